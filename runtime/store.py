"""The prepared store: ``convspec prepare SRC OUT`` writes it, the loader reads it.

Layout of OUT (every array is a ``.npy`` file, so ``np.load(mmap_mode="r")``
maps it without reading it)::

    store.json                  written last: its presence means "complete"
    prepare.json                the options and what SRC held; a rerun with other options, or on a
                                SRC that changed since, is refused
    classes.tsv                 index <TAB> folder name <TAB> readable name
    mean.npy                    float32 (S, S, 3): the training split's mean image
    pca.npz                     eigvals (3,), eigvecs (3, 3) columns: RGB covariance
    report.txt                  images that could not be read, and why
    <split>-<k>.labels.npy      int64 (n,)
    <split>-<k>.raw.npy         uint8 (n, S, S, 3)            (--raw)
    <split>-<k>.jpeg.npy        uint8 (bytes,): JPEGs back to back  (default)
    <split>-<k>.offsets.npy     int64 (n + 1,): where each JPEG starts
    <split>-<k>.stats.npz       the shard's sums for the mean and covariance, and the images it skipped

Shards are fixed chunks of the sorted file list, written under temporary names
and renamed, the labels file last; a rerun keeps every finished shard and
redoes the rest, so an interrupted prepare finishes the job.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import multiprocessing
import os
import signal
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from convspec.errors import Location, fail, plural

from . import cifar, files
from .distributed import usable_cpus
from .preprocess import Stats, load_square
from .progress import Progress
from .sources import (STORE_MARKER, detect, file_size, list_class_folders, names_from_synsets, refuse_one_class,
                      resolve, sides_of_first, unread_notes)

FORMAT = "convspec-store"
VERSION = 1
SHARD = 512  # images per shard: small enough to show progress, large enough to read fast


@dataclass
class PrepareOptions:
    size: int | None = None  # None: 256 for image folders; CIFAR batches keep their own 32x32 (and refuse another)
    raw: bool = False
    quality: int = 90
    workers: int = 0  # 0: one per core

    def fingerprint(self, source: Path) -> dict:
        return {"format": FORMAT, "version": VERSION, "source": str(source.resolve()), "size": self.size,
                "kind": "raw" if self.raw else "jpeg", "quality": None if self.raw else self.quality}


def _differences(previous: dict, wanted: dict) -> list[str]:
    """What a rerun of prepare changed, as the options that made the store in OUT."""
    said = []
    if previous.get("source") != wanted["source"]:
        said.append(f"made from {previous.get('source')}")
    if previous.get("size") != wanted["size"]:
        said.append(f"made with --size {previous.get('size')}")
    if previous.get("kind") != wanted["kind"]:
        said.append("made with --raw" if previous.get("kind") == "raw" else "made without --raw")
    elif previous.get("quality") != wanted["quality"]:
        said.append(f"made with --quality {previous.get('quality')}")
    return said or [f"made by another convspec (store format {previous.get('format')} {previous.get('version')})"]


def _listing(splits) -> dict:
    """What prepare reads from SRC: every split's classes and files (name, label, size), or CIFAR's
    arrays, as a hash and a count.  Kept shards are found by name, so a rerun on a SRC that
    gained or lost a file or a class would keep shards of the old list beside shards of the new
    one: shifted, duplicated and mislabelled images."""
    digest, count = hashlib.sha256(), 0
    for split, data in splits:
        digest.update(f"split\0{split}\n".encode())
        digest.update("".join(f"class\0{c}\n" for c in data.classes).encode())
        if isinstance(data, cifar.CifarSplit):
            digest.update(np.ascontiguousarray(data.labels, dtype=np.int64).tobytes())
            digest.update(np.ascontiguousarray(data.images))
            count += len(data.labels)
        else:
            for path, label in data.items:
                # The class folder and the file: os.path.relpath would cost 10 s on ImageNet's 1.28M files.
                digest.update(f"{path.parent.name}/{path.name}\0{label}\0{file_size(str(path))}\n".encode())
            count += len(data.items)
    return {"fingerprint": digest.hexdigest()[:16], "images": count}


def _refuse_a_changed_source(previous: dict | None, listing: dict, source: Path, out: Path, complete: bool) -> None:
    if previous is None or previous == listing:
        return
    then, now = previous.get("images"), listing["images"]
    counts = (f"{then:,} images then, {now:,} now" if then != now
              else f"{now:,} images then and now, but other file names, sizes or classes")
    if complete:
        raise fail(f"changed since {out} was prepared from it ({counts}); the store holds the old images: delete "
                   f"{out} and prepare again, or prepare into a new folder", Location(str(source)))
    raise fail(f"changed since {out} was started ({counts}), so its finished shards no longer match it: delete "
               f"{out} and prepare again, or prepare into a new folder", Location(str(source)))


def _tsv(text: str) -> str:
    """A class name as one classes.tsv field (store.json keeps the exact name)."""
    return " ".join(text.replace("\t", " ").splitlines())


def _save_atomic(path: Path, write) -> None:
    """Write a store file whole (``runtime.files``); a failure names the file, the free space and the fix."""
    try:
        files.write_whole(path, write)
    except OSError as err:
        raise _not_written(path, err) from None


def _not_written(path: Path, err: OSError):
    """The form of the checkpoint writer's error: the file, why, the free space and the fix."""
    detail = " ".join(str(err).split())[:120]
    # numpy writes arrays with fwrite, whose short write on a full disk says only "N requested and M written".
    full = err.errno in (errno.ENOSPC, errno.EDQUOT) or "requested and" in detail
    return fail(f"could not write this store file{', the disk is full' if full else ''} ({detail}); "
                f"{files.free_space(path.parent)}free some space and run the same command again to finish "
                "(the shards written so far are kept), or prepare into another OUT", Location(str(path)))


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _encode(job: tuple[str, int, int, bool]):
    """Worker: one file -> (pixels, jpeg bytes or None, error or None)."""
    path, size, quality, raw = job
    try:
        pixels = load_square(path, size)
    except Exception as err:  # PIL raises many types for broken files; each is reported
        if not os.path.exists(path):  # a link whose target is gone
            reason = f"a link to {os.readlink(path)}, which does not exist" if os.path.islink(path) else "missing"
        else:
            reason = "zero-byte file" if os.path.getsize(path) == 0 else f"{type(err).__name__}: {err}"
        return None, None, reason
    return pixels, None if raw else _jpeg(pixels, quality), None


