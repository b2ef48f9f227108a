"""Run folders, and rebuilding a trained net from its checkpoint alone.

A run folder (``runs/<spec>-<date>-<time>`` unless ``--out`` names one) holds::

    run.json          the command's options and the recipe, for people
    spec.cfg          the layer file and the params file as trained
    spec.params.cfg   (overrides are in run.json and in every checkpoint)
    metrics.jsonl     one JSON object per finished epoch
    epoch-0007.pt     a checkpoint per epoch (the newest --keep are kept)
    best.pt           the checkpoint with the lowest validation top-1 error
    interrupted.pt    written on SIGINT/SIGTERM mid-epoch; --resume continues from it
    .lock             held by the process training here (a second one is refused)

Every checkpoint holds the spec and params text with the overrides, the class
list, the mean image and the crop, so it alone rebuilds the net
(:func:`net_from_checkpoint`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from convspec.errors import Location, SpecError, fail

from . import checkpoint as ckpt
from . import files

RUNS_ROOT = Path("runs")
BEST = "best.pt"
INTERRUPTED = "interrupted.pt"
METRICS = "metrics.jsonl"


def new_run_dir(spec_path: str, root: Path = RUNS_ROOT) -> Path:
    stem = Path(spec_path).name.split(".")[0]
    return _free_name(root / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")


def _free_name(base: Path) -> Path:
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def claim_new_run_dir(path: Path) -> Path:
    """Make the default run folder, or the next free name if another run made it since it
    was chosen (two ``convspec train`` started in the same second chose the same name)."""
    base = path
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            path = _free_name(base)


# Held (flock) by the process that trains in a run folder. The kernel lets go when that
# process ends however it ends, so a killed run leaves no stale lock behind.
LOCK = ".lock"


def lock_run(run_dir: Path) -> int | None:
    """Take the run folder's lock for as long as this process trains there, or refuse
    with who holds it: two processes training into one folder interleave their
    checkpoints and metrics. Returns the descriptor to close when done; None where the
    platform or filesystem has no flock (as before there was a lock)."""
    try:
        # refuse_if_busy's brief look from another process is no holder: retry for half a second.
        return files.hold_lock(run_dir / LOCK, wait=0.5)
    except files.Busy as busy:
        raise _busy(run_dir, busy.holder) from None


def refuse_if_busy(run_dir: Path) -> None:
    """Refuse early, before any data is read, a run folder another process trains in."""
    try:
        import fcntl
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except (ImportError, OSError):  # no flock, or no lock file: nobody has trained here since locks
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise _busy(run_dir, os.read(fd, 200).decode(errors="replace").strip()) from None
    finally:
        os.close(fd)  # closing lets go of the shared lock taken to look


def _busy(run_dir: Path, holder: str) -> SpecError:
    who = f" ({holder})" if holder else ""
    if _gone(holder):  # a killed train's DataLoader workers hold its lock until they notice, a few seconds
        return fail(f"the convspec train that held this run folder{who} has exited, but processes it started "
                    "(data-loading workers) still hold it; retry in a few seconds", Location(str(run_dir)))
    return fail(f"another convspec train is training in this run folder{who}; wait for it to end or stop it, "
                "or choose another --out", Location(str(run_dir)))


def _gone(holder: str) -> bool:
    """Whether the lock file's "pid N on HOST" is a process of this machine that no longer runs."""
    match = re.fullmatch(r"pid (\d+) on (.+)", holder)
    if not match or match[2] != socket.gethostname():
        return False
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # another user's process (EPERM): alive
        return False
    return False


