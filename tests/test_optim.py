"""cuda-convnet's update rule against a float64 loop written from the formula."""

import pytest
import torch

from convspec.builder import Rule, build
from convspec.check import check
from convspec.parse import parse_text
from convspec.values import Schedule
from runtime import optim
from runtime.optim import ConvnetSGD

SPEC = ("[data]\ntype=data\ninputSize=3x6x6\n[labels]\ntype=data\ndataIdx=1\n"
        "[c]\ntype=conv\ninputs=data\nfilters=4\nfilterSize=3\nneuron=relu\n"
        "[fc]\ntype=fc\ninputs=c\noutputs=5\n[probs]\ntype=softmax\ninputs=fc\n"
        "[cost]\ntype=cost.logreg\ninputs=labels,probs\n")
PARAMS = ("[c]\nepsW=exp[base=0.1;tgtFactor=10]\nepsB=0.2\nmomW=0.9\nmomB=0.5\nwc=0.01\n"
          "[fc]\nepsW=0.05\nepsB=0.1\nmomW=0.8\nmomB=0.8\nwc=0.001\n")


def _net():
    torch.manual_seed(0)
    return build(check(parse_text(SPEC, "s.cfg"), parse_text(PARAMS, "p.cfg")), devices=["cpu"]).double()


@pytest.mark.parametrize("fused", [None, False], ids=["fused-kernel", "foreach"])
def test_update_matches_the_formula_with_schedules_and_drops(fused):
    net = _net()
    rules = {name: rule for name, _p, rule in net.learning_rules()}
    opt = ConvnetSGD(net.learning_rules(), fused=fused)
    if fused is None:  # the pinned torch has the CPU kernel, so this case runs it
        assert optim._has_fused_kernel(torch.device("cpu"))
    weights = {name: p.detach().clone() for name, p, _r in net.learning_rules()}
    incs = {name: torch.zeros_like(w) for name, w in weights.items()}
    gen = torch.Generator().manual_seed(1)
    for step, (progress, scale) in enumerate([(0.0, 1.0), (0.3, 1.0), (0.6, 0.1), (0.9, 0.1)]):
        x = torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (8,), generator=gen)
        opt.zero_grad()
        net.loss(net(x), y).backward()
        grads = {name: p.grad.clone() for name, p, _r in net.learning_rules()}
        opt.progress, opt.lr_scale = progress, scale
        opt.step()
        for name, w in weights.items():
            r = rules[name]
            eps = r.eps.value(progress) * scale
            incs[name] = r.mom * incs[name] - eps * (grads[name] + r.wc * w)
            weights[name] = w + incs[name]
    for name, p, _r in net.learning_rules():
        torch.testing.assert_close(p.detach(), weights[name], rtol=1e-12, atol=1e-14)


def test_fused_kernel_and_foreach_passes_agree_on_float32_channels_last_weights():
    """The fused path (torch._fused_sgd_ with the rule folded into its
    arguments) and the foreach passes, on the layouts training uses: conv
    weights in channels_last, and a zero-momentum group, which takes the
    foreach passes either way."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(8, 3, 5, 5), (8,), (10, 32)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    results = []
    for fused in (None, False):
        params = [w.clone().requires_grad_() for w in start]
        params[0] = start[0].clone().to(memory_format=torch.channels_last).requires_grad_()
        moms = [0.9, 0.0, 0.8]
        opt = ConvnetSGD([(f"p{i}", p, Rule(Schedule("const", 0.01 * (i + 1)), moms[i], 0.004 * i, 0.0, 0))
                          for i, p in enumerate(params)], fused=fused)
        for step, batch in enumerate(grads):
            opt.lr_scale = 1.0 if step < 2 else 0.1
            for p, g in zip(params, batch):
                p.grad = g.clone().to(memory_format=torch.channels_last) if g.dim() == 4 else g.clone()
            opt.step()
        results.append([p.detach().clone() for p in params])
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0][0], start[0])


@pytest.mark.parametrize("error", [AttributeError, NotImplementedError, RuntimeError, TypeError])
def test_a_torch_without_the_fused_kernel_takes_the_foreach_passes(monkeypatch, error):
    """The kernel is private: another torch may lack it, or take other arguments (a
    TypeError from its argument parser).  The probe then says no, and step() still
    applies the formula's update."""
    def missing(*args, **kwargs):
        raise error("no such kernel here")

    monkeypatch.setattr(optim, "_fused_kernel", {})
    monkeypatch.setattr(torch, "_fused_sgd_", missing)
    assert not optim._has_fused_kernel(torch.device("cpu"))
    w = torch.tensor([1.0, -2.0, 3.0])
    p = w.clone().requires_grad_()
    opt = ConvnetSGD([("w", p, Rule(Schedule("const", 0.1), 0.9, 0.5, 0.0, 0))])
    p.grad = torch.tensor([0.5, 0.5, 0.5])
    opt.step()
    torch.testing.assert_close(p.detach(), w - 0.1 * (torch.tensor([0.5, 0.5, 0.5]) + 0.5 * w))