def _splits(source: Path, options: PrepareOptions):
    """[(split name, ImageList or CifarSplit)] for the source's layout."""
    kind = detect(source)
    if kind == "store":
        raise fail("is already a prepared store; give the original images", Location(str(source)))
    if kind == "cifar":
        return [("train", cifar.load_cifar(source, "train")), ("test", cifar.load_cifar(source, "test"))]
    if kind == "imagefolder":
        train = list_class_folders(source / "train")
        out = [("train", train)]
        if (source / "val").is_dir():
            out.append(("val", list_class_folders(source / "val", train.classes)))
        return out
    if kind == "classfolders":
        return [("train", list_class_folders(source))]
    raise fail("a flat folder needs a labels file; prepare takes class folders or CIFAR batches",
               Location(str(source)))


# Held (flock) by the prepare writing a store, which writes its pid there. The kernel lets
# go when that process ends however it ends, so the file left behind locks nothing.
PREPARE_LOCK = ".prepare.lock"


def prepare(source: Path, out: Path, options: PrepareOptions, synsets: Path | None = None,
            progress: bool = True) -> dict:
    """Write (or finish writing) a store; returns its store.json contents."""
    source, out = resolve(source), Path(out)
    if source.is_dir() and out.resolve().is_relative_to(source.resolve()):
        # Inside SRC the store would be read as one more class folder by the next prepare or train.
        raise fail(f"is {'SRC itself' if out.resolve() == source.resolve() else f'inside SRC {source}'}; "
                   "choose an OUT outside the images", Location(str(out)))
    splits = _splits(source, options)
    refuse_one_class(splits[0][1].classes, "class folder", source)
    options = _settle_size(options, splits[0][1], source)
    _refuse_upscaling_everything(splits[0][1], options)
    fingerprint = options.fingerprint(source)
    listing = _listing(splits)
    # Before writing anything: a bad file leaves OUT as it was.
    names, synsets_note = names_from_synsets(synsets, list(splits[0][1].classes)) if synsets else ({}, None)
    out.mkdir(parents=True, exist_ok=True)
    _refuse_a_folder_of_other_files(out)  # before the lock file: a refused folder is left as it was
    try:
        # Two prepares writing one store would write each other's shards and delete each
        # other's half-written ones (remove_partial_writes below).
        lock = files.hold_lock(out / PREPARE_LOCK)
    except files.Busy as busy:
        who = f" ({busy.holder})" if busy.holder else ""
        raise fail(f"another convspec prepare is writing this store{who}; wait for it to finish "
                   "(then this command has nothing left to do), or choose another OUT", Location(str(out))) from None
    except OSError:
        lock = None  # a read-only OUT: a finished store is reported as before, anything else fails at its write
    try:
        return _write_store(source, out, options, splits, fingerprint, listing, names, synsets_note, progress)
    finally:
        if lock is not None:
            os.close(lock)


