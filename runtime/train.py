"""The training loop behind ``convspec train``.

    summary = train(TrainOptions(spec="specs/cifar10-80sec.cfg", data="cifar10"))

One epoch: minibatches from ``loader.Batches`` (order fixed by the seed and
the epoch), cuda-convnet's learning rule (``optim.ConvnetSGD``), then the
validation split through ``evaluate.evaluate`` -- the function
``convspec eval`` calls too.  After each epoch a checkpoint is written
atomically, then the epoch's record is appended to ``metrics.jsonl``.

Exact resume: the data order and the augmentation are functions of (seed,
epoch, batch), and a checkpoint keeps torch's RNG state, the optimizer's
momentum, progress and learning-rate scale, the plateau rule's state and the
metrics so far.  A run resumed from a checkpoint therefore replays exactly
what the uninterrupted run did from that point (on the CPU, bitwise).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import convspec
from convspec.errors import Location, SpecError, fail, plural

from . import checkpoint as ckpt
from . import distributed as D
from . import files
from . import runs
from .download import DATASETS
from .evaluate import EvalResult, autocast, evaluate
from .loader import (HELD_OUT, Batches, augment_for, eval_batches, holdout, open_source,
                     reads_its_training_images, recorded_held_out, refuse_other_size)
from .optim import ConvnetSGD
from .progress import Progress
from .store import StoreSplit
from .sources import (class_folders, detect, fingerprint, is_image, names_from_synsets, refuse_one_class, resolve,
                      sides_of_first, unread_notes)

DATA_ENV = "CONVSPEC_DATA"
TOPK = 5
SNAPSHOT_MINUTES = 30.0


class TrainingStopped(Exception):
    """The run stopped on purpose (a signal): state is saved, ``message`` says how to go on."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StoppedAtOnce(KeyboardInterrupt):
    """A second Ctrl-C: out at once, without saving, saying where --resume goes on from."""


@dataclass
class TrainOptions:
    spec: str | None = None
    params: str | None = None
    data: str | None = None
    val_data: str | None = None
    synsets: str | None = None
    out: str | None = None
    resume: bool = False
    devices: list[str] | None = None
    # None: fp32, NCHW and eager for a new run; on --resume, the run's own (a value is checked against it).
    precision: str | None = None
    channels_last: bool | None = None
    compile: bool | None = None  # torch.compile the net for training (validation runs it eagerly)
    overrides: list[str] = field(default_factory=list)
    epochs: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    train_limit: int | None = None  # train on this many images of the training split
    keep: int = 3
    # Mid-epoch, interrupted.pt is rewritten this often (0: never), so that a killed process or rank,
    # or a crashed machine, loses at most this much of a long epoch.  None: SNAPSHOT_MINUTES for a
    # new run, the recorded value on --resume.
    snapshot_minutes: float | None = None
    workers: int | None = None
    deterministic: bool = False
    progress: bool = True
    runs_root: str = "runs"
    echo: object = print  # where epoch lines go (main process only)


@dataclass
class RunSummary:
    run_dir: Path
    epochs: int
    steps: int
    train_seconds: float
    history: list[dict]
    last_checkpoint: Path | None
    best_checkpoint: Path | None


# --- devices -------------------------------------------------------------------------


