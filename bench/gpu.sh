#!/usr/bin/env bash
# The GPU check: one prepared script for a lent GPU machine (see README, "Benchmarks").
# It checks the CUDA path (the CUDA tests: placement; AlexNet training steps on
# cuda:0 and on cuda:0+cpu against a CPU run; convspec train/eval on cuda:0 in
# fp32 and bf16), then measures:
#   * AlexNet's training step, built against the hand-written grouped AlexNet,
#     fp32 / channels_last / bf16 / bf16 + channels_last, at batch 128 and 256;
#   * the CIFAR nets the same way at batch 128;
#   * convspec's options against a plain fp32 NCHW eager script (--plain-peer);
#   * `convspec bench` of AlexNet (per-layer times) at batch 128;
#   * what the options cost in accuracy: AlexNet's loss over the same steps on the
#     ImageNet samples in fp32 / channels_last / bf16 / bf16 + channels_last
#     (bench/option_cost.py, with dropout on and off; from .gpu-carry/squares.npz where ../shared is absent);
#   * torch.profiler's costliest operators in AlexNet's fp32 step (in gpu.log);
#   * the same steps captured as CUDA graphs (--cuda-graph): the ratio without Python or launch overhead.
# Everything lands in $OUT (default ./out): gpu.log, step_time.jsonl, bench-alexnet.json,
# option-cost.json and gpu.json (the card, torch, the date and every measurement).  About 5 minutes on
# an H100.
#
#   bash bench/gpu.sh                  # from the repo root; lark carried as .whl/ if not installed
#   DEVICE=cpu BATCHES=4 STEPS=1 bash bench/gpu.sh   # a dry run of the plumbing on a CPU
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
BATCHES=${BATCHES:-"128 256"}
STEPS=${STEPS:-20}
# The ImageNet photos option_cost.py trains on, decoded: read from here where ../shared is absent (a lent
# machine sees only the checkout), written here where it is present.  Before a lent machine's run:
#   python bench/option_cost.py --steps 1 --settings fp32 --squares .gpu-carry/squares.npz   # 12.6 MB
# and carry .gpu-carry (kept out of git by .git/info/exclude).
SQUARES=${SQUARES:-.gpu-carry/squares.npz}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
: > "$OUT/step_time.jsonl"
step_time() { python3 bench/step_time.py --device "$DEVICE" --steps "$STEPS" "$@" | tee -a "$OUT/step_time.jsonl"; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  if [ "$DEVICE" != cpu ] && [ "${TESTS:-1}" != 0 ]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_build.py -k "gpu or alexnet" 2>&1
  fi
  for batch in $BATCHES; do
    for args in "" "--channels-last" "--precision bf16" "--precision bf16 --channels-last"; do
      step_time --nets alexnet --batch "$batch" $args
    done
  done
  for args in "" "--channels-last" "--precision bf16 --channels-last"; do
    step_time --nets cifar10-80sec,cifar10-18pct --batch "${BATCHES%% *}" $args
  done
  for args in "--channels-last" "--precision bf16 --channels-last"; do
    step_time --nets alexnet,cifar10-80sec --batch "${BATCHES%% *}" --plain-peer $args
  done
  # convspec train sets cudnn.benchmark on a GPU; here it is on for both sides (one process), at both batches
  for batch in $BATCHES; do
    step_time --nets alexnet --batch "$batch" --plain-peer --precision bf16 --channels-last --cudnn-benchmark
  done
  # where the fp32 AlexNet step spends its device time (torch.profiler's table, into gpu.log)
  python3 bench/step_time.py --device "$DEVICE" --steps 3 --nets alexnet --batch "${BATCHES%% *}" --profile 5 >/dev/null
  bench_device=$DEVICE; [ "$DEVICE" = cuda ] && bench_device=cuda:0
  python3 -m convspec bench specs/alexnet.cfg --devices "$bench_device" --batch-size "${BATCHES%% *}" \
    --iterations "$STEPS" --json > "$OUT/bench-alexnet.json" && python3 - "$OUT/bench-alexnet.json" <<'EOF'
import json, sys
from runtime.layer_times import BenchResult, as_text
print(as_text(BenchResult.from_dict(json.load(open(sys.argv[1])))))
EOF
  timeout 240 python3 bench/option_cost.py --device "$bench_device" --steps "${COST_STEPS:-40}" --squares "$SQUARES" \
    --settings fp32,channels_last,bf16,bf16+channels_last > "$OUT/option-cost.txt" && cat "$OUT/option-cost.txt" \
    && tail -n 1 "$OUT/option-cost.txt" > "$OUT/option-cost.json"
  # the same with dropout off: on CUDA a bf16 tensor draws another dropout mask than a float32 one
  timeout 120 python3 bench/option_cost.py --device "$bench_device" --steps "${COST_STEPS:-40}" --squares "$SQUARES" \
    --dropout off --settings fp32,channels_last,bf16,bf16+channels_last > "$OUT/option-cost-nodropout.txt" \
    && tail -n 3 "$OUT/option-cost-nodropout.txt"
  # CUDA graphs: each side's whole step captured once and replayed, so neither keeps Python or launch
  # overhead and the built/hand-written ratio is the kernels' alone; then the captured built side against
  # a plain eager script
  if [ "$DEVICE" != cpu ]; then
    for args in "" "--precision bf16 --channels-last"; do
      timeout 120 python3 bench/step_time.py --device "$DEVICE" --steps "$STEPS" --nets alexnet,cifar10-80sec \
        --batch "${BATCHES%% *}" --cuda-graph $args | tee -a "$OUT/step_time.jsonl"
    done
    timeout 120 python3 bench/step_time.py --device "$DEVICE" --steps "$STEPS" --nets alexnet --batch "${BATCHES%% *}" \
      --plain-peer --precision bf16 --channels-last --cuda-graph | tee -a "$OUT/step_time.jsonl"
  fi
  # last, since it is the slowest to start (compilation) and the least needed: a run cut short keeps the rest
  timeout "${COMPILE_LIMIT:-150}" python3 bench/step_time.py --device "$DEVICE" --steps "$STEPS" --nets alexnet,cifar10-80sec \
    --batch "${BATCHES%% *}" --plain-peer --precision bf16 --channels-last --compile | tee -a "$OUT/step_time.jsonl"
  python3 - "$OUT" <<'EOF'
import datetime, json, subprocess, sys
from pathlib import Path
import torch
out = Path(sys.argv[1])
card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
def last_json(path):  # option_cost.py's result: the last line of what it printed
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
bench = out / "bench-alexnet.json"
result = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
          "date": datetime.date.today().isoformat(),
          "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip() or None,
          "step_time": [json.loads(line) for line in (out / "step_time.jsonl").read_text().splitlines()
                        if line.startswith("{")],
          "bench_alexnet": json.loads(bench.read_text()) if bench.exists() and bench.stat().st_size else None,
          "option_cost": last_json(out / "option-cost.txt"),
          "option_cost_dropout_off": last_json(out / "option-cost-nodropout.txt")}
(out / "gpu.json").write_text(json.dumps(result, indent=1))
print(f"wrote {out / 'gpu.json'}: {len(result['step_time'])} step-time results on {card}")
EOF
} 2>&1 | tee "$OUT/gpu.log"
