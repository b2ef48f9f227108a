"""Long-running fuzz of convspec's parse, check and build stages.

    python bench/fuzz.py --seconds 300
    python bench/fuzz.py --seconds 60 --seed 7 --no-build

The test suite (tests/test_fuzz.py) runs a few hundred hypothesis examples;
this script runs the same kinds of input for as long as it is given, with
plain ``random.Random(seed)`` so a run is repeatable:

* random bytes and random text written to a file;
* mutated copies of every spec in ``specs/`` and every
  ``../shared/reference-specs/*layers*.cfg`` (one to three edits: a line
  deleted, duplicated or swapped; a value, one list item or a key replaced; a
  number nudged, to 10**12 at most; random characters inserted), written
  beside an unmutated copy of the params file (or, one time in four, the
  spec is kept and the params file mutated).

Each input goes through ``check_paths``; it must succeed or raise
``SpecError`` located in one of the two files.  A net that checks must have
non-negative totals and a printable report, and, when it is small, must build
and run a forward pass on CPU whose every layer output has the shape the
checker inferred.  Anything else is a failure: the first few are printed with
their input and traceback, counts are printed as JSON, and the exit status is
1 if there was any failure.  The process's address space is capped
(``--memory-gb``) so that a runaway allocation is reported, not OOM-killed.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import random
import resource
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from convspec.check import check_paths, find_params_file  # noqa: E402
from convspec.errors import SpecError  # noqa: E402
from convspec.report import as_dict, as_text  # noqa: E402

# Nets above these sizes are only checked: building and running them on CPU
# would make each round take seconds.
BUILD_MAX_PARAMS = 2_000_000
BUILD_MAX_NEURONS = 2_000_000
BUILD_MAX_MACS = 200_000_000

TOKENS = [
    "", "0", "1", "2", "3", "5", "-1", "-7", "64", "1000", "1000000", "0.5", "-0.25", "1e-3",
    "1e30", "nan", "inf", "-inf", "relu", "tanh", "tanh[1,2]", "tanh[1]", "log[0]",
    "dexp[base=0.1;tgtFactor=10;numSteps=2]", "exp[base=1]", "max", "avg", "conv", "fc",
    "pool", "data", "softmax", "cost.logreg", "x", "3x32x32", "3x0x5", "1x1x1", "[", "]",
    "[]", ",", ",,", "=", "a,b", "1,2", "0,1", "0,0", "#", ";", "true", "no",
]
KEYS = [
    "type", "inputs", "gpu", "neuron", "channels", "filters", "filterSize", "padding", "stride",
    "groups", "modulesX", "initW", "initB", "sharedBiases", "outputs", "pool", "sizeX", "start",
    "outputsX", "size", "scale", "pow", "minDiv", "blocked", "keep", "enable", "coeffs", "coeff",
    "topk", "dataIdx", "inputSize", "epsW", "epsB", "momW", "momB", "wc", "wball",
    "updatePeriod", "sumWidth", "partialSum", "initWFunc", "weightSource", "Filters",
    "filter", "sizeY", "x", "",
]
CHARS = "[]=,:;#.-+ \t\n\r0123456789xaZ_é\ufeff\x00"


def seed_specs() -> list[tuple[Path, tuple[int, int, int] | None]]:
    """(layer file, input shape it checks with) for every spec to mutate."""
    seeds: list[tuple[Path, tuple[int, int, int] | None]] = [
        (p, None) for p in sorted((ROOT / "specs").glob("*.cfg")) if not p.name.endswith(".params.cfg")
    ]
    for p in sorted((SHARED / "reference-specs").glob("*layers*.cfg")):
        seeds.append((p, (3, 224, 224) if "imagenet" in p.name else (3, 32, 32)))
    return seeds


# --- inputs -------------------------------------------------------------------------


def random_text(rng: random.Random) -> str:
    pieces = []
    for _ in range(rng.randrange(12)):
        roll = rng.random()
        if roll < 0.3:
            pieces.append(f"[{rng.choice(TOKENS)}]\n")
        elif roll < 0.7:
            pieces.append(f"{rng.choice(KEYS)}={rng.choice(TOKENS)}\n")
        elif roll < 0.85:
            pieces.append("".join(rng.choice(CHARS) for _ in range(rng.randrange(8))))
        else:
            pieces.append("".join(chr(rng.choice([rng.randrange(0x80), rng.randrange(0xD800)]))
                                  for _ in range(rng.randrange(8))))
    return "".join(pieces)


_NUMBER = re.compile(r"(?<=[=,x])\d+(?=$|[,x\s])")


def _entry_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines)
            if "=" in line and not line.lstrip().startswith(("#", ";", "["))]


def mutate(text: str, rng: random.Random, names: list[str]) -> str:
    """One to three random edits of spec text."""
    for _ in range(rng.randint(1, 3)):
        lines = text.split("\n")
        op = rng.choice(["delete", "duplicate", "swap", "value", "item", "key", "chars",
                         "number", "number"])
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        entries = _entry_lines(lines)
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(j, lines[i])
        elif op == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "number" and any(_NUMBER.search(lines[k]) for k in entries):
            # Nudge a number: reaches the shape arithmetic more often than a random token.
            k = rng.choice([k for k in entries if _NUMBER.search(lines[k])])
            found = list(_NUMBER.finditer(lines[k]))
            m = rng.choice(found)
            n = int(m.group())
            new = rng.choice([n + 1, n - 1, n * 2, n // 2, 0, 1, 2, n + rng.randint(2, 9), 10**12])
            lines[k] = lines[k][: m.start()] + str(new) + lines[k][m.end():]
        elif op in ("value", "item", "key", "number") and entries:
            k = rng.choice(entries)
            key, _, value = lines[k].partition("=")
            token = rng.choice(TOKENS + names)
            if op == "value":
                value = token
            elif op == "item":
                items = value.split(",")
                items[rng.randrange(len(items))] = token
                value = ",".join(items)
            else:
                key = rng.choice(KEYS)
            lines[k] = f"{key}={value}"
        else:
            text = "\n".join(lines)
            at = rng.randrange(len(text) + 1)
            insert = "".join(rng.choice(CHARS) for _ in range(rng.randint(1, 4)))
            lines = (text[:at] + insert + text[at:]).split("\n")
        text = "\n".join(lines)
    return text


def describe_input(tmpdir: Path, kind: str, original: Path | None) -> str:
    """A mutant as a diff against its original; random input as bytes."""
    if original is None:
        return "\n".join(f"{p.name}: {p.read_bytes()[:2000]!r}" for p in sorted(tmpdir.iterdir()))
    params = find_params_file(original)
    pairs = [(original, tmpdir / original.name)] + ([(params, tmpdir / params.name)] if params else [])
    diffs = []
    for before, after in pairs:
        diffs += difflib.unified_diff(before.read_text().splitlines(), after.read_bytes().decode("utf-8", "replace")
                                      .splitlines(), str(before), f"mutated {after.name}", lineterm="", n=2)
    return "\n".join(diffs)


# --- one round ------------------------------------------------------------------------


class Failure(Exception):
    """An invariant broken without an exception of convspec's own."""


