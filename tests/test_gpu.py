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
