"""`convspec show` on a tiny run the tests train themselves: every picture is a
real PNG of the size index.html states, filter tiles are the stored weights
(recomputed here from the formula, and changed by changing a weight), and
the documented failures are one located line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_train import PARAMS, SPEC, make_data

import convspec
from convspec.check import check_paths
from convspec.errors import SpecError
from convspec.cli import main
from runtime import checkpoint as ckpt
from runtime import draw
from runtime.show import PICTURES, Run, ShowOptions, class_names, hidden_layers, scored_sample, show
from runtime.train import TrainOptions, train

ROOT = Path(__file__).resolve().parents[1]

# The tiny net without its conv layer: a checkpoint with no filters to draw.
FC_ONLY_SPEC = re.sub(r"\[conv1\].*?\n(?=\[pool1\])", "", SPEC, flags=re.S).replace("inputs=conv1", "inputs=data")
FC_ONLY_PARAMS = re.sub(r"\[conv1\].*?\n(?=\[fc1\])", "", PARAMS, flags=re.S)


def _train(root: Path, spec: str, params: str, epochs: int) -> Path:
    (root / "tiny.cfg").write_text(spec)
    (root / "tiny.params.cfg").write_text(params)
    out = root / "run"
    train(TrainOptions(spec=str(root / "tiny.cfg"), data=str(make_data(root / "data")), out=str(out),
                       epochs=epochs, progress=False, echo=lambda s: None))
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("show"), SPEC, PARAMS, epochs=3)


@pytest.fixture(scope="module")
def fc_run_dir(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("fc"), FC_ONLY_SPEC, FC_ONLY_PARAMS, epochs=1)


def _show(*args):
    return CliRunner().invoke(main, ["show", *map(str, args)])


def _stated_images(index: Path) -> dict[str, tuple[int, int]]:
    found = re.findall(r"<img src='([^']+)' width='(\d+)' height='(\d+)'", index.read_text())
    return {name: (int(w), int(h)) for name, w, h in found}


def test_every_picture_is_a_png_of_the_stated_size(run_dir, tmp_path):
    out = tmp_path / "pictures"
    res = _show(run_dir, "--out", out, "--count", "4", "--queries", "2")
    assert res.exit_code == 0, res.output
    stated = _stated_images(out / "index.html")
    assert set(stated) == {"curves.png", "filters-conv1.png", "preds.png", "neighbours.png", "net.png"}
    for name, size in stated.items():
        assert f"{out / name} ({size[0]}x{size[1]})" in res.output
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == size
            image.verify()
    page = (out / "index.html").read_text()
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # static: nothing fetched from a network
    assert "[conv1]" in page and "epsW=exp[base=0.001;tgtFactor=10]" in page  # the spec and params as trained
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"{100 * last['val_top1_error']:.2f}%" in page and "training time" in page


def test_default_out_is_run_show(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    res = _show(copy, "--only", "curves,net")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (copy / "show").iterdir()) == ["curves.png", "index.html", "net.png"]
    assert _show(copy, "--only", "curves").exit_code == 0  # its own index.html is replaced
    # net.png, drawn before and not now, stays listed: an index of curves alone once hid it.
    page = (copy / "show" / "index.html").read_text()
    assert list(_stated_images(copy / "show" / "index.html")) == ["curves.png"]
    assert "Drawn into this folder by an earlier show" in page and "<a href='net.png'>net.png</a>, written " in page
    assert "curves.png</a>" not in page


@pytest.mark.parametrize("name, content, message", [
    ("index.html", "<html><title>My lab page</title></html>",
     "{out}/index.html: was not written by convspec show and would be overwritten; choose another --out"),
    # Without an index.html, a user's own curves.png was once replaced without a word.
    ("curves.png", "my own picture",
     "{out}: is not empty and holds no convspec show pictures (it has curves.png); choose an empty or new --out"),
])
def test_a_folder_of_the_users_own_files_is_not_written_into(run_dir, tmp_path, name, content, message):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / name).write_text(content)
    res = _show(run_dir, "--only", "curves", "--out", mine)
    assert (res.exit_code, res.output) == (1, message.format(out=mine) + "\n")
    assert [p.name for p in mine.iterdir()] == [name] and (mine / name).read_text() == content


def test_out_that_is_a_file_is_refused_and_a_stopped_show_can_be_finished(run_dir, tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SpecError) as err:  # the CLI's own check says so first; the Python API gets this
        show(ShowOptions(run=str(run_dir), out=str(tmp_path / "a-file"), only=["curves"], echo=lambda s: None))
    assert str(err.value) == f"{tmp_path / 'a-file'}: is a file; give a folder for the pictures as --out"
    # A show stopped before its index.html leaves pictures carrying its PNG mark: running it again finishes.
    stopped = tmp_path / "stopped"
    assert _show(run_dir, "--only", "curves", "--out", stopped).exit_code == 0
    (stopped / "index.html").unlink()
    (stopped / ".DS_Store").write_text("a file browser's")
    res = _show(run_dir, "--only", "curves,net", "--out", stopped)
    assert res.exit_code == 0, res.output
    assert Image.open(stopped / "net.png").format == "PNG" and (stopped / "index.html").is_file()
    # An unmarked picture there is not show's.
    (stopped / "index.html").unlink()
    Image.new("RGB", (4, 4)).save(stopped / "mine.png")
    res = _show(run_dir, "--only", "curves", "--out", stopped)
    assert (res.exit_code, res.output) == (1, f"{stopped}: is not empty and holds no convspec show pictures (it has "
                                              "mine.png); choose an empty or new --out\n")
    # The default RUN/show lies in a folder convspec wrote: an older version's unmarked leftovers are its own.
    copy = tmp_path / "run-copy"
    shutil.copytree(run_dir, copy)
    (copy / "show").mkdir(exist_ok=True)
    for leftover in (copy / "show").iterdir():
        leftover.unlink()
    Image.new("RGB", (4, 4)).save(copy / "show" / "curves.png")
    res = _show(copy, "--only", "curves")
    assert res.exit_code == 0, res.output


def test_bad_data_or_synsets_leave_a_finished_page_as_it_was(run_dir, tmp_path):
    out = tmp_path / "page"
    assert _show(run_dir, "--only", "curves,net", "--out", out).exit_code == 0
    page = (out / "index.html").read_text()
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("n01440764 tench\n")
    for args in (["--data", tmp_path / "nowhere"], ["--only", "preds", "--synsets", wrong]):
        res = _show(run_dir, "--out", out, *args)
        assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.output
        assert (out / "index.html").read_text() == page
        assert sorted(p.name for p in out.iterdir()) == ["curves.png", "index.html", "net.png"]


def _reference_tile(kernel: np.ndarray, scale: int) -> np.ndarray:
    """The stated normalisation, written out per weight: w / max|w| onto 0..255, 0 at mid-grey."""
    peak = max(abs(float(v)) for v in kernel.flat)
    tile = np.zeros(kernel.shape[1:] + (3,), np.uint8)
    for c in range(3):
        for y in range(kernel.shape[1]):
            for x in range(kernel.shape[2]):
                tile[y, x, c] = min(255, max(0, round(127.5 + 127.5 * float(kernel[c, y, x]) / peak)))
    return tile.repeat(scale, 0).repeat(scale, 1)


def test_filter_tiles_are_computed_from_the_stored_weights(run_dir):
    state = ckpt.load(run_dir / "best.pt")
    run = Run(str(run_dir / "best.pt"))
    layer = run.checked.layers["conv1"]
    weight = state["model"]["conv1.weight"].double().numpy()
    grid = draw.filter_picture(layer, weight, state["epoch"])
    assert len(grid.boxes) == 8 and "largest |weight|" in grid.note
    pixels = np.asarray(grid.image)
    for kernel, (left, top, right, bottom) in zip(weight, grid.boxes):
        scale = (right - left) // kernel.shape[-1]
        assert (pixels[top:bottom, left:right] == _reference_tile(kernel, scale)).all()


def test_changing_a_weight_changes_its_tile_only(run_dir, tmp_path):
    state = ckpt.load(run_dir / "best.pt")
    before = _filters_png(run_dir / "best.pt", tmp_path / "before")
    state["model"]["conv1.weight"][5, 1, 2, 3] += 1.0  # far past the kernel's other weights
    ckpt.save(run_dir / "edited.pt", state)
    try:
        after = _filters_png(run_dir / "edited.pt", tmp_path / "after")
    finally:
        (run_dir / "edited.pt").unlink()
    grid = draw.filter_picture(Run(str(run_dir / "best.pt")).checked.layers["conv1"],
                               state["model"]["conv1.weight"].double().numpy(), state["epoch"])
    changed = [i for i, (l, t, r, b) in enumerate(grid.boxes) if (before[t:b, l:r] != after[t:b, l:r]).any()]
    assert changed == [5]
    left, top, right, _ = grid.boxes[5]
    scale = (right - left) // 5
    assert after[top + 2 * scale, left + 3 * scale, 1] == 255  # the edited green weight is now the kernel's peak


def _filters_png(checkpoint: Path, out: Path) -> np.ndarray:
    res = _show(checkpoint, "--only", "filters", "--out", out)
    assert res.exit_code == 0, res.output
    return np.asarray(Image.open(out / "filters-conv1.png").convert("RGB"))


@pytest.mark.parametrize("case", ["no metrics", "unknown layer", "not a conv layer", "no conv layer",
                                  "layer not drawn"])
def test_failures_are_one_located_line(case, run_dir, fc_run_dir, tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    args, message = {
        "no metrics": ([empty], f"{empty}: is not a run folder (no checkpoint, no metrics.jsonl); give a folder "
                                "that convspec train wrote (runs/NAME) or a .pt file"),
        "unknown layer": ([run_dir, "--layer", "conv2"], f"{run_dir}/best.pt: --layer conv2: no layer 'conv2' in the "
                                                         "run's spec; did you mean 'conv1'? (conv layers: conv1)"),
        "not a conv layer": ([run_dir, "--layer", "fc1"], f"{run_dir}/best.pt: --layer fc1: 'fc1' has type=fc; "
                                                          "filters are drawn for conv layers (conv1)"),
        "no conv layer": ([fc_run_dir, "--only", "filters"],
                          f"{fc_run_dir}/best.pt: the net has no conv layer, so there are no filters to draw"),
        "layer not drawn": ([run_dir, "--only", "curves,net", "--layer", "conv1"],
                            "error: --layer picks the layers of the filters picture, which --only curves,net leaves "
                            "out; add filters to --only or drop --layer"),
    }[case]
    res = _show(*args, "--out", tmp_path / "out")
    assert res.exit_code == 1
    assert res.stderr == message + "\n"
    if "--layer" in args:  # checked before any picture is drawn (curves.png was once written first)
        assert not (tmp_path / "out").exists()


def test_a_layer_named_twice_is_drawn_once(run_dir, tmp_path):
    res = _show(run_dir, "--only", "filters", "--layer", "conv1", "--layer", "conv1", "--out", tmp_path / "f")
    assert res.exit_code == 0, res.output
    assert res.output.count("wrote ") == 1 and list(_stated_images(tmp_path / "f" / "index.html")) == [
        "filters-conv1.png"]


def test_a_run_whose_data_is_gone_still_gets_its_other_pictures_and_page(tmp_path):
    """preds and neighbours need the run's images; the other pictures do not. A show
    once stopped after curves and filters, with no index.html."""
    run = _train(tmp_path, SPEC, PARAMS, epochs=1)
    (tmp_path / "data").rename(tmp_path / "moved")
    res = _show(run, "--out", tmp_path / "page")
    assert res.exit_code == 0, res.output
    gone = (f"{tmp_path / 'data'}: the run's training data is not there any more (moved or deleted?); put it back "
            "to score the held-out images (--data PATH scores every image under PATH instead)")
    assert f"skipped preds: {gone}\n" in res.output and f"skipped neighbours: {gone}\n" in res.output
    assert sorted(p.name for p in (tmp_path / "page").iterdir()) == [
        "curves.png", "filters-conv1.png", "index.html", "net.png"]
    res = _show(run, "--out", tmp_path / "asked", "--only", "preds")  # asked for by name: an error
    assert (res.exit_code, res.stderr) == (1, f"error: {gone}\n")


def test_a_full_disk_mid_picture_keeps_the_old_picture_whole(run_dir, tmp_path, monkeypatch):
    """Pictures and index.html are written whole: a show stopped while writing a PNG
    once left a truncated one, which index.html then showed broken."""
    out = tmp_path / "page"
    assert _show(run_dir, "--only", "curves,net", "--out", out).exit_code == 0
    before = {name: (out / name).read_bytes() for name in ("curves.png", "net.png", "index.html")}
    save = Image.Image.save

    def filling(self, fp, *args, **kwargs):
        if "net.png" in getattr(fp, "name", ""):
            fp.write(b"\x89PNG\r\n")  # a part, as a disk that fills up leaves it
            raise OSError(28, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", filling)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2**30, used=2**30, free=0))
    res = _show(run_dir, "--only", "curves,net", "--out", out)
    assert (res.exit_code, res.stderr) == (1, f"{out / 'net.png'}: could not write this file of the show (No space "
                                              "left on device); 0 MiB free there: free some space or choose another "
                                              "--out\n"), res.output
    assert (out / "net.png").read_bytes() == before["net.png"]  # the old picture, whole
    assert (out / "index.html").read_bytes() == before["index.html"]
    assert Image.open(out / "curves.png").format == "PNG"  # drawn again before the disk filled
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "index.html", "net.png"]  # no temporary file


def test_a_checkpoint_copied_out_of_its_run_draws_its_curves_from_its_own_history(run_dir, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(run_dir / "epoch-0002.pt", loose / "copied.pt")
    res = _show(loose / "copied.pt", "--only", "curves,net", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert {"curves.png", "net.png"} <= set(_stated_images(tmp_path / "out" / "index.html"))
    note = "loose: no metrics.jsonl here: the epochs drawn are those held in copied.pt, which end at its epoch 2."
    assert f"note: {note}\n" in res.output and note in (tmp_path / "out" / "index.html").read_text()
    assert Run(str(loose / "copied.pt")).metrics() == ckpt.load(run_dir / "epoch-0002.pt")["history"]
    assert [r["epoch"] for r in Run(str(loose / "copied.pt")).metrics()] == [1, 2]
    # A run whose metrics.jsonl is emptied draws from its newest checkpoint's history (it said "no metrics yet").
    emptied = tmp_path / "emptied"
    shutil.copytree(run_dir, emptied)
    (emptied / "metrics.jsonl").write_text("")
    res = _show(emptied, "--only", "curves", "--out", tmp_path / "out2")
    assert res.exit_code == 0, res.output
    assert [r["epoch"] for r in Run(str(emptied)).metrics()] == [1, 2, 3]
    assert "which end at its epoch 3." in res.output
    # A folder left with best.pt alone draws up to the best epoch, and says so.
    best_only = tmp_path / "best-only"
    best_only.mkdir()
    shutil.copy(run_dir / "best.pt", best_only / "best.pt")
    best_epoch = ckpt.load(run_dir / "best.pt")["epoch"]
    res = _show(best_only, "--only", "curves", "--out", tmp_path / "out3")
    assert res.exit_code == 0, res.output
    assert [r["epoch"] for r in Run(str(best_only)).metrics()] == list(range(1, best_epoch + 1))
    assert (f"note: best-only: no metrics.jsonl here: the epochs drawn are those held in best.pt, which end at its "
            f"epoch {best_epoch}.\n") in res.output
    # With metrics.jsonl in place there is nothing to say.
    res = _show(run_dir, "--only", "curves", "--out", tmp_path / "out4")
    assert res.exit_code == 0 and "note:" not in res.output, res.output


@pytest.mark.parametrize("line, problem", [
    ('{"epoch": 3, "train_loss": NaN}', "train_loss is NaN, not a finite number"),
    ('{"epoch": 3, "train_loss": Infinity}', "train_loss is Infinity, not a finite number"),
    ('{"epoch": 3, "val_top1_error": "x"}', 'val_top1_error is "x", not a finite number'),
    ('[1, 2]', 'is not a convspec metrics line (a JSON object with a whole "epoch")'),
    ('{"train_loss": 1.0}', 'is not a convspec metrics line (a JSON object with a whole "epoch")'),
])
def test_a_damaged_metrics_line_is_named(run_dir, tmp_path, line, problem):
    """Valid JSON with odd values crashed the curves (NaN to int, str <= int, a list's .get)."""
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    n = len((damaged / "metrics.jsonl").read_text().splitlines()) + 1
    with open(damaged / "metrics.jsonl", "a") as f:
        f.write(line + "\n")
    res = _show(damaged, "--only", "curves", "--out", tmp_path / "out")
    assert (res.exit_code, res.stderr) == (1, f"{damaged}/metrics.jsonl:{n}:1: {problem}; the run folder is "
                                              "damaged: restore metrics.jsonl or delete the line\n")


def test_a_flat_folder_for_show_says_what_show_needs(run_dir, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (32, 32)).save(flat / "a.png")
    res = _show(run_dir, "--only", "preds", "--data", flat, "--out", tmp_path / "out")
    assert (res.exit_code, res.stderr) == (1, f"{flat}: is a flat folder of images; show needs each image's class: "
                                              "put them in class folders (convspec eval --labels FILE scores a "
                                              "flat folder)\n")


def test_every_picture_skips_what_the_run_cannot_give(fc_run_dir, tmp_path):
    res = _show(fc_run_dir, "--out", tmp_path, "--count", "2", "--queries", "1")
    assert res.exit_code == 0, res.output
    assert "skipped filters: the net has no conv layer" in res.output
    assert set(_stated_images(tmp_path / "index.html")) == {"curves.png", "preds.png", "neighbours.png", "net.png"}
    assert "Not drawn" in (tmp_path / "index.html").read_text()


def test_unknown_picture_name_suggests_the_nearest():
    res = _show("--only", "filtres")
    assert res.exit_code == 2 and "no picture 'filtres'; did you mean 'filters'?" in res.output
    for empty in ("", ","):  # drew nothing, and replaced index.html with an empty page
        res = _show("--only", empty)
        assert res.exit_code == 2 and "names no picture; choose from curves, filters, preds, neighbours, net" \
            in res.output
    for missing in ("", "nothere"):  # '' read as runs/; a missing one was ignored when curves were not drawn
        res = _show("--compare", missing, "--only", "net")
        assert res.exit_code == 2 and f"Path '{missing}' does not exist" in res.output
    res = _show("--layer", "conv1,conv2")
    assert res.exit_code == 2 and "takes one layer name; repeat it: --layer conv1 --layer conv2" in res.output


@pytest.mark.parametrize("option, value, cap", [("--count", "100000", 256), ("--queries", "65", 64)])
def test_picture_sizes_are_capped_before_anything_is_read(option, value, cap):
    res = _show(option, value)  # no run exists: the cap is checked first
    assert res.exit_code == 2 and f"{value} is not in the range 1<=x<={cap}" in res.output


def test_too_many_neighbours_a_row_are_refused_before_anything_is_read():
    """--count 256 --queries 64 wrote a 27,804 x 8,910 PNG that Pillow refuses to open."""
    for args in (["--count", "33"], ["--count", "33", "--only", "neighbours,net"]):
        res = _show(*args)  # no run exists: refused first
        assert res.exit_code == 1 and res.output == (
            "error: --count 33: the neighbours picture draws at most 32 neighbours per image; give --count 32 or "
            "less, or --only preds for more test images\n")
    assert "at most 32" not in _show("--count", "33", "--only", "preds").output  # preds takes up to 256


def test_cli_and_library_list_the_same_pictures():
    from convspec.show_command import PICTURES as CLI_PICTURES

    assert CLI_PICTURES == PICTURES


def test_errors_only_shows_misclassified_images(run_dir):
    run = Run(str(run_dir / "epoch-0001.pt"))  # after one epoch, about half the validation images are wrong
    scored = scored_sample(run, ShowOptions(errors_only=True), 5)
    labels = scored.images.source.labels[scored.indices]
    assert len(scored.indices) == 5
    assert set(scored.indices) <= set(run.state["data"]["val_indices"].tolist())
    # Scored again another way: the loaded net, one image at a time, gets each of them wrong.
    net = convspec.load(run_dir / "epoch-0001.pt")
    images = scored.images.source.images(scored.indices)
    predicted = [net(net.preprocess(image)).argmax().item() for image in images]
    assert all(p != label for p, label in zip(predicted, labels, strict=True))
    assert predicted == scored.probs.argmax(1).tolist()


def test_neighbours_use_the_last_hidden_layer_past_dropout(run_dir):
    assert hidden_layers(Run(str(run_dir))) == ["fc1"]  # fc2 reads drop, an identity when testing


def test_synsets_give_readable_class_names(run_dir, tmp_path):
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("class0 great_white_shark, white shark\nclass2 tench\n")
    assert class_names(Run(str(run_dir)), str(synsets)) == ["great white shark", "class1", "tench", "class3"]


def test_lr_changes_are_marked_where_the_new_rate_began():
    records = [{"epoch": e, "lr_scale": s} for e, s in [(1, 1.0), (2, 1.0), (3, 0.1), (4, 0.1), (5, 0.01)]]
    assert draw.lr_changes(records) == [(2.0, 0.1), (4.0, 0.01)]


def test_compare_puts_several_runs_on_one_plot(run_dir, tmp_path):
    other = tmp_path / "other-run"
    other.mkdir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (other / "metrics.jsonl").write_text("".join(json.dumps({**r, "val_top1_error": r["val_top1_error"] / 2}) + "\n"
                                                 for r in records))
    res = _show(run_dir, "--only", "curves", "--compare", other, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert f"Error per epoch ({run_dir.name}, other-run)" in (tmp_path / "out" / "index.html").read_text()
    # The same run twice would draw one curve over another; a file in its folder counts as the folder.
    for again, message in [(run_dir / "metrics.jsonl", f"--compare {run_dir / 'metrics.jsonl'} is the run being "
                                                       "shown (the same run folder); compare other runs"),
                           (other, f"--compare {other} names the same run as --compare {other} (the same run "
                                   "folder); compare other runs")]:
        res = _show(run_dir, "--only", "curves", "--compare", other, "--compare", again, "--out", tmp_path / "out")
        assert res.exit_code == 1 and res.output.strip() == f"error: {message}", res.output


def test_two_towers_sit_side_by_side_in_their_device_colours():
    net = check_paths(ROOT / "specs" / "alexnet.cfg")
    rows = [[layer.name for layer in row] for row in draw.layer_rows(net)]
    assert rows[0] == ["data"] and rows[1] == ["conv1a", "conv1b"] and rows[-1] == ["logprob"]
    assert ["probs", "labels"] in rows  # the labels sit just above the cost that reads them
    image = np.asarray(draw.net_picture(net, ["cuda:0", "cuda:1"]))
    for gpu in (0, 1):
        tint = draw._tint(draw.PALETTE[gpu])
        rgb = tuple(int(tint[i:i + 2], 16) for i in (1, 3, 5))
        assert (image == rgb).all(-1).sum() > 1000  # box fills of that device's colour

