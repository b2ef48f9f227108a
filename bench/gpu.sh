#!/usr/bin/env bash
# The GPU check: one prepared script for a lent GPU machine (see README, "GPU").
# It runs the CUDA tests (placement; AlexNet training steps on cuda:0 and on
# cuda:0+cpu against a CPU run; convspec train/eval on cuda:0 in fp32 and bf16)
# and times the training step on the GPU: the built net against the
# hand-written one with the same options, then with convspec's options against
# a plain fp32 eager script (--plain-peer).  Results go to $OUT (or ./out) as
# gpu.log and step_time.jsonl.  About 5 minutes on an H100.
#
#   bash bench/gpu.sh            # from the repo root; needs lark (carried as .whl/)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_build.py -k "gpu or alexnet" 2>&1
  for args in "" "--precision bf16" "--precision bf16 --channels-last"; do
    python3 bench/step_time.py --device cuda --nets alexnet,alexnet-unfused,cifar10-80sec --steps 30 $args \
      | tee -a "$OUT/step_time.jsonl"
  done
  for args in "--plain-peer --precision bf16 --channels-last" "--plain-peer --precision bf16 --channels-last --compile"; do
    timeout 240 python3 bench/step_time.py --device cuda --nets alexnet,cifar10-80sec --steps 30 $args \
      | tee -a "$OUT/step_time.jsonl"
  done
} 2>&1 | tee "$OUT/gpu.log"