def check_can_create(run_dir: Path) -> None:
    """Refuse a run folder that cannot be made, before any data is read (a minute for ImageNet)."""
    parent = run_dir
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise fail(f"cannot make the run folder: {parent} is a file; choose another --out", Location(str(run_dir)))
    if parent.is_dir() and not os.access(parent, os.W_OK | os.X_OK):
        raise fail(f"cannot make the run folder: {parent} is not writable; choose another --out",
                   Location(str(run_dir)))
    if parent.is_dir() and parent != run_dir:
        # Permissions are not the whole story: root may write anywhere, yet /proc takes no new
        # folder, and that came out only after the data was read.  So make one, and remove it.
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".convspec-probe-", dir=parent))
        except OSError as err:
            raise fail(f"cannot make the run folder: {parent} takes no new folder ({err.strerror or err}); "
                       "choose another --out", Location(str(run_dir))) from None
    if run_dir.is_dir() and not _a_run_that_stopped_before_its_first_checkpoint(run_dir):
        names = sorted(p.name for p in run_dir.iterdir())
        raise fail(f"is not empty and holds no convspec run (it has {', '.join(names[:3])}"
                   f"{', ...' if len(names) > 3 else ''}); choose an empty or new --out", Location(str(run_dir)))


# What a run writes before its first epoch ends.
RUN_START_FILES = {"run.json", "spec.cfg", "spec.params.cfg"}
# The output of ranks other than the first under convspec train --nproc-per-node (made before rank 0 starts).
RANK_LOGS = "ranks"


def _a_run_that_stopped_before_its_first_checkpoint(run_dir: Path) -> bool:
    """Empty, or only the files a run writes at its start (with a run.json convspec
    wrote) and the temporary file of a checkpoint cut off while being written:
    training may write over those, and over nothing else of the user's."""
    names = {p.name for p in run_dir.iterdir()
             if not files.is_partial_write(p) and not (p.name == RANK_LOGS and p.is_dir()) and p.name != LOCK}
    if not names:
        return True
    if not names <= RUN_START_FILES:
        return False
    info = run_info(run_dir)
    return info is not None and {"recipe", "provenance"} <= info.keys()


def run_info(run_dir: Path) -> dict | None:
    """run.json as a dict, or None when it is missing or not one (it is for people, not required)."""
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def folder_disagrees(state: dict, run_dir: Path) -> str | None:
    """The run-folder file (spec.cfg, spec.params.cfg or run.json) that says the
    checkpoint was trained from another layer file, params file or --set, else None."""
    from convspec.errors import read_utf8
    from convspec.parse import as_parsed

    spec = state["spec"]
    for name, text in (("spec.cfg", spec["text"]), ("spec.params.cfg", spec.get("params_text") or "")):
        path = run_dir / name
        # A file deleted by hand proves nothing; one opened and saved with CRLF line ends is unchanged.
        if path.is_file() and as_parsed(read_utf8(path)) != as_parsed(text):
            return name
    info = run_info(run_dir)  # the texts agree; without a run.json there is nothing more to compare
    recorded = info.get("overrides") if info else None
    if not isinstance(recorded, list) or not all(isinstance(o, str) for o in recorded):
        return None  # no run.json, or one edited out of shape: the checkpoints hold the overrides
    return "run.json" if recorded != list(spec.get("overrides", [])) else None


def same_training(a: dict, b: dict) -> bool:
    """Whether two checkpoints come from one run's spec, params file and --set."""
    return all(a["spec"].get(k) == b["spec"].get(k) for k in ("text", "params_text", "overrides"))