def parse_devices(text: str | None, option: str = "--devices") -> list[str] | None:
    """Checked device names; ``option`` names where they came from (the Python
    API passes "devices" so its errors name its own argument)."""
    if text is None:
        return None
    use_cpu = "--devices cpu" if option.startswith("--") else f"{option}='cpu'"
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise fail(f"{option} is empty; write e.g. cpu, cuda:0 or cuda:0,cuda:1, or leave it out for the default")
    for d in devices:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise fail(f"{option}: '{d}' is not a device; write e.g. cpu, cuda:0 or cuda:0,cuda:1") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise fail(f"{option}: {d} is not available (this torch {torch.__version__} sees no CUDA GPU); "
                           f"use {use_cpu} or install a CUDA build of torch")
            if (dev.index or 0) >= torch.cuda.device_count():
                raise fail(f"{option}: {d} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
        elif dev.type != "cpu":
            raise fail(f"{option}: '{d}' is not supported; use cpu or cuda:N")
    return devices


def data_parallel_replicas(net) -> int:
    """1, or N when every layer lists the same N replicas (cuda-convnet2's
    data-parallel files).  Mixing replicas with towers is refused for now."""
    placements = {tuple(l.gpu) for l in net.layers.values() if l.type != "data"}
    widest = max(placements, key=len, default=())
    if len(widest) <= 1:
        return 1
    if len(placements) == 1:
        return len(widest)
    replicated = next(l for l in net.layers.values() if l.type != "data" and len(l.gpu) > 1)
    single = next((l for l in net.layers.values() if l.type != "data" and tuple(l.gpu) != tuple(replicated.gpu)))
    raise fail(f"this spec mixes data-parallel replicas (layer '{replicated.name}': gpu="
               f"{','.join(map(str, replicated.gpu))}) with model-parallel placement (layer '{single.name}': gpu="
               f"{','.join(map(str, single.gpu))}); convspec trains one or the other: give every layer the same "
               "gpu= list, or one gpu each", Location(net.path))


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (filecmp compares sizes first); a file that
    cannot be read, such as a link whose target is gone, is the same as nothing."""
    import filecmp

    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


# --- the trainer ---------------------------------------------------------------------


class Trainer:
    def __init__(self, options: TrainOptions):
        self.o = options
        self.cluster = D.setup()
        self.main = self.cluster.main
        self.stop_signal: int | None = None
        self.state: dict | None = None  # the checkpoint resumed from
        self.auto_named = False  # runs/<spec>-<date>-<time>, not --out: another name if that one is taken
        self._lock: int | None = None  # the run folder's lock, while training there
        self.retimed_note: str | None = None  # a resume with another --epochs moves the schedules
        self.world_note: str | None = None  # a resume on another number of ranks
        self.resumed_mtime = 0  # the checkpoint resumed from, as it was when read

    def say(self, text: str) -> None:
        if self.main:
            self.o.echo(text)

    # --- set-up -------------------------------------------------------------------

    def prepare(self) -> None:
        self.settle()
        self._open_data()
        self._build()

    def settle(self, world: int | None = None) -> None:
        """Everything before the data is read: the spec checked, the run folder
        chosen, a resumed checkpoint read.  ``convspec train --nproc-per-node``
        runs this alone before it starts the ranks, so that a bad spec is one
        error rather than one per rank; ``world`` is then the number of ranks it
        will start (else this process's own)."""
        o = self.o
        self.world = world or self.cluster.world
        if o.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        if o.resume:
            self.run_dir = Path(o.out) if o.out else runs.newest_run(Path(o.runs_root), "--out")
            runs.refuse_if_busy(self.run_dir)
            self.resumed_from = runs.resume_checkpoint(self.run_dir)
            self.resumed_mtime = self.resumed_from.stat().st_mtime_ns
            try:
                self.state = ckpt.load_training(self.resumed_from)
            except SpecError as err:
                if err.message == ckpt.NOT_TRAINING:  # a foreign file in the folder, newest by name or time
                    raise fail(f"not a convspec training checkpoint (a torch file from elsewhere?); move it out of "
                               f"{self.run_dir} and --resume again", err.location) from None
                # --resume takes a folder, so "use an older one" needs the step that gets there.
                older = [p for p in ckpt.epoch_files(self.run_dir) if p != self.resumed_from]
                if not older or not err.message.endswith("use an older one from the same run"):
                    raise
                raise fail(f"{err.message.rsplit('; ', 1)[0]}; to resume from {older[-1].name} instead, move "
                           f"{self.resumed_from.name} out of the run folder and --resume again",
                           err.location) from None
            self._from_checkpoint()
        else:
            if o.spec is None:
                raise fail("give the spec to train (convspec train SPEC --data PATH), "
                           "or --resume to continue a run")
            from convspec.check import check_paths
            from convspec.overrides import TRAIN, parse_override

            recipe_sets = {ov.key.lower(): ov.text for ov in map(parse_override, o.overrides) if ov.section == TRAIN}
            for value, key, option in ((o.epochs, "epochs", "--epochs"), (o.batch_size, "batchSize", "--batch-size"),
                                       (o.seed, "seed", "--seed")):
                if value is not None and key.lower() in recipe_sets:
                    raise fail(f"{option} {value} and --set {recipe_sets[key.lower()]} both set [train] {key}; "
                               "keep one")
            self.net_spec = check_paths(o.spec, o.params, overrides=o.overrides)
            for caution in self.net_spec.cautions:
                self.say(f"note: {caution}")
            self.recipe = self.net_spec.recipe.with_options(epochs=o.epochs, batch_size=o.batch_size, seed=o.seed)
            self.run_dir = Path(o.out) if o.out else runs.new_run_dir(o.spec, Path(o.runs_root))
            self.auto_named = not o.out
            if self.run_dir.is_dir():
                runs.refuse_if_busy(self.run_dir)
            self._refuse_a_finished_run()
            runs.check_can_create(self.run_dir)
            self.data_path = o.data or os.environ.get(DATA_ENV)
            if not o.data and self.data_path and self.data_path not in DATASETS and not Path(self.data_path).exists():
                raise fail(f"no such dataset path (from ${DATA_ENV}); set {DATA_ENV} to a dataset folder or "
                           "pass --data PATH", Location(self.data_path))
            self.val_path = o.val_data
            self.train_limit = o.train_limit
            self.precision, self.channels_last, self.compile = o.precision or self.recipe.precision, \
                bool(o.channels_last), bool(o.compile)
        if not self.data_path:
            raise fail(f"no training data: pass --data PATH (a prepared store, a CIFAR python folder, an image "
                       f"folder with one sub-folder per class, or cifar10/cifar100 to download it) or set {DATA_ENV}")
        self._output_layer()  # no cost layer: say so before reading any data
        self._check_learning_rules()
        for path in (self.data_path, self.val_path):  # a wrong path, said before any data is read
            if path and str(path) not in DATASETS:
                detect(Path(path))
        if self.state is None and self.val_path and not {str(self.val_path), str(self.data_path)} & set(DATASETS) \
                and Path(self.val_path).resolve() == Path(self.data_path).resolve() \
                and reads_its_training_images(Path(self.val_path)):
            raise fail("is the training data itself, and it holds no separate validation images: validation "
                       "would score the images the net trains on; leave --val-data out (valFraction holds some "
                       "out) or give other images", Location(str(self.val_path)))
        if self.recipe.batch_size % self.world:
            if self.state is not None:  # a resume keeps its batch
                raise fail(f"the run's batch of {self.recipe.batch_size} does not split over {self.world} ranks; "
                           f"resume it on a number of ranks that divides {self.recipe.batch_size}")
            raise fail(f"the batch of {self.recipe.batch_size} does not split over {self.world} ranks; "
                       f"use a multiple of {self.world} (--batch-size)")
        self.replicas = data_parallel_replicas(self.net_spec)

    def _refuse_mismatch(self, differs: str) -> None:
        """The folder's ``differs`` file and the resumed checkpoint disagree: say which one to fix.
        If the run's other checkpoints agree with this one, the file was edited; if one agrees
        with the file, this checkpoint came from elsewhere; with no other, either may be."""
        others = [runs.peek(p) for p in runs.checkpoint_files(self.run_dir) if p != self.resumed_from]
        others = [o for o in others if o is not None and "spec" in o]
        here = Location(str(self.run_dir / differs))
        restore = "restore it, or delete it and --resume again (the resume writes it anew from the checkpoint)"
        if others and all(runs.same_training(self.state, o) for o in others):
            raise fail(f"differs from what every checkpoint of this run was trained from (edited by hand?); "
                       f"{restore}", here)
        if any(runs.folder_disagrees(o, self.run_dir) is None for o in others):
            raise fail(f"was trained from another spec, params file or --set than this run folder's (copied in "
                       f"from another run?); move it out of {self.run_dir} and --resume again",
                       Location(str(self.resumed_from)))
        raise fail(f"differs from what {self.resumed_from.name} was trained from: if {differs} was edited, "
                   f"{restore}; if {self.resumed_from.name} came from another run, move it out of the folder", here)

    def _from_checkpoint(self) -> None:
        from convspec.recipe import Recipe

        s, o = self.state, self.o
        self.net_spec = runs.checked_net_from(s, str(self.resumed_from))
        recorded = dict(s["recipe"])
        recorded["lr_drops"] = tuple(recorded["lr_drops"])
        self.recipe = Recipe(**recorded).with_options(epochs=o.epochs)  # more epochs may be asked for
        if s["epoch"] >= self.recipe.epochs:  # said here, before any data is read or any rank is started
            raise fail(f"the run has finished {plural(s['epoch'], 'epoch')}; pass --epochs N (more than "
                       f"{s['epoch']}) to train further", Location(str(self.run_dir)))
        if self.recipe.epochs != recorded["epochs"] and self._rates_over_progress():
            # Progress is step / total steps, as cuda-convnet2's: a new length moves every point of such a curve.
            # Said once the run starts, not before an error that stops it.
            self.retimed_note = (f"note: the run now lasts {plural(self.recipe.epochs, 'epoch')}, not "
                                 f"{recorded['epochs']}: the learning rates that follow training's progress "
                                 f"({', '.join(self._rates_over_progress())}) are re-timed to the new length")
        d = s["data"]
        if o.data and str(resolve(o.data).resolve()) != d["resolved"]:
            self.say(f"note: training data is {o.data}, the run started on {d['path']}")
        self.data_path = o.data or runs.recorded_data_path(d, "pass --data PATH where the same data is now")
        self.val_path = d["val_path"] and runs.recorded_data_path(d, "pass --val-data PATH where it is now",
                                                                  "validation")
        self.train_limit = d["train_limit"]
        self.precision = s["options"]["precision"]
        self.channels_last = s["options"]["channels_last"]
        self.compile = s["options"].get("compile", False)  # runs from before --compile existed
        self._refuse_changes_on_resume()

    def _rates_over_progress(self) -> list[str]:
        """The layers whose epsW or epsB is a schedule (linear, exp, dexp), not a constant."""
        from convspec.layers import LAYER_TYPES

        def over_progress(rates) -> bool:
            return any(r is not None and r.kind != "const" for r in rates)

        return [l.name for l in self.net_spec.layers.values() if LAYER_TYPES[l.type].has_weights
                and over_progress([*(l["epsW"] or []), l["epsB"]])]

    def _refuse_changes_on_resume(self) -> None:
        """Options that would change a resumed run are refused, not ignored: an
        ablation (--set, another SPEC) silently not applied wastes the whole run.
        The same values as recorded (the first command retyped with --resume) pass."""
        from convspec.check import find_params_file
        from convspec.overrides import same_settings
        from convspec.parse import as_parsed, read_spec_text

        s, o, d = self.state, self.o, self.state["data"]
        spec, recipe = s["spec"], s["recipe"]
        differs = runs.folder_disagrees(s, self.run_dir)
        if differs:
            self._refuse_mismatch(differs)
        if self.resumed_from.name == runs.BEST:
            self.say(f"note: resuming from best.pt (epoch {s['epoch']}), the furthest checkpoint left in "
                     f"{self.run_dir}")

        def resolved(path):
            return str(Path(path).resolve()) if path else None

        def other_text(path, recorded):  # a file saved with CRLF (Windows) is the text the run recorded
            return as_parsed(read_spec_text(path)) != as_parsed(recorded or "")

        def edited_or_other(given, recorded_path, what):
            # The same file edited since the run started is not "another" file.
            if recorded_path and resolved(given) == resolved(recorded_path):
                return f"{what} {given} (edited since the run started, which keeps its copy in the run folder)"
            return f"{what} {given} (the run's is {recorded_path})"

        # SPEC without --params reads the params file beside it, as a new run does: when that is
        # the run's own params file, an edit there (an ablation of the rates) is a change too, not
        # one to drop in silence. (A run trained with another --params keeps that one, as before.)
        found = find_params_file(o.spec) if o.spec is not None and o.params is None else None
        if found is not None and resolved(found) != resolved(spec["params_path"]):
            found = None
        changed = [
            (o.spec is not None and other_text(o.spec, spec["text"]),
             o.spec and edited_or_other(o.spec, spec["path"], "SPEC")),
            (o.params is not None and other_text(o.params, spec["params_text"]),
             o.params and edited_or_other(o.params, spec["params_path"], "--params")),
            (found is not None and other_text(found, spec["params_text"]),
             found and edited_or_other(found, spec["params_path"], "the params file")),
            (bool(o.overrides) and not same_settings(o.overrides, spec.get("overrides", [])),
             f"--set {' --set '.join(o.overrides)} (the run's: "
             f"{' '.join('--set ' + t for t in spec.get('overrides', [])) or 'none'})"),
            (o.val_data is not None and resolved(o.val_data) != (d.get("val_resolved") or resolved(d["val_path"])),
             f"--val-data (the run's: {d['val_path'] or 'held out of the training data'})"),
            (o.batch_size is not None and o.batch_size != recipe["batch_size"],
             f"--batch-size {o.batch_size} (the run's: {recipe['batch_size']})"),
            (o.seed is not None and o.seed != recipe["seed"], f"--seed {o.seed} (the run's: {recipe['seed']})"),
            (o.train_limit is not None and o.train_limit != d["train_limit"],
             f"--train-limit {o.train_limit} (the run's: {d['train_limit'] or 'none'})"),
            (o.precision is not None and o.precision != self.precision,
             f"--precision {o.precision} (the run's: {self.precision})"),
            (o.channels_last is not None and o.channels_last != self.channels_last,
             f"--{'' if o.channels_last else 'no-'}channels-last (the run's: "
             f"{'channels_last' if self.channels_last else 'NCHW'})"),
            (o.compile is not None and o.compile != self.compile, f"--compile (the run's: {self.compile})"),
        ]
        recorded_world = s["options"].get("world", 1)
        if recorded_world != self.world:
            # The global batches, their augmentation and the updates do not depend on the ranks (each
            # reads its share of the same batch); only the dropout masks, drawn per rank, do.
            dropouts = [l.name for l in self.net_spec.layers.values()
                        if l.type in ("dropout", "dropout2") and l["enable"]]
            how = "without --nproc-per-node" if recorded_world == 1 else \
                f"on {recorded_world} ranks in all (--nproc-per-node {recorded_world} on one machine)"
            if dropouts:
                raise fail(f"the run was trained on {plural(recorded_world, 'rank')} and would resume on "
                           f"{self.world}, which changes the dropout masks each rank draws ({', '.join(dropouts)}), "
                           f"so the run would not go on as it was; resume it {how}, or train a new run",
                           Location(str(self.run_dir)))
            self.world_note = (f"note: the run was trained on {plural(recorded_world, 'rank')} and resumes on "
                               f"{self.world}: the same batches and updates (its net has no dropout), with each "
                               "batch's gradient summed in another order, so equal up to float rounding")
        differing = [text for differs, text in changed if differs]
        if differing:
            raise fail(f"a resumed run keeps the settings it recorded, and these differ: {'; '.join(differing)}; "
                       "drop them to continue the run, or train a new run with another --out",
                       Location(str(self.run_dir)))

    def _crop_from(self) -> str:
        """Where the crop side was set, for the errors about it: --set, [train] crop, or inputSize."""
        from convspec.overrides import parse_override

        overrides = list(map(parse_override, self.net_spec.overrides))
        crops = [ov.text for ov in overrides if ov.section.lower() == "train" and ov.key.lower() == "crop"]
        sizes = [ov.text for ov in overrides if ov.key.lower() == "inputsize"]
        if crops:  # [train] crop sets the net's input over inputSize
            return f"--set {crops[-1]}"
        if self.recipe.crop is not None:
            return f"[train] crop in {self.net_spec.params_path}"
        return f"--set {sizes[-1]}" if sizes else f"inputSize in {self.net_spec.path}"

    def _refuse_crops_bigger_than_every_image(self) -> None:
        """Crops bigger than even the largest of a folder's first few images mean the net
        does not fit the data (AlexNet's 224 px crops of 32 px CIFAR), as prepare says of
        --size.  Rescaling a little past the images on purpose (imageSize=36 for +-2 px
        shifts of 32 px crops) is a recipe, and allowed."""
        root = resolve(self.data_path)
        kind = detect(root) if root.is_dir() else None
        if kind not in ("classfolders", "imagefolder"):
            return  # stores and CIFAR batches have one size, checked against the crop once open
        classes = root / "train" if kind == "imagefolder" else root
        first = classes / class_folders(classes)[0]  # a sample, without listing every folder
        sides = sides_of_first(sorted(p for p in first.iterdir() if is_image(p)))
        if sides and sides[0] < self.crop:
            raise fail(f"the images are at most {sides[0]} px but the net takes {self.crop}x{self.crop} crops "
                       f"({self._crop_from()}), which would upscale every one; train a net whose "
                       f"crops fit the images, or give images of at least {self.crop} px",
                       Location(str(self.data_path)))

    def _refuse_synsets_that_name_no_class_folder(self) -> None:
        """Before the images are read (10-20 s for CIFAR-10, minutes for ImageNet), not after:
        the class folders' names are known from the listing.  A store and CIFAR batches hold
        their class names inside, and are checked once opened."""
        root = Path(self.data_path)
        if not root.is_dir():
            return
        kind = detect(root)
        folder = {"imagefolder": root / "train", "classfolders": root}.get(kind)
        if folder is not None:
            names_from_synsets(Path(self.o.synsets), class_folders(folder))

    def _open_data(self) -> None:
        r, c = self.recipe, self.cluster
        image_shape = self.net_spec.image_shape
        if image_shape is None or image_shape[0] != 3:
            raise fail("the data layer must take 3-channel images (inputSize=3xHxW) to train on RGB data",
                       Location(self.net_spec.path))
        self.crop = image_shape[1]
        size = r.image_size or (round(self.crop * 256 / 224) if r.random_crop else self.crop)
        if r.image_size is not None and r.image_size < self.crop:
            raise fail(f"[train] imageSize={r.image_size} is smaller than the net's {self.crop}x{self.crop} crops "
                       f"({self._crop_from()}); set imageSize={self.crop} or more, or leave it out",
                       Location(self.net_spec.params_path or self.net_spec.path))
        if self.state is None:
            self._refuse_crops_bigger_than_every_image()
        if self.o.synsets:
            self._refuse_synsets_that_name_no_class_folder()
        self.train_source = open_source(self.data_path, "train", size=size, progress=self.main and self.o.progress)
        if self.crop > self.train_source.size:
            raise fail(f"holds {self.train_source.size}x{self.train_source.size} images but the net takes "
                       f"{self.crop}x{self.crop} crops ({self._crop_from()}); train a net whose crops fit the "
                       f"images, or prepare images of at least {self.crop} px with --size {self.crop} or more",
                       Location(str(self.data_path)))
        self.classes = list(self.train_source.classes)
        names = getattr(self.train_source, "class_names", None) or self.classes
        if self.o.synsets:
            synsets, note = names_from_synsets(Path(self.o.synsets), self.classes)
            names = [synsets.get(c, c) for c in self.classes]
            if note:
                self.say(f"note: {note}")
        self.class_names = list(names)
        self.resolved_data = resolve(self.data_path).resolve()
        self.fingerprint = fingerprint(self.resolved_data)
        change = self.state and runs.data_change(self.state["data"], self.fingerprint, len(self.train_source))
        if change:
            raise fail(f"is not the data the run was trained on: {change}; resume on the same data",
                       Location(str(self.data_path)))
        for note in unread_notes(self.train_source, "read") if self.state is None else ():
            self.say(note)
        refuse_one_class(self.classes, "class", self.data_path)
        if self.state is None and not self.val_path:
            kind = detect(self.resolved_data)
            if kind == "imagefolder" and (self.resolved_data / "val").is_dir():
                split, unread = f"{self.data_path}/train", f"{self.data_path}/val is"
            elif kind == "store" and StoreSplit.has_split(self.resolved_data, "val"):
                split, unread = f"the train split of {self.data_path}", "its val split is"
            else:
                split = None
            if split:
                self.say(f"note: training holds out {self.recipe.val_fraction:g} of {split} for validation; "
                         f"{unread} not read (pass --val-data {self.data_path} to validate on it)")
        outputs = self._output_count()
        if outputs != len(self.classes):
            out_layer, n = self._output_layer(), len(self.classes)
            heads = list(dict.fromkeys(self.net_spec.cost_logits))  # every cost's head has this width
            raise fail(f"the net ends in {outputs} outputs (layer '{out_layer}') but the data has "
                       f"{plural(n, 'class', 'classes')}; set outputs={n} on "
                       f"{' and '.join(repr(h) for h in heads)} "
                       f"(e.g. {' '.join(f'--set {h}.outputs={n}' for h in heads)})", Location(self.net_spec.path))
        n = len(self.train_source)
        if self.state is not None:
            self.train_idx = self.state["data"]["train_indices"].numpy()
            self.val_idx = self.state["data"]["val_indices"].numpy()
        elif self.val_path:
            self.train_idx, self.val_idx = np.arange(n), None
        else:
            self.train_idx, self.val_idx = holdout(n, r.val_fraction, r.split_seed)
        if self.state is None and self.train_limit and self.train_limit < len(self.train_idx):
            pick = np.random.default_rng([r.split_seed, 1]).choice(len(self.train_idx), self.train_limit, replace=False)
            self.train_idx = np.sort(self.train_idx[pick])
        elif self.state is None and self.train_limit:
            self.say(f"note: --train-limit {self.train_limit:,} is not below the {len(self.train_idx):,} training "
                     "images; training on all of them")
        if self.val_path:
            held_out = recorded_held_out(self.state["data"]) if self.state is not None else HELD_OUT
            self.val_source = open_source(self.val_path, "val", classes=self.classes, size=self.train_source.size,
                                          stats=False, held_out=held_out)
            refuse_other_size(self.val_source, self.train_source.size, self.val_path, "the training images are",
                              "prepare both at one --size, or give the image folder (it is rescaled)")
            if self.val_idx is None:
                self.val_idx = np.arange(len(self.val_source))
            if self.state is None:
                for note in unread_notes(self.val_source, "validated on"):
                    self.say(note)
                self._note_validation_images_also_trained_on()
        else:
            self.val_source = self.train_source
            if self.state is None:
                self._note_validation_classes_never_trained()
        self.rank_batch = r.batch_size // c.world
        workers = self.o.workers
        if workers is None:  # decoding sources only; measured ~2% of a CPU step, more on a GPU
            workers = 0 if not torch.cuda.is_available() else min(8, max(1, (os.cpu_count() or 2) // c.world - 1))
        self.batches = Batches(self.train_source, self.train_idx, self.rank_batch,
                               augment_for(r, self.crop), seed=r.seed, rank=c.rank, world=c.world,
                               workers=workers, pin_memory=torch.cuda.is_available())
        if len(self.batches) == 0:
            held = ""
            if self.train_limit:
                held = f" (--train-limit {self.train_limit})"
            elif self.val_idx is not None and len(self.val_idx) and not self.val_path:
                held = (f" ({len(self.val_idx)} of {len(self.train_source)} are held out by "
                        f"valFraction={r.val_fraction:g})")
            raise fail(f"{len(self.train_idx)} training images{held} make no full batch of {r.batch_size}; "
                       "use a smaller --batch-size or more data", Location(str(self.data_path)))

    def _note_validation_classes_never_trained(self) -> None:
        """Held out of data with a few images a class (ImageNet samples: one), validation
        images can be of classes the net never trains on: an error near 100% then says
        nothing about the net, and once it was not said."""
        labels = getattr(self.train_source, "labels", None)
        if labels is None or self.val_idx is None or len(self.val_idx) == 0:
            return
        labels = np.asarray(labels)
        untrained = np.setdiff1d(labels[self.val_idx], labels[self.train_idx])
        if len(untrained):
            count = int(np.isin(labels[self.val_idx], untrained).sum())
            fix = (f"a larger --train-limit than {self.train_limit:,}" if self.train_limit else
                   "more images a class, or --val-data PATH")
            self.say(f"note: {count:,} of the {len(self.val_idx):,} validation images are of classes with no training "
                     f"image ({plural(len(untrained), 'class', 'classes')}), which the net cannot learn; give {fix}")

    def _note_validation_images_also_trained_on(self) -> None:
        """A --val-data folder that shares some files with --data (a split made by copying
        images out and not removing them) scores images the net trains on.  The same folder
        is refused above; a partial overlap went unseen.  Files are matched by class and
        name, then byte for byte (BMPs of one size from two splits, all named 0000..., once
        matched by size): the bytes only of the few that share a name."""
        train_paths, val_paths = getattr(self.train_source, "paths", None), getattr(self.val_source, "paths", None)
        if not train_paths or not val_paths:  # stores and CIFAR batches keep no file names
            return
        train_labels, val_labels = np.asarray(self.train_source.labels), np.asarray(self.val_source.labels)
        trained = {(int(train_labels[i]), Path(train_paths[i]).name): Path(train_paths[i]) for i in self.train_idx}
        shared = []
        for i in self.val_idx:
            here = Path(val_paths[i])
            twin = trained.get((int(val_labels[i]), here.name))
            if twin is not None and _same_bytes(twin, here):
                shared.append((here, twin))
        if shared:
            # The folders that hold the class folders, as read: DIR/train and DIR/val, not DIR twice.
            here, twin = shared[0]
            self.say(f"note: {len(shared):,} of the {len(self.val_idx):,} validation images "
                     f"{'is a copy' if len(shared) == 1 else 'are copies'} of training images (the same class, name "
                     f"and bytes; e.g. {here} of {twin}), so validation scores images the net trains on; remove "
                     f"them from {twin.parent.parent} or from {here.parent.parent}")

    def _output_layer(self) -> str:
        """The reported cost's logits layer (check gives every cost's head the same width)."""
        costs = self.net_spec.costs
        if not costs:
            raise fail("the spec has no cost.logreg layer to train against; add one "
                       "(type=cost.logreg, inputs=labels,probs)", Location(self.net_spec.path))
        if all(c["coeff"] == 0 for c in costs):  # trained whole runs at "train loss 0.0000", learning nothing
            raise fail(f"coeff=0 on every cost ({', '.join(c.name for c in costs)}): the loss would always be 0 and "
                       "nothing would learn; give a cost a coeff above 0 (cuda-convnet's logprob has 1)",
                       Location(self.net_spec.params_path or self.net_spec.path))
        return self.net_spec.cost_logits[0]

    def _check_learning_rules(self) -> None:
        from convspec.check import missing_learning_rules

        missing = missing_learning_rules(self.net_spec)
        if not missing:
            return
        (first, keys), others = missing[0], [layer.name for layer, _ in missing[1:]]
        more = (f" ({plural(len(others), 'other layer')} {'lack' if len(others) > 1 else 'lacks'} some too: "
                f"{', '.join(others[:4])}{', ...' * (len(others) > 4)})")
        lacking = " or ".join(keys) if len(keys) < 3 else f"{', '.join(keys[:-1])} or {keys[-1]}"
        params = self.net_spec.params_path
        if params is None:  # nothing to point into: the spec's section, where they may go too
            fix, where = ("add a params file (NAME.params.cfg beside the spec, or --params FILE) setting epsW, epsB, "
                          "momW and momB for each layer with weights"), first.loc
        else:
            fix = (f"set epsW, epsB, momW and momB in its [{first.name}] section of {params}" if first.params_loc
                   else f"add a [{first.name}] section to {params} setting epsW, epsB, momW and momB")
            where = first.params_loc or Location(params)
        raise fail(f"layer '{first.name}' has no {lacking}, which training needs{more if others else ''}; "
                   f"{fix}", where)

    def _output_count(self) -> int:
        return self.net_spec.layers[self._output_layer()].shape[0]

    def _build(self) -> None:
        from convspec.builder import build, default_devices

        o, c, r = self.o, self.cluster, self.recipe
        devices = parse_devices(",".join(o.devices)) if o.devices else None
        if c.distributed:
            if devices is None:
                devices = [str(D.rank_device(c))]
            if self.replicas not in (1, c.world):
                self.say(f"note: the spec lists {self.replicas} replicas; training with {c.world} ranks")
        elif self.replicas > 1:
            self.say(f"note: the spec lists {self.replicas} data-parallel replicas; this single process trains "
                     f"on the whole batch (same update). For {self.replicas} processes: "
                     f"convspec train ... --nproc-per-node {self.replicas}")
        self.devices = [torch.device(d) for d in (devices or default_devices())]
        self.device = self.devices[0]  # where images enter
        if self.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise fail(f"--precision bf16: {torch.cuda.get_device_name(self.device)} has no bf16 support; use fp32")
        torch.manual_seed(r.seed)  # the same initial weights on every rank
        self.net = build(self.net_spec, self.devices)
        if self.channels_last:
            self.net.to_channels_last()
        if self.state is not None:
            self.net.load_state_dict(self.state["model"])
        self.model = self.net
        if c.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self._refuse_settings_that_differ_between_ranks()

            single = len({d for d in self.devices}) == 1 and self.device.type == "cuda"
            self.model = DistributedDataParallel(self.net, device_ids=[self.device] if single else None)
        if self.compile:
            # Compiled lazily at the first steps (and once more for a smaller last batch);
            # the parameters stay self.net's, so checkpoints and validation are unchanged.
            self.model = torch.compile(self.model)
            if c.distributed:  # DDP's forward opens a profiler range, which dynamo warns it skips, in every run
                import logging

                logging.getLogger("torch._dynamo.variables.ctx_manager").addFilter(
                    lambda record: "Profiler record function" not in str(record.msg))
        try:
            self.optimizer = ConvnetSGD(self.net.learning_rules())
        except ValueError as err:
            raise fail(f"{err}", Location(self.net_spec.params_path or self.net_spec.path)) from None
        if self.state is not None:
            self.optimizer.load_state_dict(self.state["optimizer"])
            rng = self.state["rng"]
            ranks = rng.get("ranks") or []
            if len(ranks) == c.world:  # each rank goes on with its own draws
                rng = ranks[c.rank]
            torch.set_rng_state(rng["torch"])
            if torch.cuda.is_available() and rng["cuda"]:
                torch.cuda.set_rng_state_all(rng["cuda"])
            if c.rank and len(ranks) != c.world:  # a checkpoint from before every rank's state was kept
                torch.manual_seed(r.seed + 1000003 * c.rank + self.state["step"])
        elif c.rank:
            torch.manual_seed(r.seed + 1000003 * c.rank)  # dropout differs per rank; weights came from rank 0

    # The recipe keys a command-line option sets, named as the option: what a user typed differently.
    # (The recipe's precision keeps its own name: --precision, below, is the one the run uses.)
    OPTION_OF = {"seed": "--seed", "epochs": "--epochs", "batch_size": "--batch-size"}

    def _settings(self) -> dict:
        """What every rank must share: the net, the recipe, the options that change the step, the data."""
        from convspec.parse import as_parsed

        from .sources import content_fingerprint

        spec = self.net_spec
        return {"the spec": as_parsed(spec.spec_text), "the params file": as_parsed(spec.params_text or ""),
                "--set": sorted(spec.overrides),
                **{self.OPTION_OF.get(k, f"the recipe's {k}"): v for k, v in self.recipe.as_dict().items()},
                "--precision": self.precision, "--no-channels-last": not self.channels_last,
                "--compile": self.compile, "--resume": self.state is not None,
                "the data": (content_fingerprint(self.resolved_data, self.fingerprint), len(self.train_source)),
                "--train-limit": self.train_limit,
                "the validation data": None if self.val_source is self.train_source else len(self.val_source)}

    def _refuse_settings_that_differ_between_ranks(self) -> None:
        """Each machine runs its own command: one given another --seed trained on the wrong images
        without a word, and one given another --epochs ended in gloo's "collective mismatch" abort."""
        import torch.distributed as dist

        mine = self._settings()
        every: list = [None] * self.cluster.world
        dist.all_gather_object(every, mine)
        for rank, theirs in enumerate(every):
            key = next((k for k in mine if theirs.get(k) != every[0].get(k)), None)
            if key is None:
                continue
            shown = lambda v: "set" if v is True else "not set" if v is False else repr(v)
            if key in ("the spec", "the params file", "the data"):
                said = f"{key} differs from rank 0's"
            else:
                said = f"{key} is {shown(theirs.get(key))} there and {shown(every[0].get(key))} on rank 0"
            err = fail(f"rank {rank} was started otherwise than rank 0: {said}; start every machine with the same "
                       "command and data (only --node-rank differs)")
            err.every_rank = True  # every rank gathered the same list, so all stop here: rank 0 speaks
            raise err

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> RunSummary:
        try:
            return self._run()
        finally:
            self._unlock_run_dir()

    def _run(self) -> RunSummary:
        self.prepare()
        r = self.recipe
        s = self.state or {}
        epoch0 = s.get("epoch", 0)
        batch0 = s.get("batch", 0)
        self.step = s.get("step", 0)
        self.history: list[dict] = list(s.get("history", []))
        sched = s.get("schedule", {"plateau_drops": 0, "plateau_wait": 0, "best_val": None, "best_epoch": None})
        self.sched = dict(sched)
        self.train_seconds = s.get("train_seconds", 0.0)
        partial = s.get("partial", {"loss": 0.0, "wrong": 0, "images": 0, "seconds": 0.0})
        recorded = s.get("options", {}).get("snapshot_minutes")  # a resume keeps the run's choice
        self.snapshot_minutes = next(m for m in (self.o.snapshot_minutes, recorded, SNAPSHOT_MINUTES) if m is not None)
        if self.main:
            self._lock_run_dir()
            self._write_run_files()
        self.say(self._banner(epoch0, batch0))
        if self.retimed_note:
            self.say(self.retimed_note)
        if self.world_note:
            self.say(self.world_note)
        late = [str(d) for d in r.lr_drops if d >= r.epochs]
        # e.g. the 18pct spec (drops after 120, 130) tried with --epochs 10.  Said when the run starts, where
        # --set train.lrDrops can still change it; a resume cannot, and the first run said it already.
        if late and self.state is None:
            self.say(f"note: lrDrops={','.join(late)} come at or after the last of {plural(r.epochs, 'epoch')}: "
                     "those drops never happen; change them with --set train.lrDrops=N (or =none)")
        if self.state is None and len(self.classes) <= TOPK and self.val_idx is not None and len(self.val_idx):
            n = len(self.classes)  # eval says it of its own line; the epoch lines once printed it unexplained
            self.say(f"note: with {n} classes the top-{n} error is always 0%, since the top {n} hold every class; "
                     "read the top-1")
        if r.plateau and self.state is None and (self.val_idx is None or len(self.val_idx) == 0):
            self.say(f"note: plateau={r.plateau} lowers the rate when validation error stops improving, and this "
                     "run validates on nothing (valFraction=0, no --val-data): it never fires")
        steps_per_epoch = len(self.batches)
        self.total_steps = steps_per_epoch * r.epochs
        self.snapshot_every, self.last_saved = 60 * self.snapshot_minutes, time.perf_counter()
        self.slow_snapshot_noted = False
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, self._on_signal)
        last = best = None
        try:
            for epoch in range(epoch0, r.epochs):
                record = self._train_epoch(epoch, batch0 if epoch == epoch0 else 0,
                                           partial if epoch == epoch0 else None)
                last, best = self._end_epoch(epoch, record)
                (stop,) = self._agree_on_the_stop_signal()
                if stop is not None and epoch + 1 < r.epochs:
                    # The signal came during validation: the epoch's checkpoint is the place to stop.
                    raise TrainingStopped(f"{signal.Signals(stop).name}: stopped after epoch {epoch + 1}; saved "
                                          f"{last}. Continue with: {self._resume_command()}", 128 + stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        D.barrier(self.cluster)
        return RunSummary(self.run_dir, r.epochs, self.step, self.train_seconds, self.history, last,
                          best or (self.run_dir / runs.BEST if (self.run_dir / runs.BEST).exists() else None))

    def _agree_on_the_stop_signal(self, *flags: bool) -> tuple:
        """(signal or None, *flags): every rank stops by the same signal, the one any rank got (its name
        in the message, its exit status), and ``flags`` are agreed in the same all-reduce (true if any
        rank's is).  The ranks act on the answer alone: a signal this rank gets while they agree is
        neither acted on by this rank alone (the others would wait for it in a collective) nor
        overwritten by the answer, so it counts at the next agreement."""
        agreed, *flags = D.agreed_signal_and_flags(self.stop_signal, flags, self.cluster)
        if agreed is not None:
            self.stop_signal = agreed
        return (agreed, *flags)

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise StoppedAtOnce(self._stopped_at_once())  # a second Ctrl-C: stop now, without saving
        self.stop_signal = signum
        if self.main:  # at once: validation may take a while before the stop comes
            print(f"\n{signal.Signals(signum).name}: saving and stopping after this batch, or after this "
                  "epoch's validation (Ctrl-C again: stop now, without saving)", file=sys.stderr, flush=True)

    def _stopped_at_once(self) -> str:
        said = "SIGINT again: stopped at once, without saving"
        try:
            if not runs.has_checkpoints(self.run_dir):
                return f"{said}; the run has no checkpoint yet, so start it again without --resume"
            return (f"{said}. Continue from {runs.resume_checkpoint(self.run_dir).name} with: "
                    f"{self._resume_command()}")
        except Exception:  # noqa: BLE001 - in a signal handler: the stop matters more than the hint
            return f"{said}; convspec train --resume --out RUN continues from the run's last checkpoint"

    def _lr_scale(self, epoch: int) -> float:
        r = self.recipe
        drops = sum(1 for d in r.lr_drops if d <= epoch) + self.sched["plateau_drops"]
        return r.lr_factor ** drops

    def _train_epoch(self, epoch: int, start: int, partial: dict | None) -> dict:
        r, c = self.recipe, self.cluster
        self.net.train()
        opt = self.optimizer
        opt.lr_scale = self._lr_scale(epoch)
        sums = dict(partial or {"loss": 0.0, "wrong": 0, "images": 0, "seconds": 0.0})
        n_batches = len(self.batches)
        bar = Progress((n_batches - start) * r.batch_size, f"epoch {epoch + 1}/{r.epochs}",
                       enabled=self.main and self.o.progress)
        sync_every = 1 if self.device.type == "cpu" else 20  # .item() stalls a GPU; look every few steps
        window: list[torch.Tensor] = []
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        wrong_sum = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        t0 = time.perf_counter()
        for b, (images, labels) in enumerate(self.batches.epoch(epoch, start), start):
            x = images.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels.to(self.device, non_blocking=True)
            opt.progress = self.step / self.total_steps
            with autocast(self.device, self.precision):
                logits = self.model(x)
            loss = self.net.loss(logits, y)
            loss.backward()
            detached = loss.detach()
            if sync_every == 1:
                # The CPU reads every loss anyway: read it before the update, so that a non-finite
                # loss leaves the weights that produced it, and the diagnosis can name the layer.
                value = detached.item()
                here = not np.isfinite(value)
                if D.broadcast_flag(here, c):
                    raise self._nan_error(self.step + 1, epoch, x, value if here else None)
            opt.step()
            self.step += 1
            window.append(detached)
            loss_sum += detached.double() * len(y)
            wrong_sum += (self.net.first_logits(logits).detach().argmax(1) != y).sum()
            seen += len(y)
            if len(window) >= sync_every or b == n_batches - 1:
                values = torch.stack(window).tolist()
                # On a GPU, every 20 steps, after the updates: by then the weights have gone bad too.
                # (The CPU checked each loss above, before its update.)
                bad = next((i for i, v in enumerate(values) if not np.isfinite(v)), None) if sync_every > 1 else None
                if sync_every > 1 and D.broadcast_flag(bad is not None, c):
                    if bad is None:  # another rank's loss: by the end of this window, not at a known step
                        raise self._nan_error(self.step, epoch, x, None)
                    raise self._nan_error(self.step - len(values) + bad + 1, epoch, x, values[bad])
                window.clear()
                bar.update(len(values) * r.batch_size, f"loss {values[-1]:.4f}")
            # Rank 0's clock decides when a snapshot is due, and every rank learns it with the stop flag.
            due = self.main and self.snapshot_every > 0 and time.perf_counter() - self.last_saved >= self.snapshot_every
            stop, snapshot = self._agree_on_the_stop_signal(due)
            if stop is not None:
                self._save_interrupted(epoch, b + 1, sums, loss_sum, wrong_sum, seen, time.perf_counter() - t0)
            if snapshot and b + 1 < n_batches:
                # Writing the file is not training, as the epoch's own checkpoint is not: move the
                # clock's start on by the write, so that train_seconds (and time to accuracy) leave it out.
                t0 += self._save_snapshot(epoch, b + 1, sums, loss_sum, wrong_sum, seen, time.perf_counter() - t0)
        bar.close()
        seconds = time.perf_counter() - t0
        self.train_seconds += seconds  # this part of the epoch ends here
        total = self._sums_so_far(sums, loss_sum, wrong_sum, seen, seconds)
        return {"epoch": epoch + 1, "step": self.step, "train_loss": total["loss"] / total["images"],
                "train_error": total["wrong"] / total["images"], "lr_scale": opt.lr_scale,
                "train_images": total["images"], "train_time": total["seconds"]}

    def _sums_so_far(self, sums: dict, loss_sum, wrong_sum, seen: int, seconds: float) -> dict:
        """The epoch so far, over all ranks: what earlier (resumed) parts summed plus this part."""
        totals = torch.tensor([loss_sum.item(), float(wrong_sum.item()), float(seen)], dtype=torch.float64)
        D.all_reduce_sum(totals, self.cluster)
        return {"loss": sums["loss"] + totals[0].item(), "wrong": sums["wrong"] + int(totals[1].item()),
                "images": sums["images"] + int(totals[2].item()), "seconds": sums["seconds"] + seconds}

    def _write_part_of_epoch(self, epoch, batch, sums, loss_sum, wrong_sum, seen, seconds) -> Path:
        """interrupted.pt: the epoch up to ``batch``, which --resume continues exactly.  The
        part's time is in the file but not yet in the run's (the epoch's end counts it)."""
        partial = self._sums_so_far(sums, loss_sum, wrong_sum, seen, seconds)
        path = self.run_dir / runs.INTERRUPTED
        rng = self._rng_states()
        if self.main:
            state = self._state(epoch, batch, partial, rng)
            state["train_seconds"] = self.train_seconds + seconds
            ckpt.save(path, state)
        return path

    def _save_snapshot(self, epoch, batch, sums, loss_sum, wrong_sum, seen, seconds) -> float:
        """interrupted.pt as a stop writes it, and training goes on: --resume after a kill
        continues from here instead of from the epoch's start.  Returns the seconds the write took."""
        start = time.perf_counter()
        self._write_part_of_epoch(epoch, batch, sums, loss_sum, wrong_sum, seen, seconds)
        self.last_saved = time.perf_counter()
        took = self.last_saved - start
        if took > 0.1 * self.snapshot_every and not self.slow_snapshot_noted:
            # --snapshot-minutes 0.001 wrote a checkpoint after every batch and trained 45% slower, unsaid.
            self.slow_snapshot_noted = True
            gap = "\n" if self.o.progress else ""  # off the progress bar's line
            self.say(f"{gap}note: a snapshot takes {took:.2f} s, more than a tenth of --snapshot-minutes "
                     f"{self.snapshot_minutes:g} ({self.snapshot_every:.2f} s), so snapshots slow training by up to "
                     f"{100 * took / (took + self.snapshot_every):.0f}%; a larger --snapshot-minutes costs less")
        return took

    def validate(self) -> EvalResult | None:
        if self.val_idx is None or len(self.val_idx) == 0:
            return None
        c = self.cluster
        shard = self.val_idx[c.rank::c.world]
        batches = eval_batches(self.val_source, shard, self.rank_batch, self.crop,
                               ten_views=self.recipe.test_views == 10, mean=self.train_source.mean)
        return evaluate(self.net, batches, self.device, len(self.classes), TOPK, self.precision,
                        total=len(self.val_idx), progress=self.main and self.o.progress,
                        channels_last=self.channels_last, cluster=c)

    def _end_epoch(self, epoch: int, record: dict):
        t0 = time.perf_counter()
        result = self.validate()
        val_seconds = time.perf_counter() - t0
        r = self.recipe
        full = {"epoch": record["epoch"], "step": record["step"], "train_loss": record["train_loss"],
                "train_error": record["train_error"],
                "val_top1_error": result.top1_error if result else None,
                f"val_top{TOPK}_error": result.topk_error if result else None,
                "k": result.k if result else TOPK, "lr_scale": record["lr_scale"],
                "seconds": record["train_time"] + val_seconds, "val_seconds": val_seconds,
                "images_per_s": record["train_images"] / max(record["train_time"], 1e-9),
                "train_seconds": self.train_seconds, "val_images": result.images if result else 0}
        self.history.append(full)
        improved = False
        if result is not None:
            best = self.sched["best_val"]
            improved = best is None or result.top1_error < best
            if improved:
                self.sched.update(best_val=result.top1_error, best_epoch=epoch + 1, plateau_wait=0)
            else:
                self.sched["plateau_wait"] += 1
                if r.plateau and self.sched["plateau_wait"] >= r.plateau:
                    self.sched["plateau_drops"] += 1
                    self.sched["plateau_wait"] = 0
                    self.say(f"validation error has not improved for {r.plateau} epoch(s): "
                             f"learning rate x{r.lr_factor:g} from epoch {epoch + 2}")
        last = self.run_dir / ckpt.epoch_name(epoch + 1)
        self.last_saved = time.perf_counter()
        rng = self._rng_states()
        if self.main:
            ckpt.save(last, self._state(epoch + 1, 0, None, rng))
            if improved:
                files.link_or_copy(last, self.run_dir / runs.BEST)
            (self.run_dir / runs.INTERRUPTED).unlink(missing_ok=True)
            ckpt.prune(self.run_dir, self.o.keep)
            self._write_metrics()
        self.say(_epoch_line(full, r.epochs))
        return last, (self.run_dir / runs.BEST if improved else None)

    # --- failures and signals ---------------------------------------------------------------

    def _nan_error(self, step: int, epoch: int, x: torch.Tensor, value: float | None) -> SpecError:
        """``value``: this rank's non-finite loss, or None when another rank's was (only rank 0
        speaks, and its own loss, finite, once stood in the message)."""
        good = ckpt.epoch_files(self.run_dir)
        kept = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
        head = (f"loss became {value} at step {step} (epoch {epoch + 1})" if value is not None else
                f"another rank's loss became nan or inf by step {step} (epoch {epoch + 1})")
        what, fastest = diagnose(self.net, x, self.step / self.total_steps)
        if step == 1 and value is not None:  # the first loss came from the initial weights: no update did it
            err = fail(f"{head}, before any update; {what}. Training stopped and {kept}. No learning rate did "
                       "this: check the spec's neurons, initW and the cost's coeff, and the data")
        elif (runaway := runaway_decay(self.net, self.step / self.total_steps, self.optimizer.lr_scale)) is not None:
            layer, product, bound = runaway
            err = fail(f"{head}; {what}. Training stopped and {kept}. Weight decay alone makes '{layer}' diverge: "
                       f"epsW x wc = {product:g}, and the update is stable only below 2(1 + momW) = {bound:g}; "
                       f"lower its wc or epsW (--set {layer}.wc=... or --set {layer}.epsW=...)")
        else:
            err = fail(f"{head}; {what}. Training stopped and {kept}. Lower the learning rates (the highest "
                       f"epsW is {fastest}'s: --set {fastest}.epsW=...) or check the data")
        err.every_rank = True  # every rank stops here together (the flag is broadcast): rank 0 speaks for all
        return err

    def _save_interrupted(self, epoch, batch, sums, loss_sum, wrong_sum, seen, seconds) -> None:
        path = self._write_part_of_epoch(epoch, batch, sums, loss_sum, wrong_sum, seen, seconds)
        D.barrier(self.cluster)
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "signal"
        raise TrainingStopped(f"{name}: stopped in epoch {epoch + 1} after batch {batch}; saved {path}. "
                              f"Continue with: {self._resume_command()}",
                              128 + (self.stop_signal or 2))

    def _resume_command(self) -> str:
        """The command that continues this run, launched the way this one was."""
        command = f"convspec train --resume --out {shlex.quote(str(self.run_dir))}"  # pasted into a shell
        if os.environ.get(D.LAUNCHER_ENV):  # convspec train --nproc-per-node N
            return f"{command} {os.environ[D.LAUNCHER_ENV]}"
        if self.cluster.distributed:
            return f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', '<N>')} ... -m {command}"
        return command

    # --- state -------------------------------------------------------------------------------

    def _rng_states(self) -> dict:
        """This rank's random state and, across ranks, every rank's (a collective: every rank calls it
        at each save).  Each rank draws its own dropout masks; a checkpoint that kept rank 0's alone
        resumed every rank from it, so that after a resume all ranks drew the same masks."""
        mine = {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        if not self.cluster.distributed:
            return mine
        import torch.distributed as dist

        every: list = [None] * self.cluster.world
        dist.all_gather_object(every, mine)
        return {**mine, "ranks": every}

    def _state(self, epoch: int, batch: int, partial: dict | None, rng: dict) -> dict:
        """The checkpoint; ``rng`` from :meth:`_rng_states`, which every rank calls (a collective)."""
        spec = self.net_spec
        src = self.train_source
        data = {"path": str(self.data_path), "resolved": str(self.resolved_data),
                "val_path": self.val_path, "val_resolved": self.val_path and str(resolve(self.val_path).resolve()),
                "val_split": self.val_source.store_split if self.val_path else None,
                "fingerprint": self.fingerprint, "images": len(src),
                "classes": self.classes, "class_names": self.class_names,
                "size": int(src.size), "crop": int(self.crop), "pixel_scale": 1.0,
                "mean": torch.from_numpy(np.asarray(src.mean, dtype=np.float32)),
                "eigvals": torch.from_numpy(np.asarray(src.eigvals, dtype=np.float64)),
                "eigvecs": torch.from_numpy(np.asarray(src.eigvecs, dtype=np.float64)),
                "train_indices": torch.from_numpy(np.asarray(self.train_idx, dtype=np.int64)),
                "val_indices": torch.from_numpy(np.asarray(self.val_idx if self.val_idx is not None else [],
                                                           dtype=np.int64)),
                "train_limit": self.train_limit, "eval_batch": self.rank_batch}
        return {
            "format": ckpt.FORMAT, "version": 1,
            "epoch": epoch, "batch": batch, "step": self.step, "partial": partial,
            "model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": dict(self.sched),
            "rng": rng,
            "spec": {"path": spec.path, "text": spec.spec_text, "params_path": spec.params_path,
                     "params_text": spec.params_text, "overrides": list(spec.overrides)},
            "recipe": self.recipe.as_dict(),
            "options": {"precision": self.precision, "channels_last": self.channels_last, "compile": self.compile,
                        "devices": [str(d) for d in self.devices], "world": self.cluster.world,
                        "snapshot_minutes": self.snapshot_minutes, "argv": list(sys.argv)},
            "data": data,
            "history": list(self.history),
            "train_seconds": self.train_seconds,
            "provenance": provenance(),
        }

    def _write_metrics(self) -> None:
        # Rewritten whole from the history the checkpoint holds, so a resumed
        # run never repeats (or loses) an epoch's record.
        _write_whole(self.run_dir / runs.METRICS, "".join(json.dumps(rec) + "\n" for rec in self.history))

    def _refuse_a_finished_run(self) -> None:
        # A run's own checkpoints, not any .pt (a folder of the user's models is "not empty", below).
        if self.run_dir.exists() and (runs.has_checkpoints(self.run_dir) or (self.run_dir / runs.METRICS).exists()):
            raise fail("already holds a run; continue it with --resume, or choose another --out",
                       Location(str(self.run_dir)))

    def _lock_run_dir(self) -> None:
        """Make the run folder and hold its lock while training here; checked again under the
        lock, since another run may have started or finished here while the data was read."""
        if self.state is None and self.auto_named:
            self.run_dir = runs.claim_new_run_dir(self.run_dir)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lock = runs.lock_run(self.run_dir)
        if self.state is None:
            self._refuse_a_finished_run()
            return
        # Another --resume of this run may have trained on (and let go) while this one read its data.
        now = runs.resume_checkpoint(self.run_dir)
        if now != self.resumed_from or now.stat().st_mtime_ns != self.resumed_mtime:
            raise fail(f"the run went on while this --resume read its data (it now ends at {now.name}); "
                       "--resume again to continue from there", Location(str(self.run_dir)))

    def _unlock_run_dir(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _write_run_files(self) -> None:
        spec = self.net_spec
        info = {"spec": spec.path, "params": spec.params_path, "overrides": spec.overrides,
                "data": str(self.data_path), "val_data": self.val_path, "train_limit": self.train_limit,
                "recipe": self.recipe.as_dict(), "precision": self.precision,
                "channels_last": self.channels_last, "compile": self.compile,
                "devices": [str(d) for d in self.devices], "snapshot_minutes": self.snapshot_minutes,
                "world": self.cluster.world, "classes": len(self.classes), "argv": list(sys.argv),
                "provenance": provenance()}
        earlier = runs.run_info(self.run_dir) if self.state is not None else None
        if earlier and isinstance(earlier.get("argv"), list):  # the command that started the run stays
            info["argv"] = earlier["argv"]
            info["resumed_with"] = [*(earlier.get("resumed_with") or []), list(sys.argv)]
        # run.json first: a folder holding it is one a rerun may write over, should the disk fill below.
        _write_whole(self.run_dir / "run.json", json.dumps(info, indent=2) + "\n")
        # As parsed (UTF-8, LF line ends): a resume compares them to the checkpoint's.
        _write_whole(self.run_dir / "spec.cfg", spec.spec_text)
        if spec.params_text:
            _write_whole(self.run_dir / "spec.params.cfg", spec.params_text)
        if self.state is not None:
            self._write_metrics()  # drop records of epochs the checkpoint does not hold

    def _banner(self, epoch0: int, batch0: int) -> str:
        r = self.recipe
        val = (f"{len(self.val_idx):,} validation images" if self.val_idx is not None and len(self.val_idx)
               else "no validation")
        where = f"resuming at epoch {epoch0 + 1}, batch {batch0 + 1}" if self.state is not None else "new run"
        devices = ",".join(str(d) for d in dict.fromkeys(self.devices))
        ranks = f" x {self.cluster.world} ranks" if self.cluster.distributed else ""
        return (f"{self.run_dir}: {where}; {len(self.train_idx):,} training images, {val}, "
                f"{len(self.classes)} classes; {plural(r.epochs, 'epoch')} of "
                f"{plural(len(self.batches), 'batch', 'batches')} "
                f"of {r.batch_size}; "
                f"{self.crop}x{self.crop} crops; {devices}{ranks}, {self.precision}"
                f"{', channels_last' if self.channels_last else ''}{', compiled' if self.compile else ''}")


def diagnose(net, x: torch.Tensor, progress: float) -> tuple[str, str]:
    """What is not finite, and the layer whose learning rate to lower first.

    On a GPU the loss is read every few steps, and by then a layer that blew up
    has usually sent non-finite gradients to every other: the first bad layer in
    the net's order was often an innocent one, so the advice names the layer
    with the highest weight learning rate now, among those gone bad.  On the CPU
    the loss is read before its update, so the weights are those that made it
    and the first layer whose output is not finite is named."""
    from convspec.layers import LAYER_TYPES

    learned = [l for l in net.spec.layers.values() if LAYER_TYPES[l.type].has_weights]

    def rate(layer) -> float:
        return max((s.value(progress) for s in (layer["epsW"] or []) if s is not None), default=0.0)

    bad = [l for l in learned if not all(torch.isfinite(p).all() for p in net.layer_module(l.name).parameters())]
    if bad:
        what = ("the weights of every learned layer are not finite" if len(bad) == len(learned) else
                f"the weights of {', '.join(repr(l.name) for l in bad)} are not finite")
        return what, max(bad, key=rate).name
    fastest = max(learned, key=rate).name if learned else "LAYER"
    names = [l.name for l in net.spec.layers.values() if l.type not in ("data",) and not l.type.startswith("cost.")]
    with torch.no_grad():
        outputs = net(x, outputs=names)
    for name in names:
        if not torch.isfinite(outputs[name]).all():
            return f"the first layer whose output is not finite is '{name}'", fastest
    return "the weights and outputs are finite but the loss is not", fastest


def runaway_decay(net, progress: float, lr_scale: float = 1.0) -> tuple[str, float, float] | None:
    """The first learned layer whose weight decay diverges whatever the data, if any.

    Alone, the decay's update is  inc = mom * inc - a * W;  W += inc  with a = epsW * wc
    (epsW as it is now: its schedule at ``progress``, times the drops' ``lr_scale``):
    a linear recurrence whose roots lie inside the unit circle only while
    0 < a < 2 (1 + mom).  Past that the weights grow every step, so lowering the
    learning rates in general (the usual advice) is not the fix: this layer's wc or
    epsW is."""
    from convspec.layers import LAYER_TYPES

    for layer in net.spec.layers.values():
        if not LAYER_TYPES[layer.type].has_weights:
            continue
        for schedule, wc, mom in zip(layer["epsW"] or [], layer["wc"] or [], layer["momW"] or []):
            if schedule is None or not wc or mom is None:
                continue
            product, bound = schedule.value(progress) * lr_scale * wc, 2 * (1 + mom)
            if product >= bound:
                return layer.name, product, bound
    return None


def _write_whole(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) whole (``runtime.files``).  A write that fails (a full disk)
    names ``path``, which Python's own error for a failed write does not."""
    try:
        files.write_whole(path, lambda f: f.write(text.encode("utf-8")))
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(convspec.__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    return {"convspec": convspec.__version__, "git_commit": _git_commit(), "torch": str(torch.__version__),
            "numpy": np.__version__, "python": platform.python_version(), "host": platform.node(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _epoch_line(rec: dict, epochs: int) -> str:
    val = (f"val top-1 {100 * rec['val_top1_error']:.2f}% top-{rec['k']} {100 * rec[f'val_top{TOPK}_error']:.2f}%"
           if rec["val_top1_error"] is not None else "no validation")
    return (f"epoch {rec['epoch']}/{epochs}  train loss {rec['train_loss']:.4f} error "
            f"{100 * rec['train_error']:.2f}%  {val}  lr x{rec['lr_scale']:g}  "
            f"{rec['seconds'] - rec['val_seconds']:.1f} s training ({rec['images_per_s']:,.0f} img/s) "
            f"+ {rec['val_seconds']:.1f} s validation")


def train(options: TrainOptions) -> RunSummary:
    trainer = Trainer(options)
    try:
        return trainer.run()
    finally:
        cluster = trainer.cluster
        if cluster.distributed:
            # The DDP wrapper holds the process group, and the trainer's reference cycles kept it
            # alive until the interpreter's exit, where gloo's destructor (threads still joinable)
            # once aborted a rank that had finished: "terminate called without an active exception",
            # SIGABRT.  Freed here, while the interpreter is whole, before the group is destroyed.
            del trainer
            gc.collect()
        D.teardown(cluster)
