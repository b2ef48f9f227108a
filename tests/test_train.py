"""`convspec train` and `convspec eval` on small CIFAR-format data the tests
write themselves: metrics, checkpoints, exact resume after SIGKILL and
SIGINT, NaN stops, learning-rate drops, eval consistency, the Python API."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import convspec
from convspec.cli import main, views_described
from convspec.errors import SpecError
from runtime import checkpoint as ckpt
from runtime import cifar
from runtime import files
from runtime.evaluate import evaluate_checkpoint
from runtime import runs
from runtime import sources as runtime_sources
from runtime.runs import net_from_checkpoint
from runtime.train import TrainingStopped, TrainOptions, train

ROOT = Path(__file__).resolve().parents[1]

# A small net with every kind of state that resume must restore: momentum,
# dropout's random numbers, a schedule over progress.
SPEC = """\
[data]
type=data
inputSize=3x32x32
[labels]
type=data
dataIdx=1
[conv1]
type=conv
inputs=data
filters=8
filterSize=5
stride=2
neuron=relu
initW=0.01
[pool1]
type=pool
inputs=conv1
pool=max
sizeX=3
stride=2
[fc1]
type=fc
inputs=pool1
outputs=16
neuron=relu
initW=0.01
[drop]
type=dropout2
inputs=fc1
[fc2]
type=fc
inputs=drop
outputs=4
initW=0.01
[probs]
type=softmax
inputs=fc2
[cost]
type=cost.logreg
inputs=labels,probs
"""

PARAMS = """\
[conv1]
epsW=exp[base=0.001;tgtFactor=10]
epsB=0.02
momW=0.9
momB=0.9
wc=0.004
[fc1]
epsW=0.01
epsB=0.02
momW=0.9
momB=0.9
wc=0.004
[fc2]
epsW=0.01
epsB=0.02
momW=0.9
momB=0.9
wc=0.004
[train]
epochs=3
batchSize=16
lrDrops=2
valFraction=0.25
flip=1
"""


def make_data(root: Path, n: int = 192, classes: int = 4, seed: int = 0) -> Path:
    """CIFAR-format batches whose classes differ in colour, so a net can learn them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]])[:classes]
    images = np.clip(base[labels][:, None, None, :] + rng.normal(0, 40, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(n), 5)):  # CIFAR-10's five training batches
        cifar.write_batch(root / f"data_batch_{i + 1}", images[part], labels[part])
    cifar.write_batch(root / "test_batch", images[:32], labels[:32])
    (root / "batches.meta").write_bytes(__import__("pickle").dumps(
        {b"label_names": [f"class{i}".encode() for i in range(classes)]}, protocol=2))
    return root


@pytest.fixture()
def setup(tmp_path):
    spec = tmp_path / "tiny.cfg"
    spec.write_text(SPEC)
    (tmp_path / "tiny.params.cfg").write_text(PARAMS)
    return spec, make_data(tmp_path / "data")


def _weights(path: Path) -> dict:
    return ckpt.load(path)["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _quiet(**kw) -> TrainOptions:
    return TrainOptions(progress=False, echo=lambda s: None, **kw)


def test_train_writes_metrics_checkpoints_and_eval_agrees(setup, tmp_path):
    spec, data = setup
    out = tmp_path / "run"
    summary = train(_quiet(spec=str(spec), data=str(data), out=str(out), keep=2))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        assert set(r) >= {"epoch", "step", "train_loss", "train_error", "val_top1_error", "val_top5_error",
                          "lr_scale", "seconds", "images_per_s"}
        assert 0 <= r["train_error"] <= 1 and 0 <= r["val_top1_error"] <= 1
    assert [r["step"] for r in records] == [9, 18, 27]  # 144 training images, batches of 16
    assert [r["lr_scale"] for r in records] == [1.0, 1.0, pytest.approx(0.1)]  # lrDrops=2
    assert sorted(p.name for p in out.glob("epoch-*.pt")) == ["epoch-0002.pt", "epoch-0003.pt"]  # --keep 2
    assert (out / "best.pt").is_file() and (out / "run.json").is_file() and (out / "spec.cfg").read_text() == SPEC
    assert records[-1]["val_top1_error"] < 0.25  # colours are easy: it learned (chance: 0.75)

    state = ckpt.load(out / "epoch-0003.pt")
    assert state["data"]["classes"] == ["class0", "class1", "class2", "class3"]
    assert state["data"]["mean"].shape == (32, 32, 3) and state["data"]["crop"] == 32
    assert state["spec"]["text"] == SPEC and state["spec"]["params_text"] == PARAMS
    assert state["provenance"]["torch"] == torch.__version__ and len(state["data"]["fingerprint"]) == 16
    assert len(state["data"]["val_indices"]) == 48

    # One code path: standalone eval on the last checkpoint gives the training numbers exactly.
    done = evaluate_checkpoint(str(out / "epoch-0003.pt"), k=5)
    assert done.result.images == 48 and done.result.k == 4  # 4 classes cap k
    assert done.result.top1_error == records[-1]["val_top1_error"]
    assert done.result.topk_error == records[-1]["val_top5_error"]
    assert summary.steps == 27


def test_eval_cli_json_views_and_per_class(setup, tmp_path):
    spec, data = setup
    out = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(out), epochs=1))
    runner = CliRunner()
    res = runner.invoke(main, ["eval", "--checkpoint", str(out), "--topk", "2", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert set(got) == {"top1_error", "topk_error", "k", "images", "views", "checkpoint", "notes"}
    assert got["notes"] == []
    assert got["k"] == 2 and got["images"] == 48 and got["views"] == 1 and got["checkpoint"].endswith("best.pt")
    assert got["topk_error"] <= got["top1_error"]
    res = runner.invoke(main, ["eval", "--checkpoint", str(out), "--views", "10", "--data", str(data), "--per-class"])
    assert res.exit_code == 0, res.output
    assert "32 images, 10 views" in res.output and "class3" in res.output and "top-1 error" in res.output
    assert "note:" not in res.output  # the CIFAR folder it trained on, but scored on its test batch
    # These 32x32 images are cropped whole, so the ten views are two, and it says so.
    assert "the crop is the whole image: the image and its mirror, 5 times each" in res.output
    res = runner.invoke(main, ["eval", "--checkpoint", str(out), "--topk", "7"])
    assert res.exit_code == 0 and res.output.splitlines()[-1].endswith("top-4 error 0.00%   (--topk 7 is more "
                                                                       "than the 4 classes)")
    res = runner.invoke(main, ["eval", "--checkpoint", str(out), "--topk", "2"])  # fewer than the classes: no remark
    assert res.exit_code == 0 and re.fullmatch(r"top-1 error [\d.]+%   top-2 error [\d.]+%",
                                               res.output.splitlines()[-1]), res.output
    res = runner.invoke(main, ["eval", "--checkpoint", str(out), "--topk", "4"])
    assert res.exit_code == 0 and res.output.splitlines()[-1].endswith("top-4 error 0.00%   (the top 4 of 4 "
                                                                       "classes always hold the right one)")
    # The default 5, not typed, is capped quietly, but its 0.00% still says nothing about the net.
    res = runner.invoke(main, ["eval", "--checkpoint", str(out)])
    assert res.exit_code == 0 and res.output.splitlines()[-1].endswith("top-4 error 0.00%   (the top 4 of 4 "
                                                                       "classes always hold the right one)")
    # 32x32 crops of 32x32 images: nothing is cropped, so it does not say "centre crop".
    assert res.output.splitlines()[-2].endswith(": 48 images, 1 view (the whole image)")


def test_per_class_columns_line_up_with_wide_class_names(setup, tmp_path):
    """Padding by characters put a CJK name's columns two further right per character."""
    from convspec.cli import _columns

    spec, data = setup
    names = ["猫", "dog", "卡车", "class3"]
    (data / "batches.meta").write_bytes(__import__("pickle").dumps(
        {b"label_names": [n.encode() for n in names]}, protocol=2))
    out = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(out), epochs=1))
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--per-class"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("class ")):]
    assert [line.split()[0] for line in table] == ["class"] + [n for n in names if n in res.output.split()]
    ends = {_columns(line.rstrip()) for line in table[1:]}  # where each row ends, in terminal columns
    assert len(ends) == 1 and _columns("卡车") == 4


@pytest.mark.parametrize("views, whole_image, words", [
    (1, False, "1 view (centre crop)"),
    (1, True, "1 view (the whole image)"),
    (10, False, "10 views"),
    (10, True, "10 views (the crop is the whole image: the image and its mirror, 5 times each)"),
])
def test_eval_names_its_views(views, whole_image, words):
    assert views_described(views, whole_image) == words