def run_forward(net) -> None:
    import torch

    from convspec.builder import build

    model = build(net, devices=["cpu"]).eval()
    names = [l.name for l in net.layers.values() if l.type != "data" and not l.type.startswith("cost.")]
    images = torch.randn(2, *net.image_shape)
    with torch.no_grad():
        outputs = model(images, outputs=names) if names else {}
    for name, y in outputs.items():
        if tuple(y.shape) != (2, *net.layers[name].shape):
            raise Failure(f"layer '{name}': built output {tuple(y.shape)[1:]} but checked "
                          f"shape {net.layers[name].shape}")


def check_one(spec: Path, params: Path | None, shape, do_build: bool) -> str:
    """'ok', 'built' or 'spec_error'; raises anything else."""
    try:
        net = check_paths(spec, params, shape)
    except SpecError as err:
        message = str(err)
        params = params or find_params_file(spec)
        located = [str(spec)] + ([str(params)] if params else [])
        if not any(message.startswith(p) for p in located):
            raise Failure(f"SpecError not located in {located}: {message!r}") from err
        return "spec_error"
    if min(net.total_params, net.total_neurons, net.total_macs) < 0:
        raise Failure(f"negative totals: {net.total_params}, {net.total_neurons}, {net.total_macs}")
    for layer in net.layers.values():
        if not layer.shape or min(layer.shape) < 1:
            raise Failure(f"layer '{layer.name}' checked with shape {layer.shape}")
    json.dumps(as_dict(net))
    as_text(net)
    small = (net.total_params < BUILD_MAX_PARAMS and net.total_neurons < BUILD_MAX_NEURONS
             and net.total_macs < BUILD_MAX_MACS and net.image_shape is not None
             and math.prod(net.image_shape) < BUILD_MAX_NEURONS)
    if do_build and small:
        try:
            run_forward(net)
        except SpecError:
            return "build_spec_error"
        return "built"
    return "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--no-build", action="store_true", help="only parse and check")
    parser.add_argument("--show", type=int, default=3, help="failures to print in full (default 3)")
    parser.add_argument("--memory-gb", type=float, default=8.0,
                        help="address-space limit, so a runaway allocation is a failure, not the "
                             "OOM killer (default 8)")
    args = parser.parse_args()
    limit = int(args.memory_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))

    rng = random.Random(args.seed)
    seeds = seed_specs()
    originals = {spec: spec.read_text() for spec, _ in seeds}
    param_files = {spec: find_params_file(spec) for spec, _ in seeds}
    counts: dict[str, int] = {"ok": 0, "built": 0, "spec_error": 0, "build_spec_error": 0, "failure": 0}
    by_kind: dict[str, int] = {}
    failures: list[tuple[str, str]] = []
    failure_types: set[str] = set()
    start = time.monotonic()
    rounds = 0
    with tempfile.TemporaryDirectory(prefix="convspec-fuzz-") as tmp:
        tmpdir = Path(tmp)
        while time.monotonic() - start < args.seconds:
            rounds += 1
            roll = rng.random()
            params_path = original = None
            for old in tmpdir.iterdir():
                old.unlink()
            if roll < 0.1:
                kind, shape = "bytes", (3, 32, 32)
                spec_path = tmpdir / "random.cfg"
                spec_path.write_bytes(rng.randbytes(rng.randrange(200)))
            elif roll < 0.2:
                kind, shape = "text", (3, 32, 32)
                spec_path = tmpdir / "random.cfg"
                spec_path.write_bytes(random_text(rng).encode("utf-8"))
            else:
                original, shape = rng.choice(seeds)
                kind = "mutant:" + original.name
                spec_text = originals[original]
                names = [l.strip()[1:-1] for l in spec_text.split("\n") if l.strip().startswith("[")]
                spec_path = tmpdir / original.name
                source_params = param_files[original]
                params_text = source_params.read_text() if source_params else None
                if params_text is not None and rng.random() < 0.25:
                    params_text = mutate(params_text, rng, names)
                    kind += ":params"
                else:
                    spec_text = mutate(spec_text, rng, names)
                spec_path.write_bytes(spec_text.encode("utf-8"))
                if params_text is not None:
                    params_path = tmpdir / source_params.name
                    params_path.write_bytes(params_text.encode("utf-8"))
                if rng.random() < 0.2:
                    shape = None  # the spec's own inputSize=, if it has one
            by_kind[kind.split(":")[0]] = by_kind.get(kind.split(":")[0], 0) + 1
            try:
                counts[check_one(spec_path, None, shape, not args.no_build)] += 1
            except Exception as exc:  # noqa: BLE001 -- anything but SpecError is what we hunt
                counts["failure"] += 1
                # torch's C++ errors run to dozens of lines; the first names the problem.
                first_line = (str(exc).strip().split("\n") or [""])[0][:160]
                failure_types.add(f"{type(exc).__name__}: {first_line}")
                if len(failures) < args.show:
                    inputs = describe_input(tmpdir, kind, original if kind.startswith("mutant") else None)
                    failures.append((f"round {rounds} ({kind}, input {shape}):\n{inputs}",
                                     traceback.format_exc(limit=-8)[:6000]))

    for where, tb in failures:
        print(f"=== failure in {where}\n{tb}", file=sys.stderr)
    summary = {
        "seconds": round(time.monotonic() - start, 1),
        "seed": args.seed,
        "rounds": rounds,
        "inputs": by_kind,
        **counts,
        "failure_types": sorted(failure_types),
    }
    print(json.dumps(summary, indent=2))
    return 1 if counts["failure"] else 0


if __name__ == "__main__":
    sys.exit(main())
