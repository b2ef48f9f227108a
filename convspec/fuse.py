"""Tower fusion: plan which sibling layers run as one PyTorch call.

A two-tower spec (AlexNet's conv1a/conv1b ...) folded onto one device would
otherwise run each tower's layers one after the other.  When the maths allows,
sibling layers become one call on a tensor that holds both towers' channels:

* ``full``: convs that read the same inputs (conv1a+conv1b on ``data``, or
  conv3a+conv3b on ``pool2a,pool2b`` in either order) become one conv whose
  weight is the towers' banks concatenated;
* ``grouped``: layers that each read one member of an earlier fused step, in
  order (pool1a/pool1b after conv1a/conv1b), run once on the fused tensor; a
  conv becomes a grouped conv.

Parameters stay in their own sections' modules, so state-dict keys do not
change.  This module only plans (no torch); ``convspec.builder`` executes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .check import CheckedNet
from .layers import LEARNING_KEYS, Layer

# Layer types whose work is independent per channel (or per channel group),
# so siblings can run on a channel-concatenated tensor.
GROUPED_TYPES = {"conv", "pool", "neuron", "dropout", "dropout2", "cmrnorm", "rnorm", "cnorm"}
_FORWARD_IRRELEVANT = {"inputs", "gpu", "initW", "initB"} | {k.name for k in LEARNING_KEYS}


@dataclass(frozen=True)
class Step:
    kind: str  # "single", "grouped" or "full"
    members: tuple[str, ...]
    sources: tuple[str, ...]  # grouped: one per member; full: the inputs, in the first member's order
    device: int


def _signature(layer: Layer, shapes) -> tuple:
    attrs = tuple(sorted((k, repr(v)) for k, v in layer.attrs.items() if k not in _FORWARD_IRRELEVANT))
    return (layer.type, attrs, shapes, layer.shape)


def _uniform_single_group(layer: Layer) -> bool:
    return all(len(set(layer.attrs[k])) == 1 for k in ("filterSize", "padding", "stride")) and \
        set(layer.attrs["groups"]) == {1}


def plan(net: CheckedNet, device_of: dict[str, int], needed: set[str], fuse: bool = True) -> list[Step]:
    layers = [l for l in net.layers.values()
              if l.name in needed and l.type != "data" and not l.type.startswith("cost.")]
    done: set[str] = set()
    step_of: dict[str, Step] = {}
    steps: list[Step] = []

    def free(candidate: Layer, layer: Layer) -> bool:
        return candidate.name not in done and device_of[candidate.name] == device_of[layer.name]

    for layer in layers:
        if layer.name in done:
            continue
        step = None
        if fuse and layer.type in GROUPED_TYPES and len(layer.inputs) == 1:
            step = _grouped(layer, layers, step_of, free, device_of)
        if step is None and fuse and layer.type == "conv" and _uniform_single_group(layer):
            step = _full(layer, layers, free, device_of)
        if step is None:
            step = Step("single", (layer.name,), tuple(layer.inputs), device_of[layer.name])
        steps.append(step)
        for member in step.members:
            done.add(member)
            step_of[member] = step
    return steps


def _grouped(layer, layers, step_of, free, device_of) -> Step | None:
    source_step = step_of.get(layer.inputs[0])
    if source_step is None or len(source_step.members) < 2:
        return None
    sig = _signature(layer, tuple(layer.input_shapes))
    chosen = []
    for source in source_step.members:
        match = next((c for c in layers if len(c.inputs) == 1 and c.inputs[0] == source and free(c, layer)
                      and c.name not in chosen and _signature(c, tuple(c.input_shapes)) == sig), None)
        if match is None:
            return None
        chosen.append(match.name)
    return Step("grouped", tuple(chosen), source_step.members, device_of[layer.name])


def _full(layer, layers, free, device_of) -> Step | None:
    sources = set(layer.inputs)
    if len(sources) != len(layer.inputs):
        return None
    sig = _signature(layer, tuple(sorted(layer.input_shapes)))
    chosen = [c.name for c in layers
              if c.type == "conv" and free(c, layer) and set(c.inputs) == sources
              and len(c.inputs) == len(layer.inputs) and _uniform_single_group(c)
              and _signature(c, tuple(sorted(c.input_shapes))) == sig]
    if len(chosen) < 2:
        return None
    return Step("full", tuple(chosen), tuple(layer.inputs), device_of[layer.name])
