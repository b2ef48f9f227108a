"""Fuzzing the parse and check stages (and, for small nets, build) with hypothesis.

    python -m pytest -q tests/test_fuzz.py

Whatever bytes a spec file holds, ``check_paths`` must either return a checked
net or raise ``SpecError`` located in the spec or its params file -- never
lark's exceptions, a KeyError or a ZeroDivisionError.  Inputs are random bytes,
random spec-like text, and every spec in ``specs/`` and
``../shared/reference-specs/*layers*.cfg`` with a few random edits.  Examples
are derandomized and few, so the suite stays fast and repeatable; for long
runs use ``python bench/fuzz.py --seconds 300``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from convspec.builder import build
from convspec.check import CheckedNet, check_paths, find_params_file
from convspec.errors import SpecError
from convspec.report import as_dict, as_text

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE_SPECS = SHARED / "reference-specs"


def fuzz_settings(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


# --- the seeds: every layer file, with the input shape it checks with ------------------------


def _seeds() -> list:
    seeds = [pytest.param(p, None, id=p.name)
             for p in sorted((ROOT / "specs").glob("*.cfg")) if not p.name.endswith(".params.cfg")]
    references = sorted(REFERENCE_SPECS.glob("*layers*.cfg"))
    for p in references:
        shape = (3, 224, 224) if "imagenet" in p.name else (3, 32, 32)
        seeds.append(pytest.param(p, shape, id=p.name))
    if not references:
        seeds.append(pytest.param(None, None, id="reference-specs",
                                  marks=pytest.mark.skip(reason=f"{REFERENCE_SPECS} is not present")))
    return seeds


SEEDS = _seeds()
# Nets small enough to build and run on CPU in a fraction of a second.
SMALL_SEEDS = [s.values for s in SEEDS
               if s.values[0] is not None and re.search(r"cifar|80sec|18pct", s.values[0].name)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    # Module-scoped: hypothesis reruns the test body many times per fixture.
    return tmp_path_factory.mktemp("fuzz")


def seed_copy(workdir: Path, spec: Path) -> tuple[Path, Path | None]:
    """A directory holding the spec and its params file under their own names,
    so ``check_paths`` pairs them as it pairs the originals."""
    where = workdir / spec.stem
    where.mkdir(exist_ok=True)
    params = find_params_file(spec)
    if params is not None:
        shutil.copyfile(params, where / params.name)
    return where / spec.name, (where / params.name) if params else None


# --- the property -----------------------------------------------------------------------------------


def check_or_spec_error(spec: Path, input_shape) -> CheckedNet | None:
    """The checked net, or None after a well-formed SpecError.  Any other
    exception propagates and fails the test."""
    params = find_params_file(spec)
    try:
        net = check_paths(spec, input_shape=input_shape)
    except SpecError as err:
        message = str(err)
        located_in = [str(spec)] + ([str(params)] if params else [])
        assert any(message.startswith(p) for p in located_in), message
        assert message.split("\n")[0].strip(), "empty error message"
        return None
    assert net.total_params >= 0 and net.total_neurons >= 0 and net.total_macs >= 0
    for layer in net.layers.values():
        assert layer.shape and min(layer.shape) >= 1, (layer.name, layer.shape)
    # What `convspec check` prints must not fail either.
    json.dumps(as_dict(net))
    as_text(net)
    return net


# --- (a) random files -----------------------------------------------------------------------------------

CHARS = "[]=,:;#.-+ \t\n\r0123456789xaZ_é\ufeff"
TOKENS = [
    "", "0", "1", "2", "3", "5", "-1", "-7", "64", "1000", "1000000", "0.5", "-0.25", "1e-3",
    "1e30", "nan", "inf", "relu", "tanh", "tanh[1,2]", "tanh[1]", "log[0]",
    "dexp[base=0.1;tgtFactor=10;numSteps=2]", "exp[base=1]", "max", "avg", "conv", "fc", "pool",
    "data", "softmax", "cost.logreg", "x", "3x32x32", "3x0x5", "1x1x1", "[", "]", "[]", ",", ",,",
    "=", "a,b", "1,2", "0,1", "0,0", "#", ";", "true", "no", "@name",  # @name: a layer name
]
KEYS = [
    "type", "inputs", "gpu", "neuron", "channels", "filters", "filterSize", "padding", "stride",
    "groups", "modulesX", "initW", "initB", "sharedBiases", "outputs", "pool", "sizeX", "start",
    "outputsX", "size", "scale", "pow", "minDiv", "blocked", "keep", "enable", "coeffs", "coeff",
    "topk", "dataIdx", "inputSize", "epsW", "epsB", "momW", "momB", "wc", "updatePeriod",
    "sumWidth", "initWFunc", "weightSource", "Filters", "filter", "sizeY", "x", "",
]

spec_lines = st.one_of(
    st.sampled_from(TOKENS).map(lambda t: f"[{t}]\n"),
    st.tuples(st.sampled_from(KEYS), st.sampled_from(TOKENS)).map(lambda kv: f"{kv[0]}={kv[1]}\n"),
    st.text(CHARS, max_size=8),
)
spec_like_text = st.lists(spec_lines, max_size=12).map("".join)


@fuzz_settings(60)
@given(data=st.binary(max_size=300))
def test_random_bytes(workdir, data):
    path = workdir / "random.cfg"
    path.write_bytes(data)
    check_or_spec_error(path, (3, 32, 32))


@fuzz_settings(60)
@given(text=st.one_of(st.text(max_size=200), spec_like_text))
def test_random_text(workdir, text):
    path = workdir / "random.cfg"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    check_or_spec_error(path, (3, 32, 32))


# --- (b) mutated specs ------------------------------------------------------------------------------------

index = st.integers(0, 10**6)
edit = st.one_of(
    st.tuples(st.just("delete"), index),
    st.tuples(st.just("duplicate"), index, index),
    st.tuples(st.just("swap"), index, index),
    st.tuples(st.just("value"), index, st.sampled_from(TOKENS), index),
    st.tuples(st.just("item"), index, st.sampled_from(TOKENS), index),
    st.tuples(st.just("key"), index, st.sampled_from(KEYS)),
    st.tuples(st.just("chars"), index, st.text(CHARS, min_size=1, max_size=4)),
    st.tuples(st.just("number"), index, index, st.sampled_from(["+1", "-1", "*2", "//2", "0", "1", "+7"])),
)
NUMBER = re.compile(r"(?<=[=,x])\d+(?=$|[,x\s])")


def apply_edits(text: str, edits) -> str:
    """Apply drawn edits; indices wrap around, so every draw is usable."""
    names = [line.strip()[1:-1] for line in text.split("\n") if line.strip().startswith("[")] or ["x"]
    for op, i, *rest in edits:
        lines = text.split("\n")
        entries = [k for k, line in enumerate(lines)
                   if "=" in line and not line.lstrip().startswith(("#", ";", "["))] or [i % len(lines)]
        numbered = [k for k in entries if NUMBER.search(lines[k])]
        if op == "delete":
            del lines[i % len(lines)]
        elif op == "duplicate":
            lines.insert(rest[0] % (len(lines) + 1), lines[i % len(lines)])
        elif op == "swap":
            j = rest[0] % len(lines)
            i %= len(lines)
            lines[i], lines[j] = lines[j], lines[i]
        elif op in ("value", "item", "key"):
            k = entries[i % len(entries)]
            key, _, value = lines[k].partition("=")
            if op == "key":
                key = rest[0]
            else:
                token, which = rest
                token = names[which % len(names)] if token == "@name" else token
                items = value.split(",")
                if op == "value":
                    items = [token]
                else:
                    items[which % len(items)] = token
                value = ",".join(items)
            lines[k] = f"{key}={value}"
        elif op == "number" and numbered:
            k = numbered[i % len(numbered)]
            found = list(NUMBER.finditer(lines[k]))
            m = found[rest[0] % len(found)]
            n = int(m.group())
            new = {"+1": n + 1, "-1": n - 1, "*2": n * 2, "//2": n // 2, "0": 0, "1": 1, "+7": n + 7}[rest[1]]
            lines[k] = lines[k][: m.start()] + str(new) + lines[k][m.end():]
        elif op == "chars":
            flat = "\n".join(lines)
            at = i % (len(flat) + 1)
            lines = (flat[:at] + rest[0] + flat[at:]).split("\n")
        text = "\n".join(lines)
    return text


def test_apply_edits():
    text = "[a]\ntype=conv\nfilters=64,32\n[b]\ntype=fc"
    assert apply_edits(text, [("delete", 1)]) == "[a]\nfilters=64,32\n[b]\ntype=fc"
    assert apply_edits(text, [("swap", 0, 3)]) == "[b]\ntype=conv\nfilters=64,32\n[a]\ntype=fc"
    assert apply_edits(text, [("item", 1, "@name", 1)]) == "[a]\ntype=conv\nfilters=64,b\n[b]\ntype=fc"
    assert apply_edits(text, [("value", 2, "", 0)]) == "[a]\ntype=conv\nfilters=64,32\n[b]\ntype="
    assert apply_edits(text, [("key", 0, "x")]) == "[a]\nx=conv\nfilters=64,32\n[b]\ntype=fc"
    assert apply_edits(text, [("number", 0, 1, "*2")]) == "[a]\ntype=conv\nfilters=64,64\n[b]\ntype=fc"
    assert apply_edits(text, [("chars", 1, "]")]) == "[]a]\ntype=conv\nfilters=64,32\n[b]\ntype=fc"


edits = st.lists(edit, min_size=1, max_size=3)


@pytest.mark.parametrize("spec, shape", SEEDS)
@fuzz_settings(20)
@given(edits=edits, in_params=st.sampled_from([False, False, False, True]))
def test_mutated_specs(workdir, spec, shape, edits, in_params):
    path, params = seed_copy(workdir, spec)
    spec_text = spec.read_text()
    if in_params and params is not None:
        params.write_text(apply_edits(find_params_file(spec).read_text(), edits))
    else:
        spec_text = apply_edits(spec_text, edits)
    path.write_text(spec_text)
    check_or_spec_error(path, shape)


def test_unmutated_seeds_check(workdir):
    # The property above is only worth something if the seeds themselves check.
    for param in SEEDS:
        spec, shape = param.values
        if spec is not None:
            assert check_or_spec_error(spec, shape) is not None, spec


# --- build: a checked net builds and runs, with the shapes the checker inferred ---------------

BUILD_MAX_PARAMS = 2_000_000


def small_enough(net: CheckedNet) -> bool:
    return (net.total_params < BUILD_MAX_PARAMS and net.total_neurons < 1_000_000
            and net.total_macs < 100_000_000 and net.image_shape is not None)


def forward_all(net: CheckedNet) -> None:
    """Build on CPU, run two random images, compare every layer's output shape."""
    model = build(net, devices=["cpu"]).eval()  # a net the checker passed must build: no SpecError here
    names = [l.name for l in net.layers.values() if l.type != "data" and not l.type.startswith("cost.")]
    with torch.no_grad():
        outputs = model(torch.randn(2, *net.image_shape), outputs=names)
    assert set(outputs) == set(names)
    for name, y in outputs.items():
        assert tuple(y.shape) == (2, *net.layers[name].shape), name


