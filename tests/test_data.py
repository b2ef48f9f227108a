"""Data: CIFAR batches, the paper's preprocessing, the prepared store and the loader."""

import errno
import io
import json
import os
import pickle
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from convspec.errors import SpecError
from runtime import cifar, files, store
from runtime.loader import ArraySource, Batches, eval_batches, holdout, open_source
from runtime.preprocess import Augment, Stats, augment_batch, eval_views, load_square
from runtime.store import PrepareOptions, StoreSplit, prepare
from runtime.sources import content_fingerprint, fingerprint, list_flat, names_from_synsets, read_synsets

from conftest import SHARED

SAMPLES = SHARED / "datasets" / "imagenet-samples"
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is not present")


def _png(path, array):
    Image.fromarray(array).save(path)


# --- CIFAR batches ------------------------------------------------------------------------------

def _cifar_dir(tmp_path, n=6, seed=0):
    rng = np.random.default_rng(seed)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    images = rng.integers(0, 256, (n * 6, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n * 6)
    for i, name in enumerate(cifar.CIFAR10_TRAIN + [cifar.CIFAR10_TEST]):
        cifar.write_batch(root / name, images[i * n:(i + 1) * n], labels[i * n:(i + 1) * n])
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}, 2))
    return root, images, labels


def test_cifar_batches_round_trip(tmp_path):
    root, images, labels = _cifar_dir(tmp_path)
    train = cifar.load_cifar(root, "train")
    assert np.array_equal(train.images, images[:30]) and np.array_equal(train.labels, labels[:30])
    assert train.classes[:2] == ["c0", "c1"]
    assert np.array_equal(cifar.load_cifar(root, "test").images, images[30:])


def test_cifar_plane_layout(tmp_path):
    # The format stores 1024 red values, then green, then blue.
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[0, 0, 1] = (10, 20, 30)
    cifar.write_batch(tmp_path / "b", img, [0])
    data = cifar.load_batch(tmp_path / "b")["data"][0]
    assert (data[1], data[1024 + 1], data[2048 + 1]) == (10, 20, 30)


_ZEROS = np.zeros((6, 3072), np.uint8)


@pytest.mark.parametrize("batch, meta, message", [
    ({b"data": _ZEROS, b"labels": ["x"] * 6}, None,
     "data_batch_2: CIFAR batch's 'labels' must be N whole numbers, not 'x'; re-download the python version"),
    ({b"data": _ZEROS, b"labels": [2 ** 70] * 6}, None,
     "data_batch_2: CIFAR batch's 'labels' must be N whole numbers, not 1180591620717411303424; re-download the "
     "python version"),
    ({b"data": _ZEROS, b"labels": [0.5] * 6}, None,
     "data_batch_2: CIFAR batch's 'labels' must be N whole numbers, not 0.5; re-download the python version"),
    ({b"data": np.full((6, 3072), 300), b"labels": [0] * 6}, None,
     "data_batch_2: CIFAR batch's 'data' must be whole numbers 0..255, not int64 values; re-download the python "
     "version"),
    ({b"data": np.full((6, 3072), 0.5), b"labels": [0] * 6}, None,
     "data_batch_2: CIFAR batch's 'data' must be whole numbers 0..255, not float64 values; re-download the python "
     "version"),
    ({b"data": _ZEROS, b"labels": [-1] * 6}, None,
     ": CIFAR batch has label -1; labels are 0..9 (the classes in the meta file): re-download the python version"),
    ({b"data": _ZEROS, b"labels": 5}, None,
     "data_batch_2: CIFAR batch has no 'data' of N x 3072 values with matching labels"),
    ({b"data": [[1, 2], [3]], b"labels": [0, 0]}, None,
     "data_batch_2: CIFAR batch has no 'data' of N x 3072 values with matching labels"),
    (None, {b"label_names": None},
     "batches.meta: 'label_names' must be a list of class names; re-download the python version"),
    (None, {b"label_names": [[1], [2]]},
     "batches.meta: 'label_names' must be a list of class names; re-download the python version"),
    (None, {b"label_names": [b"cat", b"cat"] + [b"c%d" % i for i in range(8)]},
     "batches.meta: 'label_names' names a class twice (cat); re-download the python version"),
], ids=["str labels", "huge labels", "float labels", "data > 255", "float data", "negative label", "labels an int",
        "ragged data", "no names", "nested names", "a name twice"])
def test_bad_cifar_contents_are_named_not_cast(tmp_path, batch, meta, message):
    """Each crashed (exit 3) or was cast silently: 300 wrapped to 44, 0.5 became class 0, -1 reached the loss."""
    root, _, _ = _cifar_dir(tmp_path)
    if batch is not None:
        (root / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    if meta is not None:
        (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    with pytest.raises(SpecError) as err:
        cifar.load_cifar(root, "train")
    assert str(err.value) == str(root) + (("/" + message) if not message.startswith(":") else message)


def test_an_empty_batch_and_an_empty_name_are_plain_data(tmp_path):
    """Python 3 pickles b"" as builtins.bytes, which the safe unpickler refused as if it were code."""
    root, _, _ = _cifar_dir(tmp_path)
    (root / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, 2))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b""] + [b"c%d" % i for i in range(1, 10)]}, 2))
    train = cifar.load_cifar(root, "train")
    assert len(train.labels) == 24 and train.classes[0] == ""


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/convspec-pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _Evil()}))
    if os.path.exists("/tmp/convspec-pwned"):
        os.remove("/tmp/convspec-pwned")
    with pytest.raises(SpecError, match=r"not a CIFAR python batch \(refusing to load posix.system"):
        cifar.load_batch(path)
    assert not os.path.exists("/tmp/convspec-pwned")