def _run_cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "convspec", *args], env=env, cwd=kw.get("cwd", ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_training_goes_on_when_its_reader_leaves(setup, tmp_path):
    """`convspec train ... | head -1`: the pipe closes after the first line, and training still finishes."""
    spec, data = setup
    out = tmp_path / "run"
    proc = _run_cli(["train", str(spec), "--data", str(data), "--out", str(out), "--quiet"])
    proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def _wait_for(path: Path, proc, timeout=120):
    start = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        if time.time() - start > timeout:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT", "SIGKILL after snapshots"])
def test_resume_after_a_kill_is_bitwise_exact(setup, tmp_path, how):
    """Killed mid-epoch 2 (SIGKILL: back to the epoch-1 checkpoint; SIGINT:
    interrupted.pt mid-epoch; SIGKILL with --snapshot-minutes: the last
    snapshot mid-epoch, where a kill once lost the whole epoch), resumed: the
    same weights, bit for bit, as the run that was never interrupted, and no
    repeated metrics record."""
    spec, _ = setup
    data = make_data(tmp_path / "more", n=1000)  # about a second per epoch: time to land mid-epoch
    common = [str(spec), "--data", str(data), "--deterministic", "--quiet", "--batch-size", "2", "--epochs", "3",
              "--set", "train.lrDrops=1"]
    whole = _run_cli(["train", *common, "--out", str(tmp_path / "whole")])
    assert whole.wait() == 0, whole.stderr.read()
    epoch_seconds = json.loads((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()[1])["seconds"]

    run = tmp_path / "cut"
    snapshots = ["--snapshot-minutes", str(0.05 * epoch_seconds / 60)] if "snapshot" in how else []
    proc = _run_cli(["train", *common, "--out", str(run), *snapshots])
    _wait_for(run / "epoch-0001.pt", proc)
    time.sleep(0.3 * epoch_seconds)
    if snapshots:
        _wait_for(run / "interrupted.pt", proc)
    proc.send_signal(signal.SIGINT if how == "SIGINT" else signal.SIGKILL)
    code = proc.wait()
    err = proc.stderr.read()
    if how == "SIGINT":
        assert code == 130, err
        assert "SIGINT: stopped in epoch 2 after batch" in err and "convspec train --resume --out" in err
        state = ckpt.load(run / "interrupted.pt")
        assert state["epoch"] == 1 and 0 < state["batch"] < 375
    else:
        assert code == -signal.SIGKILL
        assert not (run / "epoch-0002.pt").exists()
        if snapshots:  # the last snapshot, part-way into epoch 2, with the part's sums
            state = ckpt.load(run / "interrupted.pt")
            assert state["epoch"] == 1 and 0 < state["batch"] < 375
            assert state["partial"]["images"] == 2 * state["batch"] and state["step"] == 375 + state["batch"]
            assert state["options"]["snapshot_minutes"] == float(snapshots[1])
    resumed = _run_cli(["train", "--resume", "--out", str(run), "--quiet", "--deterministic"])
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert "resuming at epoch 2" in out
    assert _same(_weights(tmp_path / "whole" / "epoch-0003.pt"), _weights(run / "epoch-0003.pt"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    whole_records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in records] == [r["train_loss"] for r in whole_records]
    assert not (run / "interrupted.pt").exists()
    if snapshots:  # the resume kept the run's interval (it once fell back to 30 minutes unsaid)
        assert ckpt.load(run / "epoch-0003.pt")["options"]["snapshot_minutes"] == float(snapshots[1])


def test_a_stop_between_the_minibatches_of_an_update_period_resumes_exactly(setup, tmp_path, monkeypatch):
    """updatePeriod=N sums N minibatches' gradients before one update: a stop (or a snapshot,
    or an epoch's end) in between saved no sum, and the resumed run went elsewhere."""
    import runtime.distributed as D

    spec, data = setup
    common = dict(spec=str(spec), data=str(data), deterministic=True, epochs=2,
                  overrides=["fc1.updatePeriod=3", "conv1.updatePeriod=2"])
    train(_quiet(out=str(tmp_path / "whole"), **common))
    real, asked = D.agreed_signal_and_flags, []

    def stop_after_step_13(signum, flags, cluster):
        if len(flags) != 1:  # the epoch's end asks for the signal alone
            return real(signum, flags, cluster)
        asked.append(flags)  # once a step: (the stop signal, whether a snapshot is due)
        signum, due = real(signum, flags, cluster)
        return signum or (2 if len(asked) == 13 else None), due
    monkeypatch.setattr(D, "agreed_signal_and_flags", stop_after_step_13)
    with pytest.raises(TrainingStopped):
        train(_quiet(out=str(tmp_path / "cut"), **common))
    monkeypatch.undo()
    state = ckpt.load(tmp_path / "cut" / "interrupted.pt")
    # 9 steps an epoch: epoch 2 after its 4th batch; 13 % 3 and 13 % 2 leave both sums part-way
    # (and epoch 1 ended part-way through conv1's pair).
    assert (state["epoch"], state["batch"], state["step"]) == (1, 4, 13)
    assert sum(g is not None for g in state["optimizer"]["pending_grads"]) == 4  # conv1's and fc1's W and b
    train(_quiet(out=str(tmp_path / "cut"), resume=True, deterministic=True))
    assert _same(_weights(tmp_path / "whole" / "epoch-0002.pt"), _weights(tmp_path / "cut" / "epoch-0002.pt"))


def test_snapshots_that_cost_much_of_their_interval_are_noted_once(setup, tmp_path):
    """--snapshot-minutes 0.001 wrote a checkpoint after every batch and trained 45% slower, unsaid."""
    spec, data = setup
    said = []
    train(TrainOptions(spec=str(spec), data=str(data), out=str(tmp_path / "run"), epochs=2, progress=False,
                       echo=said.append, snapshot_minutes=1e-6))
    notes = [line for line in said if line.startswith("note: a snapshot takes ")]
    assert len(notes) == 1 and notes[0].endswith("a larger --snapshot-minutes costs less"), said
    assert " more than a tenth of --snapshot-minutes 1e-06 (0.00 s), so snapshots slow training by up to " in notes[0]
    assert not (tmp_path / "run" / "interrupted.pt").exists()  # the epoch's checkpoint replaced the last one


def test_snapshot_writes_are_not_counted_as_training_time(setup, tmp_path, monkeypatch):
    """train_seconds once included every mid-epoch snapshot's write, unlike the epoch's own
    checkpoint: a slow disk made training look slower.  Each write here takes 1 s more, far
    beyond what the tiny net's steps take even on a busy machine."""
    spec, data = setup
    real_save, snapshot_writes = ckpt.save, []

    def slow_save(path, state):
        if Path(path).name == runs.INTERRUPTED:
            snapshot_writes.append(path)
            time.sleep(1.0)
        return real_save(path, state)
    monkeypatch.setattr(ckpt, "save", slow_save)
    out = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(out), epochs=1, snapshot_minutes=1e-6))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert len(snapshot_writes) >= 3  # one after every batch but the last
    assert record["train_seconds"] < 0.5 * len(snapshot_writes), (record["train_seconds"], len(snapshot_writes))
    assert record["train_seconds"] == pytest.approx(record["seconds"] - record["val_seconds"])


def test_nan_loss_stops_naming_step_and_layer_and_keeps_checkpoints(setup, tmp_path):
    spec, data = setup
    out = tmp_path / "run"
    # A learning rate that grows a billionfold over training: fine at first, then it blows up.
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(out), "--quiet",
                                    "--epochs", "6", "--set", "fc1.epsW=exp[base=0.01;tgtFactor=1e-12]",
                                    "--set", "conv1.epsW=exp[base=0.01;tgtFactor=1e-12]"])
    assert res.exit_code == 1, res.output
    message = res.output.strip().splitlines()[-1]
    m = re.fullmatch(r"error: loss became (-?inf|nan) at step (\d+) \(epoch (\d+)\); (the weights of .+ are not "
                     r"finite|the first layer whose output is not finite is '\w+'|the weights and outputs are finite "
                     r"but the loss is not)\. Training stopped and the last good checkpoint is (\S+)\. Lower the "
                     r"learning rates \(the highest epsW is (\w+)'s: --set \6\.epsW=\.\.\.\) or check the data",
                     message)
    assert m, message
    step, epoch, layer, named = int(m[2]), int(m[3]), m[6], Path(m[5])
    good = sorted(out.glob("epoch-*.pt"))
    # The exponential rate blows up within the six epochs, after at least one good one.
    assert 1 <= len(good) < 6
    assert named == good[-1] and ckpt.load(named)["epoch"] == len(good)
    # It failed in the epoch after the last checkpoint, at a step of that epoch (9 batches of 16 an epoch).
    assert epoch == len(good) + 1 and 9 * len(good) < step <= 9 * epoch
    assert layer in {"conv1", "fc1"}  # the two whose rates grew; fc2's stayed at 0.01
    assert all(torch.isfinite(v).all() for v in _weights(named).values())


def test_nan_advice_names_the_layer_with_the_runaway_rate_not_the_first_in_the_net(setup, tmp_path):
    """By the time the loss is read, fc2's blow-up has spread to every layer through
    the gradients; the advice once named conv1, the first in the net's order.  (wc=0, so
    that fc2's weight decay is not what diverges: that has advice of its own.)"""
    spec, data = setup
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(tmp_path / "run"),
                                    "--quiet", "--epochs", "1", "--set", "fc2.epsW=1e6", "--set", "fc2.wc=0"])
    assert res.exit_code == 1, res.output
    message = res.output.strip().splitlines()[-1]
    assert message.startswith("error: loss became ") and message.endswith(
        "Training stopped and no checkpoint was written yet. Lower the learning rates (the highest epsW is fc2's: "
        "--set fc2.epsW=...) or check the data"), message


def test_a_nan_loss_from_a_runaway_weight_decay_names_the_decay_not_the_learning_rates(setup, tmp_path):
    """fc2's decay alone diverges (epsW x wc = 0.01 x 1e6 = 1e4 >= 2(1 + 0.9)); the advice
    once said to lower the learning rates, naming whichever epsW was highest."""
    spec, data = setup
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(tmp_path / "run"),
                                    "--quiet", "--epochs", "1", "--set", "fc2.wc=1e6"])
    assert res.exit_code == 1, res.output
    message = res.output.strip().splitlines()[-1]
    assert message.startswith("error: loss became ") and message.endswith(
        "Training stopped and no checkpoint was written yet. Weight decay alone makes 'fc2' diverge: epsW x wc = "
        "10000, and the update is stable only below 2(1 + momW) = 3.8; lower its wc or epsW (--set fc2.wc=... or "
        "--set fc2.epsW=...)"), message


def test_the_runaway_decay_bound_is_where_the_decay_alone_starts_to_diverge():
    """The bound 2(1 + mom), checked against the recurrence itself in float64."""
    from types import SimpleNamespace

    from convspec.values import Schedule
    from runtime.train import runaway_decay

    def grows(a, mom, steps=4000):
        w, inc = 1.0, 0.0
        for _ in range(steps):
            inc = mom * inc - a * w
            w += inc
        return not abs(w) <= 1.0  # overflowed to inf, then nan, when it grows

    class Layer(dict):  # a spec layer as runaway_decay reads it: a name, a type and its keys
        name, type = "fc", "fc"

    for mom in (0.0, 0.5, 0.9):
        for a in (0.5, 1.9 * (1 + mom), 2.1 * (1 + mom)):
            layer = Layer(epsW=[Schedule("const", a)], wc=[1.0], momW=[mom])
            net = SimpleNamespace(spec=SimpleNamespace(layers={"fc": layer}))
            assert (runaway_decay(net, 0.0) is not None) == grows(a, mom), (a, mom)
            # After a drop to a tenth of the rate, the same decay is judged at the rate it has then.
            assert (runaway_decay(net, 0.0, lr_scale=0.1) is not None) == grows(0.1 * a, mom), (a, mom)


@pytest.mark.parametrize("override, said", [
    # The first loss comes from the initial weights: no learning rate to lower.
    ("cost.coeff=3e38", "loss became inf at step 1 (epoch 1), before any update; the weights and outputs are "
     "finite but the loss is not. Training stopped and no checkpoint was written yet. No learning rate did this: "
     "check the spec's neurons, initW and the cost's coeff, and the data"),
])
def test_a_nan_loss_from_the_start_blames_the_spec_or_data_not_the_rates(setup, tmp_path, override, said):
    """It once said "Lower the learning rates" of a run that had not yet made an update."""
    spec, data = setup
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(out), "--quiet",
                                    "--epochs", "1", "--set", override])
    assert (res.exit_code, res.output.strip().splitlines()[-1]) == (1, f"error: {said}"), res.output


def test_costs_that_all_weigh_nothing_are_refused_before_reading_data(setup, tmp_path):
    spec, _data = setup
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(tmp_path / "nowhere"), "--out",
                                    str(tmp_path / "run"), "--set", "cost.coeff=0"])
    assert (res.exit_code, res.output) == (1, f"{spec.with_name('tiny.params.cfg')}: coeff=0 on every cost (cost): "
                                              "the loss would always be 0 and nothing would learn; give a cost a "
                                              "coeff above 0 (cuda-convnet's logprob has 1)\n")
    assert not (tmp_path / "run").exists()


def test_a_nan_loss_on_another_rank_is_said_so_not_with_this_ranks_finite_loss(setup, tmp_path, monkeypatch):
    """Only rank 0 speaks for every rank: when the NaN was another rank's, its message once
    gave rank 0's own finite loss ("loss became 2.3026 at step 3")."""
    import runtime.distributed as D

    spec, data = setup
    checks = []

    def another_rank_at_step_3(flag, cluster):  # each step asks once, of its loss (stop and snapshot: the other call)
        checks.append(flag)
        return flag or len(checks) == 3
    monkeypatch.setattr(D, "broadcast_flag", another_rank_at_step_3)
    with pytest.raises(SpecError) as err:
        train(_quiet(spec=str(spec), data=str(data), out=str(tmp_path / "run"), epochs=1))
    assert str(err.value).startswith("another rank's loss became nan or inf by step 3 (epoch 1); "), err.value
    assert "before any update" not in str(err.value) and not any(checks)


def test_a_nan_loss_on_the_cpu_is_diagnosed_on_the_weights_that_made_it(setup, tmp_path):
    """On the CPU the loss is read before the update, so the weights are those that made it,
    and the first layer whose output is not finite is named (here the one whose initial
    weights overflow float32): after the update every layer's weights had gone bad."""
    spec, data = setup
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(tmp_path / "run"),
                                    "--quiet", "--epochs", "1", "--set", "conv1.initW=1e36"])
    assert res.exit_code == 1, res.output
    message = res.output.strip().splitlines()[-1]
    assert message.startswith("error: loss became nan at step 1 (epoch 1), before any update; the first layer "
                              "whose output is not finite is 'conv1'. "), message


def test_a_train_limit_above_the_training_images_is_noted(setup, tmp_path):
    spec, data = setup
    said = []
    train(TrainOptions(spec=str(spec), data=str(data), out=str(tmp_path / "all"), epochs=1, progress=False,
                       echo=said.append, train_limit=1000))
    assert "note: --train-limit 1,000 is not below the 144 training images; training on all of them" in said
    said.clear()
    train(TrainOptions(spec=str(spec), data=str(data), out=str(tmp_path / "some"), epochs=1, progress=False,
                       echo=said.append, train_limit=64))
    assert not any("--train-limit" in line for line in said) and "64 training images" in said[0]


