"""Named datasets for ``--data cifar10`` and ``--data cifar100``: download once,
verify, extract safely, and reuse from the cache ever after.

    from runtime.download import fetch
    folder = fetch("cifar10")        # ~/.cache/convspec/cifar-10-batches-py
    split = runtime.cifar.load_cifar(folder, "train")

The cache is ``$CONVSPEC_CACHE`` or ``~/.cache/convspec``.  The first call
downloads the official python-format archive into ``<archive>.part`` (resuming
with an HTTP ``Range`` request after a dropped connection), checks its md5,
renames it to the archive's name and extracts it.  Later calls find the
extracted folder and its checksum marker and touch no network.  Offline, put
the archive in the cache by hand: it is verified and used as if downloaded.

``CONVSPEC_CIFAR10_URL`` / ``CONVSPEC_CIFAR10_MD5`` (and ``_CIFAR100_``) point
at a mirror; the ``url=`` and ``md5=`` arguments override both.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from convspec.errors import Location, did_you_mean, fail

from .progress import Progress

try:  # serialises torchrun ranks that fetch at once; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


@dataclass(frozen=True)
class Archive:
    url: str
    md5: str
    filename: str  # the archive's name in the cache
    folder: str  # the folder the archive extracts to


# The official python-format archives (https://www.cs.toronto.edu/~kriz/cifar.html);
# the md5s are the published ones torchvision's cifar.py checks as well.
DATASETS = {
    "cifar10": Archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "c58f30108f718f92721af3b95e74349a", "cifar-10-python.tar.gz", "cifar-10-batches-py"),
    "cifar100": Archive("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python.tar.gz", "cifar-100-python"),
}

MARKER = ".convspec-md5"  # inside the extracted folder: the md5 of the archive it came from
CHUNK = 1 << 16


def cache_dir() -> Path:
    return Path(os.environ.get("CONVSPEC_CACHE") or Path.home() / ".cache" / "convspec")


def fetch(name: str, *, url: str | None = None, md5: str | None = None, cache: str | os.PathLike | None = None,
          progress: bool = True, retries: int = 3, timeout: float = 30) -> Path:
    """The extracted folder of dataset ``name`` (``"cifar10"`` or ``"cifar100"``).

    ``retries`` is how many times a failed request is tried again; a try that
    got further into the file than any before it does not count, so a slow,
    flaky link still finishes.  ``timeout`` bounds the connect and each read.
    """
    if name not in DATASETS:
        raise fail(f"no named dataset '{name}'{did_you_mean(name, DATASETS)}; "
                   f"known: {', '.join(DATASETS)}, or give a folder's path", Location(name))
    spec = DATASETS[name]
    env = f"CONVSPEC_{name.upper()}"
    url = url or os.environ.get(f"{env}_URL") or spec.url
    md5 = (md5 or os.environ.get(f"{env}_MD5") or spec.md5).lower()
    cache = Path(cache) if cache is not None else cache_dir()
    folder, archive = cache / spec.folder, cache / spec.filename

    if _marker(folder) == md5:
        return folder
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise fail(f"cannot create the download cache ({err.strerror}); set CONVSPEC_CACHE to a writable folder",
                   Location(str(cache))) from None

    with _locked(cache / f".{spec.filename}.lock"):
        if _marker(folder) == md5:  # another process finished while we waited for the lock
            return folder
        if archive.is_file():
            # Only a verified download is ever renamed to this name, so a
            # mismatch here is a file put in by hand: leave it for the user.
            actual = _md5(archive)
            if actual != md5:
                raise fail(f"has md5 {actual}, expected {md5}: not the official {spec.filename}; "
                           f"delete it to download again, or replace it with the right file", Location(str(archive)))
        else:
            part = archive.with_name(archive.name + ".part")
            _download(name, url, md5, part, archive, cache, spec, progress, retries, timeout)
            actual = _md5(part)
            if actual != md5:
                part.unlink()
                raise fail(f"download from {url} has md5 {actual}, expected {md5}; removed it, "
                           f"run again or put the official {spec.filename} there by hand", Location(str(archive)))
            os.replace(part, archive)
        _extract(archive, cache, spec.folder, md5)
    return folder


def _marker(folder: Path) -> str | None:
    try:
        return (folder / MARKER).read_text().strip()
    except OSError:
        return None


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path):
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _ShortRead(OSError):
    """The server closed the connection before the promised length."""


def _download(name, url, md5, part, archive, cache, spec, progress, retries, timeout) -> None:
    """Fill ``part`` with the whole file at ``url``, resuming and retrying."""
    failures, furthest = 0, 0
    if progress:  # said before connecting: a link that never answers is otherwise silent for minutes
        print(f"downloading {name} from {url} into {cache}", file=sys.stderr, flush=True)
    while True:
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "convspec"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                _receive(response, part, have, f"download {name}", progress)
            return
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:
                return  # the .part is already whole; the md5 check decides
            reason = f"HTTP {err.code} {err.reason}"
            final = err.code < 500  # 404, 403: asking again will not help
        except (OSError, http.client.HTTPException) as err:
            reason, final = _reason(err), False
        size = part.stat().st_size if part.exists() else 0
        if size > furthest:
            furthest, failures = size, 0
        else:
            failures += 1
        if final or failures > retries:
            kept = f"; {size:,} bytes kept in {part.name}, run again to resume" if size else ""
            raise fail(f"cannot download {name} from {url} ({reason}{kept}); download it elsewhere and put "
                       f"{spec.filename} in {cache} (md5 {md5}), or give the path of an extracted "
                       f"{spec.folder} folder instead of '{name}'", Location(str(archive)))
        if progress:
            tries = f" ({failures} of {retries})" if failures else ""
            print(f"download {name}: {reason}; trying again{tries}", file=sys.stderr, flush=True)
        time.sleep(min(0.5 * 2 ** max(failures - 1, 0), 8.0))


def _receive(response, part: Path, have: int, label: str, progress: bool) -> None:
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if have and response.status == 206:
        start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
        if start != str(have):  # a range we did not ask for: start over
            part.unlink()
            raise _ShortRead(f"server resumed at byte {start or '?'} instead of {have}")
        mode = "ab"
    else:
        have, mode = 0, "wb"  # a plain 200 (the server ignored Range) is the whole file
    try:
        f = open(part, mode)
    except OSError as err:
        raise fail(f"cannot write the download ({err.strerror}); set CONVSPEC_CACHE to a writable folder",
                   Location(str(part))) from None
    bar = Progress(length or 0, label + (f" (resuming at {have:,} B)" if have else ""), unit="B",
                   enabled=progress and length is not None)
    got = 0
    try:
        with f:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except http.client.IncompleteRead as err:  # chunked bodies cut short: keep what came
                    _write(f, err.partial, part)
                    raise
                if not chunk:
                    break
                _write(f, chunk, part)
                got += len(chunk)
                bar.update(len(chunk))
    finally:
        bar.close()
    if length is not None and got < length:
        raise _ShortRead(f"connection closed after {have + got:,} of {have + length:,} bytes")


def _write(f, data: bytes, part: Path) -> None:
    # A full disk is an OSError like a dropped connection; raising a SpecError
    # here keeps it out of the retry loop.
    try:
        f.write(data)
    except OSError as err:
        raise fail(f"cannot write the download ({err.strerror}); free some space or set CONVSPEC_CACHE "
                   f"to another folder", Location(str(part))) from None


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError):
        err = err.reason if isinstance(err.reason, BaseException) else OSError(str(err.reason))
    if isinstance(err, TimeoutError) or "timed out" in str(err):
        return "timed out"
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(text.split())  # one line, whatever the OS put in it


def _extract(archive: Path, cache: Path, folder_name: str, md5: str) -> None:
    """Extract into a temporary folder beside the target, then rename into
    place, so an interrupted extraction never looks like a finished one."""
    target = cache / folder_name
    for leftover in cache.glob(f".{folder_name}-*"):  # from a run killed mid-extraction; we hold the lock
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder_name}-", dir=cache))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                if hasattr(tarfile, "data_filter"):  # 3.12, and 3.11.4+ as a backport
                    tar.extractall(tmp, filter="data")
                else:
                    tar.extractall(tmp, members=_safe_members(tar, tmp, archive))
        except tarfile.TarError as err:
            raise fail(f"cannot extract ({' '.join(str(err).split())}); delete it to download again",
                       Location(str(archive))) from None
        extracted = tmp / folder_name
        if not extracted.is_dir():
            raise fail(f"holds no '{folder_name}' folder; delete it and download the python version again",
                       Location(str(archive)))
        (extracted / MARKER).write_text(md5 + "\n")
        if target.exists():  # a stale or hand-made folder without our marker
            target.rename(tmp / "stale")
        extracted.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _safe_members(tar: tarfile.TarFile, dest: Path, archive: Path):
    """Python < 3.11.4 has no ``filter="data"``: admit only plain files and
    folders whose paths stay inside ``dest``."""
    root = dest.resolve()
    for member in tar.getmembers():
        inside = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()):
            raise fail(f"refusing member '{member.name}': links and devices have no place in a dataset archive",
                       Location(str(archive)))
        if inside != root and root not in inside.parents:
            raise fail(f"refusing member '{member.name}': it would land outside {dest}", Location(str(archive)))
        yield member


__all__ = ["DATASETS", "Archive", "cache_dir", "fetch"]