def test_truncated_batch_is_a_clear_error(tmp_path):
    root, _, _ = _cifar_dir(tmp_path)
    data = (root / "data_batch_3").read_bytes()
    (root / "data_batch_3").write_bytes(data[: len(data) // 2])
    with pytest.raises(SpecError) as err:
        cifar.load_cifar(root, "train")
    assert str(err.value).startswith(f"{root / 'data_batch_3'}: not a CIFAR python batch")


# --- preprocessing ------------------------------------------------------------------------------

def test_load_square_rescales_short_side_and_crops_centre(tmp_path):
    img = np.zeros((300, 600, 3), np.uint8)  # h=300, w=600
    img[:, 150:450] = 255  # the central half is white
    _png(tmp_path / "a.png", img)
    out = load_square(str(tmp_path / "a.png"), 256)
    assert out.shape == (256, 256, 3)
    assert out[:, 2:-2].min() >= 250  # the centre crop of the 512x256 rescale is all white


def test_grayscale_and_cmyk_become_rgb(tmp_path):
    Image.fromarray(np.full((40, 50), 77, np.uint8), "L").save(tmp_path / "g.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    gray = load_square(str(tmp_path / "g.png"), 32)
    assert gray.shape == (32, 32, 3) and (gray == 77).all()
    red = load_square(str(tmp_path / "c.jpg"), 32)
    assert red.shape == (32, 32, 3) and red[..., 0].mean() > 200 and red[..., 1].mean() < 60
    # 16-bit grayscale PNG: Pillow's own conversion clipped almost every pixel to 255.
    wide = np.random.default_rng(0).integers(0, 65536, (32, 40)).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    with Image.open(tmp_path / "w.png") as img:
        assert img.mode == "I;16"
    eight = load_square(str(tmp_path / "w.png"), 32)
    assert np.array_equal(eight[..., 1], np.round(wide[:, 4:36] / 257).astype(np.uint8))  # the formula


def test_stats_match_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    a, b = Stats.empty(8), Stats.empty(8)
    a.add(images[:7])
    b.add(images[7:])
    a.merge(b)
    np.testing.assert_allclose(a.mean_image(), images.mean(0), rtol=1e-6)
    cov = np.cov(images.reshape(-1, 3).astype(np.float64).T, bias=True)
    values, vectors = a.pca()
    np.testing.assert_allclose(sorted(values), sorted(np.linalg.eigvalsh(cov)), rtol=1e-5)
    for i in range(3):  # each column is an eigenvector of the covariance
        np.testing.assert_allclose(cov @ vectors[:, i], values[i] * vectors[:, i], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(3), atol=1e-5)  # of unit length, not zero


def test_augment_batch_is_crop_of_image_minus_mean():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 10, 10, 3), dtype=np.uint8)
    mean = rng.random((10, 10, 3), dtype=np.float32) * 255
    centre = augment_batch(images, mean, Augment(6), np.random.default_rng(0))
    expected = (images.astype(np.float32) - mean)[:, 2:8, 2:8].transpose(0, 3, 1, 2)
    np.testing.assert_allclose(centre.numpy(), expected, rtol=1e-6)
    flipped = augment_batch(images, mean, Augment(10, flip=True), np.random.default_rng(3))
    full = (images.astype(np.float32) - mean).transpose(0, 3, 1, 2)
    for i in range(4):
        f = flipped[i].numpy()
        assert np.allclose(f, full[i]) or np.allclose(f, full[i][:, :, ::-1])


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_shares_of_a_batch_are_augmented_as_the_whole_batch(world):
    # Crops, flips and colour shifts drawn for the global batch, each rank taking its share [rank::world]:
    # interleaved again, the shares are the batch one process augments from the same generator state.
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (12, 10, 10, 3), dtype=np.uint8)
    mean = rng.uniform(0, 255, (10, 10, 3)).astype(np.float32)
    vals, vecs = np.array([900.0, 90.0, 9.0], np.float32), np.linalg.qr(rng.normal(size=(3, 3)))[0].astype(np.float32)
    aug = Augment(8, flip=True, random_crop=True, pca_std=0.1)
    whole = augment_batch(images, mean, aug, np.random.default_rng(7), vals, vecs)
    for rank in range(world):
        share = augment_batch(images[rank::world], mean, aug, np.random.default_rng(7), vals, vecs,
                              share=(rank, world, 12))
        assert torch.equal(share, whole[rank::world])
    alone = augment_batch(images[1::world], mean, aug, np.random.default_rng(7), vals, vecs)
    assert not torch.equal(alone, whole[1::world])  # drawn for the share alone, they differ
    with pytest.raises(ValueError, match="not rank 0's share of 12"):
        augment_batch(images[:5], mean, aug, np.random.default_rng(7), vals, vecs, share=(0, world, 12))


def test_random_crops_cover_positions_and_pca_noise_is_per_image_constant():
    images = np.zeros((64, 8, 8, 3), np.uint8)
    mean = np.zeros((8, 8, 3), np.float32)
    vals, vecs = np.array([900.0, 90.0, 9.0], np.float32), np.eye(3, dtype=np.float32)
    out = augment_batch(images, mean, Augment(8, pca_std=0.1), np.random.default_rng(0), vals, vecs)
    per_image = out.reshape(64, 3, -1)
    assert torch.allclose(per_image, per_image[:, :, :1].expand_as(per_image))  # one colour shift per image
    assert 0.1 < per_image[:, 0, 0].std().item() / (0.1 * 900 / 255) < 2  # scale alpha*lambda/255
    marked = np.zeros((1, 8, 8, 3), np.uint8)
    marked[0, 0, 0] = 255
    seen = {tuple(augment_batch(marked, mean, Augment(6, random_crop=True), np.random.default_rng(s))[0, 0]
                  .nonzero().tolist()[0]) if augment_batch(marked, mean, Augment(6, random_crop=True),
                                                           np.random.default_rng(s)).max() > 0 else None
            for s in range(40)}
    assert (0, 0) in seen and None in seen  # the marked corner is in some crops and not in others