def test_plateau_rule_divides_the_rate(setup, tmp_path):
    spec, data = setup
    out = tmp_path / "run"
    # A frozen net never improves after epoch 1, so plateau=1 drops the rate after every later epoch.
    frozen = [f"{layer}.{key}=0" for layer in ("conv1", "fc1", "fc2") for key in ("epsW", "epsB")]
    said = []
    train(TrainOptions(spec=str(spec), data=str(data), out=str(out), epochs=4, progress=False, echo=said.append,
                       overrides=frozen + ["train.plateau=1", "train.lrDrops=3,4,10"]))
    assert said[1] == ("note: lrDrops=4,10 come at or after the last of 4 epochs: those drops never happen; "
                       "change them with --set train.lrDrops=N (or =none)")
    # 4 classes: the epoch lines' top-4 error is 0% by construction, and the start says so once.
    assert said[2] == ("note: with 4 classes the top-4 error is always 0%, since the top 4 hold every class; "
                       "read the top-1")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_scale"] for r in records] == pytest.approx([1.0, 1.0, 0.1, 0.001])  # plateau twice, lrDrops=3 once
    assert len({r["val_top1_error"] for r in records}) == 1
    assert not any(line.startswith("note: plateau=") for line in said)
    said.clear()  # without validation the rule can never fire: said, not left to be found out
    train(TrainOptions(spec=str(spec), data=str(data), out=str(tmp_path / "blind"), epochs=1, progress=False,
                       echo=said.append, overrides=["train.plateau=2", "train.valFraction=0"]))
    assert ("note: plateau=2 lowers the rate when validation error stops improving, and this run validates on "
            "nothing (valFraction=0, no --val-data): it never fires") in said


def test_overrides_are_recorded_and_rebuild_the_trained_net(setup, tmp_path):
    spec, data = setup
    out = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(out), epochs=1, overrides=["fc1.outputs=24"]))
    net = convspec.load(out)
    assert net.fc1.weight.shape[0] == 24 and net.classes == ["class0", "class1", "class2", "class3"]
    state = ckpt.load(out / "best.pt")
    assert state["spec"]["overrides"] == ["fc1.outputs=24"]
    assert json.loads((out / "run.json").read_text())["overrides"] == ["fc1.outputs=24"]
    # The loaded net predicts what the checkpoint's evaluation scored.
    image = cifar.load_cifar(data, "train").images[0]
    x = net.preprocess(image)
    assert x.shape == (1, 3, 32, 32)
    expected = torch.from_numpy(image.astype(np.float32) - state["data"]["mean"].numpy()).permute(2, 0, 1)
    torch.testing.assert_close(x[0], expected)
    with torch.no_grad():
        assert net(x).shape == (1, 4)


def test_train_and_bench_print_the_notes_that_change_what_trains(setup, tmp_path):
    spec, data = setup
    params = tmp_path / "typo.params.cfg"
    params.write_text(PARAMS + "[fc3]\nepsW=0.5\n")  # a misspelt layer: its rate would be silently ignored
    said: list[str] = []
    train(TrainOptions(progress=False, echo=said.append, spec=str(spec), params=str(params), data=str(data),
                       out=str(tmp_path / "run"), epochs=1))
    assert said[0] == (f"note: {params}:25:2: params section [fc3] names no layer in the spec; ignored; "
                       "did you mean 'fc2'?")
    assert not any("placed on gpu 0" in line for line in said)
    # check lists the default placement too; it changes nothing, so train keeps quiet about it
    assert any("placed on gpu 0" in n for n in convspec.check_paths(spec, params).notes)

    result = CliRunner().invoke(main, ["bench", str(spec), "--params", str(params), "--batch-size", "4",
                                       "--iterations", "1", "--warmup", "0"])
    assert result.exit_code == 0, result.output
    assert f"note: {params}:25:2: params section [fc3] names no layer" in result.output


def test_build_api_gives_an_untrained_net(setup):
    spec, _ = setup
    net = convspec.build(str(spec), overrides=["fc1.outputs=12"])
    assert net.fc1.weight.shape[0] == 12 and net(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    # devices and input_shape as the CLI takes them, checked the same way (meta built; a 2-tuple was misread).
    assert convspec.build(str(spec), devices="cpu", input_shape="3x32x32")(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    for kw, message in [
        ({"devices": ["meta"]}, "devices: 'meta' is not supported; use cpu or cuda:N"),  # its own name, not --devices
        ({"devices": "cuda:9"} if not torch.cuda.is_available() else {"devices": "gpu7"},
         f"devices: cuda:9 is not available (this torch {torch.__version__} sees no CUDA GPU); use devices='cpu' or "
         "install a CUDA build of torch" if not torch.cuda.is_available() else
         "devices: 'gpu7' is not a device; write e.g. cpu, cuda:0 or cuda:0,cuda:1"),
        ({"input_shape": (3, 16)}, "input_shape must be (C, H, W) with positive whole numbers or 'CxHxW', not (3, 16)"),
        ({"input_shape": "3x16"}, "input_shape must be CxHxW with positive whole numbers, e.g. 3x224x224, not '3x16'"),
    ]:
        with pytest.raises(SpecError) as err:
            convspec.build(str(spec), **kw)
        assert str(err.value) == message
    for outputs, message in [
        (["labels"], "outputs: 'labels' (data) needs the labels, which a forward pass has none of; ask for layers the "
                     "images compute (e.g. 'fc2')"),
        (["fc"], f"outputs: no layer 'fc' in {spec}; did you mean 'fc2'?"),
    ]:
        with pytest.raises(SpecError) as err:
            net(torch.zeros(1, 3, 32, 32), outputs=outputs)
        assert str(err.value) == message
    assert net(torch.zeros(1, 3, 32, 32), outputs="fc1")["fc1"].shape == (1, 12)  # one name, not its letters
    assert convspec.build(str(spec), devices=[], input_shape=(np.int64(3), 32, 32)).devices == [torch.device("cpu")]


ERRORS = [
    # (arguments after "train SPEC", expected one-line error)
    (["--devices", "cuda:0"], "error: --devices: cuda:0 is not available (this torch"),
    (["--devices", "gpu0"], "error: --devices: 'gpu0' is not a device; write e.g. cpu, cuda:0 or cuda:0,cuda:1"),
    (["--set", "fc2.outputs=3"], "the net ends in 3 outputs (layer 'fc2') but the data has 4 classes; set "
                                 "outputs=4 on 'fc2' (e.g. --set fc2.outputs=4)"),
    (["--set", "convv1.epsW=1"], "error: --set convv1.epsW=1: no layer 'convv1' in"),
    (["--batch-size", "1000"], "144 training images (48 of 192 are held out by valFraction=0.25) make no full batch "
                               "of 1000; use a smaller --batch-size"),
    (["--out", "{tmp}/tiny.cfg/run"], "{tmp}/tiny.cfg/run: cannot make the run folder: {tmp}/tiny.cfg is a file; "
                                      "choose another --out"),
    (["--epochs", "1", "--set", "train.epochs=2"],
     "error: --epochs 1 and --set train.epochs=2 both set [train] epochs; keep one"),
    (["--out", "{tmp}"], "{tmp}: is not empty and holds no convspec run (it has data, tiny.cfg, tiny.params.cfg); "
                         "choose an empty or new --out"),
]


def test_missing_learning_rules_are_located_and_named(setup, tmp_path):
    """It said "no learning rate or momentum for conv1, fc1, fc2" against the file alone: not
    which keys, nor where; check passes such a file (a layer file alone is checkable)."""
    spec, data = setup
    params = tmp_path / "tiny.params.cfg"
    params.write_text(PARAMS.replace("momB=0.9\nwc=0.004\n[fc1]", "wc=0.004\n[fc1]").replace("epsB=0.02\n", "", 2))
    run = lambda: CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(tmp_path / "r"),
                                            "--quiet"])
    res = run()
    assert (res.exit_code, res.output) == (1, (
        f"{params}:1:2: layer 'conv1' has no epsB or momB, which training needs (1 other layer lacks some too: fc1); "
        f"set epsW, epsB, momW and momB in its [conv1] section of {params}\n[conv1]\n ^\n"))
    params.write_text(PARAMS.split("[fc2]")[0] + "[train]" + PARAMS.split("[train]")[1])  # no [fc2] at all
    res = run()
    assert (res.exit_code, res.output) == (1, (
        f"{params}: layer 'fc2' has no epsW, epsB, momW or momB, which training needs; add a [fc2] section to "
        f"{params} setting epsW, epsB, momW and momB\n"))
    params.unlink()
    res = run()
    assert (res.exit_code, res.output) == (1, (
        f"{spec}:7:2: layer 'conv1' has no epsW, epsB, momW or momB, which training needs (2 other layers lack some "
        "too: fc1, fc2); add a params file (NAME.params.cfg beside the spec, or --params FILE) setting epsW, epsB, "
        "momW and momB for each layer with weights\n[conv1]\n ^\n"))


@pytest.mark.skipif(not os.access("/proc", os.W_OK), reason="needs a /proc this user may write to (root on Linux)")
def test_an_out_folder_that_cannot_be_made_is_refused_before_the_data_is_read(setup, tmp_path):
    """Root passes the permission check on /proc, which makes no folders: the error once came
    after the data had been read (a minute for ImageNet).  A missing --data proves the order."""
    spec, _ = setup
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(tmp_path / "no-such-data"),
                                    "--out", "/proc/convspec-run", "--quiet"])
    assert (res.exit_code, res.output) == (1, "/proc/convspec-run: cannot make the run folder: /proc takes no new "
                                              "folder (No such file or directory); choose another --out\n")


@pytest.mark.parametrize("args, expected", ERRORS)
def test_train_errors_are_one_line(setup, tmp_path, args, expected):
    if "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    spec, data = setup
    args = [a.format(tmp=tmp_path) for a in args]
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(tmp_path / "r"),
                                    "--quiet", *args])
    assert res.exit_code == 1
    assert expected.format(tmp=tmp_path) in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1


def _class_folders(root: Path, classes: list[str], per_class: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_validation_images_copied_from_the_training_folders_are_noted(setup, tmp_path):
    """A --val-data folder made by copying some training images out, and not removing them,
    scored images the net trains on; only the very same folder was recognised."""
    from PIL import Image

    spec, _ = setup
    data = _class_folders(tmp_path / "train", ["cat", "dog"])
    val = _class_folders(tmp_path / "val", ["cat", "dog"], per_class=0)
    shutil.copy(data / "cat" / "3.png", val / "cat" / "3.png")  # the same file: noted
    shutil.copy(data / "dog" / "5.png", val / "dog" / "x5.png")  # another name: not matched
    Image.new("RGB", (32, 32)).save(val / "dog" / "0.png")  # a training name, other bytes: not matched
    # A training name and size but other pixels (uncompressed images of one size all have one size): not a copy.
    same_size = np.asarray(Image.open(data / "cat" / "4.png"))[::-1]
    Image.fromarray(np.ascontiguousarray(same_size)).save(val / "cat" / "4.png")
    assert (val / "cat" / "4.png").stat().st_size == (data / "cat" / "4.png").stat().st_size
    said = []
    options = dict(spec=str(spec), data=str(data), val_data=str(val), epochs=1, batch_size=4, progress=False,
                   echo=said.append, overrides=["fc2.outputs=2"])
    train(TrainOptions(out=str(tmp_path / "run"), **options))
    assert [line for line in said if "copies of training" in line or "a copy of training" in line] == [
        f"note: 1 of the 4 validation images is a copy of training images (the same class, name and bytes; e.g. "
        f"{val / 'cat' / '3.png'} of {data / 'cat' / '3.png'}), so validation scores images the net trains on; "
        f"remove them from {data} or from {val}"]
    (val / "cat" / "3.png").unlink()
    Image.new("RGB", (32, 32), "white").save(val / "cat" / "new.png")
    said.clear()
    train(TrainOptions(out=str(tmp_path / "run2"), **options))
    assert not any("copy of training" in line or "copies of training" in line for line in said)


def test_validation_images_of_classes_never_trained_on_are_noted(setup, tmp_path):
    """ImageNet's samples have one image a class: every held-out image is of a class the
    net never sees, and a near-100% error said so nowhere."""
    spec, _ = setup
    data = _class_folders(tmp_path / "one-each", [f"c{i}" for i in range(8)], per_class=1)
    said = []
    train(TrainOptions(spec=str(spec), data=str(data), out=str(tmp_path / "run"), epochs=1, batch_size=2,
                       progress=False, echo=said.append, overrides=["fc2.outputs=8", "train.valFraction=0.25"]))
    assert ("note: 2 of the 2 validation images are of classes with no training image (2 classes), which the net "
            "cannot learn; give more images a class, or --val-data PATH") in said
    said.clear()  # several images a class: every class is trained on
    train(TrainOptions(spec=str(spec), data=str(_class_folders(tmp_path / "eight-each", ["a", "b"])),
                       out=str(tmp_path / "run2"), epochs=1, batch_size=2, progress=False, echo=said.append,
                       overrides=["fc2.outputs=2"]))
    assert not any("no training image" in line for line in said)


def _train_two_classes(spec: Path, data: Path, out: Path):
    """One short epoch of the tiny net, cut to two classes, through the CLI."""
    return CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(out), "--quiet",
                                     "--epochs", "1", "--set", "fc2.outputs=2", "--batch-size", "4"])


