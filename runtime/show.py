"""``convspec show``: a trained run as pictures -- the figures cuda-convnet's
shownet drew and the AlexNet paper printed -- in PNG files and one static
``index.html`` (no server, no network) in ``RUN/show/``.

    convspec show                                      # newest run under runs/, every picture
    convspec show runs/alexnet-20261128-101500 --only filters,net
    show(ShowOptions(run="runs/c10", only=["curves"], compare=["runs/c10-lrn"]))

- curves: error and loss per epoch from metrics.jsonl, learning-rate changes marked;
- filters: conv kernels as tiles computed from the checkpoint's weights (Figure 3);
- preds: test images with their top-5 classes, the true one in red (Figure 4, left);
- neighbours: the training images nearest in the last hidden layer (Figure 4, right);
- net: the checked graph, one colour per gpu= group.

This module reads the run and computes what to draw; :mod:`runtime.draw`
lays the pictures out.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from convspec.errors import Location, SpecError, did_you_mean, fail, read_utf8
from convspec.layers import Layer

from . import checkpoint as ckpt
from . import draw, files, runs

PICTURES = ("curves", "filters", "preds", "neighbours", "net")


PLOTTED_METRICS = ("step", "train_loss", "train_error", "val_top1_error", "val_top5_error", "k", "lr_scale",
                   "seconds", "val_seconds", "images_per_s", "train_seconds", "val_images")


def _bad_metrics_record(record) -> str | None:
    """What is wrong with one metrics.jsonl record, or None: the pictures need an
    epoch number and finite numbers (json reads NaN and Infinity as floats)."""
    if not isinstance(record, dict) or isinstance(record.get("epoch"), bool) \
            or not isinstance(record.get("epoch"), int):
        return 'is not a convspec metrics line (a JSON object with a whole "epoch")'
    for key in PLOTTED_METRICS:  # keys a later version adds are not this reader's business
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            return f"{key} is {json.dumps(value)[:40]}, not a finite number"
    return None


@dataclass
class ShowOptions:
    run: str | None = None  # a run folder or one of its .pt files; None: the newest under runs_root
    out: str | None = None  # default: RUN/show
    only: list[str] | None = None  # None: every picture, skipping (with a note) those the run cannot give
    compare: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    data: str | None = None  # test images for preds and neighbours; default: the run's validation images
    synsets: str | None = None
    count: int | None = None  # preds: test images (16); neighbours: neighbours per image (6)
    queries: int = 5  # neighbours: test images (rows)
    errors_only: bool = False
    search_limit: int = 10_000  # neighbours: training images searched (0: all)
    devices: list[str] | None = None
    runs_root: str = "runs"
    progress: bool = False
    echo: Callable[[str], None] = print


@dataclass
class Picture:
    file: str
    title: str
    caption: str
    width: int
    height: int


@dataclass
class ShowResult:
    out: Path
    pictures: list[Picture]
    skipped: list[str]
    index: Path


class Unavailable(SpecError):
    """A picture this run cannot give: an error when asked for by name, a
    skipped picture (with a note) when every picture was asked for."""


def show(o: ShowOptions) -> ShowResult:
    run = Run(o.run, o.runs_root, o.devices)
    run.metrics()  # no epoch finished yet: nothing worth showing
    _refuse_repeated_runs(run, o.compare, o.runs_root)
    out = Path(o.out) if o.out else run.dir / "show"
    index = out / "index.html"
    _refuse_a_folder_show_did_not_write(out, index, default=not o.out)
    wanted = PICTURES if o.only is None else tuple(o.only)
    # Options are checked before any picture is drawn: a typo once left a folder of half the pictures.
    if o.layers:
        if "filters" not in wanted:
            raise fail(f"--layer picks the layers of the filters picture, which --only {','.join(wanted)} leaves "
                       "out; add filters to --only or drop --layer")
        filter_layers(run.checked, o.layers, run.where())
    if {"preds", "neighbours"} & set(wanted):
        if o.data:
            images_to_show(run, o.data)
        if o.synsets:
            class_names(run, o.synsets)
    out.mkdir(parents=True, exist_ok=True)
    drawers = {"curves": _curves, "filters": _filters, "preds": _preds, "neighbours": _neighbours, "net": _net}
    pictures, skipped = [], []
    for name in (p for p in PICTURES if p in wanted):
        try:
            made = drawers[name](run, o)
        except Unavailable as why:
            if o.only is not None:
                raise
            skipped.append(f"{name}: {why.message}")
            o.echo(f"skipped {name}: {why.message}")
            continue
        for picture, image in made:
            # Whole or not at all: a show stopped mid-write once left a truncated PNG to be shown.
            _write(out / picture.file, lambda f, image=image: image.save(f, format="PNG", optimize=True,
                                                                         pnginfo=_png_mark()))
            pictures.append(picture)
            o.echo(f"wrote {out / picture.file} ({picture.width}x{picture.height})")
    # A show --only into an earlier show's folder once wrote an index of its own pictures
    # alone, and the others stayed there unlisted: they are listed, dated, as earlier.
    drawn = {p.file for p in pictures}
    earlier = sorted(p for p in out.glob("*.png") if p.name not in drawn and (not o.out or _written_by_show(p)))
    page = index_html(run, pictures, skipped, earlier)
    _write(index, lambda f: f.write(page.encode()))
    return ShowResult(out, pictures, skipped, index)


def _write(path: Path, write) -> None:
    """One of show's files, written whole; a failure names the file (a bare "[Errno 28] No
    space left on device" did not) and leaves the file as it was."""
    try:
        files.write_whole(path, write)
    except OSError as err:
        raise fail(f"could not write this file of the show ({err.strerror or ' '.join(str(err).split())[:120]}); "
                   f"{files.free_space(path.parent)}free some space or choose another --out",
                   Location(str(path))) from None


