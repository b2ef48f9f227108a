"""Stage 3: built modules against hand-written PyTorch and explicit formulas,
in float64."""

import itertools
import math

import pytest
import torch

from convspec.builder import build as _build
from convspec.check import check, check_paths
from convspec.parse import parse_text
from convspec.values import Schedule

from conftest import REFERENCE_SPECS, ROOT
from reference_nets import Cifar11Pct, Cifar18Pct, Cifar18PctPooled, Cifar80Sec, alexnet_from_built, copy_by_name

SPECS = ROOT / "specs"


def build(net, devices=("cpu",), **kw):
    """These tests compare against CPU references; tests/test_gpu.py covers CUDA."""
    return _build(net, devices=list(devices), **kw)
HEAD = "[data]\ntype=data\ninputSize={shape}\n[labels]\ntype=data\ndataIdx=1\n"


def built(body, shape="3x8x8", params=None, **kw):
    text = HEAD.format(shape=shape) + body
    net = check(parse_text(text, "t.cfg"), parse_text(params, "p.cfg") if params else None)
    return build(net, **kw).double().eval()


def randomize(net, std=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return net


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- whole nets against hand-written modules --------------------------------------------

@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_two_tower_alexnet_equals_grouped_alexnet(fuse):
    net = randomize(build(check_paths(SPECS / "alexnet.cfg"), fuse=fuse).double(), std=0.02).eval()
    ref = alexnet_from_built(net).eval()
    x = rand(2, 3, 224, 224)
    out, expected = net(x), ref(x)
    assert out.shape == (2, 1000)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # Gradients flow through the fused steps to each section's own parameters.
    labels = torch.tensor([3, 7])
    net.loss(out, labels).backward()
    torch.nn.functional.cross_entropy(expected, labels).backward()
    torch.testing.assert_close(net.conv3b.weight[1].grad, ref.conv3.weight.grad[192:, 128:], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(net.conv2a.weight.grad, ref.conv2.weight.grad[:128], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(net.conv1b.bias.grad, ref.conv1.bias.grad[48:], rtol=1e-8, atol=1e-12)


def test_alexnet_folding_fuses_the_towers():
    net = build(check_paths(SPECS / "alexnet.cfg"))
    kinds = {s.members: s.kind for s in net.steps((net.output_name,))}
    assert kinds[("conv1a", "conv1b")] == "full"
    assert kinds[("conv2a", "conv2b")] == "grouped"
    assert kinds[("conv3a", "conv3b")] == "full"
    assert kinds[("pool5a", "pool5b")] == "grouped"


def test_alexnet_lrn_equals_grouped_alexnet_with_torch_lrn():
    net = randomize(build(check_paths(SPECS / "alexnet-lrn.cfg")).double(), std=0.02).eval()
    ref = alexnet_from_built(net, lrn=True).eval()
    x = rand(2, 3, 224, 224) * 50
    torch.testing.assert_close(net(x), ref(x), rtol=1e-9, atol=1e-10)


def test_towers_on_two_devices_match_one_device():
    spec = check_paths(SPECS / "alexnet.cfg")
    one = randomize(build(spec).double(), std=0.02).eval()
    two = build(spec, devices=["cpu", "cpu"]).double().eval()  # two placements, no fusion across them
    two.load_state_dict(one.state_dict())
    assert all(s.kind == "single" for s in two.steps((two.output_name,)))
    x = rand(1, 3, 224, 224)
    torch.testing.assert_close(two(x), one(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spec, reference", [("cifar10-80sec.cfg", Cifar80Sec), ("cifar10-18pct.cfg", Cifar18Pct),
                                             ("cifar10-18pct.cfg", Cifar18PctPooled),
                                             ("cifar10-11pct.cfg", Cifar11Pct)])
def test_cifar_nets_equal_hand_written(spec, reference):
    net = randomize(build(check_paths(SPECS / spec)).double())
    ref = copy_by_name(net, reference()).eval()
    x = rand(3, *net.spec.layers["data"].shape) * 30
    torch.testing.assert_close(net(x), ref(x), rtol=1e-10, atol=1e-10)


def test_state_dict_keys_are_section_names():
    net = build(check_paths(SPECS / "alexnet.cfg"))
    keys = set(net.state_dict())
    assert {"conv1a.weight", "conv1a.bias", "conv3a.weight.0", "conv3a.weight.1", "fc8.weight.1"} <= keys
    assert net.conv1a.weight.shape == (48, 3, 11, 11) and net.conv2b.weight.shape == (128, 48, 5, 5)


def test_initialisation_follows_initw_and_initb():
    net = build(check_paths(SPECS / "alexnet.cfg"))
    assert abs(net.fc6a.weight[0].std().item() - 0.01) < 0.0005
    assert torch.all(net.conv2a.bias == 1) and torch.all(net.conv1a.bias == 0) and torch.all(net.fc8.bias == 0)


def test_learning_rules_are_recorded_per_parameter():
    rules = {name: rule for name, _p, rule in build(check_paths(SPECS / "alexnet.cfg")).learning_rules()}
    assert rules["conv1a.weight"].eps == Schedule("const", 0.01) and rules["conv1a.weight"].wc == 0.0005
    assert rules["fc6b.weight.1"].mom == 0.9 and rules["fc6b.bias"].wc == 0.0
    # 15 weight layers: 15 biases; conv3 and the five fc layers have two weight banks each
    assert len(rules) == 15 + 8 + 2 * 2 + 5 * 2


# The main cost is written before the layers it reads, so dependency order (which
# check gives net.layers) reaches the auxiliary cost first; file order decides.
TWO_COSTS = """[c]
type=conv
inputs=data
filters=4
filterSize=3
neuron=relu
[cost]
type=cost.logreg
inputs=labels,probs
[aux]
type=fc
inputs=c
outputs=3
[auxprobs]
type=softmax
inputs=aux
[auxcost]
type=cost.logreg
inputs=labels,auxprobs
coeff=0.3
[fc]
type=fc
inputs=c
outputs=3
[probs]
type=softmax
inputs=fc
"""


def test_several_costs_train_on_their_sum_and_report_the_first_in_the_file():
    """cuda-convnet minimises the sum of coeff * cost over every cost layer: an auxiliary
    classifier's branch must get its gradient (a second cost was once dropped unseen)."""
    net = randomize(built(TWO_COSTS)).train()
    assert [c.name for c in net.costs] == ["cost", "auxcost"] and net.output_name == "fc"
    x, labels = rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    logits = net(x)
    assert isinstance(logits, tuple) and len(logits) == 2
    net.loss(logits, labels).backward()

    # By hand, from copies of the same weights.
    w = {k: v.detach().clone().requires_grad_(True) for k, v in net.state_dict().items()}
    h = torch.relu(torch.nn.functional.conv2d(x, w["c.weight"], w["c.bias"])).flatten(1)
    main, aux = h @ w["fc.weight"].t() + w["fc.bias"], h @ w["aux.weight"].t() + w["aux.bias"]
    expected = (torch.nn.functional.cross_entropy(main, labels)
                + 0.3 * torch.nn.functional.cross_entropy(aux, labels))
    torch.testing.assert_close(net.loss(logits, labels), expected, rtol=1e-12, atol=0)
    expected.backward()
    for name in ("c.weight", "aux.weight", "aux.bias", "fc.weight"):
        torch.testing.assert_close(dict(net.named_parameters())[name].grad, w[name].grad, rtol=1e-10, atol=1e-14)

    # Evaluation reads the first cost's logits alone.
    net.eval()
    torch.testing.assert_close(net(x), main.detach(), rtol=1e-12, atol=1e-14)


# --- single layers against formulas -----------------------------------------------------------

def test_local_layer_equals_direct_loop():
    net = randomize(built("[l]\ntype=local\ninputs=data\nfilters=2\nfilterSize=3\nstride=2\npadding=1\ngroups=1\n"
                          "[fc]\ntype=fc\ninputs=l\noutputs=2\n", shape="4x7x7"))
    x = rand(2, 4, 7, 7)
    y = net(x, outputs=["l"])["l"]
    w, b = net.l.weight, net.l.bias  # (oh*ow, F, C, k, k), (F, oh, ow)
    oh = 1 + math.ceil((2 + 7 - 3) / 2)
    padded = torch.nn.functional.pad(x, (1, 1 + 1, 1, 1 + 1))  # implicit zero past the bottom/right
    expected = torch.empty(2, 2, oh, oh, dtype=torch.float64)
    for i in range(oh):
        for j in range(oh):
            patch = padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            expected[:, :, i, j] = torch.einsum("nckl,fckl->nf", patch, w[i * oh + j]) + b[:, i, j]
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("attrs, shape, plain", [
    ("filterSize=3\nstride=1\npadding=1", "4x6x6", True),
    ("filterSize=3\nstride=2\npadding=1\ngroups=2", "4x7x7", True),
    ("filterSize=3\nstride=2\npadding=0", "4x6x6", False),  # the last window overhangs: zeros there
    ("filterSize=3\nstride=1\npadding=1\nsharedBiases=0", "4x5x5", False),
], ids=["plain", "grouped", "overhang", "unshared-biases"])
def test_conv_equals_direct_loop(attrs, shape, plain):
    """Both the one-call path and the general one against cuda-convnet's definition: output
    (i, j) sums the filterSize window at (-padding + i*stride, -padding + j*stride), zero
    outside the image, over 1 + ceil((2*padding + size - filterSize) / stride) positions."""
    net = randomize(built(f"[c]\ntype=conv\ninputs=data\nfilters=2\n{attrs}\n"
                          "[fc]\ntype=fc\ninputs=c\noutputs=2\n", shape=shape))
    assert net.c.single_call == plain
    channels, size = int(shape.split("x")[0]), int(shape.split("x")[1])
    f, s, p, g = (int(net.spec.layers["c"][k][0]) for k in ("filterSize", "stride", "padding", "groups"))
    x = rand(2, channels, size, size)
    y = net(x, outputs=["c"])["c"]
    out = 1 + math.ceil((2 * p + size - f) / s)
    padded = torch.zeros(2, channels, size + 2 * p + f, size + 2 * p + f, dtype=torch.float64)
    padded[:, :, p:p + size, p:p + size] = x
    w, b = net.c.weight, net.c.bias  # (filters, channels / groups, f, f); (filters,) or (filters, out, out)
    filters, per_group = w.shape[0], channels // g
    expected = torch.empty(2, filters, out, out, dtype=torch.float64)
    for k in range(filters):
        group = k // (filters // g)
        chans = slice(group * per_group, (group + 1) * per_group)
        for i in range(out):
            for j in range(out):
                patch = padded[:, chans, i * s:i * s + f, j * s:j * s + f]
                expected[:, k, i, j] = (patch * w[k]).sum((1, 2, 3)) + (b[k] if b.dim() == 1 else b[k, i, j])
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected)


def test_grouped_local_layer_equals_loop_per_group():
    net = randomize(built("[l]\ntype=local\ninputs=data\nfilters=1\nfilterSize=2\ngroups=2\n"
                          "[fc]\ntype=fc\ninputs=l\noutputs=2\n", shape="4x3x3"))
    x = rand(1, 4, 3, 3)
    y = net(x, outputs=["l"])["l"]
    w = net.l.weight  # (4, 2, 2, 2, 2)
    for f in range(2):
        chans = slice(2 * f, 2 * f + 2)
        for i in range(2):
            for j in range(2):
                v = (x[0, chans, i:i + 2, j:j + 2] * w[i * 2 + j, f]).sum() + net.l.bias[f, i, j]
                assert y[0, f, i, j].item() == pytest.approx(v.item())


NORM_PARAMS = "[l]\nscale=0.5\npow=0.75\nminDiv=2\n"


@pytest.mark.parametrize("body, shape, params", [
    ("type=local\ninputs=data\nfilters=2\nfilterSize=3\nstride=2\npadding=1\ngroups=2\n", "4x6x6", None),
    ("type=cmrnorm\ninputs=data\nsize=3\n", "5x4x4", NORM_PARAMS),
    ("type=cmrnorm\ninputs=data\nsize=2\nblocked=1\n", "5x4x4", NORM_PARAMS),
    ("type=rnorm\ninputs=data\nsize=3\n", "2x5x5", NORM_PARAMS),
    ("type=cnorm\ninputs=data\nsize=2\n", "2x5x5", NORM_PARAMS),
], ids=["local", "cmrnorm", "cmrnorm-blocked", "rnorm", "cnorm"])
def test_layer_gradients_match_finite_differences_and_layouts_agree(body, shape, params):
    """The layers with hand-made kernels (a local layer's batched matmul over patch views, the
    norms' band and exp-log powers): autograd against float64 finite differences, for the
    input and the weights, and the same output for a channels_last input."""
    net = randomize(built(f"[l]\n{body}[fc]\ntype=fc\ninputs=l\noutputs=2\n", shape=shape, params=params))
    x = rand(2, *map(int, shape.split("x"))).requires_grad_()
    tensors = {name: p.detach().clone().requires_grad_() for name, p in net.l.named_parameters()}

    def layer(x, *values):
        return torch.func.functional_call(net.l, dict(zip(tensors, values)), ([x],))

    assert torch.autograd.gradcheck(layer, (x, *tensors.values()))
    nhwc = layer(x.detach().to(memory_format=torch.channels_last), *tensors.values())
    torch.testing.assert_close(nhwc, layer(x.detach(), *tensors.values()), rtol=1e-12, atol=1e-12)


def _norm_net(kind, size, extra=""):
    params = f"[n]\nscale=0.5\npow=0.75\nminDiv=2\n{extra}"
    return built(f"[n]\ntype={kind}\ninputs=data\nsize={size}\n[fc]\ntype=fc\ninputs=n\noutputs=2\n",
                 shape="6x5x5", params=params)


@pytest.mark.parametrize("size", [3, 4])
def test_cmrnorm_formula(size):
    x = rand(2, 6, 5, 5) * 2
    y = _norm_net("cmrnorm", size)(x, outputs=["n"])["n"]
    expected = torch.empty_like(x)
    for c in range(6):
        lo, hi = max(0, c - size // 2), min(6, c - size // 2 + size)
        s = (x[:, lo:hi] ** 2).sum(1)
        expected[:, c] = x[:, c] * (2 + 0.5 / size * s) ** -0.75
    torch.testing.assert_close(y, expected)


def test_blocked_cmrnorm_formula():
    x = rand(1, 6, 5, 5)
    y = _norm_net("cmrnorm", 4, "")(x, outputs=["n"])["n"]  # default: not blocked
    net = built("[n]\ntype=cmrnorm\ninputs=data\nsize=4\nblocked=1\n[fc]\ntype=fc\ninputs=n\noutputs=2\n",
                shape="6x5x5", params="[n]\nscale=0.5\npow=0.75\nminDiv=2\n")
    yb = net(x, outputs=["n"])["n"]
    expected = torch.empty_like(x)
    for c in range(6):
        lo = (c // 4) * 4
        s = (x[:, lo:min(6, lo + 4)] ** 2).sum(1)
        expected[:, c] = x[:, c] * (2 + 0.5 / 4 * s) ** -0.75
    torch.testing.assert_close(yb, expected)
    assert not torch.allclose(y, yb)


def _window(h, w, y, x, size):
    return slice(max(0, y - size // 2), min(h, y - size // 2 + size)), slice(max(0, x - size // 2), min(w, x - size // 2 + size))


@pytest.mark.parametrize("size", [3, 4])
def test_rnorm_formula(size):
    x = rand(2, 6, 5, 5)
    y = _norm_net("rnorm", size)(x, outputs=["n"])["n"]
    expected = torch.empty_like(x)
    for i in range(5):
        for j in range(5):
            ys, xs = _window(5, 5, i, j, size)
            s = (x[:, :, ys, xs] ** 2).sum((2, 3))
            expected[:, :, i, j] = x[:, :, i, j] * (2 + 0.5 / size ** 2 * s) ** -0.75
    torch.testing.assert_close(y, expected)


def test_cnorm_formula():
    size = 3
    x = rand(2, 6, 5, 5) + 1
    y = _norm_net("cnorm", size)(x, outputs=["n"])["n"]
    mean = torch.empty_like(x)
    for i in range(5):
        for j in range(5):
            ys, xs = _window(5, 5, i, j, size)
            mean[:, :, i, j] = x[:, :, ys, xs].mean((2, 3))  # clipped count
    diffs = x - mean
    expected = torch.empty_like(x)
    for i in range(5):
        for j in range(5):
            ys, xs = _window(5, 5, i, j, size)
            s = (diffs[:, :, ys, xs] ** 2).sum((2, 3))
            expected[:, :, i, j] = x[:, :, i, j] * (2 + 0.5 / size ** 2 * s) ** -0.75
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("kind, size, stride, start, outputs", [
    ("max", 3, 2, 0, 0), ("avg", 3, 2, 0, 0), ("avg", 3, 3, -1, 0), ("max", 2, 2, 1, 0),
    ("maxabs", 3, 2, 0, 0), ("avg", 2, 2, 0, 4),
])
def test_pool_formula(kind, size, stride, start, outputs):
    body = (f"[p]\ntype=pool\npool={kind}\ninputs=data\nsizeX={size}\nstride={stride}\nstart={start}\n"
            f"outputsX={outputs}\n[fc]\ntype=fc\ninputs=p\noutputs=2\n")
    x = rand(2, 3, 7, 7)
    net = built(body, shape="3x7x7")
    y = net(x, outputs=["p"])["p"]
    o = outputs or 1 + math.ceil((7 - start - size) / stride)
    assert y.shape == (2, 3, o, o)
    for i in range(o):
        for j in range(o):
            r0, c0 = start + i * stride, start + j * stride
            win = x[:, :, max(0, r0):min(7, r0 + size), max(0, c0):min(7, c0 + size)].flatten(2)
            if kind == "max":
                v = win.max(2).values
            elif kind == "avg":
                v = win.mean(2)  # divided by the clipped count
            else:
                v = win.gather(2, win.abs().argmax(2, keepdim=True)).squeeze(2)
            torch.testing.assert_close(y[:, :, i, j], v)


@pytest.mark.parametrize("size, stride, start", [(2, 2, 0), (3, 2, 0), (3, 2, -1), (2, 1, 0), (4, 3, -2)])
def test_maxabs_keeps_the_later_of_two_as_large_as_cuda_convnet(size, stride, start):
    """Whole numbers of both signs, so windows hold -v and v: torch kept the first, cuda-convnet's
    MaxAbsPooler (acc = |acc| > |v| ? acc : v from 0, row-major) the last."""
    o = 1 + math.ceil((7 - start - size) / stride)
    net = built(f"[p]\ntype=pool\npool=maxabs\ninputs=data\nsizeX={size}\nstride={stride}\nstart={start}\n"
                "[fc]\ntype=fc\ninputs=p\noutputs=2\n", shape="3x7x7")
    x = torch.randint(-2, 3, (2, 3, 7, 7)).double()
    y = net.double()(x, outputs=["p"])["p"]
    expected = torch.zeros(2, 3, o, o, dtype=torch.float64)
    for n, c, i, j in itertools.product(range(2), range(3), range(o), range(o)):
        acc = 0.0
        for r in range(max(0, start + i * stride), min(7, start + i * stride + size)):
            for q in range(max(0, start + j * stride), min(7, start + j * stride + size)):
                v = x[n, c, r, q].item()
                acc = acc if abs(acc) > abs(v) else v
        expected[n, c, i, j] = acc
    assert torch.equal(y, expected)


NEURON_CASES = [
    ("relu", lambda x: x.clamp(min=0)),
    ("logistic", lambda x: 1 / (1 + torch.exp(-x))),
    ("abs", torch.abs),
    ("softrelu", lambda x: torch.where(x > 4, x, torch.log1p(torch.exp(x)))),
    ("square", lambda x: x * x),
    ("sqrt", lambda x: torch.sqrt(x.abs())),
    ("log[2]", lambda x: torch.log(2 + x.abs())),
    ("tanh[1.7159,0.6666]", lambda x: 1.7159 * torch.tanh(0.6666 * x)),
    ("brelu[1.5]", lambda x: x.clamp(0, 1.5)),
    ("linear[2,-1]", lambda x: 2 * x - 1),
    ("drelu[2]", lambda x: x - 2 * torch.tanh(x / 2)),
    ("ident", lambda x: x),
]


@pytest.mark.parametrize("neuron, inputs, gradient", [
    ("abs", [-1.0, 0.0, 1.0], [-1.0, -1.0, 1.0]),                      # unitInput > 0 ? 1 : -1
    ("brelu[1.5]", [-1.0, 0.0, 0.5, 1.5, 2.0], [0.0, 0.0, 1.0, 0.0, 0.0]),  # (act > 0) * (act < a)
    ("relu", [-1.0, 0.0, 1.0], [0.0, 0.0, 1.0]),                        # act > 0
])
def test_neuron_gradients_at_their_corners_are_cuda_convnets(neuron, inputs, gradient):
    """torch's abs gave 0 at 0 and clamp 1 at brelu's ends: cuda-convnet's neuron.cuh says otherwise."""
    net = built(f"[n]\ntype=neuron\ninputs=data\nneuron={neuron}\n[fc]\ntype=fc\ninputs=n\noutputs=2\n",
                shape=f"{len(inputs)}x1x1")
    x = torch.tensor(inputs).view(1, -1, 1, 1).requires_grad_()
    net(x, outputs=["n"])["n"].sum().backward()
    assert x.grad.flatten().tolist() == gradient


@pytest.mark.parametrize("neuron, formula", NEURON_CASES, ids=[n for n, _ in NEURON_CASES])
def test_neuron_functions(neuron, formula):
    net = built(f"[n]\ntype=neuron\ninputs=data\nneuron={neuron}\n[fc]\ntype=fc\ninputs=n\noutputs=2\n")
    x = rand(2, 3, 8, 8) * 3
    if neuron.startswith(("sqrt", "log")):
        x = x.abs()
    torch.testing.assert_close(net(x, outputs=["n"])["n"], formula(x))


def test_dropout_and_dropout2():
    body = ("[d]\ntype=dropout\ninputs=data\n[d2]\ntype=dropout2\ninputs=data\n"
            "[fc]\ntype=fc\ninputs=d,d2\noutputs=2\n")
    net = built(body, params="[d]\nkeep=0.25\n[d2]\nkeep=0.25\n")
    x = torch.ones(4, 3, 8, 8, dtype=torch.float64)
    out = net(x, outputs=["d", "d2"])
    assert torch.equal(out["d"], x) and torch.allclose(out["d2"], 0.25 * x)  # test time
    net.train()
    torch.manual_seed(0)
    out = net(x, outputs=["d", "d2"])
    assert set(out["d"].unique().tolist()) <= {0.0, 4.0} and set(out["d2"].unique().tolist()) <= {0.0, 1.0}
    assert abs(out["d"].mean().item() - 1.0) < 0.2  # 1/keep scaling keeps the mean
    assert abs(out["d2"].mean().item() - 0.25) < 0.1  # dropout2 drops while training, unscaled


def test_eltsum_eltmax_concat():
    body = ("[a]\ntype=neuron\ninputs=data\nneuron=linear[2,0]\n[s]\ntype=eltsum\ninputs=data,a\ncoeffs=1,-0.5\n"
            "[m]\ntype=eltmax\ninputs=data,a\n[c]\ntype=concat\ninputs=data,a\n"
            "[fc]\ntype=fc\ninputs=s,m,c\noutputs=2\n")
    net = built(body)
    x = rand(2, 3, 8, 8)
    out = net(x, outputs=["s", "m", "c"])
    torch.testing.assert_close(out["s"], torch.zeros_like(x))
    torch.testing.assert_close(out["m"], torch.maximum(x, 2 * x))
    torch.testing.assert_close(out["c"], torch.cat([x, 2 * x], 1))


def test_multi_input_fc_sums_banks():
    net = randomize(built("[a]\ntype=fc\ninputs=data\noutputs=4\n[b]\ntype=fc\ninputs=data,a\noutputs=3\n"))
    x = rand(2, 3, 8, 8)
    out = net(x, outputs=["a", "b"])
    expected = x.flatten(1) @ net.b.weight[0].T + out["a"] @ net.b.weight[1].T + net.b.bias
    torch.testing.assert_close(out["b"], expected)


def test_norm_without_scale_is_a_clear_error():
    from convspec.errors import SpecError
    with pytest.raises(SpecError, match=r"layer 'n': cmrnorm needs scale= and pow= \(in the params file\)"):
        built("[n]\ntype=cmrnorm\ninputs=data\nsize=3\n[fc]\ntype=fc\ninputs=n\noutputs=2\n")


@pytest.mark.parametrize("name", ["forward", "training", "to", "state_dict", "_modules", "cost", "costs",
                                  "output_name", "mean", "preprocess"])
def test_a_layer_named_like_the_built_nets_own_attribute_is_a_located_error(name):
    """A layer is stored under its section's name: [forward] passed check, then building
    said "unexpected KeyError ... This is a convspec bug"; [mean] built, then failed to load."""
    from convspec.errors import SpecError
    with pytest.raises(SpecError) as caught:
        built(f"[{name}]\ntype=fc\ninputs=data\noutputs=2\n")
    assert caught.value.message == (f"layer name '{name}' is taken by the built PyTorch module's own attribute "
                                    f"'{name}'; rename the section, e.g. [{name}1]")
    assert (caught.value.location.path, caught.value.location.line) == ("t.cfg", 7)
    renamed = built(f"[{name}1]\ntype=fc\ninputs=data\noutputs=2\n")
    assert renamed(torch.zeros(1, 3, 8, 8, dtype=torch.float64)).shape == (1, 2)


# --- every spec builds and runs ------------------------------------------------------------------------

def _all_specs():
    specs = [(p, None) for p in sorted(SPECS.glob("*.cfg")) if not p.name.endswith(".params.cfg")]
    if REFERENCE_SPECS.is_dir():
        for p in sorted(REFERENCE_SPECS.glob("*layers*.cfg")):
            specs.append((p, (3, 224, 224) if "imagenet" in p.name else (3, 32, 32)))
    return specs


@pytest.mark.parametrize("path, shape", _all_specs(), ids=lambda v: getattr(v, "name", str(v)))
def test_every_spec_builds_and_runs(path, shape):
    net = build(check_paths(path, input_shape=shape)).eval()
    c, h, w = net.spec.image_shape
    with torch.no_grad():
        logits = net(torch.randn(2, c, h, w))
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    assert sum(p.numel() for p in net.parameters()) == net.spec.total_params
