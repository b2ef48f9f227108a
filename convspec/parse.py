"""Stage 1: text -> syntax tree.

``parse_file(path)`` reads a cuda-convnet layer or params file and returns a
:class:`SpecFile` of sections and entries, each carrying its source location.
It knows nothing about layer types; ``convspec.check`` gives the tree meaning.

The grammar is ``grammar.lark`` beside this file, parsed with lark's LALR parser.
lark's exceptions are translated into :class:`~convspec.errors.SpecError` in
exactly one place, :func:`_syntax_error`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import lark

from .errors import Location, SpecError, decode_utf8, fail, not_utf8


@dataclass(frozen=True)
class Number:
    value: float | int
    text: str
    loc: Location


@dataclass(frozen=True)
class Word:
    text: str
    loc: Location


@dataclass(frozen=True)
class Arg:
    key: str | None  # None for positional arguments such as tanh[1.7,0.6]
    value: Union[Number, Word]
    loc: Location


@dataclass(frozen=True)
class Call:
    """``name[arg, ...]``: a neuron with parameters or a learning-rate schedule."""

    name: str
    args: tuple[Arg, ...]
    loc: Location
    # As written (tanh[1,2,3]), for messages; ``text`` is the canonical form with ';'.
    typed: str = field(default="", compare=False)

    @property
    def text(self) -> str:
        inner = ";".join(f"{a.key}={a.value.text}" if a.key else a.value.text for a in self.args)
        return f"{self.name}[{inner}]"


Item = Union[Number, Word, Call]


@dataclass(frozen=True)
class Value:
    items: tuple[Item, ...]
    raw: str
    loc: Location


@dataclass(frozen=True)
class Entry:
    key: str
    value: Value
    loc: Location  # of the key


@dataclass
class Section:
    name: str
    loc: Location  # of the name, inside the brackets
    entries: list[Entry] = field(default_factory=list)


@dataclass
class SpecFile:
    path: str
    text: str
    sections: list[Section]


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    # Built once, lazily: importing convspec stays cheap.
    return lark.Lark.open(
        "grammar.lark", rel_to=__file__, parser="lalr", propagate_positions=True,
        maybe_placeholders=False,
    )


class _ToTree(lark.Transformer):
    """Builds the dataclasses; all validation lives in the checking stage."""

    def __init__(self, path: str, lines: list[str]):
        super().__init__()
        self.path = path
        self.lines = lines

    def _loc(self, line: int, column: int) -> Location:
        source = self.lines[line - 1] if 0 < line <= len(self.lines) else None
        return Location(self.path, line, column, source)

    def _tok_loc(self, tok: lark.Token) -> Location:
        return self._loc(tok.line, tok.column)

    def start(self, children):
        sections: list[Section] = []
        orphans: list[Entry] = []
        for child in children:
            if isinstance(child, Section):
                sections.append(child)
            elif isinstance(child, Entry):
                if sections:
                    sections[-1].entries.append(child)
                else:
                    orphans.append(child)
        if orphans:
            # Stays a tree node so the checker can report it with its location.
            sections.insert(0, Section("", orphans[0].loc, orphans))
        return sections

    def header(self, children):
        tok = children[0]
        return Section(tok.value[1:-1].strip(), self._loc(tok.line, tok.column + 1))

    @lark.v_args(meta=True)
    def entry(self, meta, children):
        key = children[0]
        value = None
        for child in children[1:]:
            if isinstance(child, Value):
                value = child
        if value is None:
            end = key.end_column
            value = Value((), "", self._loc(key.line, end + 1))
        return Entry(key.value, value, self._tok_loc(key))

    @lark.v_args(meta=True)
    def value(self, meta, children):
        line = self.lines[meta.line - 1]
        raw = line[meta.column - 1 : meta.end_column - 1] if meta.line == meta.end_line else ""
        return Value(tuple(children), raw.strip(), self._loc(meta.line, meta.column))

    def number(self, children):
        return _number(children[0], self._tok_loc(children[0]))

    def word(self, children):
        return Word(children[0].value, self._tok_loc(children[0]))

    @lark.v_args(meta=True)
    def call(self, meta, children):
        name = children[0]
        args = tuple(c for c in children[1:] if isinstance(c, Arg))
        line = self.lines[meta.line - 1]
        typed = line[meta.column - 1 : meta.end_column - 1] if meta.line == meta.end_line else ""
        return Call(name.value, args, self._tok_loc(name), typed)

    def positional(self, children):
        tok = children[0]
        loc = self._tok_loc(tok)
        value = _number(tok, loc) if tok.type == "NUMBER" else Word(tok.value, loc)
        return Arg(None, value, loc)

    def keyword(self, children):
        key, tok = children
        vloc = self._tok_loc(tok)
        value = _number(tok, vloc) if tok.type == "NUMBER" else Word(tok.value, vloc)
        return Arg(key.value, value, self._tok_loc(key))


def _number(tok: lark.Token, loc: Location) -> Number:
    text = tok.value
    try:
        value: float | int = int(text)
    except ValueError:
        value = float(text)
    return Number(value, text, loc)


_TERMINAL_NAMES = {
    "HEADER": "'[section]'",
    "KEY": "a key",
    "_ASSIGN": "'='",
    "EQUAL": "'='",
    "ATOM": "a value",
    "NUMBER": "a number",
    "COMMA": "','",
    "_ARGSEP": "',' or ';'",
    "LSQB": "'['",
    "RSQB": "']'",
    "_EOL": "end of line",
    "COMMENT": "a comment",
    "HEADER_COMMENT": "a comment",
    "$END": "end of file",
}


def _describe(expected) -> str:
    names = sorted({_TERMINAL_NAMES.get(t, t) for t in expected})
    if len(names) > 1:
        return ", ".join(names[:-1]) + " or " + names[-1]
    return names[0] if names else "something else"


def _syntax_error(err: lark.exceptions.UnexpectedInput, path: str, lines: list[str]) -> SpecError:
    """The one place lark's exceptions become a located SpecError."""
    line = max(getattr(err, "line", 1) or 1, 1)
    column = max(getattr(err, "column", 1) or 1, 1)
    source = lines[line - 1] if line <= len(lines) else ""
    loc = Location(path, line, column, source)
    char = source[column - 1] if column - 1 < len(source) else "?"
    before = source[:column - 1]
    if char in "#;" and before and not before[-1].isspace() and before.count("[") == before.count("]"):
        # Not a comment (that needs a space before it): read as one, "inputs=a;b" would silently drop b.
        return fail(f"{char!r} right after a value starts no comment (put a space before it); list items are "
                    "separated by ','", loc)
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        got = f"unexpected character {char!r}"
    elif isinstance(err, lark.exceptions.UnexpectedToken):
        tok = err.token
        if tok.type == "_EOL":
            got = "line ends too early"
        elif tok.type == "$END":
            got = "file ends too early"
        else:
            got = f"unexpected {tok.value!r}"
    else:
        got = "file ends too early"
    if source.strip().startswith("[") and "]" not in source:
        return fail(f"section header {source.strip()!r} is missing its closing ']'", loc)
    expected = getattr(err, "expected", None) or getattr(err, "allowed", None) or ()
    hint = (
        "; a spec line is '[section]', 'key=value' or a comment starting with # or ;"
        if column == 1 or not source[: column - 1].strip()
        else f"; expected {_describe(expected)}"
    )
    # Python 2's ConfigParser read an indented line as more of the value above it; convspec does not.
    following = lines[line] if line < len(lines) else ""
    previous = lines[line - 2] if line >= 2 else ""
    if got == "line ends too early" and following[:1] in (" ", "\t") and following.strip():
        hint += ("; the indented line after it continues the value, which convspec does not read: "
                 "join them into one line")
    elif source[:1] in (" ", "\t") and "=" not in source and ":" not in source and "=" in previous:
        hint += ("; an indented line continuing the value above it is not read by convspec: join it to "
                 f"line {line - 1}")
    return fail(got + hint, loc)