def _refuse_a_folder_of_other_files(out: Path) -> None:
    """OUT without prepare.json holds nothing of a store's but a killed prepare's partial writes
    and the lock; anything else is not ours to write beside."""
    if not (out / "prepare.json").is_file() and any(
            not files.is_partial_write(p) and p.name != PREPARE_LOCK for p in out.iterdir()):
        raise fail("is not empty and holds no convspec store; choose an empty or new folder", Location(str(out)))


def _write_store(source: Path, out: Path, options: PrepareOptions, splits, fingerprint: dict, listing: dict,
                 names: dict, synsets_note: str | None, progress: bool) -> dict:
    """prepare's writing half, run while it holds OUT's lock."""
    if (out / "prepare.json").is_file():
        previous = json.loads((out / "prepare.json").read_text())
        previous_listing = previous.pop("listing", None)
        if isinstance(splits[0][1], cifar.CifarSplit):  # stores from CIFAR batches once recorded --size 256 unused
            previous["size"] = fingerprint["size"]
        if previous != fingerprint:
            raise fail(f"already holds a different store ({'; '.join(_differences(previous, fingerprint))}); rerun "
                       "with its options, choose another OUT or delete it", Location(str(out)))
        complete = (out / STORE_MARKER).is_file()
        _refuse_a_changed_source(previous_listing, listing, source, out, complete)
        if complete:
            return {**json.loads((out / STORE_MARKER).read_text()), "already_complete": True}
        if previous_listing is None:
            # Started by a convspec that recorded no listing, and listed otherwise (hidden files were read
            # then): its shards may not line up with this listing even if SRC never changed.
            raise fail(f"was started by an older convspec, which did not record what {source} held, so its "
                       f"finished shards cannot be checked against it: delete {out} and prepare again",
                       Location(str(out)))
    # A killed prepare's half-written shard: this run writes the shard again, under its own name.
    files.remove_partial_writes(out)
    _save_atomic(out / "prepare.json", lambda f: f.write(json.dumps({**fingerprint, "listing": listing},
                                                                    indent=1).encode()))

    classes = splits[0][1].classes
    notes = [note for _, data in splits for note in unread_notes(data, "stored")]
    notes.append(synsets_note and f"note: {synsets_note}")
    meta = {**fingerprint, "classes": [{"index": i, "folder": c, "name": names.get(c, c)}
                                       for i, c in enumerate(classes)], "splits": {}, "skipped": 0,
            "notes": [note for note in notes if note]}
    bad: list[str] = []
    total_stats = Stats.empty(options.size)
    # The CPUs this process may run on (its affinity), the bound a typed --workers is held to.
    workers = options.workers or usable_cpus()
    try:
        with multiprocessing.get_context("fork").Pool(workers, _ignore_sigint) if workers > 1 else _Inline() as pool:
            for split, data in splits:
                shards, count = _write_split(split, data, out, options, pool, bad,
                                             total_stats if split == "train" else None, progress)
                meta["splits"][split] = {"count": count, "shards": shards}
    except KeyboardInterrupt:
        # Leaving the with-block terminated the workers; finished shards are on disk.
        stopped = fail("interrupted; the shards written so far are kept: run the same command again to finish",
                       Location(str(out)))
        stopped.exit_code = 130
        raise stopped from None
    meta["skipped"] = len(bad)
    meta["size"] = int(total_stats.pixel_sum.shape[0])
    _save_atomic(out / "report.txt", lambda f: f.write("".join(line + "\n" for line in bad).encode()))
    if not isinstance(splits[0][1], cifar.CifarSplit):  # CIFAR has no unreadable images to skip
        _refuse_a_class_left_empty(splits[0][1], meta["splits"]["train"]["shards"], out)
    _save_atomic(out / "classes.tsv", lambda f: f.write("".join(
        f"{c['index']}\t{_tsv(c['folder'])}\t{_tsv(c['name'])}\n" for c in meta["classes"]).encode()))
    _save_atomic(out / "mean.npy", lambda f: np.save(f, total_stats.mean_image()))
    eigvals, eigvecs = total_stats.pca()
    _save_atomic(out / "pca.npz", lambda f: np.savez(f, eigvals=eigvals, eigvecs=eigvecs))
    _save_atomic(out / STORE_MARKER, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return meta


def _refuse_a_class_left_empty(data, shards: list[str], out: Path) -> None:
    """A class folder whose every image was skipped: training would fit an output never right and never
    trained, as for an empty folder (refused up front), but only report.txt would say so."""
    labels = [np.load(out / f"{name}.labels.npy") for name in shards]
    counts = np.bincount(np.concatenate(labels) if labels else np.zeros(0, np.int64), minlength=len(data.classes))
    empty = [c for c in range(len(data.classes)) if counts[c] == 0]
    if not empty:
        return
    folder = next(path.parent for path, label in data.items if label == empty[0])
    listed = sum(label == empty[0] for _, label in data.items)
    raise fail(f"no image of this class folder could be read ({plural(listed, 'file')} listed in "
               f"{out / 'report.txt'}); a class without images would be an output never trained: replace the "
               f"images or remove the folder, then delete {out} and prepare again"
               f"{f' ({len(empty) - 1} more like it)' if len(empty) > 1 else ''}", Location(str(folder)))


def _settle_size(options: PrepareOptions, data, source: Path) -> PrepareOptions:
    """The side the store will hold: --size for image folders (256 unless given), and for
    CIFAR batches their own, which --size does not change (it was ignored without a word)."""
    if not isinstance(data, cifar.CifarSplit):
        return replace(options, size=options.size or 256)
    side = int(data.images.shape[1])
    if options.size not in (None, side):
        raise fail(f"holds CIFAR batches, which are stored at their own {side}x{side}; --size rescales image "
                   "folders only: drop --size", Location(str(source)))
    return replace(options, size=side)


def _refuse_upscaling_everything(data, options: PrepareOptions) -> None:
    """CIFAR as JPEG folders at the default --size 256 would store 64x the
    pixels of the originals: catch it from the first few images."""
    if isinstance(data, cifar.CifarSplit):
        return
    sides = sides_of_first([path for path, _ in data.items[:8]])
    if sides and sides[0] < options.size:
        raise fail(f"the images are at most {sides[0]} px but --size is {options.size}, which "
                   f"would upscale every one; pass --size {sides[1]} "
                   f"(e.g. --size 32 --raw for CIFAR)",
                   Location(str(data.items[0][0].parent.parent)))


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the parent: a worker killed by it never
    returns its result, and the parent would wait for it forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Inline:
    """A stand-in for a Pool with one worker: no processes to start."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, jobs, chunksize=1):
        return map(fn, jobs)


def _write_split(split, data, out: Path, options: PrepareOptions, pool, bad: list[str], stats: Stats | None,
                 show: bool) -> tuple[list[str], int]:
    is_cifar = isinstance(data, cifar.CifarSplit)
    n = len(data.labels) if is_cifar else len(data.items)
    bar = Progress(n, f"prepare {split}", enabled=show)
    shards, count = [], 0
    for k, start in enumerate(range(0, n, SHARD)):
        name = f"{split}-{k:05d}"
        shards.append(name)
        stop = min(n, start + SHARD)
        if (out / f"{name}.labels.npy").is_file():  # finished by an earlier run
            count += len(np.load(out / f"{name}.labels.npy", mmap_mode="r"))
            with np.load(out / f"{name}.stats.npz") as kept:
                if stats is not None:
                    stats.merge(Stats.from_arrays(kept))
                # The images it skipped, for report.txt and the count (a shard of an older convspec has none).
                bad += [str(line) for line in kept["skipped"]] if "skipped" in kept.files else []
            bar.update(stop - start)
            continue
        skipped: list[str] = []
        if is_cifar:
            pixels = [img for img in data.images[start:stop]]
            labels = list(data.labels[start:stop])
            encoded = [(p, None if options.raw else _jpeg(p, options.quality)) for p in pixels]
        else:
            jobs = [(str(p), options.size, options.quality, options.raw) for p, _ in data.items[start:stop]]
            encoded, labels = [], []
            for (path, label), (px, jpeg, err) in zip(data.items[start:stop], pool.imap(_encode, jobs, chunksize=8)):
                if err is not None:
                    skipped.append(f"{path}\t{err}")
                    continue
                encoded.append((px, jpeg))
                labels.append(label)
        count += _write_shard(out, name, encoded, labels, options, stats, skipped)
        bad += skipped
        bar.update(stop - start)
    bar.close()
    return shards, count


def _write_shard(out: Path, name: str, encoded, labels, options: PrepareOptions, stats: Stats | None,
                 skipped: list[str]) -> int:
    pixels = np.stack([px for px, _ in encoded]) if encoded else np.zeros((0, options.size, options.size, 3), np.uint8)
    shard_stats = Stats.empty(pixels.shape[1])
    shard_stats.add(pixels)
    if options.raw:
        _save_atomic(out / f"{name}.raw.npy", lambda f: np.save(f, pixels))
    else:
        blobs = [jpeg for _, jpeg in encoded]
        offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in blobs])
        data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        _save_atomic(out / f"{name}.jpeg.npy", lambda f: np.save(f, data))
        _save_atomic(out / f"{name}.offsets.npy", lambda f: np.save(f, offsets))
    # A string array, which np.load reads without pickle.
    _save_atomic(out / f"{name}.stats.npz", lambda f: np.savez(f, **shard_stats.to_arrays(),
                                                                skipped=np.asarray(skipped, dtype=str)))
    _save_atomic(out / f"{name}.labels.npy", lambda f: np.save(f, np.asarray(labels, dtype=np.int64)))
    if stats is not None:
        stats.merge(shard_stats)
    return len(labels)


# --- reading -----------------------------------------------------------------------------


class StoreSplit:
    """One split of a store: ``images(indices)`` gives a uint8 (B, S, S, 3) batch."""

    def __init__(self, root: Path, split: str):
        root = Path(root)
        meta_path = root / STORE_MARKER
        if not meta_path.is_file():
            raise fail("is not a complete convspec store (no store.json); run convspec prepare again to finish it",
                       Location(str(root)))
        self.meta = _load_json(meta_path)
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise fail(f"store.json is not a {FORMAT} v{VERSION} store", Location(str(meta_path)))
        if split not in self.meta["splits"]:
            raise fail(f"store has no '{split}' split (it has {', '.join(self.meta['splits'])})", Location(str(root)))
        self.name, self.kind = split, self.meta["kind"]
        self.classes = [c["folder"] for c in self.meta["classes"]]
        self.class_names = [c["name"] for c in self.meta["classes"]]
        self.size = int(self.meta["size"])
        # Checked here, where a damaged file is named, not where it breaks a batch or the loss (exit 3).
        side = (self.size, self.size, 3)
        self.mean = _load(root / "mean.npy")
        _expect_shape(self.mean, side, "a mean image", root / "mean.npy")
        pca = _load(root / "pca.npz")
        self.eigvals, self.eigvecs = pca["eigvals"], pca["eigvecs"]
        _expect_shape(self.eigvals, (3,), "eigenvalues", root / "pca.npz")
        _expect_shape(self.eigvecs, (3, 3), "eigenvectors", root / "pca.npz")
        labels, self._shards, self._shard_paths, starts = [], [], [], [0]
        for name in self.meta["splits"][split]["shards"]:
            shard_labels = _load(root / f"{name}.labels.npy")
            if len(shard_labels) and not 0 <= shard_labels.min() <= shard_labels.max() < len(self.classes):
                wrong = next(int(x) for x in shard_labels if not 0 <= x < len(self.classes))
                raise fail(f"holds label {wrong}, but the store has {len(self.classes)} classes "
                           f"(0..{len(self.classes) - 1}); {DAMAGED_FIX}", Location(str(root / f"{name}.labels.npy")))
            labels.append(shard_labels)
            if self.kind == "raw":
                self._shard_paths.append(root / f"{name}.raw.npy")
                self._shards.append(_load(self._shard_paths[-1], mmap_mode="r"))
                _expect_shape(self._shards[-1], (len(self._shards[-1]), *side), "images", self._shard_paths[-1])
            else:
                self._shard_paths.append(root / f"{name}.jpeg.npy")
                self._shards.append((_load(self._shard_paths[-1], mmap_mode="r"),
                                     _load(root / f"{name}.offsets.npy")))
            count = len(self._shards[-1]) if self.kind == "raw" else len(self._shards[-1][1]) - 1
            if count != len(shard_labels):
                raise fail(f"holds a different number of images than its labels ({len(shard_labels):,}); "
                           f"{DAMAGED_FIX}", Location(str(self._shard_paths[-1])))
            starts.append(starts[-1] + len(shard_labels))
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self._starts = np.asarray(starts)

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def has_split(root: Path, split: str) -> bool:
        meta = Path(root) / STORE_MARKER
        return meta.is_file() and split in _load_json(meta).get("splits", {})

    def image(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        j = i - self._starts[shard]
        return self._shards[shard][j] if self.kind == "raw" else self._decode(shard, j)

    def images(self, indices, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 (B, S, S, 3); ``out`` is an optional scratch buffer to fill
        (fresh memory costs page faults on every batch).  Consecutive indices
        within one shard of a raw store come back as a read-only view of the
        mapped file instead, without copying."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.kind == "raw" and len(indices):
            # In-order reading (evaluation, unshuffled epochs) asks for runs that
            # the file already holds as one (B, S, S, 3) array; copying them
            # would cost a tenth of the time it takes to augment them.
            first, n = int(indices[0]), len(indices)
            shard = int(np.searchsorted(self._starts, first, side="right") - 1)
            j = first - int(self._starts[shard])
            pixels = self._shards[shard]
            if first >= 0 and j + n <= len(pixels) and np.array_equal(indices, np.arange(first, first + n)):
                return np.asarray(pixels[j:j + n])
        shape = (len(indices), self.size, self.size, 3)
        out = out[: len(indices)] if out is not None and len(out) >= len(indices) else np.empty(shape, np.uint8)
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        for shard in np.unique(shards):
            picked = np.nonzero(shards == shard)[0]
            local = indices[picked] - self._starts[shard]
            if self.kind == "raw":
                pixels = self._shards[shard]
                for k, j in zip(picked, local):  # plain slices beat fancy indexing of a memmap here
                    out[k] = pixels[j]
            else:
                for k, j in zip(picked, local):
                    out[k] = self._decode(shard, j)
        return out

    def _decode(self, shard: int, j: int) -> np.ndarray:
        data, offsets = self._shards[shard]
        try:
            with Image.open(io.BytesIO(data[offsets[j]:offsets[j + 1]].tobytes())) as img:
                return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - PIL raises several kinds for damaged bytes
            raise fail(f"image {j:,} of this shard cannot be decoded ({type(err).__name__}); {DAMAGED_FIX}",
                       Location(str(self._shard_paths[shard]))) from None


DAMAGED_FIX = "the store is damaged: run convspec prepare again into a new folder"


def _expect_shape(array: np.ndarray, shape: tuple, what: str, path: Path) -> None:
    if array.shape != shape:
        raise fail(f"holds {what} of shape {array.shape}, not {shape}; {DAMAGED_FIX}", Location(str(path)))


def _damaged_if_unreadable(path: Path, read):
    try:
        return read()
    except FileNotFoundError:
        # store.json names every file of the store, and was written after all of them.
        raise fail(f"is missing; {DAMAGED_FIX}", Location(str(path))) from None
    except (OSError, MemoryError):
        raise  # a permission, say: the CLI names the path and says what to check
    except Exception as err:  # noqa: BLE001 - numpy and json raise several kinds for damaged bytes
        detail = " ".join(str(err).split())[:120]
        raise fail(f"cannot be read ({type(err).__name__}: {detail}); {DAMAGED_FIX}", Location(str(path))) from None


def _load(path: Path, **kw):
    return _damaged_if_unreadable(path, lambda: np.load(path, **kw))


def _load_json(path: Path) -> dict:
    meta = _damaged_if_unreadable(path, lambda: json.loads(path.read_text()))
    if not isinstance(meta, dict):
        raise fail(f"is not a store description (a JSON object); {DAMAGED_FIX}", Location(str(path)))
    return meta