def test_ten_views():
    images = np.arange(2 * 5 * 5 * 3, dtype=np.uint8).reshape(2, 5, 5, 3)
    views = eval_views(images, np.zeros((5, 5, 3), np.float32), 3, ten=True)
    assert views.shape == (2, 10, 3, 3, 3)
    img = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
    corners = [img[:, :, :3, :3], img[:, :, :3, 2:], img[:, :, 2:, :3], img[:, :, 2:, 2:], img[:, :, 1:4, 1:4]]
    for k, v in enumerate(corners):
        assert torch.equal(views[:, k], v) and torch.equal(views[:, k + 5], v.flip(-1))
    assert eval_views(images, np.zeros((5, 5, 3), np.float32), 3, ten=False).shape == (2, 1, 3, 3, 3)


# --- the prepared store -----------------------------------------------------------------------------

def _image_folder(tmp_path, bad=True):
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                _png(root / split / cls / f"{i}.PNG", rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8))
    if bad:
        (root / "train" / "cat" / "empty.jpg").write_bytes(b"")
        (root / "train" / "dog" / "junk.jpeg").write_bytes(b"not an image")
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        (root / "train" / "dog" / "cut.jpg").write_bytes(buf.getvalue()[:400])
        (root / "train" / "cat" / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")  # a link left behind
    return root


def test_prepare_raw_store(tmp_path):
    root = _image_folder(tmp_path)
    meta = prepare(root, tmp_path / "out", PrepareOptions(size=16, raw=True, workers=1), progress=False)
    assert meta["splits"]["train"]["count"] == 6 and meta["splits"]["val"]["count"] == 6 and meta["skipped"] == 4
    report = (tmp_path / "out" / "report.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[1] for line in report) == [
        "cut.jpg", "empty.jpg", "gone.jpg", "junk.jpeg"]
    assert "zero-byte file" in next(line for line in report if "empty.jpg" in line)
    assert next(line for line in report if "gone.jpg" in line).endswith(
        f"a link to {tmp_path / 'moved-away.jpg'}, which does not exist")
    train = StoreSplit(tmp_path / "out", "train")
    assert train.classes == ["cat", "dog"] and list(train.labels) == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(train.images([4])[0], load_square(str(root / "train" / "dog" / "1.PNG"), 16))
    pixels = np.stack([load_square(str(root / "train" / c / f"{i}.PNG"), 16) for c in ("cat", "dog") for i in range(3)])
    np.testing.assert_allclose(train.mean, pixels.mean(0), rtol=1e-5)  # the training split's mean only
    assert (tmp_path / "out" / "classes.tsv").read_text().splitlines()[1] == "1\tdog\tdog"


def test_prepare_starts_no_more_workers_by_default_than_the_cpus_it_may_use(tmp_path, monkeypatch):
    """The default --workers was the host's CPU count, while a typed --workers is held to the
    CPUs this process may run on (a container's or taskset's share): on a 64-core host with
    one CPU given, prepare started 64 decoders.  With one usable CPU it now decodes inline."""
    root = _image_folder(tmp_path, bad=False)
    monkeypatch.setattr(store, "usable_cpus", lambda: 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started with one usable CPU")
    monkeypatch.setattr(store.multiprocessing, "get_context", no_pool)
    meta = prepare(root, tmp_path / "out", PrepareOptions(size=16, raw=True), progress=False)
    assert meta["splits"]["train"]["count"] == 6


def test_images_beside_the_class_folders_are_noted_not_stored(tmp_path):
    root = _image_folder(tmp_path, bad=False) / "train"
    for name in ("b.png", "a.png"):
        _png(root / name, np.zeros((20, 20, 3), np.uint8))
    meta = prepare(root, tmp_path / "out", PrepareOptions(size=16, raw=True, workers=1), progress=False)
    assert meta["splits"]["train"]["count"] == 6 and meta["notes"] == [
        f"note: 2 images beside the class folders in {root} (a.png, ...) have no class and are not stored; "
        "move them into a class folder to use them"]
    assert [p.name for p in open_source(root, "train", size=16).loose] == ["a.png", "b.png"]


def test_a_link_whose_image_is_gone_is_named_not_dropped_or_a_crash(tmp_path):
    """A dangling link made the data's fingerprint crash (os.stat), and prepare dropped it unlisted."""
    from runtime.sources import fingerprint

    root = _image_folder(tmp_path, bad=False) / "train"
    before = fingerprint(root)
    (root / "cat" / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")
    dangling = fingerprint(root)
    with pytest.raises(SpecError) as err:
        open_source(root, "train", size=16)
    assert str(err.value) == (f"{root / 'cat' / 'gone.jpg'}: cannot read image (FileNotFoundError: [Errno 2] No such "
                              f"file or directory: '{root / 'cat' / 'gone.jpg'}'); run convspec prepare to list and "
                              "skip broken files")
    _png(tmp_path / "moved-away.jpg", np.zeros((20, 20, 3), np.uint8))
    assert len({before, dangling, fingerprint(root)}) == 3
    assert len(open_source(root, "train", size=16)) == 7


def test_training_from_a_folder_names_every_broken_image_in_one_run(tmp_path):
    """It stopped at the first: a folder with five broken files took five runs, each reading it all."""
    root = _image_folder(tmp_path) / "train"
    with pytest.raises(SpecError) as err:
        open_source(root, "train", size=16)
    first = root / "cat" / "empty.jpg"
    assert str(err.value) == (f"{first}: cannot read image (UnidentifiedImageError: cannot identify image file "
                              f"'{first}'); 3 more of the 10 images cannot be read either (cat/gone.jpg, "
                              "dog/cut.jpg, dog/junk.jpeg); run convspec prepare to list and skip broken files")


def test_prepare_jpeg_store_is_close_to_the_pixels(tmp_path):
    root = _image_folder(tmp_path, bad=False)
    ramp = np.linspace(0, 255, 32)
    smooth = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128.0), -1).astype(np.uint8)
    _png(root / "train" / "cat" / "0.PNG", smooth)  # a photo-like smooth image, not noise
    prepare(root, tmp_path / "out", PrepareOptions(size=32, quality=95, workers=2), progress=False)
    train = StoreSplit(tmp_path / "out", "train")
    assert np.abs(train.images([0])[0] - smooth.astype(float)).mean() < 2


def test_interrupted_prepare_finishes_on_rerun(tmp_path):
    root = _image_folder(tmp_path, bad=False)
    out = tmp_path / "out"
    prepare(root, out, PrepareOptions(size=16, raw=True, workers=1), progress=False)
    complete = StoreSplit(out, "train").images(range(6))
    # What a kill leaves: no store.json, a shard without its labels, a temp file.
    (out / "store.json").unlink()
    (out / "val-00000.labels.npy").unlink()
    killed_write = out / f".train-00000.raw.npy{files.PARTIAL}4242"
    killed_write.write_bytes(b"partial")
    with pytest.raises(SpecError, match="not a complete convspec store"):
        StoreSplit(out, "train")
    with pytest.raises(SpecError) as err:  # as --data
        open_source(out, "train")
    assert str(err.value) == (f"{out}: is an unfinished convspec store (no store.json); run the same convspec "
                              "prepare command again to finish it")
    prepare(root, out, PrepareOptions(size=16, raw=True, workers=1), progress=False)
    assert np.array_equal(StoreSplit(out, "train").images(range(6)), complete)
    assert len(StoreSplit(out, "val")) == 6
    assert not killed_write.exists()  # a shard's is gigabytes on ImageNet, and the rerun wrote under its own pid


# Run prepare through the CLI with each image's encoding held at a gate, so that Ctrl-C surely lands mid-way:
# a worker marks "started" and waits until the test creates "open" (a fixed sleep raced prepare on a busy machine).
# The child takes Ctrl-C as a terminal's foreground job does. A test run started as a
# background job (`pytest &`, as a nohup script does) passes SIGINT on ignored, and
# Python then installs no KeyboardInterrupt handler: without this line the test hung.
_GATED_PREPARE = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
import runtime.store as store
encode, gate = store._encode, Path(sys.argv[3])
def gated(job):
    (gate / "started").touch()
    deadline = time.monotonic() + 120
    while not (gate / "open").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return encode(job)
store._encode = gated
from convspec.cli import main
main(["prepare", sys.argv[1], sys.argv[2], "--size", "16", "--raw", "--workers", "2"], prog_name="convspec")
"""


def test_ctrl_c_stops_prepare_at_once_and_a_rerun_finishes(tmp_path):
    """Ctrl-C reaches the pool's workers too (the whole process group): before the
    workers ignored it, prepare hung for good with dead workers."""
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(0)
    root, out = tmp_path / "src", tmp_path / "out"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(60):
            _png(root / cls / f"{i}.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    gate = tmp_path / "gate"
    gate.mkdir()
    repo = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-c", _GATED_PREPARE, str(root), str(out), str(gate)]
    proc = subprocess.Popen(args, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not (gate / "started").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert (gate / "started").exists(), proc.stderr.read() if proc.poll() is not None else "no image started in 60 s"
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does, with an image in a worker's hands
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("prepare did not stop within 30 s of Ctrl-C")
    assert proc.returncode == 130  # as train's Ctrl-C (it was 1, an error's)
    assert err.strip().splitlines()[-1] == (f"{out}: interrupted; the shards written so far are kept: "
                                            "run the same command again to finish")
    assert not (out / "store.json").exists()
    (gate / "open").touch()  # the rerun goes through
    done = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(StoreSplit(out, "train")) == 120


def test_prepare_refuses_a_different_store_and_bad_paths(tmp_path):
    root = _image_folder(tmp_path, bad=False)
    prepare(root, tmp_path / "out", PrepareOptions(size=16, raw=True, workers=1), progress=False)
    with pytest.raises(SpecError) as err:
        prepare(root, tmp_path / "out", PrepareOptions(size=24, raw=False, quality=80, workers=1), progress=False)
    assert str(err.value) == (f"{tmp_path / 'out'}: already holds a different store (made with --size 16; made "
                              "with --raw); rerun with its options, choose another OUT or delete it")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(SpecError, match="is not empty and holds no convspec store"):
        prepare(root, tmp_path / "full", PrepareOptions(size=16, raw=True), progress=False)
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x.txt"]  # left as it was: no lock file either
    with pytest.raises(SpecError, match="no such dataset path"):
        prepare(tmp_path / "nope", tmp_path / "o2", PrepareOptions(), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError) as err:
        prepare(tmp_path / "empty", tmp_path / "o3", PrepareOptions(), progress=False)
    assert str(err.value) == (f"{tmp_path / 'empty'}: holds no images, class folders, CIFAR batches or prepared "
                              "store; give the folder whose sub-folders hold each class's images (CLASS/IMAGE.jpg)")
    # OUT inside SRC would be read as one more class folder next time; SRC itself is refused the same way.
    for out, where in [(root / "store", f"inside SRC {root}"), (root, "SRC itself")]:
        with pytest.raises(SpecError) as err:
            prepare(root, out, PrepareOptions(size=16, raw=True), progress=False)
        assert str(err.value) == f"{out}: is {where}; choose an OUT outside the images"
    assert not (root / "store").exists()
    # One class, or a class with no images (it would be an output never trained), are refused before writing.
    shutil.rmtree(root / "train" / "dog")
    with pytest.raises(SpecError) as err:
        prepare(root / "train", tmp_path / "o4", PrepareOptions(size=16, raw=True), progress=False)
    assert str(err.value) == (f"{root / 'train'}: holds only one class folder (cat); a classifier needs at least 2: "
                              "give the folder that holds the class folders")
    (root / "train" / "dog").mkdir()
    (root / "train" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(SpecError) as err:
        prepare(root / "train", tmp_path / "o4", PrepareOptions(size=16, raw=True), progress=False)
    assert str(err.value) == (f"{root / 'train' / 'dog'}: class folder holds no .jpg/.jpeg/.png/.bmp images; add "
                              "images or remove the folder")
    assert not (tmp_path / "o4").exists()


def test_prepare_refuses_to_finish_or_reuse_a_store_whose_source_changed(tmp_path):
    """Kept shards are found by name: a class added before the rerun of a killed prepare left every kept label
    one class off, and later shards shifted; a complete store said "already complete" of a SRC it no longer held."""
    root = _image_folder(tmp_path, bad=False)
    out, options = tmp_path / "out", PrepareOptions(size=16, raw=True, workers=1)
    prepare(root, out, options, progress=False)
    assert prepare(root, out, options, progress=False)["already_complete"]
    (root / "train" / "ant").mkdir()  # sorts first: cat would be 1, dog 2
    _png(root / "train" / "ant" / "0.png", np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(SpecError) as err:
        prepare(root, out, options, progress=False)
    assert str(err.value) == (f"{root}: changed since {out} was prepared from it (12 images then, 13 now); the store "
                              f"holds the old images: delete {out} and prepare again, or prepare into a new folder")
    (out / "store.json").unlink()  # what a killed run leaves
    (out / "val-00000.labels.npy").unlink()
    with pytest.raises(SpecError) as err:
        prepare(root, out, options, progress=False)
    assert str(err.value) == (f"{root}: changed since {out} was started (12 images then, 13 now), so its finished "
                              f"shards no longer match it: delete {out} and prepare again, or prepare into a new "
                              "folder")
    shutil.rmtree(root / "train" / "ant")
    first = (root / "train" / "cat" / "0.PNG").read_bytes()
    _png(root / "train" / "cat" / "0.PNG", np.zeros((40, 40, 3), np.uint8))  # as many images, one of them replaced
    with pytest.raises(SpecError) as err:
        prepare(root, out, options, progress=False)
    assert str(err.value).startswith(f"{root}: changed since {out} was started (12 images then and now, but other "
                                     "file names, sizes or classes), so")
    (root / "train" / "cat" / "0.PNG").write_bytes(first)
    # A store started by a convspec that recorded no listing (and read hidden files) cannot be finished safely.
    recorded = json.loads((out / "prepare.json").read_text())
    del recorded["listing"]
    (out / "prepare.json").write_text(json.dumps(recorded))
    with pytest.raises(SpecError) as err:
        prepare(root, out, options, progress=False)
    assert str(err.value) == (f"{out}: was started by an older convspec, which did not record what {root} held, so "
                              f"its finished shards cannot be checked against it: delete {out} and prepare again")
    shutil.rmtree(out)
    assert prepare(root, out, options, progress=False)["splits"]["val"]["count"] == 6
    assert prepare(root, out, options, progress=False)["already_complete"]


@pytest.mark.parametrize("error, said", [
    (OSError(errno.ENOSPC, "No space left on device"), "[Errno 28] No space left on device"),
    (OSError("1572864 requested and 98176 written"), "1572864 requested and 98176 written"),  # numpy's fwrite
], ids=["errno", "numpy"])
def test_a_full_disk_during_prepare_names_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch, error, said):
    """It said only "error: 1572864 requested and 98176 written; ..." and left the shard's .tmp behind."""
    root = _image_folder(tmp_path, bad=False)
    out = tmp_path / "out"
    save = np.save

    def filling(file, array, *args, **kwargs):
        if f".raw.npy{files.PARTIAL}" in getattr(file, "name", ""):
            file.write(b"\x93NUMPY" + bytes(100))  # a part, as a disk that fills up leaves it
            raise error
        return save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", filling)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2**30, used=2**30, free=0))
    with pytest.raises(SpecError) as err:
        prepare(root, out, PrepareOptions(size=16, raw=True, workers=1), progress=False)
    assert str(err.value) == (f"{out / 'train-00000.raw.npy'}: could not write this store file, the disk is full "
                              f"({said}); 0 MiB free there: free some space and run the same command again to finish "
                              "(the shards written so far are kept), or prepare into another OUT")
    assert sorted(p.name for p in out.iterdir()) == [store.PREPARE_LOCK, "prepare.json"]


def test_a_second_prepare_into_a_store_being_written_is_refused_and_then_finishes(tmp_path):
    """Two prepares into one OUT wrote each other's shards and deleted each other's
    half-written ones; the second now stops at once and names the first."""
    root = _image_folder(tmp_path, bad=False)
    out, options = tmp_path / "out", PrepareOptions(size=16, raw=True, workers=1)
    out.mkdir()
    held = files.hold_lock(out / store.PREPARE_LOCK)  # as the first prepare holds it (flock is per open file)
    try:
        with pytest.raises(SpecError) as err:
            prepare(root, out, options, progress=False)
        assert str(err.value) == (f"{out}: another convspec prepare is writing this store (pid {os.getpid()} on "
                                  f"{socket.gethostname()}); wait for it to finish (then this command has nothing "
                                  "left to do), or choose another OUT")
        assert sorted(p.name for p in out.iterdir()) == [store.PREPARE_LOCK]  # nothing written
    finally:
        os.close(held)
    meta = prepare(root, out, options, progress=False)  # the lock let go: it runs
    assert meta["splits"]["train"]["count"] > 0 and (out / "store.json").is_file()
    assert prepare(root, out, options, progress=False)["already_complete"]


def test_a_resumed_prepare_still_reports_the_images_skipped_before(tmp_path):
    """Skipped images were kept in memory only: those of shards written before a kill left report.txt and the count."""
    root = _image_folder(tmp_path)
    out, options = tmp_path / "out", PrepareOptions(size=16, raw=True, workers=1)
    prepare(root, out, options, progress=False)
    report = (out / "report.txt").read_text()
    for name in ("store.json", "report.txt", "val-00000.labels.npy"):  # killed while writing the val split
        (out / name).unlink()
    meta = prepare(root, out, options, progress=False)
    assert meta["skipped"] == 4 and (out / "report.txt").read_text() == report


def test_a_class_whose_every_image_is_unreadable_is_refused(tmp_path):
    """It became a class of 0 images, which training then made an output never trained, without a word."""
    root = _image_folder(tmp_path, bad=False) / "train"
    for image in (root / "dog").iterdir():
        image.write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(SpecError) as err:
        prepare(root, out, PrepareOptions(size=16, raw=True, workers=1), progress=False)
    assert str(err.value) == (f"{root / 'dog'}: no image of this class folder could be read (3 files listed in "
                              f"{out / 'report.txt'}); a class without images would be an output never trained: "
                              f"replace the images or remove the folder, then delete {out} and prepare again")
    assert len((out / "report.txt").read_text().splitlines()) == 3 and not (out / "store.json").exists()


def test_a_class_name_with_a_tab_or_newline_stays_one_classes_tsv_field():
    from runtime.store import _tsv

    assert _tsv("a\tb\nc") == "a b c" and _tsv("n01440764") == "n01440764"


def test_prepare_cifar_batches(tmp_path):
    root, images, _ = _cifar_dir(tmp_path)
    meta = prepare(root, tmp_path / "out", PrepareOptions(raw=True, workers=1), progress=False)
    assert meta["size"] == 32 and meta["splits"]["test"]["count"] == 6
    assert np.array_equal(StoreSplit(tmp_path / "out", "train").images(range(30)), images[:30])
    # The store records the size it holds (it recorded the unused default, 256), and --size 32 is the same store.
    assert '"size": 32' in (tmp_path / "out" / "prepare.json").read_text()
    assert prepare(root, tmp_path / "out", PrepareOptions(size=32, raw=True, workers=1), progress=False)["size"] == 32
    # --size does not rescale CIFAR batches: another value was ignored without a word; now it is refused.
    with pytest.raises(SpecError) as err:
        prepare(root, tmp_path / "out24", PrepareOptions(size=24, raw=True, workers=1), progress=False)
    assert str(err.value) == (f"{root}: holds CIFAR batches, which are stored at their own 32x32; --size rescales "
                              "image folders only: drop --size")
    assert not (tmp_path / "out24").exists()


@needs_samples
def test_prepare_real_imagenet_samples_including_grayscale(tmp_path):
    src = tmp_path / "inet"
    gray = []
    for d in sorted(SAMPLES.iterdir())[:40]:  # links, not copies, to a few real classes
        (src / d.name).mkdir(parents=True)
        for f in d.iterdir():
            (src / d.name / f.name).symlink_to(f)
            with Image.open(f) as im:
                if im.mode != "RGB":
                    gray.append(f)
    meta = prepare(src, tmp_path / "out", PrepareOptions(workers=2), SHARED / "datasets" / "imagenet-synsets.txt",
                   progress=False)
    assert meta["splits"]["train"]["count"] == 40 and meta["skipped"] == 0
    assert meta["classes"][0] == {"index": 0, "folder": "n01440764", "name": "tench"}
    store = StoreSplit(tmp_path / "out", "train")
    assert store.images([0, 39]).shape == (2, 256, 256, 3)


# --- the loader -------------------------------------------------------------------------------------

def test_holdout_is_fixed_and_disjoint():
    a, b = holdout(100, 0.1, 7)
    assert len(b) == 10 and not set(a) & set(b) and len(a) + len(b) == 100
    assert np.array_equal(holdout(100, 0.1, 7)[1], b) and not np.array_equal(holdout(100, 0.1, 8)[1], b)


def _source(n=40, classes=10):
    rng = np.random.default_rng(0)
    return ArraySource(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % classes,
                       [str(i) for i in range(classes)])


def test_batches_are_deterministic_per_epoch_and_sharded_by_rank():
    source = _source(classes=40)  # each image its own label, so the labels seen name the images seen
    idx = np.arange(40)
    make = lambda **kw: Batches(source, idx, 4, Augment(6, flip=True, random_crop=True), seed=3, **kw)
    e1 = [(x.clone(), y.clone()) for x, y in make().epoch(1)]
    again = list(make().epoch(1))
    assert len(e1) == len(again) == 10
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(e1, again))
    e2 = [y for _, y in make().epoch(2)]
    assert len(e2) == 10 and not all(torch.equal(a[1], b) for a, b in zip(e1, e2))
    ranks = [[y for _, y in make(rank=r, world=2).epoch(1)] for r in (0, 1)]
    assert all(len(y) == 4 for r in ranks for y in r)
    seen = [sorted(np.concatenate([y.numpy() for y in r]).tolist()) for r in ranks]
    assert sorted(seen[0] + seen[1]) == list(range(40))  # every image once, over both ranks
    assert len(seen[0]) == len(seen[1]) == 20