def peek(path: Path) -> dict | None:
    """A checkpoint's plain entries, its tensors mapped rather than read (cheap
    for AlexNet's 0.7 GB); None when it cannot be read so, and then the full
    load, if one comes, names what is wrong."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any reason it cannot be read: no position known
        return None
    return state if isinstance(state, dict) and state.get("format") == ckpt.FORMAT else None


def checkpoint_files(run_dir: Path) -> list[Path]:
    """A run folder's checkpoints: its epoch files, interrupted.pt and best.pt, which is
    enough on its own once the epoch files are deleted."""
    return ckpt.epoch_files(run_dir) + [p for p in (run_dir / INTERRUPTED, run_dir / BEST) if p.is_file()]


def has_checkpoints(run_dir: Path) -> bool:
    return bool(checkpoint_files(run_dir))


def newest_run(root: Path = RUNS_ROOT, name_it: str = "--checkpoint") -> Path:
    runs = [d for d in root.glob("*") if d.is_dir() and checkpoint_files(d)] if root.is_dir() else []
    if not runs:
        raise fail(f"no trained run under {root}/ (no folder with a checkpoint); train one with "
                   f"convspec train SPEC --data PATH, or name one with {name_it}", Location(str(root)))
    return max(runs, key=lambda d: max(p.stat().st_mtime for p in checkpoint_files(d)))


def resume_checkpoint(run_dir: Path) -> Path:
    """The checkpoint furthest into training, by the epoch and batch it records
    (not by its name or time: a copied folder gets new times, a renamed file
    lies): an epoch file, interrupted.pt, or best.pt when the others are gone."""
    if run_dir.is_file():
        raise fail("is a file; --resume continues a run folder from its furthest checkpoint: "
                   f"--out {shlex.quote(str(run_dir.parent))}", Location(str(run_dir)))
    if not run_dir.is_dir():
        raise fail("no such run folder to resume; give the --out folder of an earlier run", Location(str(run_dir)))
    # (file, preference on a tie, position when unreadable): an unreadable interrupted.pt is
    # taken, so that the full load says what is wrong with it and names the epoch file before it.
    unreadable_interrupted = (float("inf"), 0)
    candidates = [(p, 1, None) for p in ckpt.epoch_files(run_dir)]
    candidates += [(run_dir / INTERRUPTED, 2, unreadable_interrupted)] if (run_dir / INTERRUPTED).is_file() else []
    candidates += [(run_dir / BEST, 0, (-1, 0))] if (run_dir / BEST).is_file() else []
    if not candidates:
        if _a_run_that_stopped_before_its_first_checkpoint(run_dir):
            raise fail("has no checkpoint to resume from (training stopped before its first epoch ended); "
                       "start it again without --resume", Location(str(run_dir)))
        raise fail("has no checkpoint to resume from (no epoch-*.pt, interrupted.pt or best.pt; deleted?); "
                   "train again with another --out", Location(str(run_dir)))

    def position(candidate):
        path, preference, unreadable = candidate
        state = peek(path)
        if state is not None and isinstance(state.get("epoch"), int) and isinstance(state.get("batch"), int):
            return (state["epoch"], state["batch"]), preference
        return unreadable or (ckpt.epoch_number(path), 0), preference

    return max(candidates, key=position)[0]


def eval_checkpoint(path: str | Path | None, root: Path = RUNS_ROOT) -> Path:
    """A file as given; a run folder's best.pt, else its newest checkpoint;
    with no path, that of the newest run under ``root``."""
    path = Path(path) if path is not None else newest_run(root)
    if path.is_file():
        return path
    if not path.is_dir():
        raise fail("no such checkpoint or run folder; give a folder that convspec train wrote (runs/NAME) or one "
                   "of its .pt files", Location(str(path)))
    if (path / BEST).is_file():
        return path / BEST
    found = ckpt.epoch_files(path)
    if found:
        return found[-1]
    if (path / INTERRUPTED).is_file():
        return path / INTERRUPTED
    inside = sorted((d for d in path.iterdir() if d.is_dir() and checkpoint_files(d)),
                    key=lambda d: max(p.stat().st_mtime for p in checkpoint_files(d)))
    if inside:  # the folder of runs (runs/), not a run: name the newest, as no --checkpoint would
        raise fail(f"holds run folders, not a checkpoint; give one of them (the newest is "
                   f"{shlex.quote(str(inside[-1]))})", Location(str(path)))
    raise fail("holds no checkpoint (best.pt or epoch-*.pt)", Location(str(path)))


def recorded_data_path(recorded: dict, fix: str, split: str = "training") -> str:
    """The training (or, with ``split="validation"``, the --val-data) path a checkpoint's
    ``data`` entry names.  The path as typed when it leads where it led (a dataset name
    such as cifar10 always does); else the absolute path recorded beside it (the command
    runs from another folder); else the typed path if its data has the recorded
    fingerprint (the data moved along with the project); else one line ending in ``fix``."""
    from .download import DATASETS
    from .sources import fingerprint, resolve

    typed, absolute = ((recorded["path"], recorded.get("resolved")) if split == "training"
                       else (recorded["val_path"], recorded.get("val_resolved")))
    if typed in DATASETS:
        return typed
    if Path(typed).exists() and (absolute is None or Path(typed).resolve() == Path(absolute)):
        return typed
    if absolute and Path(absolute).exists():
        return absolute
    if Path(typed).exists():
        if split == "training" and fingerprint(resolve(typed).resolve()) != recorded["fingerprint"]:
            raise fail(f"is not the run's {split} data (that was {absolute}, which is gone; this folder's files "
                       f"differ); {fix}", Location(typed))
        return typed
    raise fail(f"the run's {split} data is not there any more (moved or deleted?); {fix}", Location(typed))


def data_change(recorded: dict, fingerprint: str, images: int | None = None) -> str | None:
    """Why data is not the data a run trained on (its checkpoint's ``data`` entry), or None.
    Resume and eval both need the same data: the held-out images are positions in its listing."""
    if fingerprint != recorded["fingerprint"]:
        return (f"files were added, removed or changed since the run trained on it (fingerprint {fingerprint}, "
                f"recorded {recorded['fingerprint']})")
    if images is not None and images != recorded["images"]:
        return (f"it lists {images:,} images where the run had {recorded['images']:,} (the convspec that trained "
                "the run listed its folders otherwise)")
    return None


def checked_net_from(state: dict, where: str = "checkpoint"):
    """The checked spec as trained: the recorded texts with the recorded overrides."""
    from convspec.check import check
    from convspec.parse import parse_text

    spec = state["spec"]
    params = parse_text(spec["params_text"], spec["params_path"]) if spec.get("params_text") else None
    # Runs from before a key given twice by --set was refused trained with the last value.
    last = {text.partition("=")[0].strip().lower(): text for text in spec.get("overrides", [])}
    try:
        return check(parse_text(spec["text"], spec["path"]), params, None, list(last.values()))
    except SpecError as err:  # a stricter check than the one the run passed
        trained_by = state.get("provenance", {})
        raise fail(f"the spec recorded here no longer passes this convspec's checks ({err.message}); open it with "
                   f"the convspec that trained it (version {trained_by.get('convspec', '?')}, commit "
                   f"{trained_by.get('git_commit', '?')})", Location(where)) from None


def net_from_checkpoint(state: dict, devices=None, path: str = "checkpoint"):
    """The trained CompiledNet, in eval mode, with ``classes``, ``class_names``,
    ``mean``, ``crop`` and ``preprocess`` attached for inference."""
    from convspec.builder import build

    if state.get("format") != ckpt.FORMAT:
        raise fail(ckpt.NOT_TRAINING, Location(path))
    net = build(checked_net_from(state, path), devices)
    try:
        net.load_state_dict(state["model"])
    except RuntimeError as err:
        # torch's first line only says "Error(s) in loading state_dict for ...": the next one names the key.
        lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [str(err)]
        more = f"; and {len(lines) - 1} more" if len(lines) > 1 else ""
        raise fail(f"weights do not fit the recorded spec ({lines[0][:200]}{more}); the file was changed or "
                   "is from another program", Location(path)) from None
    # Training stops at a non-finite loss before writing its weights, so NaN or inf here means a
    # changed file; scored, such a net gave a plausible-looking error (every class tied) and no word.
    bad = next((key for key, tensor in state["model"].items()
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)
    if bad is not None:
        raise fail(f"weight '{bad}' holds NaN or inf, which training never saves; the file was changed: use "
                   "another of the run's checkpoints", Location(path))
    data = state["data"]
    net.classes, net.class_names = list(data["classes"]), list(data["class_names"])
    net.mean, net.crop, net.image_size = data["mean"].numpy(), int(data["crop"]), int(data["size"])
    net.preprocess = Preprocess(net.mean, net.image_size, net.crop)
    return net.eval()


class Preprocess:
    """What the run did to a test image: short side to ``size``, centre crop
    ``size``, subtract the training mean, centre ``crop``.  Takes a path, a
    PIL image or a uint8 (H, W, 3) array; gives a float32 (1, 3, crop, crop) batch."""

    def __init__(self, mean: np.ndarray, size: int, crop: int):
        self.mean, self.size, self.crop = mean, size, crop

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        from .preprocess import eval_views, load_square, square

        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        pixels = square(image, self.size) if isinstance(image, Image.Image) else load_square(str(image), self.size)
        return eval_views(pixels[None], self.mean, self.crop, ten=False)[:, 0]
