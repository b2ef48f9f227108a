"""The layer types, as data: one declaration per type.

Each :class:`LayerType` lists its keys (type, default, where they may appear),
its shape rule, how to count its parameters and multiply-adds, and the name of
the torch module that builds it (``convspec.ops``).  Adding a layer type is
adding one entry to :data:`LAYER_TYPES`.

Semantics follow cuda-convnet2's ``layer.py``; the places where they surprise
are commented where they are implemented.  No torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import Location, fail
from .parse import Entry

Shape = tuple[int, ...]  # (C, H, W) for images, (N,) for flat vectors

REQUIRED = object()


@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # int, float, share (above 0, at most 1), bool, word, neuron, schedule, shape, names, ints
    default: Any = None
    per_input: bool = False  # a comma list with one value per input (one value is repeated)
    minimum: float | None = None
    below: float | None = None  # exclusive upper bound (floats only)
    choices: tuple[str, ...] | None = None
    doc: str = ""


@dataclass
class Layer:
    """One checked layer: its resolved keys, inputs, placement and shape."""

    name: str
    type: str
    loc: Location
    entries: dict[str, Entry] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    gpu: list[int] = field(default_factory=list)
    gpu_defaulted: bool = False
    input_shapes: list[Shape] = field(default_factory=list)
    input_types: list[str] = field(default_factory=list)
    image_inputs: list[tuple[int, int, int]] = field(default_factory=list)  # inputs read as images
    shape: Shape = ()
    params: int = 0
    macs: int = 0
    neurons: int = 0
    params_loc: Location | None = None  # its [section] in the params file, if it has one

    def loc_of(self, key: str, index: int | None = None) -> Location:
        """Where ``key`` (or its ``index``-th list item) is written, else the section."""
        entry = self.entries.get(key)
        if entry is None:
            return self.loc
        items = entry.value.items
        if index is not None and len(items) > 1 and index < len(items):
            return items[index].loc
        return entry.value.loc

    def __getitem__(self, key: str) -> Any:
        return self.attrs[key]

    def per_input(self, key: str, index: int) -> Any:
        return self.attrs[key][index]


ShapeRule = Callable[[Layer], Shape]
CountRule = Callable[[Layer], tuple[int, int]]


@dataclass(frozen=True)
class LayerType:
    name: str
    keys: tuple[Key, ...]
    shape: ShapeRule
    count: CountRule = lambda layer: (0, 0)
    num_inputs: int | None = None  # None: one or more; 0: a data layer
    has_weights: bool = False
    counts_neurons: bool = False
    module: str = ""  # class name in convspec.ops
    doc: str = ""

    def key(self, name: str) -> Key | None:
        lowered = name.lower()
        for k in self.all_keys():
            if k.name.lower() == lowered:
                return k
        return None

    def all_keys(self) -> tuple[Key, ...]:
        common = (TYPE_KEY,) if self.num_inputs == 0 else (TYPE_KEY,) + INPUT_KEYS
        return common + self.keys + (LEARNING_KEYS if self.has_weights else ())


# --- keys shared by many types ----------------------------------------------

TYPE_KEY = Key("type", "word", REQUIRED, doc="the layer type")
INPUT_KEYS = (
    Key("inputs", "names", REQUIRED, doc="comma list of the layers this one reads"),
    Key("gpu", "ints", None, minimum=0, doc="spec GPU index; a list means data-parallel replicas"),
    Key("neuron", "neuron", None, doc="activation applied to the output"),
)
WEIGHT_INIT_KEYS = (
    Key("initW", "float", 0.01, per_input=True, minimum=0, doc="std of the Gaussian initial weights"),
    Key("initB", "float", 0.0, doc="constant initial bias"),
)
# Per-parameter learning rules; cuda-convnet2 reads them from the params file.
LEARNING_KEYS = (
    Key("epsW", "schedule", None, per_input=True, doc="weight learning rate (number or schedule)"),
    Key("epsB", "schedule", None, doc="bias learning rate (number or schedule)"),
    # Momentum 1 or more never forgets a gradient: the steps grow until the loss is NaN.
    Key("momW", "float", None, per_input=True, minimum=0, below=1, doc="weight momentum"),
    Key("momB", "float", None, minimum=0, below=1, doc="bias momentum"),
    Key("wc", "float", 0.0, per_input=True, minimum=0, doc="L2 weight decay"),
    Key("wball", "float", 0.0, per_input=True, minimum=0,
        doc="weight-ball limit: filters rescaled to this norm after each update (0: off)"),
    Key("updatePeriod", "int", 0, minimum=0, doc="accumulate gradients over this many minibatches"),
    Key("superEps", "float", 0.0, doc="recorded, unused by cuda-convnet2's default path"),
    Key("superMom", "float", 0.0, doc="recorded, unused by cuda-convnet2's default path"),
)

# Keys that only tuned cuda-convnet's CUDA kernels: accepted, ignored.
IGNORED_KEYS = {
    "partialsum": "partialSum",
    "sumwidth": "sumWidth",
    "randsparse": "randSparse",
    "filterchannels": "filterChannels",
    "conservemem": "conserveMem",
    "crossmap": "crossMap",  # a redundant marker on old cmrnorm layers
}

# Keys that would run code or need machinery convspec refuses.
REFUSED_KEYS = {
    "initwfunc": "initWFunc names a Python function cuda-convnet would import and run; "
    "a spec must never run code, so use initW=STD (Gaussian) instead",
    "initbfunc": "initBFunc names a Python function cuda-convnet would import and run; "
    "a spec must never run code, so use initB=VALUE instead",
    "initcfunc": "initCFunc names a Python function cuda-convnet would import and run; "
    "a spec must never run code; remove it",
    "weightsource": "weight sharing (weightSource) is not supported by convspec yet; "
    "remove it to give the layer its own weights",
}

# cuda-convnet2 layer types that convspec does not implement.
UNSUPPORTED_TYPES = {
    "sfc", "sum", "cmpool", "nailbed", "blur", "href", "resize", "rgb2yuv", "rgb2lab",
    "rscale", "crop", "cost.ce", "cost.bce", "cost.dce", "cost.sum2",
}


# --- shape helpers ------------------------------------------------------------


def numel(shape: Shape) -> int:
    return math.prod(shape)


def fmt_shape(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def image_input(layer: Layer, index: int, channels: int | None) -> tuple[int, int, int]:
    """Input ``index`` as (C, H, W), checking a declared ``channels=``.

    cuda-convnet passes flat vectors between layers and re-reads them as square
    ``channels``-channel images, so a flat input is accepted when it divides
    into a square image.
    """
    shape = layer.input_shapes[index]
    src = layer.inputs[index]
    if len(shape) == 3:
        if channels is not None and channels != shape[0]:
            raise fail(
                f"layer '{layer.name}': channels={channels} but input '{src}' has {shape[0]} channels; "
                f"set channels={shape[0]}",
                layer.loc_of("channels", index),
            )
        return shape  # type: ignore[return-value]
    n = shape[0]
    if channels is None:
        raise fail(
            f"layer '{layer.name}': input '{src}' is a flat vector of {n}; "
            "set channels= to read it as square images",
            layer.loc_of("inputs", index),
        )
    side = math.isqrt(n // channels) if n % channels == 0 else 0
    if side == 0 or channels * side * side != n:
        raise fail(
            f"layer '{layer.name}': the {n} outputs of '{src}' are not {channels}-channel square images",
            layer.loc_of("channels", index),
        )
    return (channels, side, side)


def _out_size(layer: Layer, key: str, size: int, extent: int) -> int:
    if size < 1:
        raise fail(
            f"layer '{layer.name}': output shrinks to nothing ({size}); "
            f"use a smaller filter or pooling size, or more padding",
            layer.loc_of(key),
        )
    return size


# --- shape and count rules ----------------------------------------------------


def data_shape(layer: Layer) -> Shape:
    # Filled in by the checker from --input, inputSize= or the label rule.
    return layer.shape


def local_shape(layer: Layer) -> Shape:
    """conv and local: one filter bank per input, outputs summed.

    ``filters=`` counts filters per group: groups=g gives filters*g maps.
    The output size rounds up, 1 + ceil((2*padding + size - filterSize) / stride);
    cuda-convnet covers the extra bottom/right rows with implicit zeros.
    """
    outs = []
    layer.image_inputs = []
    for i in range(len(layer.inputs)):
        c, h, w = image_input(layer, i, layer.per_input("channels", i))
        layer.image_inputs.append((c, h, w))
        groups = layer.per_input("groups", i)
        if c % groups:
            raise fail(
                f"layer '{layer.name}': groups={groups} does not divide the {c} channels of '{layer.inputs[i]}'",
                layer.loc_of("groups", i),
            )
        f, p, s = layer.per_input("filterSize", i), layer.per_input("padding", i), layer.per_input("stride", i)
        if layer.attrs.get("modulesX"):
            oh = ow = m = layer.attrs["modulesX"]
            if -p + s * (m - 1) + f < max(h, w):  # cuda-convnet2's rule: more is zeros, fewer loses pixels
                computed = 1 + math.ceil((2 * p + max(h, w) - f) / s)
                raise fail(
                    f"layer '{layer.name}': modulesX={m} output windows (stride={s}, padding={p}) do not cover the "
                    f"{h}x{w} input of '{layer.inputs[i]}'; use modulesX={computed} or more, or leave it out",
                    layer.loc_of("modulesX"),
                )
        else:
            oh = 1 + math.ceil((2 * p + h - f) / s)
            ow = 1 + math.ceil((2 * p + w - f) / s)
            if 2 * p + min(h, w) - f < 0:
                raise fail(
                    f"layer '{layer.name}': filterSize={f} is larger than the {h}x{w} input of "
                    f"'{layer.inputs[i]}' plus padding={p}; use a smaller filterSize or more padding",
                    layer.loc_of("filterSize", i),
                )
            if s > f and (max(oh, ow) - 1) * s >= 2 * p + min(h, w):
                raise fail(
                    f"layer '{layer.name}': stride={s} puts output windows wholly outside the {h}x{w} input "
                    f"of '{layer.inputs[i]}'; use a stride of at most filterSize={f}",
                    layer.loc_of("stride", i),
                )
        outs.append((layer.per_input("filters", i) * groups, oh, ow))
    if len(set(outs)) != 1:
        dims = ", ".join(fmt_shape(o) for o in outs)
        raise fail(
            f"layer '{layer.name}': all inputs must give equal-sized outputs to be summed, got {dims}",
            layer.loc_of("inputs"),
        )
    return outs[0]


def _filter_macs(layer: Layer) -> tuple[int, int]:
    """(weights per output location, total multiply-adds) summed over inputs."""
    fmaps, oh, ow = layer.shape
    per_location = 0
    for i, (c, _h, _w) in enumerate(layer.image_inputs):
        fc = c // layer.per_input("groups", i)
        per_location += fmaps * fc * layer.per_input("filterSize", i) ** 2
    return per_location, per_location * oh * ow


def conv_count(layer: Layer) -> tuple[int, int]:
    per_location, macs = _filter_macs(layer)
    fmaps, oh, ow = layer.shape
    biases = fmaps if layer["sharedBiases"] else fmaps * oh * ow
    return per_location + biases, macs


def local_count(layer: Layer) -> tuple[int, int]:
    per_location, macs = _filter_macs(layer)
    fmaps, oh, ow = layer.shape
    return macs + fmaps * oh * ow, macs  # unshared: one filter set per location


def fc_shape(layer: Layer) -> Shape:
    return (layer["outputs"],)


def fc_count(layer: Layer) -> tuple[int, int]:
    out = layer["outputs"]
    weights = sum(numel(s) * out for s in layer.input_shapes)
    return weights + out, weights


def pool_shape(layer: Layer) -> Shape:
    """cuda-convnet's pooling: outputsX = 1 + ceil((size - start - sizeX) / stride)."""
    c, h, w = image_input(layer, 0, layer["channels"])
    layer.image_inputs = [(c, h, w)]
    size, stride, start = layer["sizeX"], layer["stride"], layer["start"]
    if stride > size:  # cuda-convnet's layer.py: 1 <= stride <= sizeX
        raise fail(f"layer '{layer.name}': stride={stride} is larger than sizeX={size}; "
                   f"pooling windows must touch or overlap", layer.loc_of("stride"))
    if size > min(h, w):
        raise fail(
            f"layer '{layer.name}': sizeX={size} is larger than the {h}x{w} input of '{layer.inputs[0]}'",
            layer.loc_of("sizeX"),
        )
    if start <= -size:  # a window over no pixel: avg gave NaN (0/0) and max -inf, as cuda-convnet gave junk
        raise fail(f"layer '{layer.name}': start={start} puts the first window wholly before the image "
                   f"(a {size}-pixel window from {start}); use start={1 - size} or more", layer.loc_of("start"))
    if layer["outputsX"]:
        oh = ow = layer["outputsX"]
        if start + (oh - 1) * stride >= min(h, w):
            raise fail(
                f"layer '{layer.name}': outputsX={oh} puts the last window past the {h}x{w} input of "
                f"'{layer.inputs[0]}'; use outputsX={1 + (min(h, w) - 1 - start) // stride} or less",
                layer.loc_of("outputsX"),
            )
    else:
        oh = _out_size(layer, "sizeX", 1 + math.ceil((h - start - size) / stride), h)
        ow = _out_size(layer, "sizeX", 1 + math.ceil((w - start - size) / stride), w)
    return (c, oh, ow)


