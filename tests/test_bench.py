"""`convspec bench`: per-layer forward/backward times (runtime/layer_times.py).

Times themselves are not asserted (no timed tests); what is checked is that
the rows are the executor's steps, that time is attributed to the right row
(a layer slowed by a known sleep, forward and backward separately, carries it
and no other row does), and the command's output and errors."""

import contextlib
import json
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from convspec.builder import build
from convspec.check import check, check_paths
from convspec.cli import main
from convspec.parse import parse_text
from runtime.distributed import usable_cpus
from runtime.layer_times import BenchResult, as_text, bench

from conftest import REFERENCE_SPECS, ROOT

CIFAR = str(ROOT / "specs" / "cifar10-80sec.cfg")
# Long enough that no real layer of the small net comes near it even on a loaded
# 2-core machine (conv3's backward once took 94 ms there, at 0.05 s this test failed).
SLEEP_S = 0.3

TWO_TOWERS = """[data]
type=data
inputSize=3x16x16
[labels]
type=data
dataIdx=1
[conv1a]
type=conv
inputs=data
filters=8
filterSize=3
padding=1
neuron=relu
gpu=0
[conv1b]
type=conv
inputs=data
filters=8
filterSize=3
padding=1
neuron=relu
gpu=1
[pool1a]
type=pool
pool=max
inputs=conv1a
sizeX=3
stride=2
gpu=0
[pool1b]
type=pool
pool=max
inputs=conv1b
sizeX=3
stride=2
gpu=1
[fc10]
type=fc
inputs=pool1a,pool1b
outputs=10
gpu=0
[probs]
type=softmax
inputs=fc10
[logprob]
type=cost.logreg
inputs=labels,probs
"""


def cifar_net():
    torch.manual_seed(0)
    return build(check_paths(CIFAR), devices=["cpu"])


class _SleepInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(SLEEP_S)
        return grad


def slow_down(module):
    """Make ``module`` take at least SLEEP_S longer in forward and in backward."""
    original = module.forward

    def forward(inputs):
        time.sleep(SLEEP_S)
        return _SleepInBackward.apply(original(inputs))

    module.forward = forward


def test_rows_are_the_executors_steps_then_the_loss():
    net = cifar_net()
    result = bench(net, batch=4, iterations=2, warmup=0, progress=False)
    names = [row.name for row in result.layers]
    assert names == ["conv1", "pool1", "conv2", "pool2", "conv3", "pool3", "fc64", "fc10", "loss"]
    assert [row.shape for row in result.layers[:3]] == [(32, 32, 32), (32, 16, 16), (32, 16, 16)]
    assert all(row.forward_ms > 0 and row.backward_ms > 0 for row in result.layers)
    assert result.update_ms is not None and result.update_ms > 0  # the params file gives every rule
    report = result.as_dict()
    assert sum(row["share"] for row in report["layers"]) == pytest.approx(1.0)
    assert report["step_ms"] == pytest.approx(result.forward_ms + result.backward_ms + result.update_ms)
    assert report["images_per_second"] == pytest.approx(4000 / report["step_ms"])
    assert as_text(BenchResult.from_dict(json.loads(json.dumps(report)))) == as_text(result)


def test_a_slow_layer_carries_its_time_and_no_other_row_does():
    net = cifar_net()
    slow_down(net.conv2)
    # One warm-up: first calls pay one-time kernel setup that is not a layer's time.
    result = bench(net, batch=2, iterations=2, warmup=1, progress=False)
    rows = {row.name: row for row in result.layers}
    assert rows["conv2"].forward_ms >= 1000 * SLEEP_S
    assert rows["conv2"].backward_ms >= 1000 * SLEEP_S
    for name, row in rows.items():
        if name != "conv2":
            assert row.forward_ms < 1000 * SLEEP_S and row.backward_ms < 1000 * SLEEP_S, name
    # The whole step sees the sleep once in each direction.
    assert result.forward_ms >= 1000 * SLEEP_S and result.backward_ms >= 1000 * SLEEP_S


