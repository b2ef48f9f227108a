"""Data parallel on the CPU with gloo: two ranks under torchrun hold
bitwise-identical weights after K steps, equal (to float rounding) to one
process trained on the combined batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convspec
from runtime import checkpoint as ckpt
from runtime.train import TrainOptions, train

from test_train import PARAMS, SPEC, make_data

ROOT = Path(__file__).resolve().parents[1]

# Without dropout and flips, the two ranks' randomness cannot differ from one process's.
NO_RANDOM = SPEC.replace("[drop]\ntype=dropout2\ninputs=fc1\n", "").replace("inputs=drop", "inputs=fc1")

DRIVER = """
import sys, torch
from runtime.train import Trainer, TrainOptions
import runtime.distributed as D
spec, data, out = sys.argv[1:4]
t = Trainer(TrainOptions(spec=spec, data=data, out=out, epochs=2, batch_size=32, progress=False,
                         overrides=["train.flip=0"], echo=lambda s: None))
t.run()
torch.save({k: v.detach().clone() for k, v in t.net.state_dict().items()}, f"{out}-rank{t.cluster.rank}.pt")
D.teardown(t.cluster)
"""


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="this torch has no gloo backend")
def test_two_gloo_ranks_match_one_process_on_the_combined_batch(tmp_path):
    spec = tmp_path / "tiny.cfg"
    spec.write_text(NO_RANDOM)
    (tmp_path / "tiny.params.cfg").write_text(PARAMS)
    data = make_data(tmp_path / "data")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(driver), str(spec), str(data), str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = torch.load(f"{out}-rank0.pt", weights_only=True)
    rank1 = torch.load(f"{out}-rank1.pt", weights_only=True)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # bitwise

    state = ckpt.load(out / "epoch-0002.pt")
    assert state["options"]["world"] == 2 and state["step"] == 2 * (144 // 32)
    single = train(TrainOptions(spec=str(spec), data=str(data), out=str(tmp_path / "one"), epochs=2, batch_size=32,
                                progress=False, overrides=["train.flip=0"], echo=lambda s: None))
    alone = ckpt.load(single.last_checkpoint)["model"]
    for k in rank0:
        torch.testing.assert_close(rank0[k], alone[k], rtol=1e-4, atol=1e-6)
    torch.manual_seed(0)  # the runs' seed: their initial weights
    initial = convspec.build(str(spec)).state_dict()
    assert all((rank0[k] - initial[k]).abs().max() > 1e-3 for k in rank0 if k.endswith("weight"))  # it trained
    assert torch.equal(state["model"]["fc2.weight"], rank0["fc2.weight"])
    # The metrics agree too: the ranks' sums are reduced before they are recorded.
    ddp_loss = state["history"][-1]["train_loss"]
    assert abs(ddp_loss - ckpt.load(single.last_checkpoint)["history"][-1]["train_loss"]) < 1e-4