def same_image_shape(layer: Layer) -> Shape:
    c, h, w = image_input(layer, 0, layer["channels"])
    layer.image_inputs = [(c, h, w)]
    size = layer["size"]
    limit = c if layer.type == "cmrnorm" else min(h, w)
    if size > limit:
        what = f"the {c} channels" if layer.type == "cmrnorm" else f"the {h}x{w} maps"
        raise fail(f"layer '{layer.name}': size={size} is larger than {what} of '{layer.inputs[0]}'",
                   layer.loc_of("size"))
    return (c, h, w)


def same_shape(layer: Layer) -> Shape:
    return layer.input_shapes[0]


def flat_shape(layer: Layer) -> Shape:
    return (numel(layer.input_shapes[0]),)


def concat_shape(layer: Layer) -> Shape:
    """Concatenation of cuda-convnet's flat (channel, y, x) outputs: for images of
    one size that is a channel concatenation."""
    shapes = layer.input_shapes
    if all(len(s) == 3 for s in shapes) and len({s[1:] for s in shapes}) == 1:
        return (sum(s[0] for s in shapes),) + shapes[0][1:]
    return (sum(numel(s) for s in shapes),)


def elementwise_shape(layer: Layer) -> Shape:
    sizes = [numel(s) for s in layer.input_shapes]
    if len(set(sizes)) != 1:
        listed = ", ".join(f"'{n}' {fmt_shape(s)}" for n, s in zip(layer.inputs, layer.input_shapes))
        raise fail(f"layer '{layer.name}': all inputs must have the same size, got {listed}",
                   layer.loc_of("inputs"))
    if layer.type == "eltmax" and len(layer.inputs) < 2:
        raise fail(f"layer '{layer.name}': eltmax needs at least 2 inputs", layer.loc_of("inputs"))
    return layer.input_shapes[0]