def test_one_class_is_refused_and_an_unread_val_folder_is_noted(setup, tmp_path):
    spec, _ = setup
    one = _class_folders(tmp_path / "one", ["cat"])
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(one), "--out", str(tmp_path / "r1"), "--quiet"])
    assert (res.exit_code, res.output) == (1, f"{one}: holds only one class (cat); a classifier needs at least 2: "
                                              "give the folder that holds the class folders\n")
    split = tmp_path / "split"
    _class_folders(split / "train", ["cat", "dog"]), _class_folders(split / "val", ["cat", "dog"], 2)
    res = _train_two_classes(spec, split, tmp_path / "r2")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == (f"note: training holds out 0.25 of {split}/train for validation; "
                                          f"{split}/val is not read (pass --val-data {split} to validate on it)")
    # eval of DIR/train, the training half of the DIR it trained on: the exact note, not "changed since"
    # (the recorded fingerprint is DIR's, not DIR/train's).
    notes = evaluate_checkpoint(str(tmp_path / "r2"), data=str(split / "train")).notes
    assert notes[0].startswith(f"note: {split / 'train'} is the data this run trained on: "), notes
    # The same layout prepared into a store: its val split is not read either, and that is said too.
    from runtime.store import PrepareOptions, prepare

    store = tmp_path / "store"
    prepare(split, store, PrepareOptions(size=32, raw=True, workers=1), progress=False)
    res = _train_two_classes(spec, store, tmp_path / "r4")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == (f"note: training holds out 0.25 of the train split of {store} for "
                                          f"validation; its val split is not read (pass --val-data {store} to "
                                          "validate on it)")
    loose = _class_folders(tmp_path / "loose", ["cat", "dog"])
    (loose / "cat" / "0.png").rename(loose / "stray.png")  # beside the class folders: it has no class
    res = _train_two_classes(spec, loose, tmp_path / "r3")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == (f"note: 1 image beside the class folders in {loose} (stray.png) has no "
                                          "class and is not read; move it into a class folder to use it")


def test_images_in_sub_folders_are_noted_and_hidden_files_are_not_images(setup, tmp_path):
    """torchvision reads a class folder's sub-folders, convspec does not: say so. A hidden
    ``._0.png`` (macOS metadata) stopped training as an unreadable image, and a hidden image
    was read although the fingerprint that guards resumes skips hidden files."""
    spec, _ = setup
    data = _class_folders(tmp_path / "folders", ["cat", "dog"])
    (data / "dog" / "more").mkdir()
    for i in range(2):
        (data / "dog" / f"{i}.png").rename(data / "dog" / "more" / f"{i}.png")
    (data / "cat" / "._0.png").write_bytes(b"\0\5\26\7 not an image")
    res = _train_two_classes(spec, data, tmp_path / "r")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == (f"note: 2 images in folders inside the class folders "
                                          f"({data}/dog/more/0.png, ...) are not read; only the images directly in "
                                          "a class folder are: move them up a level to use them")
    assert " 10 training images, 4 validation images" in res.output.splitlines()[1]  # 14 = 16 - 2 nested


def _trained_on_two_class_folders(setup, tmp_path) -> tuple[Path, Path]:
    """(the class folders, the run): one epoch on 16 images, 4 of them held out."""
    spec, _ = setup
    data = _class_folders(tmp_path / "folders", ["cat", "dog"])
    run = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(run), epochs=1, batch_size=4, overrides=["fc2.outputs=2"]))
    return data, run


def test_eval_refuses_held_out_images_it_cannot_find_again(setup, tmp_path):
    """The held-out images are positions in the folder's listing: after a file was deleted, eval
    scored other images (some trained on) under the same "held-out" label."""
    data, run = _trained_on_two_class_folders(setup, tmp_path)
    assert evaluate_checkpoint(str(run)).result.images == 4
    recorded = ckpt.load(run / "best.pt")["data"]
    (data / "cat" / "3.png").rename(tmp_path / "3.png")
    with pytest.raises(SpecError) as err:
        evaluate_checkpoint(str(run))
    now = runtime_sources.fingerprint(data)
    assert str(err.value) == (f"{data}: is not the data the run was trained on: files were added, removed or changed "
                              f"since the run trained on it (fingerprint {now}, recorded {recorded['fingerprint']}); "
                              "its held-out images cannot be found again: put it back as it was, or give --data PATH "
                              "to score every image under PATH")
    # The same for a resume; and the same files listed otherwise (hidden files were once read) are named so.
    with pytest.raises(SpecError) as err:
        train(_quiet(resume=True, out=str(run), epochs=2))
    assert str(err.value).startswith(f"{data}: is not the data the run was trained on: files were added, removed")
    assert runs.data_change(recorded, recorded["fingerprint"], 17) == (
        "it lists 17 images where the run had 16 (the convspec that trained the run listed its folders otherwise)")
    whole = evaluate_checkpoint(str(run), data=str(data))
    assert whole.result.images == 15
    # Every image of the training folder, 12 of them trained on: no held-out figure, and it says so; the count
    # is an upper bound once files went (it once gave the recorded 12 as exact, and advised leaving --data out,
    # which the changed folder refuses).
    assert whole.notes == [f"note: {data} is the data this run trained on, changed since (16 images then, 15 now): "
                           "up to 12 of its images are training images, so this is no held-out error (give --data "
                           "images the run never trained on)"]
    (tmp_path / "3.png").rename(data / "cat" / "3.png")  # put back: the recorded count, exact again
    assert evaluate_checkpoint(str(run), data=str(data)).notes[0].startswith(
        f"note: {data} is the data this run trained on: 12 of its images are training images")
    (data / "cat" / "3.png").rename(data / "cat" / "3b.png")  # the same count, not the same files
    assert evaluate_checkpoint(str(run), data=str(data)).notes == [
        f"note: {data} is the data this run trained on, changed since (16 images, not all the same files): up to 12 "
        "of its images are training images, so this is no held-out error (give --data images the run never trained "
        "on)"]


def test_eval_on_a_copy_of_the_training_folders_says_so_in_text_and_json(setup, tmp_path):
    """Only the recorded path was recognised: a cp -r of the training data scored as if held out."""
    data, run = _trained_on_two_class_folders(setup, tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    said = (f"{copy} holds the same files as the data this run trained on ({data}): 12 of its images are training "
            "images, so this is no held-out error (leave --data out to score the run's held-out images)")
    assert evaluate_checkpoint(str(run), data=str(copy)).notes == [f"note: {said}"]
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(run), "--data", str(copy), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["notes"] == [said]
    (copy / "cat" / "0.png").unlink()  # another set of files: no note
    assert evaluate_checkpoint(str(run), data=str(copy)).notes == []


def test_eval_data_says_which_images_it_does_not_score(setup, tmp_path):
    """eval --data skipped images beside the class folders, in folders inside them, and the
    labels file's lines for images the flat folder lacks, all without a word; train said the first two."""
    from PIL import Image

    data, run = _trained_on_two_class_folders(setup, tmp_path)
    others = _class_folders(tmp_path / "others", ["cat", "dog"], per_class=2)
    pixels = np.zeros((32, 32, 3), np.uint8)
    Image.fromarray(pixels).save(others / "stray.png")
    (others / "dog" / "more").mkdir()
    Image.fromarray(pixels).save(others / "dog" / "more" / "x.png")
    done = evaluate_checkpoint(str(run), data=str(others))
    assert done.result.images == 4
    assert done.notes == [
        f"note: 1 image beside the class folders in {others} (stray.png) has no class and is not scored; move it "
        "into a class folder to use it",
        f"note: 1 image in folders inside the class folders ({others}/dog/more/x.png) is not scored; only the "
        "images directly in a class folder are: move it up a level to use it"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(pixels).save(flat / name)
    labels = tmp_path / "labels.txt"
    labels.write_text("a.png cat\nb.png dog\nc.png dog\nd.png cat\n")  # a subset of the labelled images
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(run), "--data", str(flat), "--labels", str(labels),
                                    "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert (got["images"], got["notes"]) == (2, ["2 lines of the labels file name no image in the folder "
                                                  "(c.png, ...); only the images in the folder are scored"])
    labels.write_text("a.png cat\nb.png dog\n")  # every line an image: no note
    assert evaluate_checkpoint(str(run), data=str(flat), labels=str(labels)).notes == []


def test_val_data_images_that_are_not_validated_on_are_noted(setup, tmp_path):
    from PIL import Image

    spec, _ = setup
    data = _class_folders(tmp_path / "train", ["cat", "dog"])
    val = _class_folders(tmp_path / "val", ["cat", "dog"], per_class=2)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(val / "stray.png")
    said = []
    train(TrainOptions(spec=str(spec), data=str(data), val_data=str(val), out=str(tmp_path / "run"), epochs=1,
                       batch_size=4, progress=False, echo=said.append, overrides=["fc2.outputs=2"]))
    assert (f"note: 1 image beside the class folders in {val} (stray.png) has no class and is not validated on; "
            "move it into a class folder to use it") in said


def test_eval_on_a_store_prepared_from_the_training_folders_says_so(setup, tmp_path):
    """A store made from the very folders trained on scored its train split as if held out."""
    from runtime.store import PrepareOptions, prepare

    data, run = _trained_on_two_class_folders(setup, tmp_path)
    store = tmp_path / "store"
    prepare(data, store, PrepareOptions(size=32, raw=True, workers=1), progress=False)
    assert evaluate_checkpoint(str(run), data=str(store)).notes == [
        f"note: {store} is a store prepared from the data this run trained on ({data}): 12 of its images are "
        "training images, so this is no held-out error (leave --data out to score the run's held-out images)"]
    other = _class_folders(tmp_path / "others", ["cat", "dog"])
    prepare(other, tmp_path / "other-store", PrepareOptions(size=32, raw=True, workers=1), progress=False)
    assert evaluate_checkpoint(str(run), data=str(tmp_path / "other-store")).notes == []


def test_crops_bigger_than_every_image_are_refused_and_a_larger_image_size_is_not(setup, tmp_path):
    """Crops of 40 px from 32 px images were upscaled without a word (prepare refused the same);
    rescaling 32 px images to 36 for +-2 px shifts of 32 px crops is a recipe (README's 18pct row)."""
    spec, _ = setup
    folders = _class_folders(tmp_path / "small", ["cat", "dog"])
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(folders), "--out", str(tmp_path / "r"),
                                    "--quiet", "--set", "data.inputSize=3x40x40", "--set", "fc2.outputs=2"])
    assert (res.exit_code, res.output) == (1, f"{folders}: the images are at most 32 px but the net takes 40x40 "
                                              "crops (--set data.inputSize=3x40x40), which would upscale every one; "
                                              "train a "
                                              "net whose crops fit the images, or give images of at least 40 px\n")
    shifted = ["--set", "train.imageSize=36", "--set", "train.randomCrop=1", "--set", "fc2.outputs=2"]
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(folders), "--out", str(tmp_path / "r2"),
                                    "--quiet", "--epochs", "1", "--batch-size", "4", *shifted])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(folders), "--out", str(tmp_path / "r3"),
                                    "--quiet", "--set", "train.imageSize=20", "--set", "fc2.outputs=2"])
    assert (res.exit_code, res.output) == (1, f"{spec.with_name('tiny.params.cfg')}: [train] imageSize=20 is smaller "
                                              f"than the net's 32x32 crops (inputSize in {spec}); set imageSize=32 or "
                                              "more, or leave it out\n")
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(folders), "--out", str(tmp_path / "r4"),
                                    "--quiet", "--set", "train.crop=40", "--set", "fc2.outputs=2"])
    assert (res.exit_code, res.output) == (1, f"{folders}: the images are at most 32 px but the net takes 40x40 "
                                              "crops (--set train.crop=40), which would upscale every one; train a "
                                              "net whose crops fit the images, or give images of at least 40 px\n")