def test_a_weightless_layer_on_the_data_has_no_backward_and_a_missing_cost_is_noted():
    # pool1 reads the images: training computes no gradient there, so its row has none to time.
    spec = check(parse_text("[data]\ntype=data\ninputSize=3x8x8\n[pool1]\ntype=pool\npool=max\ninputs=data\n"
                            "sizeX=2\nstride=2\n[fc]\ntype=fc\ninputs=pool1\noutputs=4\n", "s.cfg"))
    result = bench(build(spec, devices=["cpu"]), batch=2, iterations=1, warmup=0, progress=False)
    rows = {row.name: row for row in result.layers}
    assert rows["pool1"].backward_ms == 0 and rows["fc"].backward_ms > 0
    assert rows["loss"].type == "cross-entropy"
    assert result.notes == ["update not timed: parameter 'fc.weight' has no learning rate or momentum: set "
                            "epsW/epsB and momW/momB in the params file",
                            "the spec has no cost layer: the loss row times cross-entropy on the last layer's "
                            "output (train needs type=cost.logreg)"]


def test_fused_towers_are_one_row_and_towers_on_two_devices_are_two():
    spec = check(parse_text(TWO_TOWERS, "towers.cfg"))
    fused = bench(build(spec, devices=["cpu"]), batch=2, iterations=1, warmup=0, progress=False)
    assert [r.name for r in fused.layers] == ["conv1a+conv1b", "pool1a+pool1b", "fc10", "loss"]
    assert fused.layers[0].shape == (16, 16, 16)
    # No params file: no learning rules, so the update is not timed, and the report says why.
    assert fused.update_ms is None
    assert any("update not timed" in note for note in fused.notes)
    unfused = bench(build(spec, devices=["cpu"], fuse=False), batch=2, iterations=1, warmup=0, progress=False)
    assert [r.name for r in unfused.layers] == ["conv1a", "conv1b", "pool1a", "pool1b", "fc10", "loss"]
    text = as_text(unfused)
    step_line = [line for line in text.splitlines() if "forward + loss" in line]
    assert len(step_line) == 1 and step_line[0].startswith("training step without the update: forward + loss ")
    assert ", update " not in step_line[0]
    assert "note: update not timed" in text


def test_an_auxiliary_cost_branch_is_timed_and_the_loss_row_sums_both():
    aux = ("[aux]\ntype=fc\ninputs=pool1a\noutputs=10\ngpu=0\n[auxprobs]\ntype=softmax\ninputs=aux\n"
           "[auxcost]\ntype=cost.logreg\ninputs=labels,auxprobs\ncoeff=0.3\n")
    result = bench(build(check(parse_text(TWO_TOWERS + aux, "aux.cfg")), devices=["cpu"], fuse=False),
                   batch=2, iterations=1, warmup=0, progress=False)
    assert [r.name for r in result.layers] == ["conv1a", "conv1b", "pool1a", "pool1b", "fc10", "aux", "loss"]
    assert result.layers[-1].type == "softmax+logreg x2" and result.layers[-1].backward_ms > 0


def test_channels_last_and_bf16_run():
    net = cifar_net()
    result = bench(net, batch=2, iterations=1, warmup=0, precision="bf16", channels_last=True, progress=False)
    assert result.channels_last and result.precision == "bf16"
    assert "fp32" not in as_text(result).splitlines()[0] and "channels_last" in as_text(result)


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def test_bench_command_text_and_json():
    result = invoke("bench", CIFAR, "--batch-size", "2", "--iterations", "1", "--warmup", "0")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{CIFAR}: batch 2 of 3x32x32, cpu, fp32")
    assert lines[1].split() == ["layer", "type", "device", "output", "forward", "ms", "backward", "ms",
                                "total", "ms", "share"]
    assert lines[-1].startswith("whole training step: forward + loss ")
    assert lines[-1].endswith(" images/s")
    report = json.loads(invoke("bench", CIFAR, "--batch-size", "2", "--iterations", "1", "--warmup", "0",
                               "--json", "--set", "fc64.outputs=32").stdout)
    assert report["batch"] == 2 and report["iterations"] == 1
    assert [l["name"] for l in report["layers"]][-3:] == ["fc64", "fc10", "loss"]
    assert report["layers"][-3]["shape"] == [32]  # the override was applied