def logreg_shape(layer: Layer) -> Shape:
    labels, probs = layer.input_shapes
    if numel(labels) != 1:
        raise fail(
            f"layer '{layer.name}': the first input of cost.logreg must be the labels (a data layer "
            f"with dataIdx=1), but '{layer.inputs[0]}' has {numel(labels)} outputs",
            layer.loc_of("inputs", 0),
        )
    if layer.input_types[1] != "softmax":
        raise fail(
            f"layer '{layer.name}': the second input of cost.logreg must be a softmax layer, "
            f"but '{layer.inputs[1]}' is {layer.input_types[1]}",
            layer.loc_of("inputs", 1),
        )
    if layer["topk"] > numel(probs):
        raise fail(f"layer '{layer.name}': topk={layer['topk']} is more than the {numel(probs)} classes",
                   layer.loc_of("topk"))
    return (1,)


# --- the registry -------------------------------------------------------------

_CONV_KEYS = (
    Key("channels", "int", None, per_input=True, minimum=1, doc="input channels (checked)"),
    Key("filters", "int", REQUIRED, per_input=True, minimum=1, doc="filters per group"),
    Key("filterSize", "int", REQUIRED, per_input=True, minimum=1, doc="filter side"),
    Key("padding", "int", 0, per_input=True, minimum=0, doc="zero padding on each side"),
    Key("stride", "int", 1, per_input=True, minimum=1, doc="filter stride"),
    Key("groups", "int", 1, per_input=True, minimum=1, doc="channel groups"),
    Key("modulesX", "int", 0, minimum=0, doc="output side (0: computed)"),
) + WEIGHT_INIT_KEYS
_NORM_KEYS = (
    Key("channels", "int", None, minimum=1),
    Key("size", "int", REQUIRED, minimum=1, doc="neighbourhood size"),
    Key("scale", "float", None, minimum=0, doc="alpha; divided by size (cmrnorm) or size^2"),
    Key("pow", "float", None, doc="beta, the exponent"),
    Key("minDiv", "float", 1.0, doc="k, the additive constant"),
    Key("blocked", "bool", False),
)

