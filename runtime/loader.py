"""The training and evaluation loader.

    source = open_source("data/cifar-10-batches-py", "train")
    train_idx, val_idx = holdout(len(source), fraction=0.1, seed=0)
    batches = Batches(source, train_idx, batch_size=128,
                      augment=Augment(24, flip=True, random_crop=True), seed=0)
    for images, labels in batches.epoch(3): ...      # float32 (B, 3, 24, 24), int64 (B,)

Every source hands out uint8 (B, S, S, 3) batches; crops, flips, the mean
subtraction and the PCA colour noise then run on the whole batch
(``preprocess.augment_batch``).  The order is a permutation drawn from
(seed, epoch), so a resumed run sees the same order, and each data-parallel
rank takes its share, ``[rank::world]``, of every global batch, augmented as
the whole batch would be.  Decoding sources (JPEG stores,
image folders) use ``DataLoader`` workers; memory-mapped raw stores and CIFAR
arrays need none.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from convspec.errors import Location, SpecError, fail

from . import cifar
from .preprocess import Augment, Stats, augment_batch, eval_views, load_square
from .progress import Progress
from .sources import ImageList, detect, list_class_folders, list_flat, not_a_run_class, resolve
from .store import StoreSplit


class ImageSource(Protocol):
    labels: np.ndarray
    classes: list[str]
    mean: np.ndarray  # float32 (S, S, 3)
    eigvals: np.ndarray
    eigvecs: np.ndarray
    size: int
    decodes: bool  # True when fetching a batch decodes images (workers help)

    def images(self, indices, reuse: bool = False) -> np.ndarray: ...


class _Sized:
    loose: tuple = ()  # images beside the class folders, not read (set by open_source)
    nested: tuple = ()  # images in folders inside the class folders, not read (set by open_source)
    store_split: str | None = None  # which split of a prepared store this is, for saying what was scored

    def __len__(self) -> int:
        return len(self.labels)


class ArraySource(_Sized):
    """Images already in memory (CIFAR batches)."""

    decodes = False

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], stats: Stats | None = None,
                 paths: list[Path] | None = None):
        self.array, self.labels, self.classes = images, labels, classes
        self.paths = paths  # where the images came from, when they were files
        self.size = images.shape[1]
        self.mean = self.eigvals = self.eigvecs = None
        if stats is False:  # evaluation: the run's own mean is used
            return
        if stats is None:
            stats = Stats.empty(self.size)
            for start in range(0, len(images), 4096):
                stats.add(images[start:start + 4096])
        self.mean = stats.mean_image()
        self.eigvals, self.eigvecs = stats.pca()

    def images(self, indices, reuse: bool = False) -> np.ndarray:
        return self.array[np.asarray(indices)]


class FolderSource(_Sized):
    """Image files decoded on every fetch: the naive pipeline, kept for
    convenience; ``convspec prepare`` makes a store that reads far faster."""

    decodes = True

    def __init__(self, listing: ImageList, size: int, stats: bool = True):
        self.paths = [p for p, _ in listing.items]
        self.labels = np.asarray([label for _, label in listing.items], dtype=np.int64)
        self.classes, self.size = listing.classes, size
        self.mean = self.eigvals = self.eigvecs = None
        if stats:  # one pass over the images; the store keeps this instead
            sums = Stats.empty(size)
            for start in range(0, len(self.paths), 256):
                sums.add(self.images(range(start, min(len(self.paths), start + 256))))
            self.mean = sums.mean_image()
            self.eigvals, self.eigvecs = sums.pca()

    def images(self, indices, reuse: bool = False) -> np.ndarray:
        out = np.empty((len(indices), self.size, self.size, 3), dtype=np.uint8)
        for k, i in enumerate(indices):
            try:
                out[k] = load_square(str(self.paths[int(i)]), self.size)
            except Exception as err:  # a broken file mid-epoch: name it rather than crash opaquely
                raise _unreadable_image(Path(self.paths[int(i)]), err) from None
        return out


def _unreadable_image(path: Path, err: Exception, others: str = "") -> SpecError:
    return fail(f"cannot read image ({type(err).__name__}: {err}){others}; run convspec prepare to list and skip "
                "broken files", Location(str(path)))


class _StoreSource(_Sized):
    def __init__(self, split: StoreSplit):
        self.split, self.store_split = split, split.name
        self.labels, self.classes, self.mean = split.labels, split.classes, split.mean
        self.eigvals, self.eigvecs, self.size = split.eigvals, split.eigvecs, split.size
        self.class_names = split.class_names
        self.decodes = split.kind == "jpeg"

    def map_classes(self, classes: list[str], path: Path) -> None:
        """Labels through a run's class list by folder name, as class folders are
        mapped: a store of some of the run's classes is evaluated as they are."""
        index = {name: i for i, name in enumerate(classes)}
        unknown = [c for c in self.classes if c not in index]
        if unknown:
            raise not_a_run_class(unknown[0], f"class '{unknown[0]}' of the store", classes, path,
                                  more=len(unknown) - 1)
        self.labels = np.array([index[c] for c in self.classes], np.int64)[self.labels]
        names = dict(zip(self.classes, self.class_names))
        self.classes, self.class_names = list(classes), [names.get(c, c) for c in classes]

    def images(self, indices, reuse: bool = False) -> np.ndarray:
        """With ``reuse``, the batch lands in one scratch buffer that the next
        call overwrites (fresh memory costs page faults on every batch); the
        loader uses it because augment_batch consumes the batch at once."""
        if not reuse:
            return self.split.images(indices)
        if getattr(self, "_scratch", None) is None or len(self._scratch) < len(indices):
            self._scratch = np.empty((len(indices), self.size, self.size, 3), np.uint8)
        return self.split.images(indices, out=self._scratch)