@pytest.mark.skipif(not SMALL_SEEDS, reason="no small seed specs")
@fuzz_settings(12)
@given(seed=st.sampled_from(SMALL_SEEDS or [(None, None)]), edits=st.lists(edit, min_size=1, max_size=2))
def test_mutated_small_specs_build_and_run(workdir, seed, edits):
    spec, shape = seed
    path, _ = seed_copy(workdir, spec)
    path.write_text(apply_edits(spec.read_text(), edits))
    net = check_or_spec_error(path, shape)
    # Most edits give a SpecError; keep only those that check, to spend the examples on building.
    assume(net is not None and small_enough(net))
    forward_all(net)


@pytest.mark.parametrize("section, old, new, message", [
    ("[pool3]", "stride=2", "stride=1e30", "layer 'pool3': stride must be a whole number, not '1e30'"),
    ("[pool3]", "stride=2", "stride=100000", "layer 'pool3': stride=100000 is larger than sizeX=3; "
                                            "pooling windows must touch or overlap"),
    ("[conv3]", "stride=1", "stride=100000", "layer 'conv3': stride=100000 puts output windows wholly outside "
                                            "the 8x8 input of 'pool2'; use a stride of at most filterSize=5"),
])
def test_stride_past_the_input_is_a_spec_error(workdir, section, old, new, message):
    # Found by bench/fuzz.py: such strides used to check, and the built module
    # then padded the input out to (out-1)*stride+size (terabytes).
    spec = ROOT / "specs" / "cifar10-80sec.cfg"
    path, _ = seed_copy(workdir, spec)
    text = spec.read_text()
    at = text.index(section)
    path.write_text(text[:at] + text[at:].replace(old, new, 1))
    with pytest.raises(SpecError) as err:
        check_paths(path)
    assert err.value.message == message