def test_workers_do_not_change_the_batches(tmp_path):
    root = _image_folder(tmp_path, bad=False)
    prepare(root, tmp_path / "out", PrepareOptions(size=16, workers=1), progress=False)
    source = open_source(tmp_path / "out", "train")
    make = lambda w: Batches(source, np.arange(6), 2, Augment(12, flip=True, random_crop=True, pca_std=0.1),
                             seed=0, workers=w)
    alone, pooled = list(make(0).epoch(0)), list(make(2).epoch(0))
    assert len(alone) == len(pooled) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(alone, pooled))


def test_labels_and_synsets_files_that_are_not_utf8_are_one_located_line(tmp_path):
    latin1 = tmp_path / "synsets.txt"
    latin1.write_bytes(b"n01 tabby\nn02 caf\xe9 au lait\n")  # saved as Latin-1
    expected = f"{latin1}:2:8: is not UTF-8 text (bad byte 0xe9); save it as UTF-8"
    for read in (lambda: read_synsets(latin1), lambda: list_flat(tmp_path, latin1, ["n01", "n02"])):
        with pytest.raises(SpecError) as err:
            read()
        assert str(err.value) == expected


def test_a_labels_file_bom_spaces_twice_numbers_and_the_wrong_folder(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a b.png", "c.png"):
        _png(flat / name, np.zeros((8, 8, 3), np.uint8))
    labels = tmp_path / "labels.txt"
    labels.write_bytes("\ufeffa b.png dog\nc.png cat\n".encode())  # a BOM, and a file name with a space
    listing = list_flat(flat, labels, ["cat", "dog"])
    assert [(p.name, c) for p, c in listing.items] == [("a b.png", 1), ("c.png", 0)]
    for text, message in [
        ("c.png cat\na b.png dog\nc.png dog\n", f"{labels}:3:1: 'c.png' is labelled twice (first at line 1); "
                                                "keep one line"),
        ("c.png 1\n", f"{labels}:1:1: class '1' is not one of the 2 training classes (classes are the run's class "
                      "folder names, not numbers)"),
    ]:
        labels.write_text(text)
        with pytest.raises(SpecError) as err:
            list_flat(flat, labels, ["cat", "dog"])
        assert str(err.value).split("\n")[0] == message
    # --labels beside data that has its own classes was ignored, even when the file was wrong.
    folders = _image_folder(tmp_path / "f", bad=False) / "val"
    with pytest.raises(SpecError) as err:
        open_source(folders, "val", classes=["cat", "dog"], labels_file=labels)
    assert str(err.value) == (f"{folders}: holds class folders, which carry their own classes; leave --labels out "
                              "(it labels a flat folder of images)")


def test_a_damaged_store_is_one_line_naming_the_file(tmp_path):
    root = _image_folder(tmp_path, bad=False)
    raw, jpeg = tmp_path / "raw", tmp_path / "jpeg"
    prepare(root, raw, PrepareOptions(size=16, raw=True, workers=1), progress=False)
    prepare(root, jpeg, PrepareOptions(size=16, workers=1), progress=False)
    fix = "the store is damaged: run convspec prepare again into a new folder"
    shard = raw / "train-00000.raw.npy"
    shard.write_bytes(shard.read_bytes()[:1000])  # cut short, as a full disk or a bad copy leaves it
    with pytest.raises(SpecError) as err:
        open_source(raw, "train")
    assert str(err.value).startswith(f"{shard}: cannot be read (ValueError: ") and str(err.value).endswith(fix)
    (raw / "store.json").write_text("{not json")
    with pytest.raises(SpecError, match=r"store.json: cannot be read \(JSONDecodeError: .*the store is damaged"):
        open_source(raw, "train")

    # Bytes of one JPEG overwritten: decoding it fails in-process and in a DataLoader worker alike,
    # as one line naming the shard (a worker's error used to arrive wrapped in its traceback).
    data = bytearray((jpeg / "train-00000.jpeg.npy").read_bytes())
    offsets = np.load(jpeg / "train-00000.offsets.npy")
    start = len(data) - int(offsets[-1])  # the .npy header comes first
    data[start + int(offsets[2]): start + int(offsets[3])] = bytes(int(offsets[3] - offsets[2]))
    (jpeg / "train-00000.jpeg.npy").write_bytes(bytes(data))
    source = open_source(jpeg, "train")
    expected = (f"{jpeg / 'train-00000.jpeg.npy'}: image 2 of this shard cannot be decoded "
                f"(UnidentifiedImageError); {fix}")
    for workers in (0, 1):
        batches = Batches(source, np.arange(6), 6, Augment(16), seed=0, shuffle=False, workers=workers)
        with pytest.raises(SpecError) as err:
            list(batches.epoch(0))
        assert str(err.value) == expected, workers


@pytest.mark.parametrize("damage, file, message", [
    (lambda out: np.save(out / "mean.npy", np.zeros((64, 64, 3), np.float32)), "mean.npy",
     "holds a mean image of shape (64, 64, 3), not (16, 16, 3)"),
    (lambda out: np.save(out / "train-00000.labels.npy", np.array([0, 0, 99, 1, 1, 1])), "train-00000.labels.npy",
     "holds label 99, but the store has 2 classes (0..1)"),
    (lambda out: (out / "train-00000.raw.npy").unlink(), "train-00000.raw.npy", "is missing"),
], ids=["mean", "label", "shard gone"])
def test_a_store_damaged_where_no_read_fails_is_named_when_opened(tmp_path, damage, file, message):
    """A wrong mean broke the first batch and a wrong label the loss, each as "a convspec bug" (exit 3);
    a deleted shard said only "No such file or directory"."""
    out = tmp_path / "out"
    prepare(_image_folder(tmp_path, bad=False), out, PrepareOptions(size=16, raw=True, workers=1), progress=False)
    damage(out)
    with pytest.raises(SpecError) as err:
        open_source(out, "train")
    assert str(err.value) == (f"{out / file}: {message}; the store is damaged: run convspec prepare again into a "
                              "new folder")


def test_eval_batches_and_open_source_kinds(tmp_path):
    root, images, labels = _cifar_dir(tmp_path)
    source = open_source(root, "train")
    views, y = next(eval_batches(source, np.arange(5), 5, 24, ten_views=True))
    assert views.shape == (5, 10, 3, 24, 24) and torch.equal(y, torch.from_numpy(labels[:5]))
    folder = open_source(_image_folder(tmp_path / "f", bad=False), "val", size=16)
    assert len(folder) == 6 and folder.mean.shape == (16, 16, 3)
    with pytest.raises(SpecError, match="wants 40x40 crops but the images are 32x32"):
        Batches(source, np.arange(5), 2, Augment(40))


def test_random_crops_and_flips_equal_a_direct_reference():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 12, 12, 3), dtype=np.uint8)
    mean = rng.random((12, 12, 3), dtype=np.float32) * 255
    out = augment_batch(images, mean, Augment(8, flip=True, random_crop=True), np.random.default_rng(5)).numpy()
    replay = np.random.default_rng(5)  # the same draws, in augment_batch's order
    ys, xs, flips = replay.integers(0, 5, 16), replay.integers(0, 5, 16), replay.random(16) < 0.5
    assert 0 < flips.sum() < 16
    for i in range(16):
        expected = (images[i].astype(np.float32) - mean)[ys[i]:ys[i] + 8, xs[i]:xs[i] + 8]
        if flips[i]:
            expected = expected[:, ::-1]
        np.testing.assert_allclose(out[i], expected.transpose(2, 0, 1), rtol=1e-6)


