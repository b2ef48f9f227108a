"""CUDA paths: placement across devices and fused towers on a GPU.  Skipped
without a GPU; bench/gpu.sh runs them on a lent GPU machine."""

import pytest
import torch

from convspec.builder import build
from convspec.check import check_paths

from conftest import ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SPEC = ROOT / "specs" / "alexnet.cfg"


def _reference_cpu_output(state, x):
    cpu = build(check_paths(SPEC), devices=["cpu"]).double().eval()
    cpu.load_state_dict({k: v.double().cpu() for k, v in state.items()})
    return cpu(x.double())


@pytest.mark.parametrize("devices", [["cuda:0"], ["cuda:0", "cpu"], ["cpu", "cuda:0"]])
def test_alexnet_on_gpu_matches_cpu(devices):
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    net = build(check_paths(SPEC), devices=devices).eval()
    # Parameters live where their tower was placed.
    assert net.conv1a.weight.device == torch.device(devices[0])
    assert net.conv1b.weight.device == torch.device(devices[1 % len(devices)])
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        out = net(x.to(devices[0]))
        expected = _reference_cpu_output(net.state_dict(), x)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-3, atol=1e-4)


def test_training_step_on_gpu_reaches_every_parameter():
    net = build(check_paths(SPEC), devices=["cuda:0"]).train()
    x = torch.randn(8, 3, 224, 224, device="cuda:0")
    labels = torch.randint(0, 1000, (8,), device="cuda:0")
    net.loss(net(x), labels).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("devices", [["cuda:0"], ["cuda:0", "cpu"]])
def test_alexnet_training_steps_on_gpu_match_a_cpu_run(devices):
    """A few AlexNet steps with cuda-convnet's rule: the towers on one GPU, and
    split across GPU and CPU, give the CPU run's losses (dropout off, so the
    devices' different random streams do not matter)."""
    from runtime.optim import ConvnetSGD

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    start = build(check_paths(SPEC), devices=["cpu"]).state_dict()
    x = torch.randn(8, 3, 224, 224) * 50
    y = torch.randint(0, 1000, (8,))

    def losses(devs):
        net = build(check_paths(SPEC), devices=devs)
        net.load_state_dict(start)
        net.eval()  # no dropout; gradients still flow
        opt = ConvnetSGD(net.learning_rules())
        opt.lr_scale = 0.1
        out = []
        for _ in range(3):
            loss = net.loss(net(x.to(devs[0])), y)
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    cpu, gpu = losses(["cpu"]), losses(devices)
    assert gpu == pytest.approx(cpu, rel=2e-3), (cpu, gpu)
    assert cpu[-1] < cpu[0]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_and_eval_commands_on_gpu(tmp_path, precision):
    import json

    from click.testing import CliRunner

    from convspec.cli import main
    from test_train import PARAMS, SPEC as TINY, make_data

    spec = tmp_path / "tiny.cfg"
    spec.write_text(TINY)
    (tmp_path / "tiny.params.cfg").write_text(PARAMS)
    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "--out", str(out), "--quiet",
                                    "--devices", "cuda:0", "--precision", precision, "--channels-last"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(out / "epoch-0003.pt"), "--json"])
    assert res.exit_code == 0, res.output
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads(res.output)["top1_error"] == pytest.approx(last["val_top1_error"], abs=1 / 48)
    assert last["val_top1_error"] < 0.5