PNG_MARK = ("Software", "convspec show")  # a text chunk in every picture show writes


def _png_mark():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(*PNG_MARK)
    return info


def _written_by_show(path: Path) -> bool:
    from PIL import Image

    if not path.name.endswith(".png"):
        return False
    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get(PNG_MARK[0]) == PNG_MARK[1]
    except (OSError, ValueError):
        return False


def _refuse_a_folder_show_did_not_write(out: Path, index: Path, default: bool) -> None:
    """Show overwrites its own files only: a user's curves.png was once replaced without a
    word.  Its own are a marked index.html, pictures carrying its PNG mark (left by a show
    stopped before its index.html), or anything in the default RUN/show, which lies inside
    a run folder convspec wrote (older versions left pictures there unmarked)."""
    if index.is_file():
        if INDEX_MARK not in index.read_text(errors="replace")[:500]:
            raise fail("was not written by convspec show and would be overwritten; choose another --out",
                       Location(str(index)))
    elif out.exists() and not out.is_dir():
        raise fail("is a file; give a folder for the pictures as --out", Location(str(out)))
    elif out.is_dir() and not default:
        foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and not _written_by_show(p))
        if foreign:
            raise fail(f"is not empty and holds no convspec show pictures (it has {', '.join(foreign[:3])}"
                       f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new --out", Location(str(out)))


def _refuse_repeated_runs(run: "Run", compare: list[str], root: str) -> None:
    """A run compared with itself draws one curve over another, which reads as two runs that agree."""
    seen = {run.dir.resolve(): "is the run being shown"}
    for other in compare:
        folder = Run(other, root).dir.resolve()
        if folder in seen:
            raise fail(f"--compare {other} {seen[folder]} (the same run folder); compare other runs")
        seen[folder] = f"names the same run as --compare {other}"


class Run:
    """A run folder, its metrics and, read on first use, its checkpoint."""

    def __init__(self, path: str | None, root: str = "runs", devices: list[str] | None = None):
        given = Path(path) if path else runs.newest_run(Path(root), "convspec show RUN")
        if given.is_file():
            self.dir, self.given_checkpoint = given.parent, given
        elif given.is_dir():
            self.dir, self.given_checkpoint = given, None
        else:
            raise fail("no such run folder; give a folder that convspec train wrote (runs/NAME)",
                       Location(str(given)))
        self.name = self.dir.name
        self.devices = devices or (["cuda:0"] if torch.cuda.is_available() else ["cpu"])
        self.history_note = ""  # set by metrics() when the epochs come from a checkpoint
        self.images_shown: dict[str | None, "ImageSet"] = {}  # images_to_show's, by --data

    def metrics(self) -> list[dict]:
        path = self.dir / runs.METRICS
        records = []
        if path.is_file():
            for n, line in enumerate(read_utf8(path).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise fail("is not one JSON object per line (the run folder is damaged)",
                               Location(str(path), n, 1)) from None
                problem = _bad_metrics_record(record)
                if problem:
                    raise fail(f"{problem}; the run folder is damaged: restore metrics.jsonl or delete the line",
                               Location(str(path), n, 1))
                records.append(record)
        source = None
        if not records and self.given_checkpoint is not None:
            # A checkpoint copied out of its run folder still holds the history up to it.
            records, source = [dict(r) for r in self.state.get("history", [])], self.given_checkpoint
        elif not records and runs.has_checkpoints(self.dir):
            # metrics.jsonl lost or emptied: the checkpoint furthest into training holds the same records.
            source = runs.resume_checkpoint(self.dir)
            records = [dict(r) for r in ckpt.load_training(source).get("history", [])]
        if records and source is not None:
            # A history ends at its checkpoint's epoch (best.pt's at the best one): the picture says so.
            self.history_note = (f"no {runs.METRICS} here: the epochs drawn are those held in {source.name}, "
                                 f"which end at its epoch {records[-1].get('epoch', len(records))}.")
        if not records:
            if not any(self.dir.glob("*.pt")):
                raise fail("is not a run folder (no checkpoint, no metrics.jsonl); give a folder that convspec "
                           "train wrote (runs/NAME) or a .pt file", Location(str(self.dir)))
            raise fail("no metrics yet (metrics.jsonl is missing or empty): no epoch has finished; "
                       "run convspec show again after the first epoch", Location(str(path)))
        return records

    @cached_property
    def checkpoint(self) -> Path:
        return self.given_checkpoint or runs.eval_checkpoint(self.dir)

    @cached_property
    def state(self) -> dict:
        return ckpt.load_training(self.checkpoint)

    @cached_property
    def checked(self):
        return runs.checked_net_from(self.state, str(self.checkpoint))

    @cached_property
    def net(self):
        return runs.net_from_checkpoint(self.state, self.devices, str(self.checkpoint))

    def where(self) -> Location:
        return Location(str(self.checkpoint))


# --- curves --------------------------------------------------------------------------


def _curves(run: Run, o: ShowOptions):
    drawn = [run, *(Run(other, o.runs_root) for other in o.compare)]
    series = []
    for r in drawn:
        series.append((r.name if r.name not in dict(series) else str(r.dir), r.metrics()))
    image = draw.curves_picture(series)
    names = ", ".join(name for name, _ in series)
    caption = (f"Error per epoch ({names}): validation top-1 and top-5 on the held-out images, and top-1 on "
               "the training minibatches as trained (augmentation and dropout on; training top-5 is not "
               "recorded); below, the training loss. Dashed verticals mark learning-rate changes, labelled "
               "with the new multiple of the base rate.")
    notes = [f"{name}: {r.history_note}" for (name, _), r in zip(series, drawn) if r.history_note]
    for note in notes:
        o.echo(f"note: {note}")
    caption = " ".join([caption, *notes])
    return [(Picture("curves.png", "Training curves", caption, *image.size), image)]


# --- filters -------------------------------------------------------------------------


def _filters(run: Run, o: ShowOptions):
    made = []
    layers = run.checked.layers
    for layer in filter_layers(run.checked, o.layers, run.where()):
        reads_image = any(layers[s].type == "data" for s in layer.inputs)
        grid = draw.filter_picture(layer, layer_weight(run.state["model"], layer, run.checked), run.state["epoch"],
                                   colour=reads_image)
        made.append((Picture(f"filters-{layer.name}.png", f"Filters of {layer.name}", grid.note, *grid.image.size),
                     grid.image))
    return made


def filter_layers(checked, requested: list[str], where: Location) -> list[Layer]:
    """The layers named by --layer, else every conv layer fed by the data layer."""
    layers = checked.layers
    convs = [l for l in layers.values() if l.type == "conv"]
    if not convs:
        message = "the net has no conv layer, so there are no filters to draw"
        raise fail(message, where) if requested else Unavailable(message, where)
    for name in requested:
        if name not in layers:
            raise fail(f"--layer {name}: no layer '{name}' in the run's spec{did_you_mean(name, layers)} "
                       f"(conv layers: {', '.join(l.name for l in convs)})", where)
        if layers[name].type != "conv":
            raise fail(f"--layer {name}: '{name}' has type={layers[name].type}; filters are drawn for conv "
                       f"layers ({', '.join(l.name for l in convs)})", where)
    if requested:
        return [layers[n] for n in dict.fromkeys(requested)]  # --layer conv1 twice: one picture, written once
    first = [l for l in convs if any(layers[s].type == "data" for s in l.inputs)]
    return first or convs[:1]


def layer_weight(model: dict, layer: Layer, checked) -> np.ndarray:
    """(filters, channels, k, k) float64: the weights of a data-fed layer's image
    input, else every input's channels side by side."""
    from convspec.check import module_name

    prefix = module_name(layer.name)
    if f"{prefix}.weight" in model:
        parts = [model[f"{prefix}.weight"]]
    else:
        parts = [model[f"{prefix}.weight.{i}"] for i in range(len(layer.inputs))]
        images = [i for i, s in enumerate(layer.inputs) if checked.layers[s].type == "data"]
        parts = [parts[images[0]]] if images else parts
    return torch.cat([p.detach().double().cpu() for p in parts], dim=1).numpy()


# --- preds and neighbours --------------------------------------------------------------


@dataclass
class ImageSet:
    source: object  # a loader source: .images(indices) -> uint8 (B, S, S, 3), .labels
    indices: np.ndarray
    description: str


def images_to_show(run: Run, data: str | None) -> ImageSet:
    """The images `convspec eval` would score; image folders stay on disk,
    since only a few of them are drawn.  Opened once per run: show checks
    --data before drawing, and preds and neighbours read the same set."""
    if data not in run.images_shown:
        run.images_shown[data] = _open_images_to_show(run, data)
    return run.images_shown[data]


def _open_images_to_show(run: Run, data: str | None) -> ImageSet:
    from .evaluate import evaluation_images

    d = run.state["data"]
    if not data and not d["val_path"] and len(d["val_indices"]) == 0:
        raise Unavailable("the run held out no validation images (valFraction=0); give --data PATH "
                          "to show predictions on", run.where())
    if data:
        from .sources import detect, resolve

        if detect(resolve(data)) == "flat":  # eval's answer, --labels FILE, is not a show option
            raise fail("is a flat folder of images; show needs each image's class: put them in class folders "
                       "(convspec eval --labels FILE scores a flat folder)", Location(str(data)))
    if data:
        return ImageSet(*evaluation_images(d, data))
    with _needs_the_runs_data():
        return ImageSet(*evaluation_images(d, data))


@contextlib.contextmanager
def _needs_the_runs_data():
    """The run's own data gone (moved, deleted, changed) leaves preds and neighbours
    undrawable, not the other pictures: skipped with the reason when every picture was
    asked for (a show once stopped after curves and filters, with no index.html)."""
    try:
        yield
    except Unavailable:
        raise
    except SpecError as err:
        raise Unavailable(" ".join(str(err).split())) from None


@torch.no_grad()
def forward(run: Run, source, indices: np.ndarray, outputs: list[str], progress: bool = False) -> dict:
    """Each named layer's output (flattened, float32 numpy) for the centre crops
    of ``indices``, as ``convspec eval`` preprocesses them."""
    from .evaluate import autocast
    from .loader import eval_batches
    from .progress import Progress

    net, device = run.net, torch.device(run.devices[0])
    batch = int(run.state["data"].get("eval_batch", 128))
    found: dict[str, list[torch.Tensor]] = {name: [] for name in outputs}
    bar = Progress(len(indices), "features", enabled=progress and len(indices) > batch)
    for views, _ in eval_batches(source, indices, batch, net.crop, mean=net.mean):
        with autocast(device, run.state["options"]["precision"]):
            got = net(views[:, 0].to(device), outputs=outputs)
        for name in outputs:
            found[name].append(got[name].float().flatten(1).cpu())
        bar.update(len(views))
    bar.close()
    return {name: torch.cat(parts).numpy() for name, parts in found.items()}


def class_names(run: Run, synsets: str | None) -> list[str]:
    """Readable names: the synsets file's when given, else the run's; the first
    of several synonyms, underscores as spaces."""
    d = run.state["data"]
    names = list(d["class_names"])
    if synsets:
        from .sources import names_from_synsets

        table, _ = names_from_synsets(Path(synsets), list(d["classes"]))
        names = [table.get(wnid, name) for wnid, name in zip(d["classes"], names)]
    return [name.split(",")[0].replace("_", " ").strip() for name in names]


@dataclass
class Scored:
    images: ImageSet
    indices: np.ndarray  # into images.source
    probs: np.ndarray  # (N, classes)
    scanned: int


def scored_sample(run: Run, o: ShowOptions, count: int) -> Scored:
    """``count`` test images in a fixed random order (only misclassified ones
    with --errors-only), with their class probabilities."""
    shown = images_to_show(run, o.data)
    order = shown.indices[np.random.default_rng(0).permutation(len(shown.indices))]
    logits = run.net.output_name
    chosen, probs, scanned = [], [], 0
    step = max(64, count) if o.errors_only else count
    while len(chosen) < count and scanned < len(order):
        part = order[scanned:scanned + step]
        scanned += len(part)
        p = torch.softmax(torch.from_numpy(forward(run, shown.source, part, [logits])[logits]), 1).numpy()
        keep = p.argmax(1) != shown.source.labels[part] if o.errors_only else np.ones(len(part), bool)
        chosen += list(part[keep])
        probs += list(p[keep])
    if not chosen:
        raise Unavailable(f"no misclassified image among the {scanned:,} test images ({shown.description})",
                          run.where())
    return Scored(shown, np.asarray(chosen[:count]), np.stack(probs[:count]), scanned)


def centre_crops(source, indices: np.ndarray, crop: int) -> list[np.ndarray]:
    images = source.images(indices)
    start = (images.shape[1] - crop) // 2
    return list(images[:, start:start + crop, start:start + crop])


def _preds(run: Run, o: ShowOptions):
    scored = scored_sample(run, o, o.count or 16)
    names = class_names(run, o.synsets)
    crops = centre_crops(scored.images.source, scored.indices, run.net.crop)
    labels = scored.images.source.labels[scored.indices]
    k = min(5, len(names))
    what = "misclassified " if o.errors_only else ""
    title = f"Top-{k} predictions on {len(crops)} {what}test images ({run.name}, epoch {run.state['epoch']})"
    image = draw.preds_picture(crops, scored.probs, labels, names, title)
    caption = (f"{len(crops)} {what}images drawn at random from {scored.images.description}"
               + (f" ({scored.scanned:,} scanned)" if o.errors_only else "")
               + f", centre crops as the net saw them. Under each: its true class, then the net's top {k} "
                 "classes with their softmax probabilities; the true class's bar is red when it is among them.")
    return [(Picture("preds.png", "Predictions", caption, *image.size), image)]


def hidden_layers(run: Run) -> list[str]:
    """The layers feeding the output layer (past dropout, an identity when
    testing): the last hidden layer, as one layer or as its towers."""
    layers = run.checked.layers
    found = []
    for name in layers[run.net.output_name].inputs:
        while layers[name].type.startswith("dropout") and len(layers[name].inputs) == 1:
            name = layers[name].inputs[0]
        if layers[name].type == "data":
            raise Unavailable(f"the output layer '{run.net.output_name}' reads the images directly: the net has "
                              "no hidden layer to find neighbours in", run.where())
        found.append(name)
    return found


def _neighbours(run: Run, o: ShowOptions):
    count = o.count or 6
    hidden = hidden_layers(run)
    scored = scored_sample(run, o, o.queries)
    queries = scored.images.source
    d = run.state["data"]
    from .loader import open_source

    with _needs_the_runs_data():
        path = runs.recorded_data_path(d, "put it back to search it for neighbours, or leave neighbours out "
                                          "(--only curves,filters,preds,net)")
    pool_source = open_source(path, "train", classes=list(d["classes"]), size=int(d["size"]), stats=False,
                              in_memory=False)  # only the searched subset is decoded
    pool = d["train_indices"].numpy()
    searched_all = not o.search_limit or len(pool) <= o.search_limit
    if not searched_all:
        pool = np.sort(np.random.default_rng(0).choice(pool, o.search_limit, replace=False))

    # Towers' features side by side: the distance is over the whole hidden layer.
    query_features = np.concatenate(list(forward(run, queries, scored.indices, hidden).values()), 1)
    pool_features = np.concatenate(list(forward(run, pool_source, pool, hidden, o.progress).values()), 1)
    distances = torch.cdist(torch.from_numpy(query_features).double(), torch.from_numpy(pool_features).double())
    nearest = distances.topk(min(count, len(pool)), dim=1, largest=False)

    crop = run.net.crop
    rows = []
    for query, index, found, found_distances in zip(centre_crops(queries, scored.indices, crop), scored.indices,
                                                    nearest.indices.numpy(), nearest.values.tolist()):
        found = pool[found]
        images = centre_crops(pool_source, found, crop)
        rows.append(((query, int(queries.labels[index])),
                     [(image, int(pool_source.labels[i]), dist) for image, i, dist in
                      zip(images, found, found_distances)]))
    layer_text = " + ".join(hidden)
    size = query_features.shape[1]
    title = f"Nearest training images in {layer_text} ({size:,} values), {run.name}, epoch {run.state['epoch']}"
    image = draw.neighbours_picture(rows, class_names(run, o.synsets), title)
    searched = (f"all {len(pool):,} training images" if searched_all else
                f"{len(pool):,} training images drawn at random of {len(d['train_indices']):,} (--search-limit)")
    caption = (f"Left: test images from {scored.images.description}, with their true class. Right: the {count} "
               f"training images whose {layer_text} activations ({size:,} values) are nearest in Euclidean "
               f"distance, nearest first, among {searched}; under each, its class (green when it matches) "
               "and the distance.")
    return [(Picture("neighbours.png", "Nearest neighbours", caption, *image.size), image)]


# --- net ----------------------------------------------------------------------------


def _net(run: Run, o: ShowOptions):
    devices = list(run.state["options"].get("devices") or [])
    image = draw.net_picture(run.checked, devices)
    groups = sorted({g for layer in run.checked.layers.values() for g in layer.gpu})
    caption = (f"The checked graph of {run.checked.path}: one box per layer (its type, output shape per image "
               "and parameter count), one colour per gpu= group, edges labelled with the tensor they carry "
               "(shape and float32 bytes per image); dashed edges cross from one gpu= group to another, "
               "a copy between devices when the groups run on different ones. "
               + draw.placement(groups, devices))
    return [(Picture("net.png", "Network graph", caption, *image.size), image)]


# --- index.html --------------------------------------------------------------------------


INDEX_MARK = "convspec show:"  # in the title of every index.html show writes, so it overwrites only its own


def index_html(run: Run, pictures: list[Picture], skipped: list[str], earlier: list[Path] = ()) -> str:
    records = run.metrics()
    last = records[-1]
    esc = html.escape
    try:
        state = run.state
    except SpecError:  # curves alone need no checkpoint
        state = None
    k = last.get("k", 5)

    def pct(value):
        return "-" if value is None else f"{100 * value:.2f}%"

    parts = [f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>{INDEX_MARK} {esc(run.name)}"
             f"</title>\n<style>{_CSS}</style></head><body>\n<h1>{esc(run.name)}</h1>"]
    if state is not None:
        parts.append(f"<p>Checkpoint <code>{esc(str(run.checkpoint))}</code>, epoch {state['epoch']}, "
                     f"step {state['step']:,}.</p>")
    parts.append("<h2>Final errors</h2><table><tr><th>epoch</th><th>validation top-1</th>"
                 f"<th>validation top-{k}</th><th>training error (top-1)</th><th>training loss</th></tr>")
    parts.append(f"<tr><td>{last['epoch']}</td><td>{pct(last.get('val_top1_error'))}</td>"
                 f"<td>{pct(last.get('val_top5_error'))}</td><td>{pct(last.get('train_error'))}</td>"
                 f"<td>{last.get('train_loss', float('nan')):.4f}</td></tr></table>")
    per_second = [r["images_per_s"] for r in records if r.get("images_per_s")]
    parts.append("<h2>Timing</h2><table>"
                 f"<tr><td>training time</td><td>{last.get('train_seconds', 0):.1f} s over {len(records)} "
                 "epochs (without validation)</td></tr>"
                 f"<tr><td>wall time of the epochs</td><td>{sum(r.get('seconds', 0) for r in records):.1f} s "
                 "(with validation)</td></tr>"
                 f"<tr><td>training throughput</td><td>{np.mean(per_second) if per_second else 0:,.0f} "
                 "images/s (mean of the epochs)</td></tr>")
    if state is not None:
        options = state["options"]
        parts.append(f"<tr><td>devices</td><td>{esc(', '.join(options['devices']))}, {options['precision']}"
                     f"{', channels-last' if options['channels_last'] else ''}, {options['world']} "
                     "process(es)</td></tr>")
    parts.append("</table>\n<h2>Pictures</h2>")
    if not pictures:
        parts.append("<p>None drawn.</p>")
    for p in pictures:
        parts.append(f"<figure id='{esc(Path(p.file).stem)}'><img src='{esc(p.file)}' width='{p.width}' "
                     f"height='{p.height}' alt='{esc(p.title)}'><figcaption><b>{esc(p.title)}.</b> {esc(p.caption)} "
                     f"<span class='size'>({esc(p.file)}, {p.width}×{p.height} pixels)</span></figcaption></figure>")
    if skipped:
        parts.append("<p>Not drawn:</p><ul>" + "".join(f"<li>{esc(s)}</li>" for s in skipped) + "</ul>")
    if earlier:
        parts.append("<p>Drawn into this folder by an earlier show, perhaps of an earlier epoch or of another run, "
                     "and not redrawn by this one:</p><ul>" + "".join(
                         f"<li><a href='{esc(p.name)}'>{esc(p.name)}</a>, written "
                         f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(p.stat().st_mtime))}</li>"
                         for p in earlier) + "</ul>")
    parts.append(_spec_html(run, state))
    return "\n".join(parts) + "\n</body></html>\n"


