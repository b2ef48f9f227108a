"""runtime/allocator.py: freed activation-sized blocks stay in the process.

    python -m pytest -q tests/test_allocator.py

Each case runs in a fresh interpreter, since a process's malloc state is what is
tested: a 20 MiB block (a batch's activations) is allocated and freed, and glibc's
own counters (mallinfo2) say whether it was mmapped and whether it stayed.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import convspec.cli
from convspec.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(),
                                reason="needs glibc 2.33+ (mallinfo2) on Linux")

PROBE = """
import ctypes, sys
from runtime.allocator import keep_freed_blocks
was_set = keep_freed_blocks() if sys.argv[1] == "tuned" else None
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
block = bytearray(20 << 20)
mapped = libc.mallinfo2().hblkhd >= 20 << 20
del block
kept = libc.mallinfo2().fordblks >= 20 << 20
print(was_set, mapped, kept)
"""


def probe(mode: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env=environ, capture_output=True,
                         text=True, check=True, timeout=60)
    return out.stdout.split()


@glibc_only
def test_untuned_glibc_maps_and_returns_a_big_block():
    """The baseline the module exists for: without it the block is mmapped, then given back."""
    assert probe("plain") == ["None", "True", "False"]


@glibc_only
def test_keep_freed_blocks_serves_the_block_from_the_heap_and_keeps_it():
    assert probe("tuned") == ["True", "False", "True"]


@glibc_only
def test_a_users_own_malloc_setting_is_left_alone():
    # MALLOC_ARENA_MAX touches neither threshold, so the block behaves as untuned: nothing was set.
    assert probe("tuned", MALLOC_ARENA_MAX="4") == ["False", "True", "False"]


def test_every_command_starts_with_it(monkeypatch):
    calls = []
    monkeypatch.setattr(convspec.cli, "keep_freed_blocks", lambda: calls.append(1) or True)
    result = CliRunner().invoke(main, ["check", str(ROOT / "specs" / "cifar10-80sec.cfg")])
    assert result.exit_code == 0, result.output
    assert calls == [1]