# Image folders up to this many decoded bytes are read into memory once (CIFAR's
# 50,000 JPEGs are 150 MB at 32x32), so epochs after the first cost no decoding.
IN_MEMORY_BYTES = 2 << 30


# The splits of a store that validation and evaluation read, in order of preference: val/ of an image
# folder, else the test_batch of CIFAR batches; a store with neither is read whole (its train split).
HELD_OUT = ("val", "test")


def recorded_held_out(data: dict) -> tuple[str, ...]:
    """The store split a run's --val-data was read from, as its checkpoint's ``data`` entry
    records it: runs from before the split was recorded read 'val', else 'train'."""
    if "val_split" not in data:
        return ("val",)
    return (data["val_split"],) if data["val_split"] else HELD_OUT


def reads_its_training_images(path: Path) -> bool:
    """Whether ``path`` opened for validation gives the images it gives for training: class
    folders, and a store of one split (an image folder with val/ and CIFAR batches hold both)."""
    kind = detect(path)
    return kind in ("classfolders", "flat") or (
        kind == "store" and not any(StoreSplit.has_split(path, s) for s in HELD_OUT))


def open_source(path: str | Path, split: str = "train", classes: list[str] | None = None,
                labels_file: Path | None = None, size: int = 256, stats: bool = True,
                progress: bool = False, in_memory: bool = True, held_out: tuple[str, ...] = HELD_OUT
                ) -> ImageSource:
    """Detect the kind of ``path`` and open one split ("train", "val" or "test").

    ``classes`` (a trained run's list) maps class folder names to indices; an
    unknown folder is an error naming it.  ``size`` is the side images from a
    folder are rescaled and centre-cropped to.  ``stats=False`` skips the mean
    and PCA pass (evaluation uses the run's own).  ``in_memory=False`` keeps
    an image folder on disk even when it would fit (for reading a few images).
    ``held_out``: the store splits "val" and "test" may read, in order of preference.
    """
    path = resolve(path)
    kind = detect(path)
    if labels_file is not None and kind != "flat":
        raise fail(f"holds {KIND_NAMES[kind]}, which carry their own classes; leave --labels out (it labels a flat "
                   "folder of images)", Location(str(path)))
    if kind == "store":
        wanted = split if split == "train" else next(
            (name for name in held_out if StoreSplit.has_split(path, name)), "train")
        store = StoreSplit(path, wanted)
        source = _StoreSource(store)
        if classes is not None and store.classes != classes:
            source.map_classes(classes, path)
        return source
    if kind == "cifar":
        data = cifar.load_cifar(path, "train" if split == "train" else "test")
        if classes is not None and list(data.classes) != list(classes):
            # Labels are indices into the class list: only the same list in the same order means the same classes.
            raise fail(f"its classes ({_few(data.classes)}) are not the run's ({_few(classes)}); evaluate CIFAR "
                       "batches of the classes the run was trained on", Location(str(path)))
        return ArraySource(data.images, data.labels, data.classes, stats=None if stats else False)
    if kind == "imagefolder":
        sub = path / ("train" if split == "train" else "val")
        if not sub.is_dir():
            # detect() saw train/, so only a val/ can be missing: scoring needs a folder of class folders.
            raise fail(f"has a train/ folder but no val/ folder; give {path / 'train'} to score every image in it, "
                       "or add val/ with one folder per class", Location(str(path)))
        listing = list_class_folders(sub, classes)
    elif kind == "classfolders":
        listing = list_class_folders(path, classes)
    else:
        if classes is None:
            raise fail("is a flat folder of images; training needs one sub-folder per class (or a store "
                       "from convspec prepare)", Location(str(path)))
        if labels_file is None:
            raise fail("is a flat folder of images; give --labels FILE ('filename class' lines)",
                       Location(str(path)))
        listing = list_flat(path, labels_file, classes)
    if in_memory and len(listing.items) * size * size * 3 <= IN_MEMORY_BYTES:
        source = _read_into_memory(listing, size, stats, progress)
    else:
        source = FolderSource(listing, size, stats)
    source.loose, source.nested, source.absent = listing.loose, listing.nested, listing.absent
    return source


