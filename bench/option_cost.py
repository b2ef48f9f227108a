"""What the speed options cost in accuracy: AlexNet's training loss, step by step.

``convspec train``'s options that change results only through rounding
(channels_last) or through arithmetic precision (bf16 autocast) are compared
here on real images: specs/alexnet.cfg (its two towers fused onto one device)
trains from one initialisation on the same batches of the ImageNet samples in
each setting, with ``convspec train``'s step (forward under autocast, the
spec's softmax + logreg loss, backward, ``ConvnetSGD`` with the params file's
rules), and the torch RNG reseeded before each setting so that dropout draws
from the same stream.  The batches are the first ``--images`` photos of a
fixed shuffle of ../shared/datasets/imagenet-samples (one per class), read as
training reads them (short side 256, centre 256x256, mean image of these
photos subtracted) and centre-cropped to 224; the steps cycle through them, so
the loss falls as the net starts to fit them (at ``--lr-scale`` 0.1 by
default: at the spec's full rate the loss on so few photos jumps about).

It prints the loss of every setting at every step, the largest difference from
fp32 NCHW, and one JSON object on the last line.  bf16 on a CPU without bf16
units (the 2-core machine here) is ~15x slower than fp32: keep --steps small.

    python bench/option_cost.py                      # fp32, channels_last, bf16; 12 steps of 32, rates x0.1
    python bench/option_cost.py --device cuda --steps 50 --settings fp32,channels_last,bf16,bf16+channels_last
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # convspec itself, without installing it

from convspec.builder import build  # noqa: E402
from convspec.check import check_paths  # noqa: E402
from runtime.evaluate import autocast  # noqa: E402
from runtime.optim import ConvnetSGD  # noqa: E402
from runtime.preprocess import Augment, augment_batch, load_square  # noqa: E402
from runtime.sources import list_class_folders  # noqa: E402

SETTINGS = {  # name -> (precision, channels_last)
    "fp32": ("fp32", False),
    "channels_last": ("fp32", True),
    "bf16": ("bf16", False),
    "bf16+channels_last": ("bf16", True),
}


def read_squares(data: Path, images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``images`` photos of a fixed shuffle, as training reads them: (N, 256, 256, 3) uint8, labels."""
    listing = list_class_folders(data)
    order = np.random.default_rng(seed).permutation(len(listing.items))[:images]
    squares = np.stack([load_square(str(listing.items[i][0]), 256) for i in order])
    labels = np.asarray([listing.items[i][1] for i in order], dtype=np.int64)
    return squares, labels


