"""Typed values: turn parsed ``key=value`` entries into ints, floats, lists,
neuron functions and learning-rate schedules, with located errors.

Part of the checking stage; no torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import Location, did_you_mean, fail
from .parse import Arg, Call, Number


# --- neuron functions -------------------------------------------------------

# name -> (parameter names, formula shown in errors and docs)
NEURONS: dict[str, tuple[tuple[str, ...], str]] = {
    "ident": ((), "f(x) = x"),
    "relu": ((), "f(x) = max(0, x)"),
    "logistic": ((), "f(x) = 1 / (1 + e^-x)"),
    "abs": ((), "f(x) = |x|"),
    "softrelu": ((), "f(x) = log(1 + e^x)"),
    "square": ((), "f(x) = x^2"),
    "sqrt": ((), "f(x) = sqrt(x)"),
    "log": (("a",), "f(x) = log(a + x)"),
    "tanh": (("a", "b"), "f(x) = a * tanh(b * x)"),
    "abstanh": (("a", "b"), "f(x) = a * |tanh(b * x)|"),
    "brelu": (("a",), "f(x) = min(a, max(0, x))"),
    "linear": (("a", "b"), "f(x) = a * x + b"),
    "drelu": (("a",), "f(x) = x - a * tanh(x / a)"),
}


@dataclass(frozen=True)
class Neuron:
    name: str
    params: tuple[float, ...] = ()

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}[{','.join(f'{p:g}' for p in self.params)}]"


def neuron_usage() -> str:
    return ", ".join(
        f"{n}[{','.join(p)}]" if p else n for n, (p, _f) in NEURONS.items()
    )


# --- learning-rate schedules ------------------------------------------------

# name -> parameter names; numSteps is an int, the rest floats.
SCHEDULES: dict[str, tuple[str, ...]] = {
    "const": ("base",),
    "linear": ("base", "tgtFactor"),
    "exp": ("base", "tgtFactor"),
    "dexp": ("base", "tgtFactor", "numSteps"),
}


@dataclass(frozen=True)
class Schedule:
    """A cuda-convnet2 learning-rate schedule over training progress in [0, 1].

    ``tgtFactor`` is how many times smaller the rate is at the end, as in
    cuda-convnet2's ``lr.cu``: ``exp`` decays geometrically from ``base`` to
    ``base / tgtFactor``; ``dexp`` does the same in ``numSteps`` flat steps.
    """

    kind: str
    base: float
    tgt_factor: float = 1.0
    num_steps: int = 1

    def value(self, progress: float) -> float:
        p = min(max(progress, 0.0), 1.0)
        if self.kind == "const":
            return self.base
        final = self.base / self.tgt_factor
        if self.kind == "linear":
            return (1 - p) * self.base + p * final
        if self.kind == "exp":
            return self.base * (1.0 / self.tgt_factor) ** p
        # dexp: numSteps values sampled from the exp curve at evenly spaced
        # progress points, each held for 1/numSteps of training.
        n = self.num_steps
        # The last step is exactly base / tgtFactor (numSteps=1 gives only that).
        values = [self.base * (1.0 / self.tgt_factor) ** (i / (n - 1)) for i in range(n - 1)] + [final]
        for i, v in enumerate(values):
            if p <= (i + 1) / n:
                return v
        return values[-1]

    def __str__(self) -> str:
        if self.kind == "const":
            return f"{self.base:g}"
        args = [f"base={self.base:g}", f"tgtFactor={self.tgt_factor:g}"]
        if self.kind == "dexp":
            args.append(f"numSteps={self.num_steps}")
        return f"{self.kind}[{';'.join(args)}]"


# --- conversions --------------------------------------------------------------


@dataclass
class Ctx:
    """What an error needs to say where it is: the layer and the key."""

    layer: str
    key: str

    def where(self) -> str:
        if self.layer.startswith("["):  # a section that is not a layer, such as [train]
            return f"{self.layer}: {self.key}"
        return f"layer '{self.layer}': {self.key}"


def _item_text(item) -> str:
    return item.text


# No size, count or index in a spec comes near this; past it, a typo such as
# outputs=99999999999999999999999 passed the check and crashed torch.  Keys with a
# bound of their own (seeds) keep it.
LARGEST_WHOLE = 2**31 - 1


def to_int(item, ctx: Ctx, minimum: int | None = None, maximum: int | None = None) -> int:
    # Whole numbers are written as such: cuda-convnet's int() refuses "16.0" and "1e3" too.
    if isinstance(item, Number) and isinstance(item.value, int):
        value = item.value
    else:
        raise fail(f"{ctx.where()} must be a whole number, not '{_item_text(item)}'", item.loc)
    if minimum is not None and value < minimum:
        raise fail(f"{ctx.where()}={value} must be at least {minimum}", item.loc)
    maximum = LARGEST_WHOLE if maximum is None else maximum  # seeds take all of torch's 64 bits
    if value > maximum:
        raise fail(f"{ctx.where()}={value} must be at most {maximum}", item.loc)
    return value


# The largest float32: weights, biases and activations are float32 tensors (or bf16, with its range).
FLOAT32_MAX = 3.4028234663852886e38


def to_float(item, ctx: Ctx, minimum: float | None = None, below: float | None = None) -> float:
    if not isinstance(item, Number):
        raise fail(f"{ctx.where()} must be a number, not '{_item_text(item)}'", item.loc)
    value = float(item.value)
    if not math.isfinite(value):
        raise fail(f"{ctx.where()} must be a finite number, not '{item.text}'", item.loc)
    if abs(value) > FLOAT32_MAX:
        # initB=1e39 passed check, then filling the float32 bias failed as "a convspec bug".
        raise fail(f"{ctx.where()}={item.text} is beyond float32's range (magnitude at most 3.4e38), the "
                   "precision nets are built and trained in", item.loc)
    if minimum is not None and value < minimum:
        raise fail(f"{ctx.where()}={item.text} must be at least {minimum:g}", item.loc)
    if below is not None and value >= below:
        raise fail(f"{ctx.where()}={item.text} must be below {below:g}", item.loc)
    return value


def to_share(item, ctx: Ctx, meaning: str = "the share kept") -> float:
    """A share of something kept, such as dropout's keep (0 keeps nothing and divides
    by 0) or the learning rate kept at a drop (0 stops learning)."""
    value = to_float(item, ctx)
    if not 0 < value <= 1:
        raise fail(f"{ctx.where()}={item.text} must be above 0 and at most 1 ({meaning})", item.loc)
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def to_bool(item, ctx: Ctx) -> bool:
    text = _item_text(item).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise fail(f"{ctx.where()} must be 1, 0, true, false, yes, no, on or off, not '{_item_text(item)}'", item.loc)


def to_word(item, ctx: Ctx, choices: tuple[str, ...] | None = None) -> str:
    if isinstance(item, Call):
        raise fail(f"{ctx.where()} must be a plain word, not '{item.text}'", item.loc)
    text = item.text
    if choices is not None and text not in choices:
        raise fail(
            f"{ctx.where()}={text} is not one of {', '.join(choices)}{did_you_mean(text, choices)}",
            item.loc,
        )
    return text


def to_neuron(item, ctx: Ctx) -> Neuron:
    if isinstance(item, Number):
        raise fail(f"{ctx.where()} must name a neuron function ({neuron_usage()}), not '{item.text}'", item.loc)
    name = item.name if isinstance(item, Call) else item.text
    if name not in NEURONS:
        hint = did_you_mean(name, NEURONS)
        if name == "nrelu":
            raise fail(f"{ctx.where()}=nrelu (noisy relu) is not supported by convspec; use relu", item.loc)
        raise fail(f"{ctx.where()}: unknown neuron function '{name}'{hint or '; known: ' + neuron_usage()}", item.loc)
    expected, formula = NEURONS[name]
    args: tuple[Arg, ...] = item.args if isinstance(item, Call) else ()
    if len(args) != len(expected) or any(a.key is not None for a in args):
        form = f"{name}[{','.join(expected)}]" if expected else name
        typed = getattr(item, "typed", "") or item.text  # a Call as written: tanh[1,2,3], not tanh[1;2;3]
        raise fail(f"{ctx.where()}: neuron '{name}' is written {form} ({formula}), not '{typed}'", item.loc)
    # "layer 'c': neuron=tanh[a,b]: a must be a number": which argument, not just "neuron".
    params = tuple(to_float(a.value, Ctx(ctx.layer, f"{ctx.key}={name}[{','.join(expected)}]: {letter}"))
                   for a, letter in zip(args, expected))
    if name == "abstanh":
        # |tanh(bx)| = |tanh(-bx)|; cuda-convnet makes b positive too.
        params = (params[0], abs(params[1]))
    return Neuron(name, params)


def to_schedule(item, ctx: Ctx) -> Schedule:
    if isinstance(item, Number):
        return Schedule("const", to_float(item, ctx, minimum=0.0))
    name = item.name if isinstance(item, Call) else item.text
    if name.lower() not in SCHEDULES:
        raise fail(
            f"{ctx.where()}: unknown schedule '{name}'; use a number or one of "
            "const[base=B], linear[base=B;tgtFactor=F], exp[base=B;tgtFactor=F], "
            f"dexp[base=B;tgtFactor=F;numSteps=N]{did_you_mean(name, SCHEDULES)}",
            item.loc,
        )
    kind = name.lower()
    wanted = SCHEDULES[kind]
    args = item.args if isinstance(item, Call) else ()
    given: dict[str, Arg] = {}
    for arg in args:
        key = next((w for w in wanted if arg.key and w.lower() == arg.key.lower()), None)
        if key is None:
            raise fail(
                f"{ctx.where()}: {kind} takes {';'.join(w + '=' for w in wanted)} arguments, not '{arg.key or arg.value.text}'",
                arg.loc,
            )
        if key in given:
            raise fail(f"{ctx.where()}: {kind} has {key}= twice; keep one", arg.loc)
        given[key] = arg
    missing = [w for w in wanted if w not in given]
    if missing:
        raise fail(f"{ctx.where()}: {kind} schedule needs {', '.join(missing)} (as {kind}[{';'.join(w + '=...' for w in wanted)}])", item.loc)

    def argument(name):  # errors name the argument: "layer 'conv1': epsW: numSteps=0 must be at least 1"
        return given[name].value, Ctx(ctx.layer, f"{ctx.key}: {name}")

    base = to_float(*argument("base"), minimum=0.0)
    if kind == "const":
        return Schedule(kind, base)
    tgt = to_float(*argument("tgtFactor"))
    if tgt <= 0:
        raise fail(f"{ctx.where()}: tgtFactor must be positive", given["tgtFactor"].value.loc)
    steps = to_int(*argument("numSteps"), minimum=1) if kind == "dexp" else 1
    return Schedule(kind, base, tgt, steps)


def to_shape(item, ctx: Ctx) -> tuple[int, int, int]:
    """``3x224x224`` (channels x height x width)."""
    return parse_shape(item.text if not isinstance(item, Call) else item.text, ctx.where(), item.loc)


def parse_shape(text: str, what: str, loc: Location | None) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    # ASCII digits only: int() also reads other scripts' digits and spaces around them.
    dims = tuple(int(p) for p in parts) if all(p.isascii() and p.isdigit() for p in parts) else ()
    if len(dims) != 3 or min(dims) < 1:
        raise fail(f"{what} must be CxHxW with positive whole numbers, e.g. 3x224x224, not '{text}'", loc)
    if max(dims) > LARGEST_WHOLE:
        raise fail(f"{what}={text} has a side over {LARGEST_WHOLE}; give the image's real size", loc)
    return dims  # type: ignore[return-value]
