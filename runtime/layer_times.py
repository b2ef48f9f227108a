"""Where a spec spends a training step: per-layer forward and backward times,
as ``caffe time`` prints them (``convspec bench``).

Two measurements, interleaved in every iteration so that drift in the machine
hits both alike:

* **the whole step**, as ``convspec train`` runs it: forward + loss,
  ``loss.backward()``, and the ConvnetSGD update (when the params file gives
  every layer its learning rules);
* **each step of the executor's plan alone**: the layer (or fused towers, named
  ``conv1a+conv1b``) is run on the inputs it saw in the whole forward, detached,
  and then back-propagated from a random output gradient.  Inputs that come
  from the data layer need no gradient, as in training, so the first conv's
  backward computes weight gradients only.  The loss row is the cost layer
  (softmax + cross-entropy, which the net applies to the logits).

Times are medians over the iterations, in milliseconds; the device is
synchronised around every timed region, so on a GPU they are kernel times plus
launch overhead.  The rows add up to less than the whole step when the step
also copies tensors between devices or the executor's Python shows; the
report prints both so the difference is visible.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from convspec.builder import CompiledNet
from convspec.errors import Location, fail
from convspec.layers import fmt_shape
from convspec.report import table

from .evaluate import autocast
from .optim import ConvnetSGD
from .progress import Progress


@dataclass
class LayerTime:
    name: str  # a layer, or fused towers "conv1a+conv1b", or "loss"
    type: str
    device: str
    shape: tuple[int, ...]  # output per image; () for the loss
    forward_ms: float
    backward_ms: float

    @property
    def total_ms(self) -> float:
        return self.forward_ms + self.backward_ms


@dataclass
class BenchResult:
    spec: str
    batch: int
    input_shape: tuple[int, int, int]
    devices: list[str]
    precision: str
    channels_last: bool
    threads: int
    iterations: int
    warmup: int
    layers: list[LayerTime]
    forward_ms: float  # the whole net: forward + loss
    backward_ms: float
    update_ms: float | None  # None: no learning rules to run an update with
    notes: list[str] = field(default_factory=list)

    @property
    def step_ms(self) -> float:
        return self.forward_ms + self.backward_ms + (self.update_ms or 0.0)

    @property
    def images_per_second(self) -> float:
        return 1000.0 * self.batch / self.step_ms

    @classmethod
    def from_dict(cls, d: dict) -> "BenchResult":
        """The inverse of :meth:`as_dict` (``convspec bench --json`` output back to a result)."""
        rows = [LayerTime(l["name"], l["type"], l["device"], tuple(l["shape"]), l["forward_ms"], l["backward_ms"])
                for l in d["layers"]]
        return cls(d["spec"], d["batch"], tuple(d["input"]), d["devices"], d["precision"], d["channels_last"],
                   d["threads"], d["iterations"], d["warmup"], rows, d["forward_ms"], d["backward_ms"],
                   d["update_ms"], d["notes"])

    def as_dict(self) -> dict:
        layer_sum = sum(l.total_ms for l in self.layers)
        return {
            "spec": self.spec, "batch": self.batch, "input": list(self.input_shape), "devices": self.devices,
            "precision": self.precision, "channels_last": self.channels_last, "threads": self.threads,
            "iterations": self.iterations, "warmup": self.warmup,
            "layers": [{"name": l.name, "type": l.type, "device": l.device, "shape": list(l.shape),
                        "forward_ms": l.forward_ms, "backward_ms": l.backward_ms,
                        "share": l.total_ms / layer_sum if layer_sum else 0.0} for l in self.layers],
            "layers_forward_ms": sum(l.forward_ms for l in self.layers),
            "layers_backward_ms": sum(l.backward_ms for l in self.layers),
            "forward_ms": self.forward_ms, "backward_ms": self.backward_ms, "update_ms": self.update_ms,
            "step_ms": self.step_ms, "images_per_second": self.images_per_second, "notes": self.notes,
        }


def _synchronize(devices: Sequence[torch.device]) -> None:
    for d in {d for d in devices if d.type == "cuda"}:
        torch.cuda.synchronize(d)


class _Clock:
    """Milliseconds of a region, with every device in use synchronised at both ends."""

    def __init__(self, devices: Sequence[torch.device]):
        self.devices = devices

    def time(self, fn: Callable[[], object]) -> tuple[float, object]:
        _synchronize(self.devices)
        start = time.perf_counter()
        out = fn()
        _synchronize(self.devices)
        return 1000.0 * (time.perf_counter() - start), out


def bench(net: CompiledNet, batch: int, iterations: int = 10, warmup: int = 2, precision: str = "fp32",
          channels_last: bool = False, progress: bool = True, seed: int = 0) -> BenchResult:
    """Time ``net`` (built, in train mode) on a random batch; see the module text."""
    spec = net.spec
    if net.image_input is None or net.output_name == net.image_input:
        if all(layer.type == "data" for layer in spec.layers.values()):
            raise fail("the spec has no layers after its data layer: nothing to time", Location(spec.path))
        raise fail("no layer computes anything from the images before the softmax: nothing to time; add layers "
                   "between them, e.g. [fc] with outputs=10", Location(spec.path))
    devices = net.devices
    entry = devices[0]
    input_shape = tuple(spec.layers[net.image_input].shape)
    classes = spec.layers[net.output_name].shape[0]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn((batch, *input_shape), generator=generator).to(entry)
    if channels_last:
        net = net.to_channels_last()
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), generator=generator).to(entry)
    net.train()
    notes: list[str] = list(spec.cautions)
    try:
        optimizer: ConvnetSGD | None = ConvnetSGD(net.learning_rules())
    except ValueError as err:
        optimizer = None
        notes.append(f"update not timed: {err}")
    if len(set(devices)) > 1:
        notes.append("copies between devices are in the whole-net times, not in the rows")
    if net.cost is None:
        notes.append("the spec has no cost layer: the loss row times cross-entropy on the last layer's output "
                     "(train needs type=cost.logreg)")

    steps = net.steps(net.training_outputs)  # an auxiliary cost's branch trains, so it is timed
    step_names = ["+".join(s.members) for s in steps]
    clock = _Clock(devices)
    params = list(net.parameters())

    def clear_grads() -> None:
        for p in params:
            p.grad = None  # as training's zero_grad(set_to_none=True): the next backward assigns

    def whole_step() -> tuple[float, float, float | None]:
        clear_grads()

        def forward():
            with autocast(entry, precision):
                return net.loss(net(images), labels)

        forward_ms, loss = clock.time(forward)
        backward_ms, _ = clock.time(loss.backward)
        update_ms = clock.time(optimizer.step)[0] if optimizer is not None else None
        return forward_ms, backward_ms, update_ms

    def one_by_one() -> list[tuple[float, float]]:
        with torch.no_grad(), autocast(entry, precision):
            values = net(images, outputs=list(dict.fromkeys(m for s in steps for m in s.members)))
        values[net.image_input] = images
        times = []
        for step in steps:
            device = devices[step.device]
            first = spec.layers[step.members[0]]
            sources = first.inputs if step.kind == "single" else step.sources
            inputs = [values[s].detach().to(device).requires_grad_(s != net.image_input) for s in sources]

            def forward(step=step, inputs=inputs):
                with autocast(device, precision):
                    return net.run_step(step, inputs)

            forward_ms, y = clock.time(forward)
            if y.requires_grad:
                grad = torch.randn_like(y)
                backward_ms, _ = clock.time(lambda: y.backward(grad))
            else:
                backward_ms = 0.0  # weightless and fed by the data: training computes no gradient here
            times.append((forward_ms, backward_ms))
        logits = tuple(values[name].detach().float().requires_grad_(True) for name in net.training_outputs)
        forward_ms, loss = clock.time(lambda: net.loss(logits, labels))
        backward_ms, _ = clock.time(loss.backward)
        times.append((forward_ms, backward_ms))
        clear_grads()
        return times

    whole: list[tuple[float, float, float | None]] = []
    rows: list[list[tuple[float, float]]] = []
    bar = Progress(warmup + iterations, f"bench {spec.path}", unit="it", enabled=progress)
    for i in range(warmup + iterations):
        # Alternate which measurement goes first, so neither always runs on a cold cache.
        if i % 2:
            w, r = whole_step(), one_by_one()
        else:
            r, w = one_by_one(), whole_step()
        if i >= warmup:
            whole.append(w)
            rows.append(r)
        bar.update(1)
    bar.close()

    def median(values) -> float:
        return statistics.median(values)

    layers = []
    for j, step in enumerate(steps):
        first = spec.layers[step.members[0]]
        shape = tuple(first.shape) if len(step.members) == 1 else \
            (sum(spec.layers[m].shape[0] for m in step.members), *first.shape[1:])
        layers.append(LayerTime(step_names[j], first.type, str(devices[step.device]), shape,
                                median(r[j][0] for r in rows), median(r[j][1] for r in rows)))
    cost = net.cost
    kind = "cross-entropy" if cost is None else "softmax+logreg" + (f" x{len(net.costs)}" if len(net.costs) > 1 else "")
    layers.append(LayerTime("loss", kind, str(entry), (),
                            median(r[-1][0] for r in rows), median(r[-1][1] for r in rows)))
    updates = [w[2] for w in whole]
    return BenchResult(spec.path, batch, input_shape, [str(d) for d in devices], precision, channels_last,
                       torch.get_num_threads(), iterations, warmup, layers,
                       median(w[0] for w in whole), median(w[1] for w in whole),
                       None if updates[0] is None else median(updates), notes)


def as_text(result: BenchResult) -> str:
    r = result
    header = ("layer", "type", "device", "output", "forward ms", "backward ms", "total ms", "share")
    layer_sum = sum(l.total_ms for l in r.layers)
    rows = [header]
    for l in r.layers:
        rows.append((l.name, l.type, l.device, fmt_shape(l.shape) if l.shape else "-", f"{l.forward_ms:.2f}",
                     f"{l.backward_ms:.2f}", f"{l.total_ms:.2f}",
                     f"{100 * l.total_ms / layer_sum:.1f}%" if layer_sum else "-"))
    rows.append(("layers", "", "", "", f"{sum(l.forward_ms for l in r.layers):.2f}",
                 f"{sum(l.backward_ms for l in r.layers):.2f}", f"{layer_sum:.2f}", "100.0%"))
    shape = "x".join(map(str, r.input_shape))
    layout = ", channels_last" if r.channels_last else ""
    lines = [f"{r.spec}: batch {r.batch} of {shape}, {','.join(r.devices)}, {r.precision}{layout}, "
             f"{r.threads} threads; medians of {r.iterations} iterations after {r.warmup} warm-up"]
    lines += table(rows, numeric={4, 5, 6, 7})
    # Without an update (no learning rates) the figure is not a whole step, and says so.
    update = f", update {r.update_ms:.2f} ms" if r.update_ms is not None else ""
    what = "whole training step" if r.update_ms is not None else "training step without the update"
    lines.append(f"{what}: forward + loss {r.forward_ms:.2f} ms, backward {r.backward_ms:.2f} ms"
                 f"{update}; {r.step_ms:.2f} ms = {r.images_per_second:,.0f} images/s")
    lines.extend(f"note: {n}" for n in r.notes)
    return "\n".join(lines)
