"""Time convspec's optimizer step (ConvnetSGD) alone, on a spec's parameters.

A training step ends with the update, which reads and writes every parameter,
its gradient and its momentum buffer: on AlexNet's 61 million parameters that
is memory traffic, not arithmetic, and on a 2-core CPU it is a visible share
of the step.  This script gives every parameter a fixed random gradient, runs
``ConvnetSGD.step()`` ``--steps`` times (the gradients are restored before
each, as backward would leave them) and prints one JSON line: the median and
fastest step, and a checksum of the weights afterwards, so that two versions
of the optimizer can be shown to compute the same update.

    python bench/optim_step.py                      # AlexNet
    python bench/optim_step.py --spec specs/cifar10-80sec.cfg --steps 20
    python bench/optim_step.py --foreach            # the four foreach passes instead
                                                    # of torch's fused SGD kernel
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # convspec itself, without installing it

from convspec.builder import build  # noqa: E402
from convspec.check import check_paths  # noqa: E402
from convspec.errors import SpecError  # noqa: E402
from convspec.values import parse_shape  # noqa: E402
from runtime.optim import ConvnetSGD  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "specs/alexnet.cfg"), help="layer file (default: AlexNet)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (default: 8; the first two are warm-up)")
    parser.add_argument("--input", metavar="CxHxW", help="image size, for an original cuda-convnet file (it has none)")
    parser.add_argument("--foreach", action="store_true",
                        help="update with the four torch._foreach_* passes, not the fused kernel")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    torch.manual_seed(0)
    try:
        shape = parse_shape(args.input, "--input", None) if args.input else None
        net = build(check_paths(args.spec, input_shape=shape), devices=["cpu"])
    except SpecError as err:
        parser.error(str(err))  # the spec's own one-line error, not a traceback
    try:
        opt = ConvnetSGD(net.learning_rules(), fused=False if args.foreach else None)
    except ValueError as err:  # a layer without epsW/momW: the message names it and the fix
        parser.error(str(err))
    params = list(net.parameters())
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]
    times = []
    for _ in range(args.steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    timed = times[2:] if len(times) > 2 else times
    result = {
        "spec": Path(args.spec).name, "parameters": sum(p.numel() for p in params), "steps": args.steps,
        "median_ms": round(statistics.median(timed) * 1e3, 2), "min_ms": round(min(timed) * 1e3, 2),
        "path": "foreach" if args.foreach else "fused", "threads": torch.get_num_threads(), "torch": torch.__version__,
        # The weights after the steps, summed in float64: equal sums for equal updates.
        "checksum": float(sum(p.detach().double().sum().item() for p in params)),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