KIND_NAMES = {"store": "a prepared store", "cifar": "CIFAR batches", "imagefolder": "train/ and val/ class folders",
              "classfolders": "class folders"}


def _few(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def refuse_other_size(source: ImageSource, size: int, path, trained: str, fix: str) -> None:
    """A store or CIFAR folder has one fixed size (an image folder is rescaled to any):
    its images and the mean image must be the same size, or every view is wrong."""
    if source.size != size:
        raise fail(f"holds {source.size}x{source.size} images but {trained} {size}x{size}; {fix}",
                   Location(str(path)))


def _read_into_memory(listing: ImageList, size: int, stats: bool, progress: bool) -> "ArraySource":
    folder = FolderSource(listing, size, stats=False)
    images = np.empty((len(folder), size, size, 3), np.uint8)
    bar = Progress(len(folder), f"reading {len(folder):,} images", enabled=progress)
    broken: list[tuple[Path, Exception]] = []
    for start in range(0, len(folder), 256):
        stop = min(len(folder), start + 256)
        for i in range(start, stop):
            try:
                images[i] = load_square(str(folder.paths[i]), size)
            except Exception as err:  # read on: one run that names every broken file, not one run per file
                broken.append((Path(folder.paths[i]), err))
        bar.update(stop - start)
    bar.close()
    if broken:
        (first, err), rest = broken[0], [p for p, _ in broken[1:]]
        others = ""
        if rest:
            names = ", ".join(f"{p.parent.name}/{p.name}" for p in rest[:3]) + (", ..." if len(rest) > 3 else "")
            others = f"; {len(rest)} more of the {len(folder):,} images cannot be read either ({names})"
        raise _unreadable_image(first, err, others)
    return ArraySource(images, folder.labels, folder.classes, stats=None if stats else False,
                       paths=folder.paths)


def augment_for(recipe, crop: int) -> Augment:
    """Training augmentation from the params file's [train] section (convspec.recipe.DataRecipe)."""
    return Augment(crop, flip=recipe.flip, random_crop=recipe.random_crop, pca_std=recipe.pca_noise)


def holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): a fixed random ``fraction`` held out."""
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(n * fraction))
    return np.sort(order[k:]), np.sort(order[:k])


class _BufferPool:
    """Float batch buffers handed out again once nobody holds them.

    Fresh memory for every batch costs page faults and zeroing (a third of
    the raw store's time).  A buffer is reused only when its reference count
    shows that the pool alone holds it: a batch the caller keeps (in a list,
    in autograd's saved tensors) is never overwritten.
    """

    def __init__(self, size: int = 4):
        self.size = size
        self.buffers: list[np.ndarray] = []

    def get(self, shape: tuple[int, ...]) -> np.ndarray:
        for buf in self.buffers:
            # References: the list, the loop variable and getrefcount's argument.
            if buf.shape == shape and sys.getrefcount(buf) <= 3:
                return buf
        buf = np.empty(shape, dtype=np.float32)
        if len(self.buffers) < self.size:
            self.buffers.append(buf)
        return buf


class _EpochBatches(Dataset):
    """An epoch's batches: this rank's share, ``[rank::world]``, of each global batch."""

    def __init__(self, source, batches: list[np.ndarray], augment: Augment, seed: int, epoch: int,
                 pool: _BufferPool | None = None, rank: int = 0, world: int = 1):
        self.source, self.batches, self.augment = source, batches, augment
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world
        self.pool = pool if pool is not None else _BufferPool()

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int):
        whole = self.batches[b]
        idx = whole[self.rank::self.world]
        rng = np.random.default_rng([self.seed, self.epoch, b])  # independent of worker and rank count
        if getattr(self, "_mean_flipped", None) is None:
            self._mean_flipped = np.ascontiguousarray(self.source.mean[:, ::-1])
        batch = self.source.images(idx, reuse=True)  # consumed by augment_batch below
        c = self.augment.crop
        out = self.pool.get((len(idx), c, c, 3))
        images = augment_batch(batch, self.source.mean, self.augment, rng,
                               self.source.eigvals, self.source.eigvecs, self._mean_flipped, out=out,
                               share=(self.rank, self.world, len(whole)))
        del out  # only the returned tensor may keep the buffer busy
        return images, torch.from_numpy(self.source.labels[idx])


@dataclass
class Batches:
    source: ImageSource
    indices: np.ndarray
    batch_size: int
    augment: Augment
    seed: int = 0
    shuffle: bool = True
    rank: int = 0
    world: int = 1
    workers: int = 0
    pin_memory: bool = False
    drop_last: bool = True

    def __post_init__(self):
        if self.augment.crop > self.source.size:
            raise fail(f"the net wants {self.augment.crop}x{self.augment.crop} crops but the images are "
                       f"{self.source.size}x{self.source.size}")

    def _batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's slice of every global batch."""
        return [g[self.rank::self.world] for g in self._global_batches(epoch)]

    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        order = self.indices
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        size = self.batch_size * self.world
        stop = (len(order) // size) * size if self.drop_last else len(order)
        globals_ = [order[i:i + size] for i in range(0, stop, size)]
        return [g for g in globals_ if len(g[self.rank::self.world])]

    def __len__(self) -> int:
        return len(self._batches(0))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from batch ``start`` on (a resumed run skips
        the ones it already trained on without reading them)."""
        workers = self.workers if self.source.decodes else 0
        if getattr(self, "_pool", None) is None:
            self._pool = _BufferPool()
        # In-process epochs share one pool: a fresh pool per epoch page-faults
        # new buffers for the first batches of every epoch.  Workers get their
        # own (the dataset is pickled to them, buffers and all).
        data = _EpochBatches(self.source, self._global_batches(epoch), self.augment, self.seed, epoch,
                             pool=None if workers else self._pool, rank=self.rank, world=self.world)
        if workers == 0:
            # No DataLoader: creating its iterator draws from torch's global
            # RNG, which would shift dropout's random numbers on resume.
            for b in range(start, len(data)):
                yield data[b]
            return
        loader = DataLoader(_Skip(data, start), batch_size=None, shuffle=False, num_workers=workers,
                            pin_memory=self.pin_memory, persistent_workers=False, prefetch_factor=4,
                            generator=torch.Generator().manual_seed(self.seed))
        for item in loader:
            if isinstance(item, _WorkerFailure):
                raise fail(item.message, item.location)
            yield item


@dataclass
class _WorkerFailure:
    """A worker's one-line error, passed back as a value: raised in a worker, it
    would reach the user wrapped in the worker's traceback (and lose its location)."""
    message: str
    location: Location | None


class _Skip(Dataset):
    def __init__(self, data: _EpochBatches, start: int):
        self.data, self.start = data, start

    def __len__(self) -> int:
        return len(self.data) - self.start

    def __getitem__(self, b: int):
        try:
            return self.data[b + self.start]
        except SpecError as err:
            return _WorkerFailure(err.message, err.location)


def eval_batches(source: ImageSource, indices: np.ndarray, batch_size: int, crop: int,
                 ten_views: bool = False, mean: np.ndarray | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(B, V, 3, crop, crop) views and labels, in order; V is 1 or 10.
    ``mean``: the training set's mean image (default: the source's own)."""
    mean = source.mean if mean is None else mean
    if crop > source.size:
        raise fail(f"the net wants {crop}x{crop} crops but the images are {source.size}x{source.size}")
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        yield eval_views(source.images(idx), mean, crop, ten_views), torch.from_numpy(source.labels[idx])