def test_prepare_refuses_to_upscale_every_image(tmp_path):
    root = _image_folder(tmp_path, bad=False)  # 20-22 x 30 px images
    with pytest.raises(SpecError) as err:
        prepare(root, tmp_path / "out", PrepareOptions(size=256, raw=True, workers=1), progress=False)
    assert err.value.message == ("the images are at most 30 px but --size is 256, which would upscale every one; "
                                 "pass --size 20 (e.g. --size 32 --raw for CIFAR)")
    assert prepare(root, tmp_path / "out", PrepareOptions(size=16, raw=True, workers=1),
                   progress=False)["splits"]["train"]["count"] == 6


def test_batches_kept_by_the_caller_are_never_overwritten():
    source = _source(64)
    make = lambda: Batches(source, np.arange(64), 8, Augment(6, flip=True, random_crop=True), seed=1)
    kept = [x.clone() for x, _ in make().epoch(0)]  # reference copies
    held = [x for x, _ in make().epoch(0)]          # the caller keeps every batch
    assert len({x.data_ptr() for x in held}) == len(held)
    assert all(torch.equal(a, b) for a, b in zip(kept, held))


def test_dropped_batches_recycle_their_buffers():
    source = _source(64)
    pointers = [x.data_ptr() for x, _ in Batches(source, np.arange(64), 8, Augment(6), seed=1).epoch(0)]
    assert len(set(pointers)) < len(pointers)  # a buffer came back once its batch was dropped


