"""Where images come from: ``--data PATH`` is detected as one of

- a **prepared store** (``store.json`` inside; written by ``convspec prepare``);
- **CIFAR-10/100 python batches** (``batches.meta`` or ``meta`` inside);
- an **image folder** in ImageFolder layout: ``PATH/train/<class>/*`` and
  ``PATH/val/<class>/*``, or a single split ``PATH/<class>/*``;
- a **flat folder** of images with a labels file (``--labels``, ILSVRC's
  validation layout: ``filename class`` lines).

Class indices are the training set's sorted class names; a split evaluated
later maps its names through that list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from convspec.errors import Location, SpecError, did_you_mean, fail, read_utf8

from .cifar import is_cifar_dir

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
STORE_MARKER = "store.json"


def resolve(path: str | Path) -> Path:
    """``cifar10`` and ``cifar100`` name datasets (downloaded once into the
    cache); anything else is a path."""
    from .download import DATASETS, fetch

    if str(path) in DATASETS and not Path(path).exists():
        return fetch(str(path))
    return Path(path)


def is_image(path: Path) -> bool:
    """An image file by its name.  A link whose target is gone counts too, so that
    prepare lists it in report.txt (and training names it) instead of dropping it unseen.
    Hidden files are not: macOS's ``._name.jpg`` metadata files are no images, and the
    fingerprint that tells a resume the data changed skips hidden files too."""
    return (path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
            and (path.is_file() or (path.is_symlink() and not path.exists())))


def detect(path: Path) -> str:
    """'store', 'cifar', 'imagefolder' (with train/ and val/), 'classfolders' or 'flat'."""
    if not path.exists():
        raise fail("no such dataset path; give a prepared store, a CIFAR python folder, "
                   "or an image folder with one sub-folder per class", Location(str(path)))
    if not path.is_dir():
        archive = f"; extract it (tar xzf {path.name}) and give the folder it makes" \
            if path.name.endswith((".tar.gz", ".tgz")) else ""
        raise fail(f"is a file; give a folder (a prepared store, CIFAR batches or class folders){archive}",
                   Location(str(path)))
    if (path / STORE_MARKER).is_file():
        return "store"
    if is_cifar_dir(path):
        return "cifar"
    if (path / "train").is_dir():
        return "imagefolder"
    if (path / "run.json").is_file() and any(path.glob("*.pt")):  # its show/ folder read as a class
        raise fail("is a run folder (what convspec train writes), not data; give it to eval or show as the "
                   "run (eval --checkpoint RUN), and give --data a folder of images", Location(str(path)))
    subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if subdirs:
        return "classfolders"
    if any(is_image(p) for p in path.iterdir()):
        return "flat"
    if (path / "prepare.json").is_file():  # what an interrupted convspec prepare leaves
        raise fail("is an unfinished convspec store (no store.json); run the same convspec prepare command "
                   "again to finish it", Location(str(path)))
    if any((path / name).is_file() for name in ("data_batch_1", "test_batch")):
        raise fail("holds CIFAR-10 batches but no batches.meta (the class names); download the python version "
                   "again", Location(str(path)))
    raise fail("holds no images, class folders, CIFAR batches or prepared store; give the folder whose "
               "sub-folders hold each class's images (CLASS/IMAGE.jpg)", Location(str(path)))


@dataclass
class ImageList:
    items: list[tuple[Path, int]]  # (file, class index)
    classes: list[str]  # folder names (wnids), index order
    loose: list[Path] = field(default_factory=list)  # images beside the class folders: they have no class
    nested: list[Path] = field(default_factory=list)  # images in folders inside a class folder: not read
    absent: list[str] = field(default_factory=list)  # names a labels file gives that the flat folder lacks


def unread_notes(listing, action: str) -> list[str]:
    """Notes for the images a listing (or a source opened from one) does not read: those
    beside the class folders (torchvision's ImageFolder skips them unseen) and those in
    folders inside a class folder (which torchvision would read)."""
    notes = []
    loose, nested = list(getattr(listing, "loose", ())), list(getattr(listing, "nested", ()))
    if loose:
        many = len(loose) > 1
        notes.append(f"note: {len(loose)} image{'s' * many} beside the class folders in {loose[0].parent} "
                     f"({loose[0].name}{', ...' * many}) {'have' if many else 'has'} no class and "
                     f"{'are' if many else 'is'} not {action}; move {'them' if many else 'it'} into a class folder "
                     f"to use {'them' if many else 'it'}")
    if nested:
        many = len(nested) > 1
        notes.append(f"note: {len(nested)} image{'s' * many} in folders inside the class folders ({nested[0]}"
                     f"{', ...' * many}) {'are' if many else 'is'} not {action}; only the images directly in a class "
                     f"folder are: move {'them' if many else 'it'} up a level to use {'them' if many else 'it'}")
    absent = list(getattr(listing, "absent", ()))
    if absent:  # a subset of ILSVRC's validation images is a use; the wrong folder or a renamed copy is a mistake
        many = len(absent) > 1
        notes.append(f"note: {len(absent)} line{'s' * many} of the labels file name{'s' * (not many)} no image in "
                     f"the folder ({absent[0]}{', ...' * many}); only the images in the folder are {action}")
    return notes


def _is_image_entry(entry: os.DirEntry) -> bool:
    """:func:`is_image` for a directory entry, from what the directory listing already knows."""
    return (os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and not entry.name.startswith(".")
            and (entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path))))


def _images_below(folder: Path) -> list[Path]:
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [p for p in (Path(parent) / f for f in sorted(files)) if is_image(p)]
    return found


def class_folders(root: Path) -> list[str]:
    names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise fail("has no class sub-folders; put the images in one folder per class (or remove the empty folder)",
                   Location(str(root)))
    return names


def refuse_one_class(classes: list[str], what: str, where) -> None:
    """Training and prepare refuse data of one class alike."""
    if len(classes) == 1:
        raise fail(f"holds only one {what} ({classes[0]}); a classifier needs at least 2: give the folder that holds "
                   "the class folders", Location(str(where)))


def not_a_run_class(name: str, what: str, classes: list[str], where, more: int = 0) -> SpecError:
    """The error for class ``name`` (``what``: a folder, or a store's class) that the run's class list lacks."""
    return fail(f"{what} is not one of the {len(classes)} classes of the training data{did_you_mean(name, classes)}"
                f"{f' ({more} more like it)' if more else ''}", Location(str(where)))


def list_class_folders(root: Path, classes: list[str] | None = None) -> ImageList:
    """Images under ``root/<class>/``.  With ``classes`` (the training run's
    list), folder names map through it; an unseen class is an error."""
    found = class_folders(root)
    training = classes is None  # the folders are the classes; else they map through a run's list
    if classes is None:
        classes = found
    index = {name: i for i, name in enumerate(classes)}
    items = []
    empty = []
    nested: list[Path] = []
    for name in found:
        if name not in index:
            raise not_a_run_class(name, f"class folder '{name}'", classes, root / name)
        # os.scandir knows each entry's type from the directory itself: no stat per file (1.28M on ImageNet).
        with os.scandir(root / name) as found_here:
            entries = sorted(found_here, key=lambda e: e.name)
        images = [(Path(e.path), index[name]) for e in entries if _is_image_entry(e)]
        nested += [p for e in entries if e.is_dir() and not e.name.startswith(".") for p in _images_below(Path(e.path))]
        empty += [] if images else [name]
        items += images
    if not items:
        raise fail("has class folders but no .jpg/.jpeg/.png/.bmp images in them", Location(str(root)))
    if empty and training:
        # A class with no images would still be an output of the net, never right and never trained.
        raise fail(f"class folder holds no .jpg/.jpeg/.png/.bmp images; add images or remove the folder"
                   f"{f' ({len(empty) - 1} more like it)' if len(empty) > 1 else ''}", Location(str(root / empty[0])))
    return ImageList(items, classes, [p for p in sorted(root.iterdir()) if is_image(p)], nested)


def list_flat(root: Path, labels_file: Path, classes: list[str]) -> ImageList:
    """A flat folder and a ``filename class`` file, the class being a folder name (wnid) from training."""
    index = {name: i for i, name in enumerate(classes)}
    labels: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for n, line in enumerate(read_utf8(labels_file).splitlines(), 1):
        parts = line.rsplit(None, 1)  # the class is the last word; a file name may hold spaces
        if not parts or line.lstrip().startswith("#"):
            continue
        if len(parts) != 2:
            raise fail("expected 'filename class' on each line", Location(str(labels_file), n, 1, line))
        name, cls = parts[0].strip(), parts[1]
        if cls not in index:
            numbered = " (classes are the run's class folder names, not numbers)" if cls.isdigit() else ""
            raise fail(f"class '{cls}' is not one of the {len(classes)} training classes"
                       f"{did_you_mean(cls, classes)}{numbered}", Location(str(labels_file), n, 1, line))
        if name in first_line:
            raise fail(f"'{name}' is labelled twice (first at line {first_line[name]}); keep one line",
                       Location(str(labels_file), n, 1, line))
        first_line[name] = n
        labels[name] = index[cls]
    items = []
    for p in sorted(root.iterdir()):
        if is_image(p):
            if p.name not in labels:
                raise fail(f"image '{p.name}' has no line in the labels file", Location(str(labels_file)))
            items.append((p, labels[p.name]))
    found = {p.name for p, _ in items}
    return ImageList(items, classes, absent=[name for name in labels if name not in found])


def sides_of_first(paths: list[Path], n: int = 8) -> tuple[int, int] | None:
    """(largest, smallest) side among the first ``n`` readable images: enough to catch
    a whole folder that would be upscaled (CIFAR read at 256 px), without reading it all."""
    from PIL import Image

    sizes = []
    for path in paths[:n]:
        try:
            with Image.open(path) as img:
                sizes.append(img.size)
        except Exception:  # unreadable files are reported where they are read
            continue
    return (max(max(s) for s in sizes), min(min(s) for s in sizes)) if sizes else None


def read_synsets(path: Path) -> dict[str, str]:
    """``wnid name`` per line -> {wnid: name}."""
    names = {}
    for line in read_utf8(path).splitlines():
        parts = line.strip().split(maxsplit=1)
        if parts:
            names[parts[0]] = parts[1] if len(parts) > 1 else parts[0]
    return names


def names_from_synsets(path: Path, classes: list[str]) -> tuple[dict[str, str], str | None]:
    """The synsets file's names for these classes (folder names, or a store's), and a
    note on those it does not name.  A file that names none of them is the wrong file
    (it was taken without a word, and every class kept its own name): an error."""
    table = read_synsets(path)
    missing = [c for c in classes if c not in table]
    if classes and len(missing) == len(classes):
        raise fail(f"names none of the {len(classes)} classes (e.g. {classes[0]}); give the synsets file "
                   "of this data (lines of 'CLASS name'), or leave --synsets out", Location(str(path)))
    note = (f"{len(missing)} of {len(classes)} classes are not named in {path} (e.g. {missing[0]}); "
            "they keep their own names") if missing else None
    return {c: table[c] for c in classes if c in table}, note


def file_size(file: str) -> int:
    try:
        return os.stat(file).st_size
    except OSError:  # a link whose target is gone: listed, so that mending it changes the fingerprint
        return -1


def content_fingerprint(path: Path, known: str | None = None) -> str:
    """:func:`fingerprint` without where the data came from: a store's description names the
    folder it was prepared from, so two machines' stores of the same images differ by it.
    ``known``: the path's fingerprint, already computed (a folder's stats every file)."""
    import hashlib
    import json

    marker = Path(path) / STORE_MARKER
    if not marker.is_file():
        return known or fingerprint(path)
    try:
        description = json.loads(marker.read_text())
        description.pop("source", None)
    except (OSError, ValueError, AttributeError):  # a damaged description is reported where it is read
        return known or fingerprint(path)
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(path: Path) -> str:
    """A short hash that changes when the dataset does: the store's
    description, or the names and sizes of the files (cheap: no pixel is read).
    A run records it, and resuming on different data is refused."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    if (path / STORE_MARKER).is_file():
        digest.update((path / STORE_MARKER).read_bytes())
    else:
        entries = []
        for folder, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = os.path.relpath(folder, path)
            entries += [(os.path.join(rel, f), file_size(os.path.join(folder, f))) for f in files if not f.startswith(".")]
        for name, size in sorted(entries):
            digest.update(f"{name}\0{size}\n".encode())
    return digest.hexdigest()[:16]
