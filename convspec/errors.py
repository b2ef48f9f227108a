"""Source locations and the one error type every stage raises.

Every problem a user can cause -- a typo in a spec, a missing file, a shape that
does not fit -- becomes a :class:`SpecError` that prints as

    specs/alexnet.cfg:14:8: layer 'conv2': groups=3 does not divide the 64 channels of 'pool1'
    inputs=pool1
           ^

so an editor can jump to it.  The CLI prints ``str(error)`` and exits 1; only
``--debug`` shows a traceback.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Location:
    """A 1-based line and column in a file (pycparser's ``Coord``)."""

    path: str
    line: int = 0
    column: int = 0
    source_line: str | None = None

    def __str__(self) -> str:
        if self.line <= 0:
            return self.path
        return f"{self.path}:{self.line}:{self.column}"


class SpecError(Exception):
    """A problem with a spec, a params file or a command-line value.

    ``message`` is one line naming the layer, the key, the constraint and the
    fix.  ``location`` points at the offending text when there is one.
    """

    # Raised by every rank of a distributed run together (a NaN loss): rank 0 alone reports it.
    every_rank = False
    exit_code = 1  # 130 for a stop by Ctrl-C, as train's and the shell's

    def __init__(self, message: str, location: Location | None = None):
        super().__init__(message)
        self.message = message
        self.location = location

    def __str__(self) -> str:
        if self.location is None:
            return self.message
        text = f"{self.location}: {self.message}"
        line = self.location.source_line
        if line and line.strip() and self.location.column > 0:
            # Tabs keep their width so the caret lands under the character.
            prefix = "".join(c if c == "\t" else " " for c in line[: self.location.column - 1])
            text += f"\n{line}\n{prefix}^"
        return text


def fail(message: str, location: Location | None = None) -> SpecError:
    """Build the error; callers write ``raise fail(...)`` so control flow stays visible."""
    return SpecError(message, location)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix for the closest choice, or ``""``."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    if not close:  # 'convolution' -> 'conv': a known name that starts the word
        close = [c for c in sorted(lowered, key=len, reverse=True) if len(c) >= 3 and word.lower().startswith(c)][:1]
    return f"; did you mean '{lowered[close[0]]}'?" if close else ""


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``"1 layer"``, ``"2 layers"``, ``"1,024 batches"``: counts in messages read as English."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def decode_utf8(data: bytes, shown: str) -> str:
    """Text a user wrote (a spec, a labels or synsets file), or one line naming
    the file, line and column of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        raise not_utf8(data[err.start], Location(shown, data[: err.start].count(b"\n") + 1,
                                                 err.start - line_start + 1)) from None


def not_utf8(byte: int, where: Location) -> SpecError:
    return fail(f"is not UTF-8 text (bad byte 0x{byte:02x}); save it as UTF-8", where)


def read_utf8(path) -> str:
    """``Path.read_text`` for files users give, with :func:`decode_utf8`'s error.
    A byte-order mark (Windows editors write one) is not part of the first line."""
    with open(path, "rb") as f:
        return decode_utf8(f.read(), str(path)).removeprefix("\ufeff")