def test_a_synsets_file_that_names_no_class_folder_is_refused_and_gaps_are_noted(tmp_path):
    """A wrong --synsets file was once taken without a word: every class kept its folder name."""
    root = _image_folder(tmp_path, bad=False)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("n01440764 tench\nn01443537 goldfish\n")
    with pytest.raises(SpecError) as err:
        prepare(root, tmp_path / "out", PrepareOptions(size=16, raw=True, workers=1), synsets=wrong, progress=False)
    assert str(err.value) == (f"{wrong}: names none of the 2 classes (e.g. cat); give the synsets file of this "
                              "data (lines of 'CLASS name'), or leave --synsets out")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    half = tmp_path / "half.txt"
    half.write_text("cat house cat, Felis catus\n")
    assert names_from_synsets(half, ["cat", "dog"]) == (
        {"cat": "house cat, Felis catus"},
        f"1 of 2 classes are not named in {half} (e.g. dog); they keep their own names")
    meta = prepare(root, tmp_path / "out", PrepareOptions(size=16, raw=True, workers=1), synsets=half, progress=False)
    assert [c["name"] for c in meta["classes"]] == ["house cat, Felis catus", "dog"]
    assert meta["notes"] == [f"note: 1 of 2 classes are not named in {half} (e.g. dog); they keep their "
                             "own names"]


def test_stores_of_the_same_images_have_one_content_fingerprint(tmp_path):
    """Machines compare their data as they start: two stores prepared from copies of one folder
    differed by the source path in store.json, and were refused as other data."""
    root = _image_folder(tmp_path, bad=False)
    shutil.copytree(root, tmp_path / "copy")
    prepare(root, tmp_path / "a", PrepareOptions(size=16, workers=1), progress=False)
    prepare(tmp_path / "copy", tmp_path / "b", PrepareOptions(size=16, workers=1), progress=False)
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "b")  # a resume's check keeps the source
    assert content_fingerprint(tmp_path / "a") == content_fingerprint(tmp_path / "b")
    assert content_fingerprint(root) == fingerprint(root) == fingerprint(tmp_path / "copy")
    prepare(root, tmp_path / "c", PrepareOptions(size=20, workers=1), progress=False)
    assert content_fingerprint(tmp_path / "c") != content_fingerprint(tmp_path / "a")