def as_parsed(text: str) -> str:
    """Spec text as the parser reads it, and as a run records it: LF line ends (CRLF, and a
    lone CR as old Mac files have, as ConfigParser's universal newlines read them), no
    byte-order mark.  Texts compared for sameness are compared so."""
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")


def parse_text(text: str, path: str = "<string>") -> SpecFile:
    """Parse spec text.  Raises SpecError for syntax errors."""
    text = as_parsed(text)
    lines = text.split("\n")
    try:
        tree = _parser().parse(text if text.endswith("\n") else text + "\n")
    except lark.exceptions.UnexpectedInput as err:
        raise _syntax_error(err, path, lines) from None
    sections = _ToTree(path, lines).transform(tree)
    return SpecFile(path, text, sections)


MAX_SPEC_BYTES = 16 * 2**20  # AlexNet's spec is 4 KB


def read_spec_text(path: str | os.PathLike) -> str:
    """Read a file as spec text, with one-line errors for the usual ways it fails."""
    p = Path(path)
    shown = str(path)
    if not p.exists():
        raise fail(f"no such file; check the path (working directory: {os.getcwd()})", Location(shown))
    if p.is_dir():
        raise fail("is a directory; give the path of a .cfg layer file", Location(shown))
    try:
        with open(p, "rb") as f:
            # Bounded: /dev/zero or a mistaken multi-GB file must not hang or fill memory.
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise fail(f"cannot read: {err.strerror}", Location(shown)) from None
    if len(data) > MAX_SPEC_BYTES:
        raise fail(f"is over {MAX_SPEC_BYTES // 2**20} MiB, which no spec is; give the path of a .cfg layer file",
                   Location(shown))
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # a byte-order mark: Windows Notepad's "Unicode"
        raise fail("is UTF-16 text, not UTF-8; save it as UTF-8", Location(shown, 1, 1))
    if b"\0" in data:
        at = data.index(b"\0")
        raise fail("is a binary file, not a spec (a NUL byte); a spec is text of [section] and key=value lines",
                   Location(shown, data.count(b"\n", 0, at) + 1, at - data.rfind(b"\n", 0, at)))
    try:
        return decode_utf8(data, shown)
    except SpecError:
        return _with_legacy_comments(data, shown)


def _with_legacy_comments(data: bytes, shown: str) -> str:
    """Python 2's ConfigParser, which cuda-convnet used, read bytes: a comment in Latin-1
    (an author's name) was never looked at.  Such a file is read as it was, its
    non-UTF-8 comments as Latin-1; a byte outside a comment stays the located error."""
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append(raw.decode("utf-8"))
            continue
        except UnicodeDecodeError as err:
            first_bad = err.start
        line = raw.decode("latin-1")
        before = line[:first_bad]
        starts_comment = before.lstrip()[:1] in ("#", ";") or any(
            before[i] in "#;" and before[i - 1].isspace() for i in range(1, len(before)))
        if not starts_comment:
            raise not_utf8(raw[first_bad], Location(shown, number, first_bad + 1))
        lines.append(line)
    return "\n".join(lines)


def parse_file(path: str | os.PathLike) -> SpecFile:
    """Read and parse one file.  Empty files are the checker's to reject."""
    return parse_text(read_spec_text(path), str(path))
