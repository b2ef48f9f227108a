"""How fast the data side delivers training images, per core.

    python bench/loader.py                      # ImageNet samples + CIFAR-10 from ../shared
    python bench/loader.py --images 400 --skip-cifar

Part 1 times, in one process with one thread (so the rate is per core), the
delivery of augmented training batches (random 224 crop of 256x256, flip,
mean subtraction, float tensor) from the ImageNet samples by:

1. the naive pipeline a user writes first: PIL opens the original JPEG, resizes
   the short side to 256, crops the centre, then crops/flips per image;
2. the prepared JPEG store (``convspec prepare``);
3. the prepared raw store (``convspec prepare --raw``).

Part 2 trains the CIFAR-10 specs for some steps from a raw store of
../shared/datasets/cifar10-train (both cores for the step, as training does)
and reports the share of the step spent waiting for data.

The last line is JSON: {"naive_per_core", "jpeg_store_per_core",
"raw_store_per_core", "jpeg_ratio", "raw_ratio", "cifar_wait_share"}.
Stores are written once under --work (default /tmp/convspec-bench).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convspec.builder import build  # noqa: E402
from convspec.check import check_paths  # noqa: E402
from runtime.loader import Batches, holdout, open_source  # noqa: E402
from runtime.preprocess import Augment  # noqa: E402
from runtime.store import PrepareOptions, prepare  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets"


def naive_batches(files, mean, batch, rng):
    """What a user writes first: open, resize, crop, flip, subtract, per image."""
    for start in range(0, len(files), batch):
        out = []
        for f in files[start:start + batch]:
            with Image.open(f) as img:
                img = img.convert("RGB")
                w, h = img.size
                s = 256 / min(w, h)
                img = img.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
                left, top = (img.width - 256) // 2, (img.height - 256) // 2
                a = np.asarray(img.crop((left, top, left + 256, top + 256)), dtype=np.float32) - mean
            y, x = rng.integers(0, 33, 2)
            a = a[y:y + 224, x:x + 224]
            if rng.random() < 0.5:
                a = a[:, ::-1]
            out.append(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1))
        yield torch.stack(out)


def rate(batches, n_images) -> float:
    start = time.perf_counter()
    count = 0
    for x in batches:
        count += len(x)
    assert count == n_images, (count, n_images)
    return count / (time.perf_counter() - start)


def part1(args, work: Path) -> dict:
    torch.set_num_threads(1)
    samples = SHARED / "imagenet-samples"
    jpeg, raw = work / "inet-jpeg", work / "inet-raw"
    for out, is_raw in ((jpeg, False), (raw, True)):
        prepare(samples, out, PrepareOptions(raw=is_raw, workers=2), progress=False)
    files = sorted(str(p) for d in sorted(samples.iterdir()) for p in d.iterdir())[: args.images]
    n = len(files) - len(files) % args.batch
    files = files[:n]
    stores = {name: open_source(path, "train") for name, path in (("jpeg", jpeg), ("raw", raw))}
    mean = stores["raw"].mean
    aug = Augment(224, flip=True, random_crop=True)

    def store_batches(source):
        # The real loader, in this process (a raw store needs no workers).
        batches = Batches(source, np.arange(n), args.batch, aug, seed=0, shuffle=True, workers=0)  # as training reads
        for images, _labels in batches.epoch(0):
            yield images

    results = {}
    for _ in range(args.repeats):  # interleaved, best of repeats
        results.setdefault("naive", []).append(rate(naive_batches(files, mean, args.batch, np.random.default_rng(0)), n))
        results.setdefault("jpeg", []).append(rate(store_batches(stores["jpeg"]), n))
        results.setdefault("raw", []).append(rate(store_batches(stores["raw"]), n))
    best = {k: max(v) for k, v in results.items()}
    print(f"part 1 ({n} images, 1 thread, best of {args.repeats}): naive {best['naive']:.0f}/s, "
          f"jpeg store {best['jpeg']:.0f}/s, raw store {best['raw']:.0f}/s", file=sys.stderr)
    return best


def part2(args, work: Path) -> dict:
    torch.set_num_threads(args.threads)
    store = work / "cifar10-raw"
    prepare(SHARED / "cifar10-train", store, PrepareOptions(size=32, raw=True, workers=2), progress=False)
    source = open_source(store, "train")
    train_idx, _ = holdout(len(source), 0.1, 0)
    shares = {}
    for spec in ("cifar10-80sec", "cifar10-18pct"):
        net = build(check_paths(ROOT / "specs" / f"{spec}.cfg"), devices=["cpu"]).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
        batches = Batches(source, train_idx, 128, Augment(32, flip=True), seed=0, workers=args.workers)
        waited = total = 0.0
        it = iter(batches.epoch(0))
        start = time.perf_counter()
        for step in range(args.cifar_steps):
            t0 = time.perf_counter()
            images, labels = next(it)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            net.loss(net(images), labels).backward()
            opt.step()
            if step >= 3:  # skip warm-up
                waited += t1 - t0
                total += time.perf_counter() - t0
        shares[spec] = waited / total
        print(f"part 2 {spec}: {args.cifar_steps} steps, {waited / total:.1%} of the step waiting for data "
              f"({(time.perf_counter() - start) / args.cifar_steps * 1000:.0f} ms/step)", file=sys.stderr)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512, help="ImageNet samples to time (default 512)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/convspec-bench"))
    parser.add_argument("--cifar-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2, help="threads for the CIFAR training step")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for the CIFAR loader")
    parser.add_argument("--skip-cifar", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    best = part1(args, args.work)
    shares = {} if args.skip_cifar else part2(args, args.work)
    print(json.dumps({
        "naive_per_core": round(best["naive"], 1),
        "jpeg_store_per_core": round(best["jpeg"], 1),
        "raw_store_per_core": round(best["raw"], 1),
        "jpeg_ratio": round(best["jpeg"] / best["naive"], 2),
        "raw_ratio": round(best["raw"] / best["naive"], 2),
        "cifar_wait_share": {k: round(v, 4) for k, v in shares.items()},
    }))


if __name__ == "__main__":
    main()
