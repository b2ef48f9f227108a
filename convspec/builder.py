"""Stage 3: checked graph -> ``torch.nn.Module``.

    net = build(check_paths("specs/alexnet.cfg"), devices=["cuda:0", "cuda:1"])
    logits = net(images)                       # the input of the cost's softmax
    loss = net.loss(logits, labels)            # coeff * cross-entropy, summed over costs
    feats = net(images, outputs=["fc7a"])      # any layer's output, by name

Submodules are named after the spec's sections, so state-dict keys read
``conv1a.weight``.  Spec GPU indices fold onto the devices given
(``gpu % len(devices)``); tensors are copied only where an edge crosses
devices, and on real GPUs the towers' kernels run concurrently because CUDA
launches are asynchronous.  On one device, sibling towers are fused
(``convspec.fuse``).  Each parameter's learning rules (epsW, momW, wc, ...)
are recorded for the trainer in :meth:`CompiledNet.learning_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .check import CheckedNet, module_name
from .errors import SpecError, did_you_mean, fail
from .fuse import Step, plan
from .layers import LAYER_TYPES


@dataclass(frozen=True)
class Rule:
    """How one parameter learns (cuda-convnet's per-layer keys)."""

    eps: Any  # values.Schedule or None
    mom: float | None
    wc: float
    wball: float
    update_period: int
    layer_type: str = ""


def default_devices() -> list[torch.device]:
    if torch.cuda.is_available():
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return [torch.device("cpu")]


def _free_module_name(net: nn.Module, layer) -> str:
    """The layer's module name, refused where PyTorch would fail.

    A layer is stored as an attribute of the built net, under its section's name (so the
    state-dict keys are the spec's): a section named [forward], [training] or [cost] would
    shadow the net's own.  (Two sections with one module name, [a.b] and [a_b], are
    refused by the checker, which knows no PyTorch attributes.)"""
    name = module_name(layer.name)
    if hasattr(net, name):
        raise fail(f"layer name '{layer.name}' is taken by the built PyTorch module's own attribute '{name}'; "
                   f"rename the section, e.g. [{layer.name}1]", layer.loc)
    return name


def channels_last_in_place(module: nn.Module) -> nn.Module:
    """Store every 4-D parameter and buffer of ``module`` NHWC (channels_last), in place.

    ``Module.to(memory_format=torch.channels_last)`` refuses the whole module as
    soon as one tensor is not 4-D, and a local layer's unshared filters are 5-D;
    only the convolutions' kernels care about the layout."""
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module


class CompiledNet(nn.Module):
    def __init__(self, net: CheckedNet, devices: Sequence[str | torch.device] | None = None,
                 fuse: bool = True):
        super().__init__()
        self.spec = net
        self.devices = [torch.device(d) for d in devices] if devices else default_devices()
        self.fuse = fuse
        self.device_of: dict[str, int] = {}
        self.image_input = next((l.name for l in net.layers.values()
                                 if l.type == "data" and l["dataIdx"] != 1), None)
        # cuda-convnet trains on the sum of every cost layer times its coeff; the first in the
        # file is the one whose error is reported (an auxiliary classifier comes after it).
        self.costs = net.costs
        self.cost = self.costs[0] if self.costs else None
        # Each cost's logits: the loss applies log-softmax itself.
        self.cost_outputs = tuple(net.cost_logits)
        if self.cost_outputs:
            self.output_name = self.cost_outputs[0]
        else:
            read = net.read_layers()
            sinks = [l.name for l in net.layers.values() if l.type != "data" and l.name not in read]
            self.output_name = sinks[-1] if sinks else self.image_input
        self._plans: dict[tuple[str, ...], list[Step]] = {}
        # What runtime.runs attaches to a net loaded from a run.  Every attribute is set before
        # the layers' modules are added, so that a layer cannot take one of these names (nor
        # any of nn.Module's) as its module's name.
        self.classes = self.class_names = self.mean = self.crop = self.image_size = self.preprocess = None
        for layer in net.layers.values():
            if layer.type == "data":
                continue
            self.device_of[layer.name] = layer.gpu[0] % len(self.devices)
            module_class = LAYER_TYPES[layer.type].module
            if module_class:
                module = getattr(ops, module_class)(layer)
                self.add_module(_free_module_name(self, layer), module.to(self.devices[self.device_of[layer.name]]))
        if self.output_name is not None:
            # Plan now, not at the first forward, so torch.compile never traces the planner.
            self.steps((self.output_name,))
            self.steps(self.training_outputs)

    @property
    def training_outputs(self) -> tuple[str, ...]:
        """What a forward pass in train mode returns: every cost's logits, or the output alone."""
        return self.cost_outputs if len(self.cost_outputs) > 1 else (self.output_name,)

    def to_channels_last(self) -> "CompiledNet":
        """Store every 4-D parameter and buffer NHWC (channels_last), in place."""
        return channels_last_in_place(self)

    # --- planning -------------------------------------------------------------------

    def layer_module(self, name: str) -> nn.Module:
        return getattr(self, module_name(name))

    def steps(self, outputs: tuple[str, ...]) -> list[Step]:
        if outputs not in self._plans:
            needed: set[str] = set()
            stack = list(outputs)
            while stack:
                name = stack.pop()
                if name in needed:
                    continue
                if name not in self.spec.layers:
                    raise KeyError(f"no layer '{name}' in {self.spec.path}")
                needed.add(name)
                stack.extend(self.spec.layers[name].inputs)
            self._plans[outputs] = plan(self.spec, self.device_of, needed, self.fuse)
        return self._plans[outputs]

    # --- running ----------------------------------------------------------------------

    def _wanted(self, outputs: str | Sequence[str] | None) -> tuple[str, ...]:
        """The layers to return, checked: a bare KeyError named neither the fix nor the spec."""
        if not outputs:
            return (self.output_name,)
        wanted = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        for name in wanted:
            layer = self.spec.layers.get(name) if isinstance(name, str) else None
            if layer is None:
                name = str(name)
                raise SpecError(f"outputs: no layer '{name}' in {self.spec.path}"
                                f"{did_you_mean(name, list(self.spec.layers))}")
            if name != self.image_input and (layer.type == "data" or layer.type.startswith("cost.")):
                raise SpecError(f"outputs: '{name}' ({layer.type}) needs the labels, which a forward pass has none "
                                f"of; ask for layers the images compute (e.g. '{self.output_name}')")
        return wanted

    def forward(self, images: torch.Tensor, outputs: str | Sequence[str] | None = None):
        """The output's logits; with ``outputs``, a dict of those layers' outputs.  In train
        mode a net with several cost layers returns a tuple of every cost's logits, in file
        order, for :meth:`loss` to sum; in eval mode only the first cost's, whose error is
        the one reported."""
        several = not outputs and self.training and len(self.cost_outputs) > 1
        wanted = self.cost_outputs if several else self._wanted(outputs)
        values: dict[str, torch.Tensor] = {self.image_input: images}
        fused: dict[tuple[str, ...], torch.Tensor] = {}  # members -> channel-concatenated output
        copies: dict[tuple[str, torch.device], torch.Tensor] = {}

        one_device = len(self.devices) == 1

        def fetch(name: str, device: torch.device) -> torch.Tensor:
            x = values[name]
            if one_device or x.device == device:
                return x
            key = (name, device)
            if key not in copies:  # one copy per edge target, shared by its readers
                copies[key] = x.to(device, non_blocking=True)
            return copies[key]

        def gather(names: tuple[str, ...], device: torch.device) -> torch.Tensor:
            if len(names) == 1:
                return fetch(names[0], device)
            if names in fused and fused[names].device == device:
                return fused[names]
            return torch.cat([fetch(n, device) for n in names], dim=1)

        modules = self._modules  # looked up once: nn.Module's __getattr__ costs a call per layer
        for step in self.steps(wanted):
            device = self.devices[step.device]
            if step.kind == "single":
                name = step.members[0]
                values[name] = modules[module_name(name)]([fetch(s, device) for s in step.sources])
                continue
            x = gather(step.sources, device)
            y = self._run_fused(step, x)
            fused[step.members] = y
            # One split, not a narrow per member: a layer that reads members one by one
            # (AlexNet's fc6a and fc6b read pool5a and pool5b) then sends its gradients back
            # through one concatenation, where each narrow's backward zero-fills a
            # tensor of the whole step's size and the copies are then summed.
            widths = [self.spec.layers[name].shape[0] for name in step.members]
            values.update(zip(step.members, torch.split(y, widths, dim=1)))

        if outputs:
            return {name: values[name] for name in wanted}
        if several:
            return tuple(values[name] for name in wanted)
        return values[self.output_name]

    def run_step(self, step: Step, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """One planned step alone, on inputs already on its device: a single
        layer's inputs in spec order, or a fused step's sources (the channel
        concatenation is done here, as :meth:`forward` does).  For timing
        layers one by one (``runtime.layer_times``)."""
        if step.kind == "single":
            return self.layer_module(step.members[0])(list(inputs))
        return self._run_fused(step, inputs[0] if len(inputs) == 1 else torch.cat(list(inputs), dim=1))

    def _run_fused(self, step: Step, x: torch.Tensor) -> torch.Tensor:
        mods = [self.layer_module(n) for n in step.members]
        first = mods[0]
        layer = self.spec.layers[step.members[0]]
        if layer.type == "conv":
            if step.kind == "full":
                weight = _cat([
                    _cat([m.weights()[self.spec.layers[n].inputs.index(s)] for s in step.sources], dim=1)
                    for n, m in zip(step.members, mods)], dim=0)
                groups = 1
            else:
                weight = _cat([m.weights()[0] for m in mods], dim=0)
                groups = len(mods) * first.geometry[0][2]
            y = first.conv(x, weight, 0, groups=groups, bias=_cat([m.bias for m in mods], dim=0))
            return ops.apply_neuron(first.neuron, y)
        if layer.type == "cmrnorm":
            return first([x], towers=len(mods))  # the channel window must not cross towers
        # pool, neuron, dropout, rnorm, cnorm: the same work on every channel.
        return first([x])

    # --- training support ---------------------------------------------------------------

    def loss(self, logits: torch.Tensor | tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """cuda-convnet's cost.logreg: coeff * mean(-log softmax(logits)[label]), summed over
        the cost layers when ``logits`` is train mode's tuple (one per cost, in file order);
        a single tensor is the first cost's."""
        several = logits if isinstance(logits, tuple) else (logits,)
        coeffs = [c["coeff"] for c in self.costs] or [1.0]
        if len(several) > len(coeffs):
            raise ValueError(f"{len(several)} logits for the {len(coeffs)} cost layers of {self.spec.path}")
        total = None
        for coeff, one in zip(coeffs, several):
            if one.dtype in (torch.float16, torch.bfloat16):
                one = one.float()  # the log-softmax of low-precision logits loses too much
            term = F.cross_entropy(one, labels.to(one.device))
            if coeff != 1:  # 1 * x is x: skip a kernel forward and another backward
                term = coeff * term
            total = term if total is None else total + term.to(total.device)
        return total

    @staticmethod
    def first_logits(logits: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The reported cost's logits from what :meth:`forward` returned."""
        return logits[0] if isinstance(logits, tuple) else logits

    def learning_rules(self) -> Iterator[tuple[str, nn.Parameter, Rule]]:
        """(state-dict name, parameter, its rule) for every learnable tensor."""
        for layer in self.spec.layers.values():
            if not LAYER_TYPES[layer.type].has_weights:
                continue
            module = self.layer_module(layer.name)
            prefix = module_name(layer.name)
            weights = module.weights()
            for i, w in enumerate(weights):
                suffix = "weight" if len(weights) == 1 else f"weight.{i}"
                yield f"{prefix}.{suffix}", w, Rule(layer["epsW"][i], layer["momW"][i], layer["wc"][i],
                                                   layer["wball"][i], layer["updatePeriod"], layer.type)
            yield f"{prefix}.bias", module.bias, Rule(layer["epsB"], layer["momB"], 0.0, 0.0,
                                                      layer["updatePeriod"], layer.type)


def _cat(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat, except that one tensor is used as it is: cat would copy it (a kernel
    forward and another backward) for nothing."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def build(net: CheckedNet, devices: Sequence[str | torch.device] | None = None,
          fuse: bool = True) -> CompiledNet:
    return CompiledNet(net, devices, fuse)