LAYER_TYPES: dict[str, LayerType] = {
    t.name: t
    for t in [
        LayerType("data", (
            Key("dataIdx", "int", 0, minimum=0, doc="0: images, 1: labels"),
            Key("inputSize", "shape", None, doc="convspec extension: CxHxW of the images"),
        ), data_shape, num_inputs=0, doc="input images or labels"),
        LayerType("conv", _CONV_KEYS + (Key("sharedBiases", "bool", True),), local_shape, conv_count,
                  has_weights=True, counts_neurons=True, module="Conv", doc="convolution"),
        LayerType("local", _CONV_KEYS, local_shape, local_count,
                  has_weights=True, counts_neurons=True, module="Local", doc="locally connected, unshared weights"),
        LayerType("fc", (Key("outputs", "int", REQUIRED, minimum=1),) + WEIGHT_INIT_KEYS, fc_shape, fc_count,
                  has_weights=True, counts_neurons=True, module="FullyConnected", doc="fully connected"),
        LayerType("pool", (
            Key("pool", "word", REQUIRED, choices=("max", "avg", "maxabs")),
            Key("sizeX", "int", REQUIRED, minimum=1),
            Key("stride", "int", REQUIRED, minimum=1),
            Key("start", "int", 0),
            Key("outputsX", "int", 0, minimum=0),
            Key("channels", "int", None, minimum=1),
        ), pool_shape, num_inputs=1, module="Pool", doc="max or average pooling"),
        LayerType("neuron", (), same_shape, num_inputs=1, module="NeuronLayer", doc="activation function"),
        LayerType("softmax", (), flat_shape, num_inputs=1, module="Softmax"),
        LayerType("dropout", (Key("keep", "share", 0.5), Key("enable", "bool", True)),
                  same_shape, num_inputs=1, module="Dropout", doc="scales by 1/keep while training"),
        LayerType("dropout2", (Key("keep", "share", 0.5), Key("enable", "bool", True)),
                  same_shape, num_inputs=1, module="Dropout", doc="scales by keep at test time"),
        LayerType("cmrnorm", _NORM_KEYS, same_image_shape, num_inputs=1, module="CrossMapNorm"),
        LayerType("rnorm", _NORM_KEYS, same_image_shape, num_inputs=1, module="ResponseNorm"),
        LayerType("cnorm", _NORM_KEYS, same_image_shape, num_inputs=1, module="ContrastNorm"),
        LayerType("concat", (), concat_shape, module="Concat"),
        LayerType("pass", (), concat_shape, module="Concat", doc="pass-through (a concatenation)"),
        LayerType("eltsum", (Key("coeffs", "float", 1.0, per_input=True),), elementwise_shape, module="EltSum"),
        LayerType("eltmax", (), elementwise_shape, module="EltMax"),
        LayerType("cost.logreg", (
            Key("coeff", "float", 1.0, minimum=0),
            Key("topk", "int", 1, minimum=1),
        ), logreg_shape, num_inputs=2, doc="log-loss of a softmax against labels"),
    ]
}

# Old cuda-convnet files write sizeX= where the norm layers now take size=.
# Early cuda-convnet files also wrote numFilters, numOutputs and subsX.
LEGACY_SPELLINGS = {
    ("cmrnorm", "sizex"): "size", ("rnorm", "sizex"): "size", ("cnorm", "sizex"): "size",
    ("conv", "numfilters"): "filters", ("local", "numfilters"): "filters",
    ("fc", "numoutputs"): "outputs", ("pool", "subsx"): "sizeX",
}
