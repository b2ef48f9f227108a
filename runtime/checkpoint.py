"""Checkpoints: one plain dict per file, written atomically, read safely.

A checkpoint holds only tensors and plain Python values (str, int, float,
bool, None, lists and dicts of them), so ``torch.load(weights_only=True)``
reads it and a checkpoint can never run code.  It is written whole
(``runtime.files``): a crash leaves either the old file or the new one, never
half of one.

    save(run_dir / "epoch-0003.pt", state)
    state = load(run_dir / "epoch-0003.pt")
    prune(run_dir, keep=3)            # the newest 3 epoch-*.pt; best.pt is separate
"""

from __future__ import annotations

import pickle
import re
import textwrap
import zipfile
from pathlib import Path

import torch

from convspec.errors import Location, fail

from . import files

EPOCH_PATTERN = "epoch-*.pt"
FORMAT = "convspec-checkpoint"


def epoch_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.pt"


def epoch_number(path: Path) -> int | None:
    """N for an epoch-N.pt file name, else None."""
    match = re.fullmatch(r"epoch-(\d+)\.pt", path.name)
    return int(match[1]) if match else None


def epoch_files(run_dir: str | Path) -> list[Path]:
    """A run folder's epoch-N.pt files, oldest epoch first.  Sorted by N, not by
    name: epoch-10000.pt comes after epoch-9999.pt, which its name sorts before."""
    found = [p for p in Path(run_dir).glob(EPOCH_PATTERN) if epoch_number(p) is not None and p.is_file()]
    return sorted(found, key=lambda p: (epoch_number(p), p.name))


def save(path: str | Path, state: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        files.write_whole(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as err:
        text = " ".join(str(err).split())
        # A full disk reaches torch.save's zip writer as a RuntimeError: "[enforce fail at
        # inline_container.cc:672] . unexpected pos 119872 vs 119824", which names nothing a user knows.
        why = "the disk filled up as it was written" if "unexpected pos" in text else \
            (err.strerror if isinstance(err, OSError) and err.strerror else text[:120])
        raise fail(f"could not write the checkpoint ({why}); "
                   f"{files.free_space(path.parent)}free some space or choose another --out "
                   "(--resume continues from the last checkpoint saved)", Location(str(path))) from None
    return path


def load(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint; a missing, truncated, corrupted or unsafe file is a
    one-line error naming it (older checkpoints are untouched)."""
    path = Path(path)
    if not path.is_file():
        raise fail("no such checkpoint; give a run folder or a .pt file it holds", Location(str(path)))
    if path.stat().st_size == 0:
        raise fail("checkpoint is empty (0 bytes), probably cut off while being written; "
                   "use an older one from the same run", Location(str(path)))
    with path.open("rb") as head:
        if head.read(4) != b"PK\x03\x04":  # every zip, cut off or not, starts so; a spec or an image does not
            raise fail("not a checkpoint (convspec checkpoints are the .pt files convspec train writes); "
                       "give a run folder or one of its .pt files", Location(str(path)))
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; a cut-off one has no directory
        raise fail("checkpoint is truncated or corrupted (not a complete torch zip file); "
                   "use an older one from the same run", Location(str(path)))
    try:
        # torch.load does not check the zip's CRCs: flipped bytes would load as wrong weights.
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        damaged, names = "its directory", []
    if damaged is not None:
        raise fail(f"checkpoint is corrupted ({damaged} fails its checksum); use an older one from the same run",
                   Location(str(path)))
    # torch.save writes FOLDER/data.pkl beside the tensors; any other zip once met torch's own
    # text, cut off mid-phrase ("Expected hasRecord("version") to be true, but got ...").
    if not any(name.count("/") == 1 and name.endswith("/data.pkl") for name in names):
        raise fail("not a checkpoint: a zip file, but not one torch.save wrote (it holds no data.pkl); give a run "
                   "folder or one of the .pt files convspec train writes", Location(str(path)))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (zipfile.BadZipFile, RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        # Cut at a word, without torch's own request for reports.
        first = textwrap.shorten(first.split("(Could this error message be improved?")[0], 120, placeholder=" ...")
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise fail("checkpoint holds objects other than tensors and plain values and was not loaded, "
                       "since loading them could run code", Location(str(path))) from None
        raise fail(f"checkpoint is truncated or corrupted ({first}); use an older one from the same run",
                   Location(str(path))) from None
    if not isinstance(state, dict):
        raise fail(f"not a convspec checkpoint (it holds a {type(state).__name__}, where convspec writes a dict); "
                   "give a run folder or one of the .pt files convspec train writes", Location(str(path)))
    return state


NOT_TRAINING = ("not a convspec training checkpoint (a torch file from elsewhere?); give a run folder or one of "
                "the .pt files convspec train writes")


# What every reader of a training checkpoint relies on; later additions (history, provenance, ...) are read
# with defaults, so that older checkpoints still open.
REQUIRED = ("epoch", "model", "spec", "recipe", "options", "data")


def load_training(path: str | Path, map_location="cpu") -> dict:
    """:func:`load`, for a checkpoint that convspec train wrote (eval, show, resume, convspec.load)."""
    state = load(path, map_location)
    if state.get("format") != FORMAT:
        raise fail(NOT_TRAINING, Location(str(path)))
    missing = [key for key in REQUIRED if key not in state]
    if missing:  # a checkpoint edited by a script, or cut short by one: eval, show and resume all need these
        raise fail(f"convspec checkpoint without its '{missing[0]}' entry (edited or rewritten by another "
                   "program?); use an older one from the same run", Location(str(path)))
    return state


def prune(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` epoch checkpoints; returns the deleted."""
    files = epoch_files(run_dir)
    doomed = files[:-keep] if keep > 0 else files
    for f in doomed:
        f.unlink()
    return doomed
