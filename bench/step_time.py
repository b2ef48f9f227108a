"""Training-step time of a convspec-built net against the same net written by hand.

One training step is forward + ``F.cross_entropy`` loss + backward + an SGD
update with momentum (``torch.optim.SGD(lr=0.01, momentum=0.9, foreach=True)``),
done identically for both sides.  The built side is
``convspec.builder.build(convspec.check.check_paths(spec))`` on one device, so a
two-tower spec has its towers folded onto that device and fused
(``convspec.fuse``); the hand-written peers live in ``tests/reference_nets.py``
and get the built net's weights copied in, so both compute the same thing:

* ``alexnet``:          specs/alexnet.cfg vs ``AlexNetGrouped`` (``alexnet_from_built``);
* ``alexnet-unfused``:  the same, built with ``fuse=False``, to show what tower fusion buys;
* ``cifar10-80sec``:    specs/cifar10-80sec.cfg vs ``Cifar80Sec`` (``copy_by_name``);
* ``cifar10-18pct``:    specs/cifar10-18pct.cfg vs ``Cifar18PctPooled``;
* ``cifar10-11pct``:    specs/cifar10-11pct.cfg vs ``Cifar11Pct`` (torch's local_response_norm and an
                        unfold + einsum locally connected layer, as a user would write them).

Both models train (dropout active) on the same random batch (fixed seed), in
one process with the same threads.  Steps are interleaved: step i times the
built net then the hand-written one, step i+1 the other way round, so slow
drift in the machine (clocks, other processes) hits both sides alike.  Each
net prints one JSON line on stdout with the median step time of each side,
``ratio = median(built) / median(handwritten)`` (above 1: the built net is
slower), images/s, the fastest step of each side (``*_min_ms``: on a shared
machine the median is only as steady as the neighbours) and ``max_abs_diff``,
the largest logit difference between the two sides on two images (eval mode,
fp32, before timing), a check that they really are the same net.  ``*_ops`` counts
the aten operators of one whole step of each side, views left out (eager steps
only; null with ``--compile`` or ``--cuda-graph``): on a GPU each is a kernel launch
and its Python, which is what a step of small kernels is bound by.  Progress
goes to stderr.

Run from the repository root:

    python bench/step_time.py
    python bench/step_time.py --nets alexnet --steps 6
    python bench/step_time.py --nets cifar10-80sec --channels-last --precision bf16
    python bench/step_time.py --device cuda --precision bf16 --batch 256

Defaults: batch 64 for the AlexNets and 128 for CIFAR (``--batch`` overrides
both), 2 warm-up steps, then 10 timed steps for the AlexNets and 30 for CIFAR
(``--steps`` overrides both); ``--threads`` defaults to PyTorch's own choice.
``--channels-last`` converts both models and the batch to channels_last;
``--precision bf16`` runs forward + loss of both sides under
``torch.autocast(device, dtype=torch.bfloat16)``; ``--compile`` wraps both in
``torch.compile``.  With ``--plain-peer`` the options apply to the built side
only (which then trains with ``runtime.optim.ConvnetSGD``, as ``convspec
train`` does) and the hand-written side stays fp32 eager: ``speedup`` =
median(hand-written) / median(built) is what the options buy.  ``--cuda-graph``
captures each side's whole step once as a CUDA graph and times its replays
(PyTorch's whole-network capture), which takes Python and kernel launches out of
the step; with ``--plain-peer`` only the built side is captured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # reference_nets: the hand-written peers
sys.path.insert(0, str(ROOT))  # convspec itself, without installing it

import reference_nets  # noqa: E402
from convspec.builder import build, channels_last_in_place  # noqa: E402
from convspec.check import check_paths  # noqa: E402


@dataclass(frozen=True)
class Bench:
    spec: str
    fuse: bool
    handwritten: Callable[[nn.Module], nn.Module]  # built net -> hand-written net with its weights
    batch: int
    steps: int


NETS = {
    "alexnet": Bench("specs/alexnet.cfg", True, reference_nets.alexnet_from_built, 64, 10),
    "cifar10-80sec": Bench("specs/cifar10-80sec.cfg", True,
                           lambda net: reference_nets.copy_by_name(net, reference_nets.Cifar80Sec()), 128, 30),
    "alexnet-unfused": Bench("specs/alexnet.cfg", False, reference_nets.alexnet_from_built, 64, 10),
    "cifar10-18pct": Bench("specs/cifar10-18pct.cfg", True,
                           lambda net: reference_nets.copy_by_name(net, reference_nets.Cifar18PctPooled()), 128, 30),
    "cifar10-11pct": Bench("specs/cifar10-11pct.cfg", True,
                           lambda net: reference_nets.copy_by_name(net, reference_nets.Cifar11Pct()), 128, 10),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_models(bench: Bench, device: torch.device) -> tuple[nn.Module, nn.Module]:
    net = build(check_paths(ROOT / bench.spec), devices=[device], fuse=bench.fuse)
    ref = bench.handwritten(net).to(device)
    return net, ref


@torch.no_grad()
def max_abs_diff(net: nn.Module, ref: nn.Module, images: torch.Tensor) -> float:
    """Sanity check that both sides compute the same function (eval mode: no dropout)."""
    for model in (net, ref):
        model.eval()
    diff = (net(images[:2]) - ref(images[:2])).abs().max().item()
    for model in (net, ref):
        model.train()
    return diff


def convspec_step(net, forward, opt, images, labels, precision) -> None:
    """What runtime/train.py does per batch: ConvnetSGD clears the gradients it used."""
    with precision():
        loss = net.loss(forward(images), labels)
    loss.backward()
    opt.step()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, precision: Callable[[], contextlib.AbstractContextManager]) -> None:
    opt.zero_grad(set_to_none=True)
    with precision():
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    opt.step()


def graphed(step: Callable[[], None], device: torch.device, warmup: int = 3) -> Callable[[], None]:
    """``step`` captured once as a CUDA graph; the returned callable replays it.

    PyTorch's whole-network recipe: a few eager steps on a side stream first (cuDNN's
    choices, the optimizer's momentum buffers and the allocator settle there), then one
    captured step.  Every replay reads the same input tensors and writes the same
    gradient and parameter memory, and Python values read during capture (a learning
    rate, the step count) are frozen into the graph: right for timing a step, not for
    a training loop whose rates change."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


