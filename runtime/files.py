"""Files written whole: checkpoints, a run's records and a prepared store's files;
and the lock a writer holds on its folder.

Each is written under a temporary name in its own folder, fsynced, then renamed
over the target, and the rename is synced too.  A reader, or a process killed
mid-write, sees the old file or the new one, never part of one.  The temporary
name is hidden (a leading dot) and carries the writer's pid, so two writers of
one name never write into the same temporary file.

    write_whole(run_dir / "run.json", lambda f: f.write(text.encode()))
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
from pathlib import Path
from typing import BinaryIO, Callable

PARTIAL = ".tmp-"  # in the name of a file being written: .epoch-0003.pt.tmp-PID


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before the rename."""
    return path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")


def is_partial_write(path: Path) -> bool:
    """A temporary file, left behind when a process was killed while writing it."""
    return path.name.startswith(".") and PARTIAL in path.name


def remove_partial_writes(folder: Path) -> None:
    """Delete what killed writers left in ``folder``: a store shard's is gigabytes, and the
    rerun that rewrites the shard writes under its own pid, not over the old name."""
    for path in folder.iterdir():
        if is_partial_write(path) and path.is_file():
            path.unlink(missing_ok=True)


def write_whole(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(binary_file)``, atomically and durably.

    Errors (OSError, or whatever ``write`` raises) propagate as they are, for the
    caller to turn into its own message; the temporary file never outlives the call."""
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # a power cut leaves the old file or the new one, never an empty one
        os.replace(tmp, path)
        sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes the same bytes as ``src``: a hard link where the file system has them
    (no second write of a large file), else a copy; either way through a rename."""
    tmp = partial_path(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def free_space(folder: Path) -> str:
    """"N MiB free there: ", for the one-line error of a write that failed (a full disk);
    empty when even that cannot be read (the folder gone), so the error still comes."""
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free there: "
    except OSError:
        return ""


def sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable: until the folder itself is synced, a power cut
    can forget it."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Busy(Exception):
    """Another process holds the lock; ``holder`` is what it wrote there ("pid N on HOST")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def hold_lock(path: Path, wait: float = 0.0) -> int | None:
    """Take an exclusive flock on ``path`` (made if missing) and write "pid N on HOST"
    into it. The lock lasts until the returned descriptor is closed, or the process
    ends however it ends, so a killed writer leaves no stale lock. ``wait``: seconds
    to retry a held lock before raising :class:`Busy`. Returns None where the platform
    (Windows) or the file system has no flock: the caller goes on unlocked."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as err:
            busy = err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
            if busy and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            holder = os.read(fd, 200).decode(errors="replace").strip()
            os.close(fd)
            if busy:
                raise Busy(holder) from None
            return None  # a file system without locks
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    except OSError:
        os.close(fd)
        raise
    return fd