def test_bench_default_batch_is_the_recipes():
    assert check_paths(CIFAR).recipe.batch_size == 128
    result = invoke("bench", CIFAR, "--iterations", "1", "--warmup", "0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["batch"] == 128


@pytest.mark.parametrize("args, message", [
    (["specs/nope.cfg"], f"specs/nope.cfg: no such file; check the path (working directory: {os.getcwd()})"),
    ([CIFAR, "--devices", "mps"], "error: --devices: 'mps' is not supported; use cpu or cuda:N"),
    ([CIFAR, "--set", "conv9.filters=3"],
     f"error: --set conv9.filters=3: no layer 'conv9' in {CIFAR}; did you mean 'conv3'?"),
    ([CIFAR, "--threads", str(usable_cpus() + 1)],
     f"error: --threads {usable_cpus() + 1}: {usable_cpus()} "
     f"CPU{'s are' if usable_cpus() > 1 else ' is'} available here, and more threads than CPUs time their waiting for "
     f"each other; use at most {usable_cpus()}"),
])
def test_bench_errors_are_one_line(args, message):
    result = invoke("bench", *args, "--iterations", "1", "--warmup", "0", "--batch-size", "1")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [message]


def test_a_spec_of_only_a_data_layer_is_refused_by_bench_and_train(tmp_path):
    spec = tmp_path / "data-only.cfg"
    spec.write_text("[data]\ntype=data\ninputSize=3x32x32\n")
    result = invoke("bench", str(spec), "--iterations", "1", "--warmup", "0", "--batch-size", "1")
    assert (result.exit_code, result.output) == (1, f"{spec}: the spec has no layers after its data layer: "
                                                    "nothing to time\n")
    bare = tmp_path / "softmax-of-pixels.cfg"  # it said "no layers after its data layer"
    bare.write_text("[data]\ntype=data\ninputSize=3x2x2\n[labels]\ntype=data\ndataIdx=1\n"
                    "[probs]\ntype=softmax\ninputs=data\n[cost]\ntype=cost.logreg\ninputs=labels,probs\n")
    result = invoke("bench", str(bare), "--iterations", "1", "--warmup", "0", "--batch-size", "1")
    assert (result.exit_code, result.output) == (1, f"{bare}: no layer computes anything from the images before "
                                                    "the softmax: nothing to time; add layers between them, e.g. "
                                                    "[fc] with outputs=10\n")
    result = invoke("train", str(spec), "--data", str(tmp_path / "not-read"), "--out", str(tmp_path / "run"))
    assert (result.exit_code, result.output) == (1, f"{spec}: the spec has no cost.logreg layer to train "
                                                    "against; add one (type=cost.logreg, inputs=labels,probs)\n")


def test_train_refuses_a_spec_without_learning_rules_before_reading_data(tmp_path):
    """check notes what train needs; train says it before it reads any data (a minute for ImageNet)."""
    spec = tmp_path / "lonely.cfg"
    spec.write_text((ROOT / "specs" / "cifar10-80sec.cfg").read_text())  # no params file beside it
    result = invoke("check", str(spec))
    assert ("note: epsW, epsB, momW or momB not set (they belong in the params file); needed to train: "
            "conv1, conv2, conv3, fc64, fc10") in result.output
    result = invoke("train", str(spec), "--data", str(tmp_path / "not-read"), "--out", str(tmp_path / "run"))
    line = (ROOT / "specs" / "cifar10-80sec.cfg").read_text().splitlines().index("[conv1]") + 1
    assert (result.exit_code, result.output) == (1, f"{spec}:{line}:2: layer 'conv1' has no epsW, epsB, momW or momB, "
                                                    "which training needs (4 other layers lack some too: conv2, "
                                                    "conv3, fc64, fc10); add a params file (NAME.params.cfg beside "
                                                    "the spec, or --params FILE) setting epsW, epsB, momW and momB "
                                                    "for each layer with weights\n[conv1]\n ^\n")
    no_cost = tmp_path / "no-cost.cfg"
    no_cost.write_text("[data]\ntype=data\ninputSize=3x8x8\n[fc]\ntype=fc\ninputs=data\noutputs=2\n")
    assert "note: no cost.logreg layer; needed to train (type=cost.logreg, inputs=labels,probs)" in \
        invoke("check", str(no_cost)).output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_bench_on_missing_cuda_is_one_line():
    result = invoke("bench", CIFAR, "--devices", "cuda:0")
    assert result.exit_code == 1
    assert "--devices: cuda:0 is not available" in result.output


@pytest.mark.skipif(not REFERENCE_SPECS.exists(), reason="needs ../shared/reference-specs")
def test_bench_reads_an_original_cuda_convnet_file_with_input():
    spec = REFERENCE_SPECS / "cuda-convnet-layers-80sec.cfg"
    result = invoke("bench", str(spec), "--input", "3x32x32", "--batch-size", "2", "--iterations", "1",
                    "--warmup", "0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input"] == [3, 32, 32]


def _load_bench_script(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_option_cost_trains_the_same_steps_in_every_setting():
    # bench/option_cost.py's loop on a small net: channels_last follows the fp32
    # curve to float rounding, bf16 stays near it but is not the same numbers,
    # and the loss does move (it is training, not replaying one value).
    option_cost = _load_bench_script("option_cost")
    torch.manual_seed(0)
    net = build(check_paths(CIFAR), ["cpu"])
    initial = net.state_dict()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32, generator=generator) * 50,
                torch.randint(0, 10, (8,), generator=generator)) for _ in range(2)]
    curves = {name: option_cost.train_losses(CIFAR, initial, batches, 4, torch.device("cpu"),
                                             precision, cl, seed=0, lr_scale=1.0)[0]
              for name, (precision, cl) in option_cost.SETTINGS.items()}
    assert curves["channels_last"] == pytest.approx(curves["fp32"], rel=1e-4)
    assert curves["bf16"] == pytest.approx(curves["fp32"], rel=0.05)
    assert curves["bf16"] != curves["fp32"]
    assert curves["fp32"][2] != pytest.approx(curves["fp32"][0], rel=1e-3)


