"""CIFAR-10/100 in their python batch format, read without running code.

The batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``
for CIFAR-10; ``train``, ``test``, ``meta`` for CIFAR-100) are pickles, and a
pickle can run code.  :class:`SafeUnpickler` admits only the plain types these
files hold (dicts, lists, strings, bytes, numbers and numpy arrays) and refuses
every other global.
"""

from __future__ import annotations

import io
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convspec.errors import Location, fail

CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = "test_batch"
CIFAR10_META = "batches.meta"
CIFAR100_TRAIN, CIFAR100_TEST, CIFAR100_META = "train", "test", "meta"

# (module, name) pairs a numpy array's pickle needs; nothing else is importable.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how python 2 pickles bytes when read as latin1
    ("builtins", "bytes"),  # how python 3 pickles b"" (an empty name, an empty batch),
    ("__builtin__", "bytes"),  # ... spelled the python 2 way in protocol 2
}


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR batches hold only plain data")


def load_batch(path: Path) -> dict:
    """One batch file as a dict with str keys; a located error if it is not one."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise fail(f"cannot read CIFAR batch: {err.strerror}", Location(str(path))) from None
    try:
        obj = SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as err:  # any malformed pickle: truncated, wrong format, refused global
        raise fail(f"not a CIFAR python batch ({err}); re-download it or remove it", Location(str(path))) from None
    if not isinstance(obj, dict):
        raise fail("not a CIFAR python batch (expected a dict)", Location(str(path)))
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


@dataclass
class CifarSplit:
    images: np.ndarray  # (N, 32, 32, 3) uint8, RGB
    labels: np.ndarray  # (N,) int64
    classes: list[str]


def _images(batch: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The batch's images and labels, checked: a value cast to uint8 or int64
    unchecked would wrap (300 -> 44) or crash far from the file."""
    try:
        data = np.asarray(batch.get("data"))
    except ValueError:  # ragged rows
        data = np.zeros((0, 0))
    labels = batch.get("labels", batch.get("fine_labels"))
    if not isinstance(labels, (list, tuple, np.ndarray)):
        labels = None
    if data.ndim != 2 or data.shape[1] != 3072 or labels is None or len(labels) != len(data):
        raise fail("CIFAR batch has no 'data' of N x 3072 values with matching labels", Location(str(path)))
    if data.dtype != np.uint8 and not (data.dtype.kind in "iu" and (data.size == 0 or
                                                                    (data.min() >= 0 and data.max() <= 255))):
        raise fail(f"CIFAR batch's 'data' must be whole numbers 0..255, not {data.dtype} values; re-download the "
                   "python version", Location(str(path)))
    try:
        label_array = np.asarray(labels) if len(labels) else np.zeros(0, np.int64)
    except (TypeError, ValueError):
        label_array = np.asarray([], dtype=object)
    if label_array.ndim != 1 or label_array.dtype.kind not in "iu":
        shown = repr(next(iter(labels), None))[:30]
        raise fail(f"CIFAR batch's 'labels' must be N whole numbers, not {shown}; re-download the python version",
                   Location(str(path)))
    # Stored as N x (1024 red, 1024 green, 1024 blue), row-major 32x32 planes.
    images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), label_array.astype(np.int64)


def _text(name: bytes) -> str:
    """UTF-8 (a batch written by python 3), else latin-1 (python 2's byte strings never fail it)."""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return name.decode("latin1")


def _class_names(meta: dict, key: str, path: Path) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or not all(isinstance(c, (str, bytes)) for c in names):
        raise fail(f"'{key}' must be a list of class names; re-download the python version", Location(str(path)))
    names = [_text(c) if isinstance(c, bytes) else c for c in names]
    twice = sorted(name for name, count in Counter(names).items() if count > 1)
    if twice:
        raise fail(f"'{key}' names a class twice ({', '.join(twice[:3])}); re-download the python version",
                   Location(str(path)))
    return names


def is_cifar_dir(path: Path) -> bool:
    return (path / CIFAR10_META).is_file() or (path / CIFAR100_META).is_file()


def load_cifar(path: Path, split: str) -> CifarSplit:
    """``split`` is "train" or "test"."""
    if (path / CIFAR10_META).is_file():
        classes = _class_names(load_batch(path / CIFAR10_META), "label_names", path / CIFAR10_META)
        names = CIFAR10_TRAIN if split == "train" else [CIFAR10_TEST]
    elif (path / CIFAR100_META).is_file():
        classes = _class_names(load_batch(path / CIFAR100_META), "fine_label_names", path / CIFAR100_META)
        names = [CIFAR100_TRAIN if split == "train" else CIFAR100_TEST]
    else:
        raise fail("not a CIFAR folder: no batches.meta (CIFAR-10) or meta (CIFAR-100)", Location(str(path)))
    parts = []
    for name in names:
        if not (path / name).is_file():
            raise fail(f"CIFAR folder is missing '{name}'; download the python version again",
                       Location(str(path)))
        parts.append(_images(load_batch(path / name), path / name))
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if not classes or labels.max(initial=0) >= len(classes):
        raise fail("CIFAR meta file lists fewer classes than the labels use", Location(str(path)))
    if labels.min(initial=0) < 0:
        raise fail(f"CIFAR batch has label {labels.min()}; labels are 0..{len(classes) - 1} (the classes in the "
                   "meta file): re-download the python version", Location(str(path)))
    return CifarSplit(images, labels, classes)


def write_batch(path: Path, images: np.ndarray, labels, extra: dict | None = None) -> None:
    """Write a CIFAR-format batch (tests and tools make small ones)."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1).astype(np.uint8)
    obj = {b"data": data, b"labels": list(map(int, labels)), **(extra or {})}
    path.write_bytes(pickle.dumps(obj, protocol=2))


__all__ = ["CifarSplit", "SafeUnpickler", "is_cifar_dir", "load_batch", "load_cifar", "write_batch"]