def to_batches(squares: np.ndarray, labels: np.ndarray, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    mean = squares.astype(np.float32).mean(axis=0)
    centre = Augment(crop=224)
    rng = np.random.default_rng(seed)  # unused by a centre crop without flips; augment_batch wants one
    return [(augment_batch(squares[i:i + batch], mean, centre, rng), torch.from_numpy(labels[i:i + batch]))
            for i in range(0, len(squares) - batch + 1, batch)]


def train_losses(spec: str, initial: dict, batches, steps: int, device: torch.device,
                 precision: str, channels_last: bool, seed: int, lr_scale: float,
                 overrides: list[str] = ()) -> tuple[list[float], float]:
    net = build(check_paths(spec, overrides=overrides), [str(device)])
    net.load_state_dict(initial)
    if channels_last:
        net = net.to_channels_last()
    net.train()
    optimizer = ConvnetSGD(net.learning_rules())
    optimizer.lr_scale = lr_scale
    torch.manual_seed(seed)  # the same dropout stream in every setting
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        images, labels = batches[step % len(batches)]
        x = images.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = net(x)
        loss = net.loss(logits, labels.to(device))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"  step {step + 1}/{steps}: loss {losses[-1]:.4f}", file=sys.stderr)
    return losses, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "specs" / "alexnet.cfg"))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "imagenet-samples"))
    parser.add_argument("--images", type=int, default=64, help="photos to cycle through (default 64)")
    parser.add_argument("--squares", type=Path,
                        help="an .npz of the decoded photos: read from it when it exists, else written to it "
                             "after reading --data (how bench/gpu.sh takes the same photos to a machine that "
                             "cannot see ../shared; 64 photos are 12.6 MB)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--settings", default="fp32,channels_last,bf16",
                        help=f"comma list of {', '.join(SETTINGS)} (fp32 always runs first: the reference)")
    parser.add_argument("--lr-scale", type=float, default=0.1,
                        help="multiply every learning rate, as a drop does (default 0.1: the paper's rate after "
                             "its first drop; at the full rate the loss on 64 repeated photos jumps about)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dropout", choices=["on", "off"], default="on",
                        help="off: every dropout layer disabled (enable=0), so that only arithmetic differs "
                             "between settings; on CUDA, dropout draws a different mask for a bf16 tensor than "
                             "for a float32 one from the same seed")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = ["fp32"] + [s for s in args.settings.split(",") if s and s != "fp32"]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        sys.exit(f"option_cost.py: unknown setting {unknown[0]!r}; choose from {', '.join(SETTINGS)}")
    data = Path(args.data)
    reuse = args.squares is not None and args.squares.is_file()
    if not reuse and not data.is_dir():
        sys.exit(f"option_cost.py: no image folder at {data}; pass --data DIR (class folders of photos)"
                 + (f" or an existing --squares file (not found: {args.squares})" if args.squares else ""))
    if args.images < args.batch:
        sys.exit(f"option_cost.py: --images {args.images} is fewer than one --batch of {args.batch}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if reuse:
        with np.load(args.squares) as saved:
            squares, labels = saved["squares"][:args.images], saved["labels"][:args.images]
            saved_seed = int(saved["seed"])
        if saved_seed != args.seed:
            sys.exit(f"option_cost.py: {args.squares} holds the shuffle of --seed {saved_seed}, not {args.seed}; "
                     f"pass --seed {saved_seed} or write it again from --data")
        if len(squares) < args.images:
            sys.exit(f"option_cost.py: {args.squares} holds {len(squares)} photos, fewer than --images "
                     f"{args.images}; write it again with --images {args.images} from --data")
        print(f"read {len(squares)} decoded photos from {args.squares}", file=sys.stderr)
    else:
        print(f"reading {args.images} photos from {data}", file=sys.stderr)
        squares, labels = read_squares(data, args.images, args.seed)
        if args.squares is not None:
            args.squares.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.squares, squares=squares, labels=labels, seed=args.seed)
            print(f"wrote the decoded photos to {args.squares}", file=sys.stderr)
    batches = to_batches(squares, labels, args.batch, args.seed)
    torch.manual_seed(args.seed)
    checked = check_paths(args.spec)
    overrides = ([f"{layer.name}.enable=0" for layer in checked.layers.values() if layer.type.startswith("dropout")]
                 if args.dropout == "off" else [])
    initial = build(checked, [str(device)]).state_dict()

    curves, seconds = {}, {}
    for name in names:
        print(f"{name}:", file=sys.stderr)
        precision, channels_last = SETTINGS[name]
        curves[name], seconds[name] = train_losses(args.spec, initial, batches, args.steps, device,
                                                   precision, channels_last, args.seed, args.lr_scale, overrides)

    reference = curves["fp32"]
    print("step  " + "  ".join(f"{n:>18}" for n in names))
    for i in range(args.steps):
        print(f"{i + 1:>4}  " + "  ".join(f"{curves[n][i]:>18.4f}" for n in names))
    print("max |loss - fp32|  " + "  ".join(
        f"{n}: {max(abs(a - b) for a, b in zip(curves[n], reference)):.4f}" for n in names[1:]))
    print("seconds            " + "  ".join(f"{n}: {seconds[n]:.1f}" for n in names))
    print(json.dumps({
        "spec": Path(args.spec).name, "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "images": args.images, "batch": args.batch, "dropout": args.dropout, "steps": args.steps,
        "lr_scale": args.lr_scale,
        "losses": curves, "seconds": seconds,
        "max_abs_diff_from_fp32": {n: max(abs(a - b) for a, b in zip(curves[n], reference)) for n in names[1:]},
    }))


if __name__ == "__main__":
    main()