def test_option_cost_reads_the_photos_it_saved_where_the_folder_is_gone(tmp_path):
    # bench/gpu.sh takes the decoded photos to a machine without ../shared as an .npz: a run from the .npz
    # alone trains on the same batches (the same losses), and one with another shuffle seed is refused.
    import subprocess

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "photos" / f"n0{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40 + 20 * i, 60, 3), dtype=np.uint8)).save(
                tmp_path / "photos" / f"n0{c}" / f"{i}.jpg")
    squares = tmp_path / "carry" / "squares.npz"

    def option_cost(data, *extra):
        return subprocess.run([sys.executable, str(ROOT / "bench" / "option_cost.py"), "--data", str(data),
                               "--squares", str(squares), "--images", "4", "--batch", "2", "--steps", "2",
                               "--settings", "fp32", "--dropout", "off", "--threads", "1", *extra],
                              capture_output=True, text=True, timeout=300)

    first = option_cost(tmp_path / "photos")
    assert first.returncode == 0, first.stderr
    assert f"wrote the decoded photos to {squares}" in first.stderr
    again = option_cost(tmp_path / "gone")
    assert again.returncode == 0, again.stderr
    assert f"read 4 decoded photos from {squares}" in again.stderr
    a, b = json.loads(first.stdout.splitlines()[-1]), json.loads(again.stdout.splitlines()[-1])
    assert a["losses"] == b["losses"] and a["dropout"] == "off"
    other = option_cost(tmp_path / "gone", "--seed", "1")
    assert (other.returncode, other.stderr.strip()) == (1, (
        f"option_cost.py: {squares} holds the shuffle of --seed 0, not 1; pass --seed 0 or write it again "
        "from --data"))


def test_peer_accuracy_trains_the_hand_written_net_on_an_image_folder(tmp_path):
    # bench/peer_accuracy.py on 4 classes of 32x32 JPEGs that differ in colour: it runs end to end for each
    # choice it offers, prints one JSON line, and the cuda-convnet choices learn the colours.
    import re
    import subprocess

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]):
        (tmp_path / f"class{c}").mkdir()
        for i in range(80):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / f"class{c}" / f"{i}.jpg")
    runs = {}
    for choices in (["raw", "convnet", "ceil"], ["scaled", "torch", "floor"]):
        inputs, init, pool = choices
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "peer_accuracy.py"), "--data", str(tmp_path),
                               "--inputs", inputs, "--init", init, "--pool", pool, "--epochs", "12", "--drop", "10",
                               "--threads", "1"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout.splitlines()[-1])
        assert (result["inputs"], result["init"], result["pool"], len(result["val_top1_error"])) == (
            inputs, init, pool, 12)
        assert re.fullmatch(r"read 320 images in \d+\.\d s; 288 train, 32 validation", proc.stdout.splitlines()[0])
        runs[inputs] = result["val_top1_error"]
    assert runs["raw"][-1] < 10  # 32 validation images: at most 3 wrong