def test_missing_data_and_runs_say_what_to_pass(setup, tmp_path, monkeypatch):
    spec, data = setup
    monkeypatch.delenv("CONVSPEC_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(main, ["train", str(spec)])
    assert res.exit_code == 1 and res.output.startswith("error: no training data: pass --data PATH")
    res = runner.invoke(main, ["eval"])
    assert res.exit_code == 1 and "no trained run under runs/" in res.output
    res = runner.invoke(main, ["train", "--resume"])
    assert res.exit_code == 1 and "no trained run under runs/" in res.output
    # CONVSPEC_DATA supplies --data; a finished run refuses to resume without more epochs.
    monkeypatch.setenv("CONVSPEC_DATA", str(data))
    res = runner.invoke(main, ["train", str(spec), "--epochs", "1", "--quiet", "--out", "runs/a"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["train", "--resume"])
    assert res.exit_code == 1 and "the run has finished 1 epoch; pass --epochs N (more than 1)" in res.output
    # Under --nproc-per-node it is said once, before any rank starts (both ranks once read the data to say it).
    res = runner.invoke(main, ["train", "--resume", "--nproc-per-node", "2"])
    assert (res.exit_code, res.output) == (1, "runs/a: the run has finished 1 epoch; pass --epochs N (more than 1) "
                                              "to train further\n")
    res = runner.invoke(main, ["train", str(spec), "--out", "runs/a"])
    assert res.exit_code == 1 and "already holds a run; continue it with --resume" in res.output
    res = runner.invoke(main, ["train", "--resume", "--epochs", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert [json.loads(x)["epoch"] for x in Path("runs/a/metrics.jsonl").read_text().splitlines()] == [1, 2]
    # A folder whose only checkpoint is best.pt (the epoch files deleted to save space) is still the
    # newest run to eval, show and resume; it was passed over ("no trained run under runs/").
    for name in ("epoch-0001.pt", "epoch-0002.pt", "metrics.jsonl"):
        Path("runs/a", name).unlink(missing_ok=True)
    res = runner.invoke(main, ["eval"])
    assert res.exit_code == 0 and f"{Path('runs/a/best.pt')} on " in res.output, res.output
    res = runner.invoke(main, ["show", "--only", "curves"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["train", "--resume", "--epochs", "3", "--quiet"])
    assert res.exit_code == 0, res.output


def test_a_torch_file_from_elsewhere_and_a_file_as_run_folder_are_named(setup, tmp_path):
    spec, data = setup
    out = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(out), epochs=1))
    foreign = tmp_path / "resnet.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    not_ours = (f"{foreign}: not a convspec training checkpoint (a torch file from elsewhere?); give a run folder "
                "or one of the .pt files convspec train writes\n")
    for command in (["eval", "--checkpoint", str(foreign)], ["show", str(foreign), "--only", "curves"]):
        res = CliRunner().invoke(main, command)
        assert (res.exit_code, res.output) == (1, not_ours), command
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(tensor)])
    assert (res.exit_code, res.output) == (1, f"{tensor}: not a convspec checkpoint (it holds a Tensor, where "
                                              "convspec writes a dict); give a run folder or one of the .pt files "
                                              "convspec train writes\n")
    # A checkpoint rewritten without one of its entries was a KeyError, reported as a convspec bug (exit 3).
    for key in ("model", "spec"):
        cut = ckpt.load(out / "best.pt")
        del cut[key]
        torch.save(cut, tmp_path / f"no-{key}.pt")
        for command in (["eval", "--checkpoint", str(tmp_path / f"no-{key}.pt")],
                        ["show", str(tmp_path / f"no-{key}.pt"), "--only", "net"]):
            res = CliRunner().invoke(main, command)
            assert (res.exit_code, res.output) == (1, f"{tmp_path / f'no-{key}.pt'}: convspec checkpoint without its "
                                                      f"'{key}' entry (edited or rewritten by another program?); use "
                                                      "an older one from the same run\n"), command
    res = CliRunner().invoke(main, ["train", "--resume", "--out", str(out / "best.pt"), "--epochs", "2"])
    assert (res.exit_code, res.output) == (1, f"{out / 'best.pt'}: is a file; --resume continues a run folder from "
                                              f"its furthest checkpoint: --out {out}\n")


@pytest.mark.parametrize("args, expected", [
    (["prepare", "{data}", "{tmp}/store", "--raw", "--quality", "50"],
     "error: --quality sets the JPEG quality, and --raw stores no JPEG; drop one"),
    (["eval", "--labels", "{spec}"],
     "error: --labels names the classes of a flat folder given with --data; give --data PATH too"),
    (["eval", "--devices", ""],
     "error: --devices is empty; write e.g. cpu, cuda:0 or cuda:0,cuda:1, or leave it out for the default"),
    (["eval", "--checkpoint", "{tmp}/nope"], "{tmp}/nope: no such checkpoint or run folder; give a folder that "
                                             "convspec train wrote (runs/NAME) or one of its .pt files"),
])
def test_options_that_contradict_or_are_empty_are_refused(setup, tmp_path, args, expected):
    spec, data = setup
    args = [a.format(tmp=tmp_path, data=data, spec=spec) for a in args]
    res = CliRunner().invoke(main, args)
    assert (res.exit_code, res.output) == (1, expected.format(tmp=tmp_path) + "\n")
    assert not (tmp_path / "store").exists()


def test_out_may_hold_what_a_run_killed_early_left_and_nothing_else(setup, tmp_path):
    spec, data = setup
    killed = tmp_path / "killed"  # stopped while writing its first checkpoint
    train(_quiet(spec=str(spec), data=str(data), out=str(killed), epochs=1))
    for name in ("epoch-0001.pt", "best.pt", "metrics.jsonl"):
        (killed / name).unlink()
    (killed / f".epoch-0001.pt{files.PARTIAL}4242").write_bytes(b"PK\x03\x04cut")
    train(_quiet(spec=str(spec), data=str(data), out=str(killed), epochs=1))
    mine = tmp_path / "mine"  # a user's folder that happens to hold a spec.cfg
    mine.mkdir()
    (mine / "spec.cfg").write_text(SPEC)
    with pytest.raises(SpecError, match="is not empty and holds no convspec run"):
        train(_quiet(spec=str(spec), data=str(data), out=str(mine), epochs=1))
    models = tmp_path / "models"  # a user's folder of other .pt files is not a run to --resume
    models.mkdir()
    (models / "resnet50.pt").write_bytes(b"PK\x03\x04")
    with pytest.raises(SpecError) as err:
        train(_quiet(spec=str(spec), data=str(data), out=str(models), epochs=1))
    assert str(err.value) == (f"{models}: is not empty and holds no convspec run (it has resnet50.pt); "
                              "choose an empty or new --out")


def test_a_run_recorded_with_one_key_set_twice_still_loads(setup, tmp_path):
    """Before --set refused a key given twice, the last value was trained: such runs still open."""
    spec, data = setup
    out = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(out), epochs=1, overrides=["fc1.outputs=12"]))
    state = ckpt.load(out / "best.pt")
    state["spec"]["overrides"] = ["fc1.outputs=30", "fc1.outputs=12"]
    ckpt.save(out / "best.pt", state)
    assert convspec.load(out).fc1.weight.shape[0] == 12


def test_build_takes_one_override_as_a_string(setup):
    spec, _ = setup
    assert convspec.build(str(spec), overrides="fc1.outputs=12").fc1.weight.shape[0] == 12


def test_data_that_moved_or_an_unset_path_is_named_with_the_fix(setup, tmp_path, monkeypatch):
    spec, data = setup
    monkeypatch.setenv("CONVSPEC_DATA", str(tmp_path / "nope"))
    res = CliRunner().invoke(main, ["train", str(spec), "--out", str(tmp_path / "r0")])
    assert (res.exit_code, res.output) == (1, f"{tmp_path / 'nope'}: no such dataset path (from $CONVSPEC_DATA); "
                                              "set CONVSPEC_DATA to a dataset folder or pass --data PATH\n")
    monkeypatch.delenv("CONVSPEC_DATA")
    # A run started from another folder records the path as typed and its absolute form: eval still finds it.
    monkeypatch.chdir(tmp_path)
    train(_quiet(spec=str(spec), data="data", out="run", epochs=1))
    monkeypatch.chdir(tmp_path / "run")
    scored = evaluate_checkpoint(".", k=2).result
    assert scored.images == 48
    # Other data under the typed name here is not the run's: the recorded absolute path wins ...
    make_data(tmp_path / "run" / "data", seed=1)
    assert evaluate_checkpoint(".", k=2).result.top1_error == scored.top1_error
    moved = data.rename(tmp_path / "moved")
    # ... and once that is gone, the other data is refused, not scored with the run's held-out indices.
    res = CliRunner().invoke(main, ["eval", "--checkpoint", "."])
    assert (res.exit_code, res.output) == (1, f"data: is not the run's training data (that was {data}, which is "
                                              "gone; this folder's files differ); put it back to score the "
                                              "held-out images (--data PATH scores every image under PATH "
                                              "instead)\n")
    shutil.rmtree(tmp_path / "run" / "data")
    gone = "data: the run's training data is not there any more (moved or deleted?); "
    res = CliRunner().invoke(main, ["eval", "--checkpoint", "."])
    assert (res.exit_code, res.output) == (1, f"{gone}put it back to score the held-out images (--data PATH "
                                              "scores every image under PATH instead)\n")
    res = CliRunner().invoke(main, ["train", "--resume", "--out", ".", "--epochs", "2", "--quiet"])
    assert (res.exit_code, res.output) == (1, f"{gone}pass --data PATH where the same data is now\n")
    res = CliRunner().invoke(main, ["train", "--resume", "--out", ".", "--epochs", "2", "--quiet", "--data",
                                    str(moved)])
    assert res.exit_code == 0, res.output


def test_corrupt_checkpoint_is_named_and_older_ones_work(setup, tmp_path):
    spec, data = setup
    out = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(out), epochs=2, overrides=["train.valFraction=0"]))
    assert not (out / "best.pt").exists()  # no validation, no best
    last = out / "epoch-0002.pt"
    last.write_bytes(last.read_bytes()[:1000])
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--data", str(data)])
    assert res.exit_code == 1 and f"{last}: checkpoint is truncated or corrupted" in res.output
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out / "epoch-0001.pt"), "--data", str(data)])
    assert res.exit_code == 0 and "32 images" in res.output
    # Weights that no longer fit the spec recorded beside them: the message names the tensor.
    state = ckpt.load(out / "epoch-0001.pt")
    state["model"]["fc1.weight"] = torch.zeros(5, 7)
    ckpt.save(tmp_path / "edited.pt", state)
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path / "edited.pt"), "--data", str(data)])
    assert res.exit_code == 1 and res.output == (
        f"{tmp_path / 'edited.pt'}: weights do not fit the recorded spec (size mismatch for fc1.weight: copying a "
        "param with shape torch.Size([5, 7]) from checkpoint, the shape in current model is torch.Size([16, 392]).); "
        "the file was changed or is from another program\n")
    # NaN weights that fit: scored, they once gave a plausible error with no word.
    state = ckpt.load(out / "epoch-0001.pt")
    state["model"]["fc1.bias"][3] = float("nan")
    ckpt.save(tmp_path / "nan.pt", state)
    pictures = ["show", "--only", "preds", "--data", str(data), "--out", str(tmp_path / "p")]
    for command in (["eval", "--checkpoint"], pictures):
        res = CliRunner().invoke(main, [*command, str(tmp_path / "nan.pt")])
        assert res.exit_code == 1 and res.output == (
            f"{tmp_path / 'nan.pt'}: weight 'fc1.bias' holds NaN or inf, which training never saves; the file was "
            "changed: use another of the run's checkpoints\n"), res.output


def _with_gpus(spec_text: str, gpus: dict[str, str]) -> str:
    for layer, gpu in gpus.items():
        spec_text = spec_text.replace(f"[{layer}]\n", f"[{layer}]\ngpu={gpu}\n")
    return spec_text