def _spec_html(run: Run, state: dict | None) -> str:
    esc = html.escape
    if state is not None:
        spec = state["spec"]
        texts = [(spec["path"], spec["text"])] + ([(spec["params_path"], spec["params_text"])]
                                                  if spec.get("params_text") else [])
        overrides = list(spec.get("overrides") or [])
    else:
        texts = [(str(p), p.read_text()) for p in (run.dir / "spec.cfg", run.dir / "spec.params.cfg") if p.is_file()]
        overrides = []
    out = ["<h2>Spec</h2>"]
    for path, text in texts:
        out.append(f"<h3><code>{esc(str(path))}</code></h3><pre>{esc(text)}</pre>")
    if overrides:
        out.append("<p>Overrides: " + ", ".join(f"<code>--set {esc(s)}</code>" for s in overrides) + "</p>")
    info = run.dir / "run.json"
    if info.is_file():
        out.append(f"<h2>Options</h2><p>From <code>{esc(str(info))}</code>:</p><pre>{esc(info.read_text())}</pre>")
    return "\n".join(out)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222;"
        f"background:{draw.BACKGROUND}}}figure{{margin:2.5em 0}}img{{max-width:100%;height:auto;border:1px solid #ddd}}"
        "figcaption{color:#333;max-width:60em;margin-top:.5em}.size{color:#777}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:90%}table{border-collapse:collapse}"
        "td,th{padding:.25em .9em;text-align:left;border-bottom:1px solid #eee}")