CLOCK = time.perf_counter


class _CountOps(TorchDispatchMode):
    """Counts the aten operators that run, views left out.  On a GPU each is at least one
    kernel launch plus its Python and dispatcher time: a step made of many small ones is
    bound by those, not by the card."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(step: Callable[[], None]) -> int:
    """Non-view aten operators in one whole training step (forward, loss, backward, update)."""
    with _CountOps() as counter:
        step()
    return counter.count


def timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds for one step; on a GPU, wait for queued kernels on both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = CLOCK()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return CLOCK() - start


def profile(step: Callable[[], None], steps: int, device: torch.device) -> None:
    """torch.profiler's table of the costliest operators over ``steps`` steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiler(activities=activities) as prof:
        for _ in range(steps):
            timed(step, device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    log(prof.key_averages().table(sort_by=sort, row_limit=15))


def run(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    bench = NETS[name]
    batch = args.batch or bench.batch
    steps = args.steps or bench.steps

    torch.manual_seed(0)
    net, ref = make_models(bench, device)
    images = torch.randn(batch, *net.spec.layers[net.image_input].shape, device=device)
    labels = torch.randint(0, net.spec.layers[net.output_name].shape[0], (batch,), device=device)
    diff = max_abs_diff(net, ref, images)
    if args.channels_last:
        net, ref = net.to_channels_last(), channels_last_in_place(ref)  # ref: 11pct's local weights are 5-D
        images = images.contiguous(memory_format=torch.channels_last)

    if args.precision == "bf16":
        # A captured graph must not reuse autocast's cast cache across replays.
        cache = not args.cuda_graph
        precision = lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)  # noqa: E731
    else:
        precision = contextlib.nullcontext
    sides = {}
    for side, model in (("built", net), ("handwritten", ref)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
        sides[side] = lambda model=model, opt=opt: train_step(model, opt, images, labels, precision)
    if args.plain_peer:
        # The peer is what a user writes first: fp32, eager, contiguous, torch's SGD.
        # The built side is what `convspec train` runs: its options and ConvnetSGD.
        from runtime.optim import ConvnetSGD

        ref = ref.to(memory_format=torch.contiguous_format)
        plain = images.contiguous()
        opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9, foreach=True)
        sides["handwritten"] = lambda: train_step(ref, opt, plain, labels, contextlib.nullcontext)
        convnet_opt = ConvnetSGD(net.learning_rules())
        forward = torch.compile(net) if args.compile else net
        sides["built"] = lambda: convspec_step(net, forward, convnet_opt, images, labels, precision)
    elif args.compile:
        compiled = {"built": torch.compile(net), "handwritten": torch.compile(ref)}
        for side in compiled:
            opt = torch.optim.SGD(compiled[side].parameters(), lr=0.01, momentum=0.9, foreach=True)
            sides[side] = lambda m=compiled[side], opt=opt: train_step(m, opt, images, labels, precision)

    # Counted on the eager steps (a compiled or captured step runs other operators, or none),
    # before timing: the counting step is one more warm-up step for each side.
    eager = not (args.compile or args.cuda_graph)
    ops = {side: ops_per_step(sides[side]) if eager else None for side in sides}

    if args.cuda_graph:
        # A plain script is eager: only the built side gets the option then.
        for side in ("built",) if args.plain_peer else ("built", "handwritten"):
            sides[side] = graphed(sides[side], device)

    times: dict[str, list[float]] = {"built": [], "handwritten": []}
    for i in range(args.warmup + steps):
        order = ("built", "handwritten") if i % 2 == 0 else ("handwritten", "built")
        for side in order:
            seconds = timed(sides[side], device)
            if i >= args.warmup:
                times[side].append(seconds)

    if args.profile:
        profile(sides["built"], args.profile, device)
    built_s, hand_s = statistics.median(times["built"]), statistics.median(times["handwritten"])
    result = {
        "net": name, "batch": batch, "threads": torch.get_num_threads(), "device": str(device),
        "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
        "cuda_graph": args.cuda_graph,
        "plain_peer": args.plain_peer, "steps": steps, "speedup": round(hand_s / built_s, 3),
        "built_ms": round(built_s * 1e3, 3), "handwritten_ms": round(hand_s * 1e3, 3),
        "ratio": round(built_s / hand_s, 4),
        "built_min_ms": round(min(times["built"]) * 1e3, 3),
        "handwritten_min_ms": round(min(times["handwritten"]) * 1e3, 3),
        "built_images_per_s": round(batch / built_s, 1), "handwritten_images_per_s": round(batch / hand_s, 1),
        "built_ops": ops["built"], "handwritten_ops": ops["handwritten"],
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "max_abs_diff": diff,
        "clock": "cpu" if CLOCK is time.process_time else "wall", "torch": torch.__version__,
    }
    log(f"{name}: built {result['built_ms']:.1f} ms, hand-written {result['handwritten_ms']:.1f} ms, "
        f"ratio {result['ratio']:.3f}{_ops_text(ops)} (median of {steps} steps, batch {batch}, "
        f"{result['threads']} threads, {args.precision}{', channels_last' if args.channels_last else ''}"
        f"{', CUDA graph' if args.cuda_graph else ''})")
    return result


def _ops_text(ops: dict) -> str:
    return f", {ops['built']} ops a step against {ops['handwritten']}" if ops["built"] is not None else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(NETS),
                        help=f"comma-separated, from {', '.join(NETS)} (default: all)")
    parser.add_argument("--batch", type=int, help="images per step (default: 64 AlexNet, 128 CIFAR)")
    parser.add_argument("--steps", type=int, help="timed steps per side (default: 10 AlexNet, 30 CIFAR)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (default: 2)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last models and batch")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast forward + loss on both sides")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model(s)")
    parser.add_argument("--plain-peer", action="store_true",
                        help="options (--channels-last, --precision, --compile) on the built side only, which "
                             "also uses convspec's ConvnetSGD; the hand-written side stays fp32 eager with "
                             "torch.optim.SGD: 'speedup' is then what the options buy over a plain script")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark on both sides, as convspec train sets it on a GPU "
                             "(cuDNN times its kernels for each shape in the warm-up steps and keeps the fastest)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture each side's whole step as a CUDA graph and time its replays (no Python or "
                             "launch overhead left; with --plain-peer, the built side only); needs --device cuda")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile this many steps of the built side with torch.profiler and "
                             "print its 15 costliest operators (device time on a GPU) to stderr")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time steps by this process's CPU time (all its threads) instead of the wall "
                             "clock: on a shared CPU machine, other work then cannot stretch a step")
    args = parser.parse_args(argv)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time

    names = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in names if n not in NETS]
    if unknown:
        parser.error(f"unknown net(s) {', '.join(unknown)}; choose from {', '.join(NETS)}")
    for option in ("batch", "steps", "threads"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.cuda_graph and not args.device.startswith("cuda"):
        parser.error(f"--cuda-graph needs a CUDA device, not --device {args.device}; add --device cuda")
    if args.cuda_graph and args.compile:
        parser.error("--cuda-graph and --compile both take the overhead out; time one at a time")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    for name in names:
        print(json.dumps(run(name, args, device)), flush=True)


if __name__ == "__main__":
    main()