def test_step_time_races_the_built_net_against_its_peer_and_prints_json(capsys):
    # bench/step_time.py end to end on the CPU, one step a side: one JSON line per net, whose
    # two sides compute the same function (the logit check) and whose ratio is built / hand-written.
    step_time = _load_bench_script("step_time")
    # (no --threads: it would set the thread count of the whole test process)
    step_time.main(["--nets", "cifar10-80sec", "--batch", "4", "--steps", "2", "--warmup", "0"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["net"], result["batch"], result["steps"], result["cuda_graph"]) == ("cifar10-80sec", 4, 2, False)
    assert result["max_abs_diff"] < 1e-3
    assert result["ratio"] == pytest.approx(result["built_ms"] / result["handwritten_ms"], rel=0.01)
    assert result["built_ops"] == result["handwritten_ops"] > 20


def test_optim_step_times_cuda_convnets_update_and_sums_the_weights_it_left(capsys):
    """bench/optim_step.py on cifar10-80sec: its checksum is the weights after three updates
    with its fixed gradients, recomputed here in float64 from cuda-convnet's rule."""
    optim_step = _load_bench_script("optim_step")
    result = optim_step.main(["--spec", str(ROOT / "specs/cifar10-80sec.cfg"), "--steps", "3"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    torch.manual_seed(0)
    net = build(check_paths(ROOT / "specs/cifar10-80sec.cfg"), devices=["cpu"])
    gen = torch.Generator().manual_seed(1)
    total = 0.0
    for _name, p, rule in net.learning_rules():
        g = (torch.randn(p.shape, generator=gen) * 1e-3).double()
        w, inc = p.detach().double(), torch.zeros(p.shape, dtype=torch.float64)
        for _ in range(3):
            inc = rule.mom * inc - rule.eps.value(0.0) * (g + rule.wc * w)
            w = w + inc
        total += w.sum().item()
    assert result["parameters"] == sum(p.numel() for p in net.parameters())
    assert result["checksum"] == pytest.approx(total, rel=1e-6, abs=1e-4)
    assert 0 < result["min_ms"] <= result["median_ms"]


@pytest.mark.parametrize("args, message", [
    (["--spec", "nope.cfg"], "nope.cfg: no such file; check the path"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--input", "3x3"], "--input must be CxHxW with positive whole numbers, e.g. 3x224x224, not '3x3'"),
])
def test_optim_step_errors_are_one_line(args, message, capsys):
    optim_step = _load_bench_script("optim_step")
    with pytest.raises(SystemExit) as exit_info:
        optim_step.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_built_step_runs_no_more_operators_than_the_hand_written_one():
    """What a step costs beyond its kernels grows with the operators it runs (on a GPU each
    is a launch).  cifar10-80sec built from its spec runs exactly the hand-written module's
    operators, and convspec's loss exactly F.cross_entropy's; views are not counted."""
    step_time = _load_bench_script("step_time")
    net, ref = step_time.make_models(step_time.NETS["cifar10-80sec"], torch.device("cpu"))
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    counts = {}
    for side, model in (("built", net), ("hand-written", ref)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
        counts[side] = step_time.ops_per_step(
            lambda: step_time.train_step(model, opt, images, labels, contextlib.nullcontext))
    assert counts["built"] == counts["hand-written"] > 20
    logits = net(images)
    ours = step_time.ops_per_step(lambda: net.loss(logits, labels).backward(retain_graph=True))
    theirs = step_time.ops_per_step(lambda: F.cross_entropy(logits, labels).backward(retain_graph=True))
    assert ours == theirs


@pytest.mark.parametrize("args, message", [
    (["--cuda-graph"], "--cuda-graph needs a CUDA device, not --device cpu; add --device cuda"),
    (["--cuda-graph", "--device", "cuda", "--compile"],
     "--cuda-graph and --compile both take the overhead out; time one at a time"),
])
def test_step_time_refuses_a_cuda_graph_it_cannot_capture(args, message, capsys):
    step_time = _load_bench_script("step_time")
    with pytest.raises(SystemExit) as exit_info:
        step_time.main(["--nets", "cifar10-80sec", *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")
