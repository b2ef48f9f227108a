"""Checkpoints: atomic writes, safe reads, clear errors, pruning."""

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from convspec.errors import SpecError
from runtime import files
from runtime.checkpoint import epoch_name, load, prune, save


def _state():
    return {"model": {"conv1.weight": torch.randn(2, 3)}, "epoch": 3, "spec": "[data]\ntype=data\n",
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.default_rng(0).bit_generator.state},
            "classes": ["cat", "dog"], "options": {"lr_scale": 0.1, "devices": None}}


def test_round_trip(tmp_path):
    state = _state()
    save(tmp_path / "a.pt", state)
    back = load(tmp_path / "a.pt")
    assert torch.equal(back["model"]["conv1.weight"], state["model"]["conv1.weight"])
    assert back["rng"]["numpy"] == state["rng"]["numpy"] and back["classes"] == ["cat", "dog"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left


def test_truncated_and_corrupted_files_name_the_file(tmp_path):
    save(tmp_path / "good.pt", _state())
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(os.urandom(2000))
    (tmp_path / "spec.cfg").write_text("[data]\ntype=data\n")
    with zipfile.ZipFile(tmp_path / "other.pt", "w") as other:  # a whole zip, not torch's: its text was cut off
        other.writestr("archive/notes.txt", "hello")
    for name, words in (("cut.pt", "checkpoint is truncated or corrupted"), ("empty.pt", "checkpoint is empty"),
                        ("junk.pt", "not a checkpoint"), ("spec.cfg", "not a checkpoint"),
                        ("other.pt", "not a checkpoint: a zip file, but not one torch.save wrote (it holds no "
                                     "data.pkl); give a run folder or one of the .pt files convspec train writes")):
        with pytest.raises(SpecError) as err:
            load(tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name}: {words}")
    assert load(tmp_path / "good.pt")["epoch"] == 3  # the older file is untouched


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/convspec-ckpt-pwned",))


def test_a_checkpoint_cannot_run_code(tmp_path):
    torch.save({"model": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(SpecError, match="was not loaded, since loading them could run code"):
        load(tmp_path / "evil.pt")
    assert not os.path.exists("/tmp/convspec-ckpt-pwned")


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    save(tmp_path / "a.pt", _state())

    def broken(*_a, **_k):
        # What torch.save's zip writer raised on a full disk (a 300 KB tmpfs).
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 119872 vs 119824")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(SpecError) as err:
        save(tmp_path / "a.pt", {"epoch": 4})
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'a.pt'}: could not write the checkpoint (the disk filled up as it "
                              "was written); ")
    monkeypatch.setattr(torch, "save", lambda *_a, **_k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(SpecError, match=r"a.pt: could not write the checkpoint \(No space left on device\); "):
        save(tmp_path / "a.pt", {"epoch": 4})
    assert message.endswith(" MiB free there: free some space or choose another --out "
                            "(--resume continues from the last checkpoint saved)")
    assert load(tmp_path / "a.pt")["epoch"] == 3 and len(list(tmp_path.iterdir())) == 1


def test_prune_keeps_the_newest(tmp_path):
    for e in range(1, 6):
        save(tmp_path / epoch_name(e), {"epoch": e})
    save(tmp_path / "best.pt", {"epoch": 2})
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "epoch-0004.pt", "epoch-0005.pt"]


def test_flipped_bytes_inside_the_weights_are_caught(tmp_path):
    """torch.load would read them as wrong weights; the zip's CRCs catch them."""
    state = {"model": {"w": torch.arange(4096, dtype=torch.float32)}}
    save(tmp_path / "good.pt", state)
    data = bytearray((tmp_path / "good.pt").read_bytes())
    start = data.index(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[:64])  # the tensor's bytes
    for i in range(start + 100, start + 164):
        data[i] ^= 0xFF
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(SpecError) as err:
        load(bad)
    assert str(err.value).startswith(f"{bad}: checkpoint is corrupted (")
    assert str(err.value).endswith("fails its checksum); use an older one from the same run")
    assert torch.equal(load(tmp_path / "good.pt")["model"]["w"], state["model"]["w"])


# runtime.files: the one way checkpoints, run records and store files are written.

def test_write_whole_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "run.json"
    target.write_text("old")
    files.write_whole(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["run.json"]


def test_a_write_cut_off_by_an_error_keeps_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "train-00000.raw.npy"
    target.write_bytes(b"whole")
    seen = []

    def half_then_full_disk(f):
        f.write(b"half")
        seen.append(Path(f.name))
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        files.write_whole(target, half_then_full_disk)
    # It was written beside the target, hidden, under a name a run folder's check knows to skip.
    assert seen[0].parent == tmp_path and files.is_partial_write(seen[0]) and not files.is_partial_write(target)
    assert target.read_bytes() == b"whole" and os.listdir(tmp_path) == [target.name]


def test_remove_partial_writes_removes_only_those(tmp_path):
    for name in (".epoch-0002.pt.tmp-4242", "epoch-0001.pt", ".hidden", "notes.tmp-1"):
        (tmp_path / name).write_bytes(b"x")
    files.remove_partial_writes(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [".hidden", "epoch-0001.pt", "notes.tmp-1"]


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-links-copy"])
def test_link_or_copy_gives_the_same_bytes_either_way(tmp_path, monkeypatch, links):
    src, dst = tmp_path / "epoch-0003.pt", tmp_path / "best.pt"
    src.write_bytes(b"weights")
    dst.write_bytes(b"older best")
    if not links:  # a file system without hard links (FAT, some network mounts)
        monkeypatch.setattr(os, "link", lambda *_: (_ for _ in ()).throw(OSError(1, "Operation not permitted")))
    files.link_or_copy(src, dst)
    assert dst.read_bytes() == b"weights" and sorted(os.listdir(tmp_path)) == ["best.pt", "epoch-0003.pt"]
    assert (os.stat(src).st_ino == os.stat(dst).st_ino) == links
