"""``--set LAYER.KEY=VALUE``: edit a spec or params value from the command line.

An override is parsed with the spec grammar and put where the value lives: it
replaces the key in the params file or the layer file, whichever holds it, and
is added to the layer's section otherwise; ``train.KEY`` edits the params
file's ``[train]`` recipe.  The checker then sees an ordinary file, so an
override gets the same typed checks and located errors as a file edit::

    --set:1:12: layer 'conv1': epsW must be a number, not 'fast'
    conv1.epsW=fast
               ^

Runs record the override strings with the original texts, so a checkpoint
rebuilds exactly the net that was trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import Location, SpecError, did_you_mean, fail
from .parse import Entry, Section, SpecFile, parse_text

ORIGIN = "--set"
TRAIN = "train"


@dataclass(frozen=True)
class Override:
    section: str
    key: str
    entry: Entry
    text: str  # as given: conv1.epsW=0.002


def parse_override(text: str) -> Override:
    head, eq, value = text.partition("=")
    section, dot, key = head.strip().rpartition(".")
    if eq and dot and section and key.strip() and not value.strip():  # "pool1.neuron=": the form is right
        drop = f"; to drop the neuron, --set {head.strip()}=ident" if key.strip().lower() == "neuron" else ""
        raise fail(f"--set {text}: no value after '='; give one{drop}")
    if not eq or not dot or not section or not key.strip() or not value.strip():
        raise fail(f"--set takes LAYER.KEY=VALUE (e.g. --set conv1.epsW=0.002 or --set train.epochs=5), "
                   f"not '{text}'")
    if any(c in text for c in "\n\r"):
        # The snippet below is parsed as a file, and a second line would be dropped unseen.
        raise fail(f"--set takes one KEY=VALUE on one line, not {text!r}; give each key its own --set")
    key = key.strip()
    try:
        parsed = parse_text(f"[{section}]\n{key}={value}\n", ORIGIN)
    except SpecError as err:
        if err.location and err.location.line == 1:  # the "[section]" line: the name cannot be one
            raise fail(f"--set {text}: '{section}' cannot be a layer name; use a [section] name from the spec, "
                       "or train for the recipe") from None
        column = err.location.column if err.location and err.location.line == 2 else 0
        where = Location(ORIGIN, 1, column + len(section) + 1 if column else 0, text)
        raise fail(err.message, where) from None
    shift = len(section) + 1  # the text shown is "section.key=value"
    entry = _relocate(parsed.sections[0].entries[0], shift, text)
    return Override(section, key, entry, text)


def same_settings(given: list[str], recorded: list[str]) -> bool:
    """Whether two lists of ``--set`` texts make the same edits.  A key may be set once
    (apply_overrides refuses it twice), so order is not an edit, and keys are matched
    without regard to case, as in the files; layer names and values are compared as typed."""
    def settings(texts):
        return {(ov.section, ov.key.lower(), ov.text.partition("=")[2].strip()) for ov in map(parse_override, texts)}
    return settings(given) == settings(recorded)


def _relocate(obj, shift: int, line: str):
    """Locations in the parsed snippet (line 2 of "[s]\\nkey=value") -> column
    in the option as typed, so carets point into ``--set``'s text."""
    if isinstance(obj, Location):
        return Location(ORIGIN, 1, obj.column + shift, line)
    if isinstance(obj, tuple):
        return tuple(_relocate(x, shift, line) for x in obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _relocate(getattr(obj, f.name), shift, line)
                                           for f in dataclasses.fields(obj)})
    return obj


def apply_overrides(spec: SpecFile, params: SpecFile | None,
                    overrides: list[Override]) -> tuple[SpecFile, SpecFile | None]:
    """New file trees with the overrides applied; the inputs are not changed."""
    if not overrides:
        return spec, params
    spec = SpecFile(spec.path, spec.text, [Section(s.name, s.loc, list(s.entries)) for s in spec.sections])
    if params is not None:
        params = SpecFile(params.path, params.text, [Section(s.name, s.loc, list(s.entries)) for s in params.sections])
    layers = {s.name: s for s in spec.sections}
    seen: dict[tuple[str, str], Override] = {}
    for override in overrides:
        first = seen.setdefault((override.section, override.key.lower()), override)
        if first is not override:  # the same key twice in a file is an error too
            raise fail(f"--set {override.section}.{override.key} is given twice ({first.text} and {override.text}); "
                       "keep one")
        if override.section == TRAIN and TRAIN not in layers:
            if params is None:
                params = SpecFile(ORIGIN, "", [])
            target = _section(params, TRAIN, override)
            _put(target, override)
            continue
        if override.section not in layers:
            hint = did_you_mean(override.section, list(layers) + [TRAIN])
            raise fail(f"--set {override.text}: no layer '{override.section}' in {spec.path}"
                       f"{hint or '; use a section name from the spec, or train for the recipe'}")
        in_params = params and next((s for s in params.sections if s.name == override.section), None)
        if in_params and _has(in_params, override.key):
            _put(in_params, override)
        else:
            _put(layers[override.section], override)
    return spec, params


def _section(file: SpecFile, name: str, override: Override) -> Section:
    found = next((s for s in file.sections if s.name == name), None)
    if found is None:
        found = Section(name, override.entry.loc, [])
        file.sections.append(found)
    return found


def _has(section: Section, key: str) -> bool:
    return any(e.key.lower() == key.lower() for e in section.entries)


def _put(section: Section, override: Override) -> None:
    kept = [e for e in section.entries if e.key.lower() != override.key.lower()]
    section.entries[:] = kept + [override.entry]