def test_replicas_mean_data_parallel_and_mixing_with_towers_is_refused(setup, tmp_path):
    spec, data = setup
    layers = ("conv1", "pool1", "fc1", "drop", "fc2", "probs", "cost")
    replicated = tmp_path / "dp.cfg"
    replicated.write_text(_with_gpus(SPEC, {name: "0,1" for name in layers}))
    (tmp_path / "dp.params.cfg").write_text(PARAMS)
    lines = []
    train(TrainOptions(spec=str(replicated), data=str(data), out=str(tmp_path / "dp"), epochs=1, progress=False,
                       echo=lines.append))
    assert any("the spec lists 2 data-parallel replicas; this single process trains on the whole batch" in line
               and line.endswith("For 2 processes: convspec train ... --nproc-per-node 2") for line in lines)

    mixed = tmp_path / "mixed.cfg"
    mixed.write_text(_with_gpus(SPEC, {"conv1": "0,1", "fc1": "0", "cost": "0"}))
    (tmp_path / "mixed.params.cfg").write_text(PARAMS)
    res = CliRunner().invoke(main, ["train", str(mixed), "--data", str(data), "--out", str(tmp_path / "m"), "--quiet"])
    assert res.exit_code == 1
    assert ("mixes data-parallel replicas (layer 'conv1': gpu=0,1) with model-parallel placement "
            "(layer 'fc1': gpu=0)") in res.output


def _test_batch_as_class_folders(data: Path, folder: Path, count: int, side: int | None = None):
    """The first ``count`` images of the CIFAR test batch as PNGs in class folders (resized to ``side``)."""
    from PIL import Image

    images = cifar.load_cifar(data, "test")
    for k, (image, label) in enumerate(zip(images.images[:count], images.labels[:count])):
        (folder / images.classes[label]).mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image)
        (picture.resize((side, side)) if side else picture).save(folder / images.classes[label] / f"{k}.png")
    return images


def test_eval_data_maps_class_folders_through_the_runs_classes(setup, tmp_path):
    from PIL import Image

    spec, data = setup
    out = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(out), epochs=1))
    folder = tmp_path / "folder"
    images = _test_batch_as_class_folders(data, folder, 12)
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--data", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["images"] == 12
    # CIFAR batches name their classes in batches.meta: another order is other classes (it was accepted).
    renamed = tmp_path / "renamed"
    shutil.copytree(data, renamed)
    (renamed / "batches.meta").write_bytes(__import__("pickle").dumps(
        {b"label_names": [b"class1", b"class0", b"class2", b"class3"]}, protocol=2))
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--data", str(renamed)])
    assert (res.exit_code, res.output.strip()) == (1, (
        f"{renamed}: its classes (class1, class0, class2, class3) are not the run's (class0, class1, class2, class3); "
        "evaluate CIFAR batches of the classes the run was trained on"))
    # Same images, same answers as through the CIFAR batches (PNG is lossless).
    direct = evaluate_checkpoint(str(out), str(data), k=2)
    assert direct.result.images == 32
    whole = tmp_path / "whole-test-batch"
    _test_batch_as_class_folders(data, whole, 32)
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--data", str(whole), "--topk", "2", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert (got["images"], got["top1_error"], got["topk_error"]) == \
        (32, direct.result.top1_error, direct.result.topk_error)
    (folder / "class9").mkdir()
    Image.fromarray(images.images[0]).save(folder / "class9" / "x.png")
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--data", str(folder)])
    assert res.exit_code == 1
    assert f"{folder / 'class9'}: class folder 'class9' is not one of the 4 classes of the training data" in res.output


def test_a_store_of_one_split_or_some_classes_is_evaluated(setup, tmp_path):
    from runtime.store import PrepareOptions, prepare

    spec, data = setup
    out = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(out), epochs=1))
    folder = tmp_path / "folder"
    _test_batch_as_class_folders(data, folder, 10)
    store = tmp_path / "store"
    prepare(folder, store, PrepareOptions(size=32, raw=True, workers=1), progress=False)
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--data", str(store), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["images"] == 10
    # A store of some of the run's classes maps them by name, as the class folders do (it was refused).
    shutil.rmtree(folder / sorted(p.name for p in folder.iterdir())[0])
    some = tmp_path / "some"
    prepare(folder, some, PrepareOptions(size=32, raw=True, workers=1), progress=False)
    through_store = evaluate_checkpoint(str(out), str(some), k=2).result
    through_folder = evaluate_checkpoint(str(out), str(folder), k=2).result
    assert through_store.images == through_folder.images < 10
    assert (through_store.top1_error, through_store.topk_error) == (through_folder.top1_error,
                                                                    through_folder.topk_error)
    (folder / "zebra").mkdir()
    shutil.copy(next((folder / sorted(p.name for p in folder.iterdir())[0]).iterdir()), folder / "zebra" / "x.png")
    other = tmp_path / "other"
    prepare(folder, other, PrepareOptions(size=32, raw=True, workers=1), progress=False)
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--data", str(other)])
    assert (res.exit_code, res.output.strip()) == (1, f"{other}: class 'zebra' of the store is not one of the 4 "
                                                      "classes of the training data")


def test_a_store_of_cifar_batches_is_scored_on_its_test_split(setup, tmp_path):
    """A store prepared from CIFAR batches holds 'train' and 'test' splits.  eval --data STORE and
    --val-data STORE read its train split (the images the net was trained on) and said nothing."""
    from runtime.store import PrepareOptions, prepare

    spec, data = setup  # 192 training images in five batches, 32 in test_batch
    store = tmp_path / "store"
    prepare(data, store, PrepareOptions(size=32, raw=True, workers=1), progress=False)
    out = tmp_path / "run"
    lines = []
    train(TrainOptions(progress=False, echo=lines.append, spec=str(spec), data=str(store), val_data=str(store),
                       out=str(out), epochs=1))
    assert "192 training images, 32 validation images" in lines[0]
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--data", str(store)])
    assert res.exit_code == 0, res.output
    assert f"on {store} (its test split): 32 images" in res.output
    through_store = evaluate_checkpoint(str(out), str(store), k=2).result
    through_batches = evaluate_checkpoint(str(out), str(data), k=2).result  # CIFAR batches: test_batch
    assert (through_store.images, through_store.top1_error) == (through_batches.images, through_batches.top1_error)
    assert evaluate_checkpoint(str(out), k=2).result.images == 32  # the run's validation data: the split it read
    # A run from before the split was recorded validated on the store's train split, and its indices say so:
    # it still scores those images (reading the test split with them ran past its end).
    old = ckpt.load(out / "best.pt")
    del old["data"]["val_split"]
    old["data"]["val_indices"] = torch.arange(192)
    torch.save(old, tmp_path / "old.pt")
    assert evaluate_checkpoint(str(tmp_path / "old.pt"), k=2).result.images == 192
    # --val-data that is the training data and holds no other images would score the training images: refused.
    one_split = tmp_path / "one-split"
    _test_batch_as_class_folders(data, tmp_path / "folders", 10)
    prepare(tmp_path / "folders", one_split, PrepareOptions(size=32, raw=True, workers=1), progress=False)
    for same in (one_split, tmp_path / "folders"):
        with pytest.raises(SpecError) as err:
            train(_quiet(spec=str(spec), data=str(same), val_data=str(same), out=str(tmp_path / "same"), epochs=1))
        assert str(err.value) == (f"{same}: is the training data itself, and it holds no separate validation "
                                  "images: validation would score the images the net trains on; leave --val-data "
                                  "out (valFraction holds some out) or give other images")


def test_a_store_of_another_size_is_named_with_the_fix(setup, tmp_path):
    """A store has one size; the mean image and crops need the run's.  eval on a 40 px store
    crashed (numpy broadcasting), and too-small training images said so without file or fix."""
    from runtime.store import PrepareOptions, prepare

    spec, data = setup
    out = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(out), epochs=1))
    folder = tmp_path / "folder"
    _test_batch_as_class_folders(data, folder, 12, side=48)
    for size in (16, 40):
        prepare(folder, tmp_path / f"s{size}", PrepareOptions(size=size, raw=True, workers=1), progress=False)
    for size in (16, 40):
        res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--data", str(tmp_path / f"s{size}")])
        assert (res.exit_code, res.output.strip()) == (1, (
            f"{tmp_path / f's{size}'}: holds {size}x{size} images but the run's images were 32x32; give a store "
            "prepared with --size 32, or the image folder (eval rescales it)"))
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out), "--data", str(folder)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(tmp_path / "s16"), "--out", str(tmp_path / "r")])
    assert (res.exit_code, res.output.strip()) == (1, (
        f"{tmp_path / 's16'}: holds 16x16 images but the net takes 32x32 crops (inputSize in {spec}); train a "
        "net whose crops fit the images, or prepare images of at least 32 px with --size 32 or more"))
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--val-data", str(tmp_path / "s40"),
                                    "--out", str(tmp_path / "r2")])
    assert (res.exit_code, res.output.strip().splitlines()[-1]) == (1, (
        f"{tmp_path / 's40'}: holds 40x40 images but the training images are 32x32; prepare both at one --size, "
        "or give the image folder (it is rescaled)"))


def test_training_on_a_flat_folder_says_what_training_needs(setup, tmp_path):
    from PIL import Image

    spec, _ = setup
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (32, 32)).save(flat / "a.png")
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(flat), "--out", str(tmp_path / "r")])
    assert res.exit_code == 1
    assert res.output.strip() == (f"{flat}: is a flat folder of images; training needs one sub-folder per "
                                  "class (or a store from convspec prepare)")


def test_an_auxiliary_cost_trains_its_branch_and_the_first_cost_is_reported(setup, tmp_path):
    """cuda-convnet minimises every cost layer's coeff * cost: a classifier hung off pool1 with
    its own cost must learn the colours too (with that cost dropped it ended 56% wrong), while
    the metrics stay the main cost's, exactly as eval recomputes them."""
    spec, data = setup
    aux = ("[aux]\ntype=fc\ninputs=pool1\noutputs=4\ninitW=0.01\n[auxprobs]\ntype=softmax\ninputs=aux\n"
           "[auxcost]\ntype=cost.logreg\ninputs=labels,auxprobs\ncoeff=0.5\n")
    spec.write_text(SPEC + aux)
    spec.with_suffix(".params.cfg").write_text(PARAMS.replace(
        "[train]", "[aux]\nepsW=0.001\nepsB=0.02\nmomW=0.9\nmomB=0.9\nwc=0.004\n[train]"))
    out = tmp_path / "run"
    summary = train(_quiet(spec=str(spec), data=str(data), out=str(out)))
    state = ckpt.load(summary.last_checkpoint)
    net = net_from_checkpoint(state)
    test = cifar.load_cifar(data, "test")
    x = torch.from_numpy(test.images.astype(np.float32) - net.mean).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        got = net(x, outputs=["aux", "fc2"])
    labels = torch.from_numpy(test.labels)
    assert (got["aux"].argmax(1) != labels).float().mean().item() < 0.25
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert evaluate_checkpoint(str(summary.last_checkpoint)).result.top1_error == record["val_top1_error"]
    # Both heads are too narrow for the data: both are named, before any step.
    with pytest.raises(SpecError) as err:
        train(_quiet(spec=str(spec), data=str(data), out=str(tmp_path / "narrow"),
                     overrides=["fc2.outputs=3", "aux.outputs=3"]))
    assert str(err.value) == (f"{spec}: the net ends in 3 outputs (layer 'fc2') but the data has 4 classes; set "
                              "outputs=4 on 'fc2' and 'aux' (e.g. --set fc2.outputs=4 --set aux.outputs=4)")


def test_channels_last_trains_a_net_with_local_layers(setup, tmp_path):
    """A local layer's unshared filters are 5-D, which ``Module.to(memory_format=
    channels_last)`` refuses: the default layout must still train such a net (the
    11pct spec) and land where NCHW does."""
    spec, data = setup
    local = ("[local1]\ntype=local\ninputs=pool1\nfilters=4\nfilterSize=3\npadding=1\nstride=1\n"
             "neuron=relu\ninitW=0.05\n[fc1]\ntype=fc\ninputs=local1\n")
    spec.write_text(SPEC.replace("[fc1]\ntype=fc\ninputs=pool1\n", local))
    params = spec.with_suffix(".params.cfg")
    params.write_text(PARAMS.replace("[fc1]", "[local1]\nepsW=0.01\nepsB=0.02\nmomW=0.9\nmomB=0.9\nwc=0.004\n[fc1]"))
    common = dict(spec=str(spec), data=str(data), epochs=1, overrides=["drop.enable=0"])
    plain = train(_quiet(out=str(tmp_path / "plain"), **common))
    nhwc = train(_quiet(out=str(tmp_path / "nhwc"), channels_last=True, **common))
    a, b = _weights(plain.last_checkpoint), _weights(nhwc.last_checkpoint)
    assert a["local1.weight"].dim() == 5
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5, msg=key)
    result = evaluate_checkpoint(str(nhwc.last_checkpoint), progress=False).result
    assert 0 <= result.top1_error <= 1