@pytest.mark.parametrize("case", ["bf16", "fp16", "mixed-layout"])
def test_where_the_fused_kernel_is_wrong_the_foreach_passes_run(case):
    """torch 2.13's CPU kernel left bf16 and fp16 weights unchanged (whole 16-element
    chunks), and mixed a channels_last weight with a contiguous buffer: those groups take
    the foreach passes, and the update is the formula's."""
    gen = torch.Generator().manual_seed(5)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case, torch.float32)
    w = torch.randn(8, 4, 3, 3, generator=gen).to(dtype)
    g = torch.randn(8, 4, 3, 3, generator=gen).to(dtype)
    if case == "mixed-layout":
        w = w.to(memory_format=torch.channels_last)  # its grad and its buffer stay contiguous
    p = w.clone().requires_grad_()
    opt = ConvnetSGD([("w", p, Rule(Schedule("const", 0.01), 0.9, 0.004, 0.0, 0))])
    opt.state[p]["inc"] = torch.zeros(p.shape, dtype=dtype)  # contiguous, whatever p's layout
    expected_inc = torch.zeros(p.shape, dtype=torch.float64)
    expected = w.double()
    for _ in range(3):
        p.grad = g.clone().contiguous()
        opt.step()
        expected_inc = 0.9 * expected_inc - 0.01 * (g.double() + 0.004 * expected)
        expected = expected + expected_inc
    tol = {"bf16": 2e-2, "fp16": 2e-3}.get(case, 1e-5)
    torch.testing.assert_close(p.detach().double(), expected, rtol=tol, atol=tol)
    assert not torch.equal(p.detach(), w)


def test_differs_from_torch_sgd_once_eps_changes():
    net, ref = _net(), _net()
    params = [p for _n, p, _r in net.learning_rules()]
    rules = [(n, p, Rule(Schedule("const", 0.1), 0.9, 0.0, 0.0, 0)) for n, p, _r in net.learning_rules()]
    ours = ConvnetSGD(rules)
    sgd = torch.optim.SGD([p for _n, p, _r in ref.learning_rules()], lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    for step in range(3):
        scale = 1.0 if step < 2 else 0.1  # a learning-rate drop at the third step
        for model, opt in ((net, ours), (ref, sgd)):
            opt.zero_grad()
            model.loss(model(x), y).backward()
        ours.lr_scale = scale
        for g in sgd.param_groups:
            g["lr"] = 0.1 * scale
        ours.step()
        sgd.step()
        same = all(torch.allclose(a, b) for a, b in zip(params, ref.parameters()))
        assert same == (step < 2)  # identical until eps changes, then cuda-convnet's buffer differs


def test_zero_rate_freezes_and_wball_rescales_filters():
    net = _net()
    rules = []
    for name, p, r in net.learning_rules():
        eps = Schedule("const", 0.0) if name == "c.weight" else r.eps
        wball = 2.0 if name == "fc.weight" else 0.0
        rules.append((name, p, Rule(eps, r.mom, r.wc, wball, 0, r.layer_type)))
    before = net.c.weight.detach().clone()
    opt = ConvnetSGD(rules)
    net.loss(net(torch.randn(4, 3, 6, 6, dtype=torch.float64)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert torch.equal(net.c.weight, before)
    torch.testing.assert_close(net.fc.weight.norm(dim=1), torch.full((5,), 2.0, dtype=torch.float64))


def test_missing_rates_are_a_clear_error():
    net = build(check(parse_text(SPEC, "s.cfg")), devices=["cpu"])
    with pytest.raises(ValueError, match="parameter 'c.weight' has no learning rate or momentum"):
        ConvnetSGD(net.learning_rules())


def test_update_period_accumulates_and_applies_the_mean():
    """updatePeriod=2: no change after the first minibatch; after the second,
    one update with the mean of the two minibatch gradients."""
    net, ref = _net(), _net()
    period2 = [(n, p, Rule(r.eps, r.mom, r.wc, 0.0, 2, r.layer_type)) for n, p, r in net.learning_rules()]
    opt, ref_opt = ConvnetSGD(period2), ConvnetSGD(ref.learning_rules())
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    start = net.c.weight.detach().clone()
    net.loss(net(x[:4]), y[:4]).backward()
    opt.step()
    assert torch.equal(net.c.weight, start) and net.c.weight.grad is not None  # still accumulating
    net.loss(net(x[4:]), y[4:]).backward()
    opt.step()
    assert net.c.weight.grad is None  # used and cleared
    (0.5 * (ref.loss(ref(x[:4]), y[:4]) + ref.loss(ref(x[4:]), y[4:]))).backward()
    ref_opt.step()
    for (_n, a, _r), (_m, b, _s) in zip(net.learning_rules(), ref.learning_rules()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.equal(net.c.weight, start)