@pytest.mark.parametrize("option", ["channels_last", "compile"])
def test_channels_last_and_compile_train_the_same_net(setup, tmp_path, option):
    """Both change how the net runs, not what it computes: one epoch (9 steps) lands on the
    eager NCHW run's weights up to float rounding, and the run records the option.  Dropout
    is switched off: compiled code draws its masks from another generator."""
    spec, data = setup
    common = dict(spec=str(spec), data=str(data), epochs=1, overrides=["drop.enable=0"])
    plain = train(_quiet(out=str(tmp_path / "plain"), **common))
    other = train(_quiet(out=str(tmp_path / option), **common, **{option: True}))
    a, b = _weights(plain.last_checkpoint), _weights(other.last_checkpoint)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5, msg=key)
    assert ckpt.load(other.last_checkpoint)["options"][option] is True
    assert json.loads((tmp_path / option / "run.json").read_text())[option] is True


def test_the_recipe_sets_precision_and_the_option_overrides_it(setup, tmp_path):
    """[train] precision=bf16 trains under autocast without --precision; a typed --precision wins; a
    resumed bf16 run stays bf16 without the option."""
    spec, data = setup
    cases = {"recipe": (["--set", "train.precision=bf16"], "bf16"),
             "typed": (["--set", "train.precision=bf16", "--precision", "fp32"], "fp32"),
             "default": ([], "fp32")}
    for name, (extra, expected) in cases.items():
        out = tmp_path / name
        res = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(out), "--quiet",
                                        "--epochs", "1", *extra])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "run.json").read_text())["precision"] == expected, name
    res = CliRunner().invoke(main, ["train", "--resume", "--out", str(tmp_path / "recipe"), "--epochs", "2",
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    assert ckpt.load(tmp_path / "recipe" / "epoch-0002.pt")["options"]["precision"] == "bf16"


def test_an_out_that_is_a_dangling_link_is_named_as_one(setup, tmp_path):
    """mkdir on a link to nothing says "File exists", which sent users looking for a folder."""
    out = tmp_path / "run"
    out.symlink_to(tmp_path / "gone")
    spec, data = setup
    result = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(out), "--quiet"])
    assert result.exit_code == 1 and result.output == (
        f"error: {out}: a link to {tmp_path / 'gone'}, which does not exist; remove the link, or make the folder "
        "it points to\n")


def test_resume_refuses_options_that_would_change_the_run(setup, tmp_path):
    """A resumed run trains what it recorded.  Retyping the first command with --resume passes; an
    option that would change the run (an ablation by --set, another SPEC) is refused, not dropped."""
    spec, data = setup
    out = tmp_path / "run"
    first = ["train", str(spec), "--data", str(data), "--out", str(out), "--quiet", "--set", "fc1.outputs=12",
             "--set", "train.flip=0"]
    assert CliRunner().invoke(main, first + ["--epochs", "1"]).exit_code == 0
    other = tmp_path / "other.cfg"
    other.write_text(SPEC.replace("outputs=16", "outputs=8"))

    def refused(*args):
        res = CliRunner().invoke(main, ["train", "--resume", "--out", str(out), "--epochs", "2", *args])
        assert res.exit_code == 1, res.output
        return res.output.strip()

    keeps = (f"{out}: a resumed run keeps the settings it recorded, and these differ: {{}}; drop them to continue "
             "the run, or train a new run with another --out")
    assert refused(str(other)) == keeps.format(f"SPEC {other} (the run's is {spec})")
    assert refused("--set", "fc1.outputs=20", "--seed", "3") == keeps.format(
        "--set fc1.outputs=20 (the run's: --set fc1.outputs=12 --set train.flip=0); --seed 3 (the run's: 0)")
    assert refused("--precision", "bf16", "--no-channels-last") == keeps.format(
        "--precision bf16 (the run's: fp32); --no-channels-last (the run's: channels_last)")
    assert refused("--train-limit", "50") == keeps.format("--train-limit 50 (the run's: none)")
    assert [p.name for p in out.glob("epoch-*.pt")] == ["epoch-0001.pt"]  # nothing trained, nothing lost
    original = spec.read_text()
    spec.write_text(original.replace("outputs=16", "outputs=14"))  # the same file, edited since
    assert refused(str(spec)) == keeps.format(f"SPEC {spec} (edited since the run started, which keeps its copy "
                                              "in the run folder)")
    spec.write_text(original)
    params = spec.with_name("tiny.params.cfg")  # found beside SPEC, not named by --params
    params.write_text(PARAMS.replace("epsW=0.01", "epsW=0.05"))  # an ablation of the rates
    assert refused(str(spec)) == keeps.format(f"the params file {params} (edited since the run started, which "
                                              "keeps its copy in the run folder)")
    params.write_text(PARAMS)

    # The same edits typed in another order, a key in another case: the same run (was refused).
    retyped = first[:-4] + ["--set", "train.FLIP=0", "--set", "fc1.outputs=12"]
    res = CliRunner().invoke(main, retyped + ["--epochs", "2", "--resume"])
    assert res.exit_code == 0, res.output
    assert not res.output.startswith("note:")
    # 4 classes: the closing line names the top-k it measured, as the epoch lines do
    done = res.output.splitlines()[-1]
    assert done.startswith(f"done: {out}  val top-1 ") and " top-4 " in done


_HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from runtime import runs
runs.lock_run(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_run_folder_another_process_trains_in_is_refused_and_freed_when_it_dies(setup, tmp_path):
    """A second terminal's --resume picked the live run (the newest) and both trained into one
    folder; a new run with its --out rewrote the live run's run.json."""
    import socket

    spec, data = setup
    run = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(run), epochs=1))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_THE_LOCK, str(run)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "locked\n"
        busy = (f"{run}: another convspec train is training in this run folder (pid {holder.pid} on "
                f"{socket.gethostname()}); wait for it to end or stop it, or choose another --out")
        for options in (dict(resume=True, out=str(run), epochs=2), dict(spec=str(spec), data=str(data), out=str(run))):
            with pytest.raises(SpecError) as err:
                train(_quiet(**options))
            assert str(err.value) == busy
        with pytest.raises(SpecError) as err:  # taken while this one read its data: refused under the lock too
            runs.lock_run(run)
        assert str(err.value) == busy
    finally:
        holder.kill()
        holder.wait()
    # Killed, it held nothing: the lock file left behind stops no one.
    assert (run / ".lock").is_file()
    assert train(_quiet(resume=True, out=str(run), epochs=2)).epochs == 2


_LOCK_THEN_EXIT_LEAVING_A_CHILD = """
import os, sys, time
from pathlib import Path
from runtime import runs
runs.lock_run(Path(sys.argv[1]))
child = os.fork()
if child == 0:  # a DataLoader worker: it inherits the locked descriptor and outlives its parent a while
    time.sleep(600)
else:
    print(os.getpid(), child, flush=True)
    os._exit(0)
"""


@pytest.mark.parametrize("ending", ["\r\n", "\r"], ids=["windows", "old-mac"])
def test_a_spec_saved_with_other_line_ends_resumes_with_the_first_command_retyped(setup, tmp_path, ending):
    """A Windows-saved spec was refused as "edited since the run started" by its own resume:
    the run records the text as parsed (LF), and the file was compared as read (CRLF)."""
    spec, data = setup
    for path in (spec, tmp_path / "tiny.params.cfg"):
        path.write_bytes(path.read_bytes().replace(b"\n", ending.encode()))
    first = ["train", str(spec), "--data", str(data), "--out", str(tmp_path / "run"), "--quiet"]
    assert CliRunner().invoke(main, first + ["--epochs", "1"]).exit_code == 0
    res = CliRunner().invoke(main, first + ["--epochs", "2", "--resume"])
    assert res.exit_code == 0, res.output
    (tmp_path / "tiny.params.cfg").write_bytes(PARAMS.replace("epsW=0.01", "epsW=0.05").encode())
    res = CliRunner().invoke(main, first + ["--epochs", "3", "--resume"])  # a real edit is still one
    assert res.exit_code == 1 and "the params file" in res.output and "edited since the run started" in res.output


def test_a_lock_held_on_by_a_dead_trains_workers_says_to_retry(setup, tmp_path):
    """A train killed with --workers 2: its workers held the lock a few seconds more, and the
    refusal named the dead train's pid as "another convspec train is training"."""
    import signal
    import socket

    run = tmp_path / "run"
    run.mkdir()
    parent = subprocess.Popen([sys.executable, "-c", _LOCK_THEN_EXIT_LEAVING_A_CHILD, str(run)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    pid, worker = map(int, parent.stdout.readline().split())
    parent.wait()
    try:
        with pytest.raises(SpecError) as err:
            runs.lock_run(run)
        assert str(err.value) == (f"{run}: the convspec train that held this run folder (pid {pid} on "
                                  f"{socket.gethostname()}) has exited, but processes it started (data-loading "
                                  "workers) still hold it; retry in a few seconds")
    finally:
        os.kill(worker, signal.SIGKILL)
    deadline = time.time() + 10
    while True:  # the worker gone, the folder is free
        try:
            os.close(runs.lock_run(run))
            break
        except SpecError:
            assert time.time() < deadline
            time.sleep(0.1)


def test_a_full_disk_at_the_run_files_names_the_file_and_a_rerun_goes_ahead(setup, tmp_path, monkeypatch):
    """The error was "[Errno 28] No space left on device" alone (a failed write names no file)."""
    import errno

    spec, data = setup
    run = tmp_path / "run"
    real_open = open

    class FullDisk:
        def __init__(self, path, *args, **kw):
            self.file = real_open(path, *args, **kw)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("runtime.files.open", FullDisk, raising=False)
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(run), "--quiet"])
    assert (res.exit_code, res.output) == (1, f"error: {run / 'run.json'}: No space left on device; check the "
                                              "path, its permissions and the free disk space\n")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # no half-written or temporary file
    monkeypatch.undo()
    assert train(_quiet(spec=str(spec), data=str(data), out=str(run), epochs=1)).epochs == 1


def test_a_resume_with_another_length_says_the_schedules_move(setup, tmp_path):
    """conv1's epsW is exp[...] over training's progress: --epochs on a resume re-times it."""
    spec, data = setup
    run = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(run), epochs=1))
    res = CliRunner().invoke(main, ["train", "--resume", "--out", str(run), "--epochs", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[1] == ("note: the run now lasts 2 epochs, not 1: the learning rates that follow "
                                          "training's progress (conv1) are re-timed to the new length")


@pytest.mark.parametrize("layout, message", [
    ("train/cat", "{root}: has a train/ folder but no val/ folder; give {root}/train to score every image in it, or "
                  "add val/ with one folder per class"),
    ("train/cat val", "{root}/val: has no class sub-folders; put the images in one folder per class (or remove the "
                      "empty folder)"),
    ("data_batch_1", "{root}: holds CIFAR-10 batches but no batches.meta (the class names); download the python "
                     "version again"),
])
def test_a_split_that_is_not_there_says_what_to_give_instead(tmp_path, layout, message):
    from runtime.loader import open_source

    root = tmp_path / "data"
    root.mkdir()
    for name in layout.split():
        if "batch" in name:
            (root / name).write_bytes(b"")
        else:
            (root / name).mkdir(parents=True)
    with pytest.raises(SpecError) as err:
        open_source(root, "val", classes=["cat", "dog"], stats=False, in_memory=False)
    assert str(err.value) == message.format(root=root)


def test_an_archive_given_as_data_says_to_extract_it(tmp_path):
    from runtime.sources import detect

    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"")
    with pytest.raises(SpecError) as err:
        detect(archive)
    # Worded for every command that reads data (prepare's SRC has no --data option).
    assert str(err.value) == (f"{archive}: is a file; give a folder (a prepared store, CIFAR batches or class "
                              "folders); extract it (tar xzf cifar-10-python.tar.gz) and give the folder it makes")


def test_a_resume_whose_run_went_on_meanwhile_is_refused_under_the_lock(setup, tmp_path, monkeypatch):
    """Two --resume of one run both read epoch 1; the first trained on and let go of the lock
    while the second read its data, which then wrote over the first's epochs."""
    spec, data = setup
    run = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(run), epochs=1))
    real_lock = runs.lock_run

    def the_other_resume_trained_first(run_dir):
        checkpoint = run / "epoch-0001.pt"
        os.utime(checkpoint, ns=(checkpoint.stat().st_atime_ns, checkpoint.stat().st_mtime_ns + 10**9))
        return real_lock(run_dir)

    monkeypatch.setattr(runs, "lock_run", the_other_resume_trained_first)
    with pytest.raises(SpecError) as err:
        train(_quiet(resume=True, out=str(run), epochs=2))
    assert str(err.value) == (f"{run}: the run went on while this --resume read its data (it now ends at "
                              "epoch-0001.pt); --resume again to continue from there")
    monkeypatch.undo()
    assert train(_quiet(resume=True, out=str(run), epochs=2)).epochs == 2


def test_two_runs_that_chose_the_same_default_folder_get_two(tmp_path):
    taken = runs.new_run_dir("specs/x.cfg", tmp_path)
    assert runs.claim_new_run_dir(taken) == taken and taken.is_dir()
    assert runs.claim_new_run_dir(taken) == taken.with_name(taken.name + "-2")


def test_resume_refuses_a_checkpoint_from_another_run(setup, tmp_path):
    """A checkpoint copied into a run folder from a run of another spec is not adopted (it used to be,
    and the folder's spec.cfg, metrics and best.pt were rewritten as the other run's)."""
    spec, data = setup
    other_spec = tmp_path / "other.cfg"
    other_spec.write_text(SPEC.replace("outputs=16", "outputs=8"))
    (tmp_path / "other.params.cfg").write_text(PARAMS)
    run, other = tmp_path / "run", tmp_path / "other"
    train(_quiet(spec=str(spec), data=str(data), out=str(run), epochs=1))
    train(_quiet(spec=str(other_spec), data=str(data), out=str(other), epochs=2))
    (run / "epoch-0002.pt").write_bytes((other / "epoch-0002.pt").read_bytes())
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(SpecError) as err:
        train(_quiet(out=str(run), resume=True, epochs=3))
    refused = (f"{run / 'epoch-0002.pt'}: was trained from another spec, params file or --set than this run "
               f"folder's (copied in from another run?); move it out of {run} and --resume again")
    assert str(err.value) == refused
    assert (run / "metrics.jsonl").read_text() == metrics and (run / "spec.cfg").read_text() == SPEC
    # The same spec trained with another --set (the usual ablation) is another run too.
    ablation = tmp_path / "ablation"
    train(_quiet(spec=str(spec), data=str(data), out=str(ablation), epochs=2, overrides=["fc1.outputs=12"]))
    (run / "epoch-0002.pt").write_bytes((ablation / "epoch-0002.pt").read_bytes())
    with pytest.raises(SpecError) as err:
        train(_quiet(out=str(run), resume=True, epochs=3))
    assert str(err.value) == refused


def test_a_signal_during_validation_stops_after_that_epoch(setup, tmp_path, monkeypatch):
    """Ctrl-C while validating: the epoch's checkpoint is written and training stops there
    (it used to train a batch of the next epoch first), and --resume goes on from it."""
    from runtime.train import Trainer, TrainingStopped

    spec, data = setup
    validate = Trainer.validate

    def interrupted_validation(self):
        if not getattr(self, "_signalled", False):
            self._signalled = True
            self._on_signal(signal.SIGINT, None)
        return validate(self)

    monkeypatch.setattr(Trainer, "validate", interrupted_validation)
    out = tmp_path / "my run"  # the command to paste quotes it
    with pytest.raises(TrainingStopped) as stop:
        train(_quiet(spec=str(spec), data=str(data), out=str(out)))
    assert str(stop.value) == (f"SIGINT: stopped after epoch 1; saved {out / 'epoch-0001.pt'}. "
                               f"Continue with: convspec train --resume --out '{out}'")
    assert stop.value.exit_code == 130 and not (out / "interrupted.pt").exists()
    monkeypatch.setattr(Trainer, "validate", validate)
    summary = train(_quiet(resume=True, out=str(out)))
    assert [h["epoch"] for h in summary.history] == [1, 2, 3]


def test_a_second_ctrl_c_stops_at_once_and_says_where_the_run_goes_on_from(setup, tmp_path, monkeypatch):
    """It said only "nothing new was saved", though epoch 1's checkpoint was there to resume from."""
    from runtime.train import Trainer

    spec, data = setup
    validate = Trainer.validate

    def ctrl_c_twice_in_epoch_2(self):
        if self.step > len(self.batches):
            self._on_signal(signal.SIGINT, None)
            self._on_signal(signal.SIGINT, None)
        return validate(self)

    monkeypatch.setattr(Trainer, "validate", ctrl_c_twice_in_epoch_2)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(out), "--quiet"])
    assert res.exit_code == 130
    assert res.output.splitlines()[-1] == ("SIGINT again: stopped at once, without saving. Continue from "
                                           f"epoch-0001.pt with: convspec train --resume --out {out}")
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "epoch-0001.pt"]


def test_a_wrong_synsets_file_is_refused_before_the_images_are_read(setup, tmp_path, monkeypatch):
    """It was refused only after every image was read: 10-20 s on CIFAR-10, minutes on ImageNet."""
    from PIL import Image

    import runtime.train

    spec, _ = setup
    for name in ("cat", "dog"):
        (tmp_path / "folders" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "folders" / name / "a.png")
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("n01440764 tench\n")
    monkeypatch.setattr(runtime.train, "open_source", lambda *a, **k: pytest.fail("read the images first"))
    with pytest.raises(SpecError) as err:
        train(_quiet(spec=str(spec), data=str(tmp_path / "folders"), out=str(tmp_path / "run"), synsets=str(wrong)))
    assert str(err.value) == (f"{wrong}: names none of the 2 classes (e.g. cat); give the synsets file of this "
                              "data (lines of 'CLASS name'), or leave --synsets out")


def test_a_run_folder_given_as_data_is_named_as_one(setup, tmp_path):
    """eval --data RUN said "class folder 'show' is not one of the 4 classes"."""
    spec, data = setup
    out = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(out), epochs=1))
    (out / "show").mkdir()
    for command in (["eval", "--checkpoint", str(out), "--data", str(out)], ["train", str(spec), "--data", str(out)]):
        res = CliRunner().invoke(main, command)
        assert (res.exit_code, res.output) == (1, f"{out}: is a run folder (what convspec train writes), not data; "
                                                  "give it to eval or show as the run (eval --checkpoint RUN), and "
                                                  "give --data a folder of images\n")


def test_run_json_keeps_the_command_that_started_the_run(setup, tmp_path, monkeypatch):
    """A resume rewrote run.json's argv with its own command: how the run began was lost."""
    spec, data = setup
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["convspec", "train", "first"])
    train(_quiet(spec=str(spec), data=str(data), out=str(out), epochs=1))
    for epochs in (2, 3):
        monkeypatch.setattr(sys, "argv", ["convspec", "train", "--resume", str(epochs)])
        train(_quiet(resume=True, out=str(out), epochs=epochs))
    info = json.loads((out / "run.json").read_text())
    assert info["argv"] == ["convspec", "train", "first"]
    assert info["resumed_with"] == [["convspec", "train", "--resume", "2"], ["convspec", "train", "--resume", "3"]]


def test_eval_on_the_folder_of_runs_names_the_newest_run(setup, tmp_path):
    """eval --checkpoint runs said "holds no checkpoint", though it holds runs that do."""
    spec, data = setup
    train(_quiet(spec=str(spec), data=str(data), out=str(tmp_path / "runs" / "a"), epochs=1))
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path / "runs")])
    assert (res.exit_code, res.output) == (1, f"{tmp_path / 'runs'}: holds run folders, not a checkpoint; give one "
                                              f"of them (the newest is {tmp_path / 'runs' / 'a'})\n")


def test_resume_from_a_damaged_checkpoint_says_how_to_use_the_one_before(setup, tmp_path):
    spec, data = setup
    out = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(out), epochs=2))
    last = out / "epoch-0002.pt"
    last.write_bytes(last.read_bytes()[:1000])
    res = CliRunner().invoke(main, ["train", "--resume", "--out", str(out), "--epochs", "3", "--quiet"])
    assert (res.exit_code, res.output) == (1, f"{last}: checkpoint is truncated or corrupted (not a complete torch "
                                              "zip file); to resume from epoch-0001.pt instead, move epoch-0002.pt "
                                              "out of the run folder and --resume again\n")
    last.rename(tmp_path / "damaged.pt")
    summary = train(_quiet(resume=True, out=str(out), epochs=3))
    assert [h["epoch"] for h in summary.history] == [1, 2, 3]


def test_resume_takes_the_furthest_checkpoint_by_what_it_records(setup, tmp_path):
    """--resume picks by the epoch and batch inside the files, not their names or times; a hand-edited
    spec.cfg is blamed, not the checkpoints; best.pt alone is enough; run.json is for people."""
    spec, data = setup
    run = tmp_path / "run"
    train(_quiet(spec=str(spec), data=str(data), out=str(run), epochs=2))

    def copy(name):
        return Path(shutil.copytree(run, tmp_path / name))

    def resume(folder):
        said: list[str] = []
        train(TrainOptions(progress=False, echo=said.append, out=str(folder), resume=True, epochs=3))
        return said

    # A stale interrupted.pt (here epoch 1's state, copied last so it is the newest file) is not taken.
    stale = copy("stale")
    shutil.copy(stale / "epoch-0001.pt", stale / "interrupted.pt")
    before = (stale / "epoch-0002.pt").read_bytes()
    info = json.loads((stale / "run.json").read_text())
    (stale / "run.json").write_text(json.dumps({**info, "overrides": None}))  # edited out of shape: ignored
    assert any("resuming at epoch 3, batch 1" in line for line in resume(stale))
    assert (stale / "epoch-0002.pt").read_bytes() == before

    # spec.cfg edited by hand: every checkpoint agrees with the others, so the file is named.
    edited = copy("edited")
    (edited / "spec.cfg").write_text(SPEC.replace("outputs=16", "outputs=12"))
    with pytest.raises(SpecError) as err:
        resume(edited)
    assert str(err.value) == (f"{edited / 'spec.cfg'}: differs from what every checkpoint of this run was trained "
                              "from (edited by hand?); restore it, or delete it and --resume again (the resume "
                              "writes it anew from the checkpoint)")
    (edited / "spec.cfg").unlink()
    resume(edited)
    assert (edited / "spec.cfg").read_text() == SPEC

    # Only best.pt left: it is resumed from, and the run says so.
    best_only = copy("best-only")
    for p in best_only.glob("epoch-*.pt"):
        p.unlink()
    best_epoch = ckpt.load(best_only / "best.pt")["epoch"]
    said = resume(best_only)
    assert said[0] == f"note: resuming from best.pt (epoch {best_epoch}), the furthest checkpoint left in {best_only}"
    assert [json.loads(line)["epoch"] for line in (best_only / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # No checkpoint at all, after epochs finished: not "stopped before its first epoch".
    bare = copy("bare")
    for p in bare.glob("*.pt"):
        p.unlink()
    with pytest.raises(SpecError) as err:
        resume(bare)
    assert str(err.value) == (f"{bare}: has no checkpoint to resume from (no epoch-*.pt, interrupted.pt or best.pt; "
                              "deleted?); train again with another --out")


def test_epoch_ten_thousand_sorts_after_epoch_9999(tmp_path):
    """Names sort epoch-10000.pt before epoch-9999.pt: pruning by name deleted the checkpoint just written."""
    from runtime import runs

    for n in (9998, 9999, 10000):
        (tmp_path / ckpt.epoch_name(n)).touch()
    (tmp_path / "epoch-best.pt").touch()  # not an epoch file
    assert [p.name for p in ckpt.epoch_files(tmp_path)] == ["epoch-9998.pt", "epoch-9999.pt", "epoch-10000.pt"]
    assert runs.resume_checkpoint(tmp_path).name == "epoch-10000.pt"  # unreadable files: by the number in the name
    assert [p.name for p in ckpt.prune(tmp_path, 2)] == ["epoch-9998.pt"]
