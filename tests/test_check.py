"""Stage 2: names, order, shapes, counts and devices, and the exact errors."""

import gc
import math
import time

import pytest

from convspec.check import check, check_paths, find_params_file
from convspec.errors import SpecError
from convspec.parse import parse_text
from convspec.values import Schedule

from conftest import REFERENCE_SPECS, ROOT, needs_shared

SPECS = ROOT / "specs"

HEAD = "[data]\ntype=data\ninputSize=3x32x32\n\n[labels]\ntype=data\ndataIdx=1\n"
TAIL = "[probs]\ntype=softmax\ninputs=fc\n\n[cost]\ntype=cost.logreg\ninputs=labels,probs\n"


def checked(body, params=None, input_shape=None, head=HEAD):
    spec = parse_text(head + body, "s.cfg")
    return check(spec, parse_text(params, "p.cfg") if params is not None else None, input_shape)


# --- the AlexNet spec: the paper's numbers ---------------------------------------

def test_alexnet_counts():
    net = check_paths(SPECS / "alexnet.cfg")
    assert net.total_params == 60_965_224  # the paper's "60 million"
    # conv/local/fc output units: 290,400 + 186,624 + 64,896 * 2 + 43,264 + 9,192
    assert net.total_neurons == 55 * 55 * 96 + 27 * 27 * 256 + 2 * 13 * 13 * 384 + 13 * 13 * 256 + 4096 * 2 + 1000
    assert net.layers["conv1a"].shape == (48, 55, 55)  # cuda-convnet rounds up; nn.Conv2d would give 54
    assert net.layers["pool5b"].shape == (128, 6, 6)
    assert net.params_path.endswith("alexnet.params.cfg")
    assert set(net.devices) == {0, 1}
    assert net.devices[0].params + net.devices[1].params == net.total_params


def test_alexnet_macs_by_formula():
    net = check_paths(SPECS / "alexnet.cfg")
    conv = lambda out, fc, k, fmaps: out * out * fmaps * fc * k * k
    expected = (conv(55, 3, 11, 96) + conv(27, 48, 5, 256) + conv(13, 256, 3, 384) + conv(13, 192, 3, 384)
                + conv(13, 192, 3, 256) + 9216 * 4096 + 4096 * 4096 + 4096 * 1000)
    assert net.total_macs == expected


def test_alexnet_lrn_ablation_has_same_parameters():
    net = check_paths(SPECS / "alexnet-lrn.cfg")
    assert net.total_params == 60_965_224
    assert net.layers["rnorm1a"].attrs["minDiv"] == 2.0 and net.layers["rnorm1a"].attrs["size"] == 5


def test_cifar_specs_match_cuda_convnet_counts():
    # 80sec: conv 3*32*25+32, 32*32*25+32, 32*64*25+64, fc 1024*64+64, 64*10+10
    assert check_paths(SPECS / "cifar10-80sec.cfg").total_params == 2432 + 25632 + 51264 + 65600 + 650
    assert check_paths(SPECS / "cifar10-18pct.cfg").total_params == 2432 + 25632 + 51264 + 10250


# The recipes in specs/ beside each net's own params file, and what each may change from it
# (the net's cuda-convnet rules): the README states these differences, so they are held here.
ALTERNATE_PARAMS = {
    "cifar10-80sec-fast.params.cfg": ("cifar10-80sec.cfg", {"epsW", "epsB"}),
    "cifar10-18pct-aug.params.cfg": ("cifar10-18pct.cfg", {"fc10.wc"}),
}


def test_every_params_file_in_specs_checks_with_its_net_and_changes_only_what_it_says():
    siblings = {p.name.replace(".cfg", ".params.cfg") for p in SPECS.glob("*.cfg")}
    assert {p.name for p in SPECS.glob("*.params.cfg")} - siblings == set(ALTERNATE_PARAMS)
    for name, (spec, may_change) in ALTERNATE_PARAMS.items():
        own, alternate = check_paths(SPECS / spec), check_paths(SPECS / spec, SPECS / name)
        changed = set()
        for layer in own.layers.values():
            for key in ("epsW", "epsB", "momW", "momB", "wc", "wball", "updatePeriod"):
                if layer.attrs.get(key) != alternate.layers[layer.name].attrs.get(key):
                    changed.add(key if key in may_change else f"{layer.name}.{key}")
        assert changed == may_change, name
    # cifar10-18pct-aug keeps cuda-convnet's schedule and adds flips and +-2 px shifts (crops of 36x36).
    own, aug = (check_paths(SPECS / "cifar10-18pct.cfg", SPECS / p).recipe
                for p in ("cifar10-18pct.params.cfg", "cifar10-18pct-aug.params.cfg"))
    assert (aug.epochs, aug.lr_drops, aug.lr_factor, aug.batch_size) == (own.epochs, own.lr_drops, own.lr_factor,
                                                                         own.batch_size) == (140, (120, 130), 0.1, 128)
    assert (aug.flip, aug.random_crop, aug.image_size, aug.precision) == (True, True, 36, "bf16")


@needs_shared
@pytest.mark.parametrize("name, shape, params", [
    ("cuda-convnet-layers-80sec.cfg", (3, 32, 32), 145_578),
    ("cuda-convnet-layers-18pct.cfg", (3, 32, 32), 89_578),
    ("cuda-convnet2-layers-imagenet-2gpu-model.cfg", (3, 224, 224), 60_965_224),
])
def test_reference_specs_check_unmodified(name, shape, params):
    net = check_paths(REFERENCE_SPECS / name, input_shape=shape)
    assert net.params_path is not None and "layer-params" in net.params_path  # cuda-convnet's pairing
    assert net.total_params == params


@needs_shared
def test_reference_params_are_read():
    net = check_paths(REFERENCE_SPECS / "cuda-convnet2-layers-imagenet-2gpu-model.cfg", input_shape=(3, 224, 224))
    assert net.layers["conv1a"].attrs["epsW"][0] == Schedule("dexp", 0.02, 250, 4)
    assert net.layers["rnorm1a"].attrs["minDiv"] == 2 and net.layers["cnorm2a"].attrs["scale"] == 0.001
    assert net.layers["dropout1a"].attrs["keep"] == 0.5
    assert net.layers["logprob"].attrs["topk"] == 5


def test_params_file_pairing(tmp_path):
    (tmp_path / "net.cfg").write_text("x")
    (tmp_path / "net.params.cfg").write_text("x")
    assert find_params_file(tmp_path / "net.cfg") == tmp_path / "net.params.cfg"
    (tmp_path / "layers-a.cfg").write_text("x")
    (tmp_path / "layer-params-a.cfg").write_text("x")
    assert find_params_file(tmp_path / "layers-a.cfg") == tmp_path / "layer-params-a.cfg"
    assert find_params_file(tmp_path / "other.cfg") is None


# --- semantics that surprise ---------------------------------------------------------

def test_filters_are_per_group_and_output_rounds_up():
    net = checked("[c]\ntype=conv\ninputs=data\nfilters=16\nfilterSize=5\nstride=2\ngroups=3\n"
                  "[fc]\ntype=fc\ninputs=c\noutputs=10\n" + TAIL, input_shape=(6, 31, 31))
    c = net.layers["c"]
    assert c.shape == (48, 1 + math.ceil((31 - 5) / 2), 14)
    assert c.params == 48 * 2 * 25 + 48


def test_multi_input_conv_has_one_bank_per_input_and_one_bias():
    net = checked("[a]\ntype=conv\ninputs=data\nfilters=8\nfilterSize=3\npadding=1\n"
                  "[b]\ntype=conv\ninputs=data,a\nfilters=4\nfilterSize=3,1\npadding=1,0\n"
                  "[fc]\ntype=fc\ninputs=b\noutputs=10\n" + TAIL)
    assert net.layers["b"].params == 4 * 3 * 9 + 4 * 8 * 1 + 4


def test_unshared_biases_and_local_layer_counts():
    net = checked("[c]\ntype=conv\ninputs=data\nfilters=4\nfilterSize=3\nsharedBiases=0\n"
                  "[l]\ntype=local\ninputs=c\nfilters=2\nfilterSize=3\n"
                  "[fc]\ntype=fc\ninputs=l\noutputs=10\n" + TAIL)
    assert net.layers["c"].params == 4 * 3 * 9 + 4 * 30 * 30
    assert net.layers["l"].params == 28 * 28 * (2 * 4 * 9) + 2 * 28 * 28


def test_pool_output_formula_and_start():
    net = checked("[p]\ntype=pool\npool=max\ninputs=data\nsizeX=3\nstride=2\n"
                  "[q]\ntype=pool\npool=avg\ninputs=data\nsizeX=4\nstride=3\nstart=-1\n"
                  "[fc]\ntype=fc\ninputs=p,q\noutputs=10\n" + TAIL)
    assert net.layers["p"].shape == (3, 16, 16)  # 1 + ceil((32 - 3) / 2)
    assert net.layers["q"].shape == (3, 1 + math.ceil((32 + 1 - 4) / 3), 11)


def test_replicated_layer_weights_counted_once():
    net = checked("[fc]\ntype=fc\ninputs=data\noutputs=10\ngpu=0,1\n" + TAIL)
    assert net.total_params == 3 * 32 * 32 * 10 + 10
    assert net.devices[0].params == net.devices[1].params == net.total_params


def test_data_fed_layers_default_to_gpu_0_and_say_so():
    net = checked("[fc]\ntype=fc\ninputs=data\noutputs=10\n" + TAIL)
    assert net.layers["fc"].gpu == [0] and net.layers["probs"].gpu == [0]
    assert any("placed on gpu 0: fc" in n for n in net.notes)


def test_legacy_sizex_on_norm_layers():
    net = checked("[n]\ntype=cmrnorm\ninputs=data\nsizeX=3\n[fc]\ntype=fc\ninputs=n\noutputs=10\n" + TAIL)
    assert net.layers["n"].attrs["size"] == 3


def test_kernel_tuning_keys_are_ignored_and_keys_are_case_insensitive():
    net = checked("[c]\ntype=conv\ninputs=data\nFILTERS=16\nfiltersize=3\npartialSum=4\nsumWidth=2\n"
                  "randSparse=false\n[fc]\ntype=fc\ninputs=c\noutputs=10\n" + TAIL)
    assert net.layers["c"].shape == (16, 30, 30)


def test_input_overrides_recorded_size():
    assert checked("[fc]\ntype=fc\ninputs=data\noutputs=10\n" + TAIL, input_shape=(1, 8, 8)).total_params == 650


# --- schedules: cuda-convnet2's lr.cu formulas ----------------------------------------------

def test_schedules():
    assert Schedule("const", 0.1).value(0.7) == 0.1
    assert Schedule("linear", 1.0, 4.0).value(0.5) == pytest.approx(0.5 * 1 + 0.5 * 0.25)
    assert Schedule("exp", 1.0, 100.0).value(0.5) == pytest.approx(0.1)
    d = Schedule("dexp", 0.02, 250, 4)
    steps = [0.02 * 250 ** (-i / 3) for i in range(4)]
    assert [d.value(p) for p in (0.0, 0.25, 0.26, 0.5, 0.6, 0.75, 0.8, 1.0)] == pytest.approx(
        [steps[0], steps[0], steps[1], steps[1], steps[2], steps[2], steps[3], steps[3]])
    assert Schedule("dexp", 1.0, 10, 1).value(0.0) == pytest.approx(0.1)


# --- errors: exact text and location ----------------------------------------------------------

CONV = "[c]\ntype=conv\ninputs=data\nfilters=16\nfilterSize=5\n"
FC = "[fc]\ntype=fc\ninputs=c\noutputs=10\n"

ERRORS = [
    # (spec body after HEAD, params or None, first line of the error[, a HEAD of its own])
    ("[conv1]\nepsW=0.001\n[fc]\nepsW=0.01\n", None, "s.cfg:1:2: no section has type=, so this looks like a "
     "layer-params file; give the layer file as SPEC and this one with --params", ""),
    # cuda-convnet2's rule for a given modulesX: more windows see zeros, fewer would skip pixels.
    (CONV + "modulesX=20\n" + FC + TAIL, None,
     "s.cfg:13:10: layer 'c': modulesX=20 output windows (stride=1, padding=0) do not cover the 32x32 input of "
     "'data'; use modulesX=28 or more, or leave it out"),
    # An empty value was read as the default: initW= trained with 0.01.
    (CONV + "initW=\n" + FC + TAIL, None,
     "s.cfg:13:7: layer 'c': initW= has no value; give one or delete the line (the default is 0.01)"),
    (CONV + FC + TAIL, "[c]\nepsW=\n", "p.cfg:2:6: layer 'c': epsW= has no value; give one or delete the line "
                                      "(the default is none)"),
    ("[c]\ntype=conv\ninputs=dta\nfilters=16\nfilterSize=5\n" + FC + TAIL, None,
     "s.cfg:10:8: layer 'c': input 'dta' is not defined; did you mean 'data'?"),
    # pool1 and pool3 are as close to 'pool9'; pool3 comes later and would make a cycle.
    ("[pool1]\ntype=pool\npool=max\ninputs=data\nsizeX=2\nstride=2\n"
     "[c]\ntype=conv\ninputs=pool9\nfilters=16\nfilterSize=5\n"
     "[pool3]\ntype=pool\npool=max\ninputs=c\nsizeX=2\nstride=2\n" + FC.replace("inputs=c", "inputs=pool3") + TAIL,
     None, "s.cfg:16:8: layer 'c': input 'pool9' is not defined; did you mean 'pool1'?"),
    (CONV + "[c]\ntype=fc\ninputs=data\noutputs=3\n" + FC + TAIL, None,
     "s.cfg:13:2: duplicate section [c] (first at line 8); rename or merge one"),
    # An old spelling beside the new one, in either order: the second once won silently.
    (CONV + "numFilters=16\n" + FC + TAIL, None,
     "s.cfg:13:1: layer 'c': both numFilters= (old spelling) and filters= are set; keep filters="),
    ("[c]\ntype=conv\ninputs=data\nnumFilters=32\nfilterSize=5\nfilters=64\n" + FC + TAIL, None,
     "s.cfg:13:1: layer 'c': both numFilters= (old spelling) and filters= are set; keep filters="),
    ("[p]\ntype=pool\npool=max\ninputs=data\nsizeX=3\nsubsX=3\nstride=2\n"
     "[fc]\ntype=fc\ninputs=p\noutputs=10\n" + TAIL, None,
     "s.cfg:13:1: layer 'p': both subsX= (old spelling) and sizeX= are set; keep sizeX="),
    (CONV + "filters=32\n" + FC + TAIL, None,
     "s.cfg:13:1: layer 'c': duplicate key 'filters' with a different value (first at line 11); keep one"),
    ("[c]\ntype=conv\ninputs=data\nfilters=x16\nfilterSize=5\n" + FC + TAIL, None,
     "s.cfg:11:9: layer 'c': filters must be a whole number, not 'x16'"),
    # Python's int() reads any script's digits: filters=\u0663 (Arabic-Indic three) trained 3 filters.
    ("[c]\ntype=conv\ninputs=data\nfilters=\u0663\nfilterSize=5\n" + FC + TAIL, None,
     "s.cfg:11:9: layer 'c': filters must be a whole number, not '\u0663'"),
    (CONV + FC + TAIL, None, "s.cfg:3:11: layer 'data': inputSize must be CxHxW with positive whole numbers, e.g. "
     "3x224x224, not '3x\u0663\u0662x32'", HEAD.replace("3x32x32", "3x\u0663\u0662x32")),
    ("[c]\ntype=convolution\ninputs=data\n" + FC + TAIL, None,
     "s.cfg:9:6: layer 'c': unknown layer type 'convolution'; did you mean 'conv'?"),
    (CONV + "filtrs=3\n" + FC + TAIL, None,
     "s.cfg:13:1: layer 'c': unknown key 'filtrs' for type conv; did you mean 'filters'?"),
    ("[c]\ntype=conv\ninputs=data\nfilters=16\nfilterSize=0\n" + FC + TAIL, None,
     "s.cfg:12:12: layer 'c': filterSize=0 must be at least 1"),
    ("[../x]\ntype=conv\ninputs=data\nfilters=16\nfilterSize=5\n[fc]\ntype=fc\ninputs=../x\noutputs=10\n" + TAIL, None,
     "s.cfg:8:2: section name '../x' contains '/' or '\\'; layer names also name files (convspec show's "
     "filters-NAME.png), so use letters, digits, '_', '-' or '.'"),
    # '.' cannot be in a PyTorch module name and becomes '_': [a.b] and [a_b] once built one shared module.
    ("[a.b]\ntype=fc\ninputs=data\noutputs=2\n[a_b]\ntype=fc\ninputs=a.b\noutputs=10\n" + TAIL, None,
     "s.cfg:12:2: layers 'a.b' and 'a_b' would both be PyTorch module 'a_b' ('.' becomes '_'); rename one"),
    (CONV + "initB=-1e39\n" + FC + TAIL, None,
     "s.cfg:13:7: layer 'c': initB=-1e39 is beyond float32's range (magnitude at most 3.4e38), the precision "
     "nets are built and trained in"),
    (CONV + "initW=3.5e38\n" + FC + TAIL, None,
     "s.cfg:13:7: layer 'c': initW=3.5e38 is beyond float32's range (magnitude at most 3.4e38), the precision "
     "nets are built and trained in"),
    ("[c]\ntype=conv\ninputs=data\nfilters=16\nfilterSize=40\n" + FC + TAIL, None,
     "s.cfg:12:12: layer 'c': filterSize=40 is larger than the 32x32 input of 'data' plus padding=0; "
     "use a smaller filterSize or more padding"),
    ("[c]\ntype=conv\ninputs=data\nfilters=16\nfilterSize=5\ngroups=2\n" + FC + TAIL, None,
     "s.cfg:13:8: layer 'c': groups=2 does not divide the 3 channels of 'data'"),
    ("[c]\ntype=conv\ninputs=data\nchannels=1\nfilters=16\nfilterSize=5\n" + FC + TAIL, None,
     "s.cfg:11:10: layer 'c': channels=1 but input 'data' has 3 channels; set channels=3"),
    ("[c]\ntype=conv\ninputs=data\nfilterSize=5\n" + FC + TAIL, None,
     "s.cfg:8:2: layer 'c': conv needs filters=... (filters per group)"),
    ("[c]\ntype=conv\ninputs=fc\nfilters=16\nfilterSize=5\n" + FC + TAIL, None,
     "s.cfg:10:8: layer 'c': inputs form a cycle: c -> fc -> c; a layer cannot read its own output"),
    ("[c]\ninputs=data\n" + FC + TAIL, None,
     "s.cfg:8:2: layer 'c' has no type=; add one, e.g. type=conv (types: data, conv, local, fc, pool, "
     "neuron, softmax, dropout, dropout2, cmrnorm, rnorm, cnorm, concat, pass, eltsum, eltmax, cost.logreg)"),
    (CONV + "initWFunc=mod.fn(1)\n" + FC + TAIL, None,
     "s.cfg:13:1: layer 'c': initWFunc names a Python function cuda-convnet would import and run; "
     "a spec must never run code, so use initW=STD (Gaussian) instead"),
    (CONV + "neuron=relux\n" + FC + TAIL, None,
     "s.cfg:13:8: layer 'c': neuron: unknown neuron function 'relux'; did you mean 'relu'?"),
    (CONV + "neuron=tanh[1.7,b]\n" + FC + TAIL, None,
     "s.cfg:13:17: layer 'c': neuron=tanh[a,b]: b must be a number, not 'b'"),
    (CONV + "neuron=tanh[1]\n" + FC + TAIL, None,
     "s.cfg:13:8: layer 'c': neuron: neuron 'tanh' is written tanh[a,b] (f(x) = a * tanh(b * x)), not 'tanh[1]'"),
    # Quoted as typed: the parsed form once came back as 'tanh[1;2;3]'.
    (CONV + "neuron=tanh[1,2,3]\n" + FC + TAIL, None,
     "s.cfg:13:8: layer 'c': neuron: neuron 'tanh' is written tanh[a,b] (f(x) = a * tanh(b * x)), not "
     "'tanh[1,2,3]'"),
    ("[p]\ntype=pool\npool=mean\ninputs=data\nsizeX=3\nstride=2\n[fc]\ntype=fc\ninputs=p\noutputs=10\n" + TAIL, None,
     "s.cfg:10:6: layer 'p': pool=mean is not one of max, avg, maxabs"),
    ("[p]\ntype=pool\npool=avg\ninputs=data\nsizeX=2\nstride=2\nstart=-2\n[fc]\ntype=fc\ninputs=p\noutputs=10\n" + TAIL, None,
     "s.cfg:14:7: layer 'p': start=-2 puts the first window wholly before the image (a 2-pixel window from -2); "
     "use start=-1 or more"),
    ("[p]\ntype=pool\npool=avg\ninputs=data\nsizeX=2\nstride=2\noutputsX=17\n[fc]\ntype=fc\ninputs=p\noutputs=10\n" + TAIL, None,
     "s.cfg:14:10: layer 'p': outputsX=17 puts the last window past the 32x32 input of 'data'; use outputsX=16 or less"),
    (CONV + "gpu=0,0\n" + FC + TAIL, None,
     "s.cfg:13:5: layer 'c': gpu=0,0 lists a GPU twice; replicas must run on different GPUs"),
    ("[c]\ntype=conv\ninputs=data\nfilters=16,8\nfilterSize=5\n" + FC + TAIL, None,
     "s.cfg:11:9: layer 'c': filters has 2 values but the layer has 1 input; give one value, or one per input"),
    (CONV + FC + TAIL, "[c]\nepsW=fast\n",
     "p.cfg:2:6: layer 'c': epsW: unknown schedule 'fast'; use a number or one of const[base=B], "
     "linear[base=B;tgtFactor=F], exp[base=B;tgtFactor=F], dexp[base=B;tgtFactor=F;numSteps=N]"),
    (CONV + FC + TAIL, "[c]\nepsW=dexp[base=0.1;tgtFactor=10]\n",
     "p.cfg:2:6: layer 'c': epsW: dexp schedule needs numSteps (as dexp[base=...;tgtFactor=...;numSteps=...])"),
    (CONV + FC + TAIL, "[c]\nepsW=dexp[base=0.1;tgtFactor=10;numSteps=0]\n",
     "p.cfg:2:42: layer 'c': epsW: numSteps=0 must be at least 1"),
    (CONV + FC + TAIL, None, "s.cfg:3:11: layer 'data': inputSize=32x32x3 is read as channels x height x width "
     "(32 channels of 32x3); did you mean inputSize=3x32x32?", HEAD.replace("3x32x32", "32x32x3")),
    # A non-square input checked and built, then training's square crops failed in the fc layer.
    (CONV + FC + TAIL, None, "s.cfg:3:11: layer 'data': inputSize=3x32x24 is not square, and training and "
     "evaluation feed square crops (as cuda-convnet's did); use inputSize=3x32x32 or 3x24x24",
     HEAD.replace("3x32x32", "3x32x24")),
    (CONV + FC + TAIL, "[c]\nepsW=exp[base=0.1;tgtFactor=10;base=0.2]\n",
     "p.cfg:2:32: layer 'c': epsW: exp has base= twice; keep one"),
    (CONV + FC + TAIL, "[c]\nepsW=exp[base=nan;tgtFactor=10]\n",
     "p.cfg:2:15: layer 'c': epsW: base must be a number, not 'nan'"),
    (CONV + FC + TAIL + "[train]\nepochs=2\n", None,
     "s.cfg:24:2: [train] is the training recipe and belongs in the params file (NAME.params.cfg beside the "
     "spec), not the layer file; move it there"),
    ("[d]\ntype=dropout\ninputs=data\nkeep=1.5\n" + FC.replace("inputs=c", "inputs=d") + TAIL, None,
     "s.cfg:11:6: layer 'd': keep=1.5 must be above 0 and at most 1 (the share kept)"),
    (CONV + FC + TAIL, "[c]\nmomW=2\n", "p.cfg:2:6: layer 'c': momW=2 must be below 1"),
    (CONV + FC + TAIL, "[c]\nmomB=1.0\n", "p.cfg:2:6: layer 'c': momB=1.0 must be below 1"),
    (CONV + FC + TAIL, "[c]\nfilters=16\n",
     "p.cfg:2:1: layer 'c': 'filters' is set in both the layer file (line 11) and the params file; keep one"),
    (CONV + "[fc]\ntype=fc\ninputs=c\noutputs=10\n[probs]\ntype=softmax\ninputs=fc\n"
     "[cost]\ntype=cost.logreg\ninputs=probs,labels\n", None,
     "s.cfg:22:8: layer 'cost': the first input of cost.logreg must be the labels (a data layer with dataIdx=1), "
     "but 'probs' has 10 outputs"),
    (CONV + "[fc]\ntype=fc\ninputs=labels\noutputs=10\n" + TAIL, None,
     "s.cfg:15:8: layer 'fc': input 'labels' is the labels (dataIdx=1), which only a cost layer reads; "
     "give the layer whose output this one takes"),
    (CONV + FC + TAIL, None, "s.cfg:5:2: layer 'labels': dataIdx=0 (the images) is already read by layer 'data'; "
     "the labels are dataIdx=1", "[data]\ntype=data\ninputSize=3x32x32\n\n[labels]\ntype=data\n"),
    (CONV + FC + TAIL, None, "s.cfg:7:9: layer 'labels': dataIdx=2, but a convspec data source gives two items: "
     "the images (dataIdx=0) and the labels (dataIdx=1)", HEAD.replace("dataIdx=1", "dataIdx=2")),
    (CONV + FC + TAIL, None, "s.cfg:10:9: layer 'labels2': dataIdx=1 (the labels) is already read by layer "
     "'labels'; keep one labels layer", HEAD + "[labels2]\ntype=data\ndataIdx=1\n"),
]


@pytest.mark.parametrize("body, params, message, head", [(*e, HEAD)[:4] for e in ERRORS],
                         ids=[e[2].split(": ", 1)[1][:50] for e in ERRORS])
def test_error_messages(body, params, message, head):
    with pytest.raises(SpecError) as err:
        checked(body, params, head=head)
    assert str(err.value).split("\n")[0] == message


def test_error_shows_the_line_and_a_caret():
    with pytest.raises(SpecError) as err:
        checked("[c]\ntype=conv\ninputs=dta\nfilters=16\nfilterSize=5\n" + FC + TAIL)
    assert str(err.value).split("\n")[1:] == ["inputs=dta", "       ^"]


def test_missing_image_size_asks_for_input():
    with pytest.raises(SpecError) as err:
        checked(FC.replace("inputs=c", "inputs=data") + TAIL, head="[data]\ntype=data\n[labels]\ntype=data\ndataIdx=1\n")
    assert str(err.value).split("\n")[0] == (
        "s.cfg:1:2: data layer 'data' has no image size: add inputSize=CxHxW to this section, or pass "
        "--set data.inputSize=CxHxW (e.g. --set data.inputSize=3x32x32; check and bench also take --input 3x32x32)")


@pytest.mark.parametrize("content, message", [
    (b"", "empty spec: no [layer] sections; a spec starts with e.g. [data] and type=data"),
    (b"# only a comment\n", "empty spec: no [layer] sections; a spec starts with e.g. [data] and type=data"),
    (b"\x00\x01binary", "is a binary file, not a spec (a NUL byte); a spec is text of [section] and key=value lines"),
    (b"[a]\ntype=\xff\n", "is not UTF-8 text (bad byte 0xff); save it as UTF-8"),
])
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.cfg"
    path.write_bytes(content)
    with pytest.raises(SpecError) as err:
        check_paths(path)
    assert err.value.message == message
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize("ending", ["\r\n", "\r"], ids=["windows", "old-mac"])
def test_other_line_endings_read_as_the_same_lines(tmp_path, ending):
    """A lone CR (old Mac files) was one long line: the params file's rates went unread and
    train said the file set none.  ConfigParser, which cuda-convnet used, read both."""
    spec, params = tmp_path / "net.cfg", tmp_path / "net.params.cfg"
    spec.write_bytes((SPECS / "cifar10-80sec.cfg").read_bytes().replace(b"\n", ending.encode()))
    params.write_bytes((SPECS / "cifar10-80sec.params.cfg").read_bytes().replace(b"\n", ending.encode()))
    net, lf = check_paths(spec), check_paths(SPECS / "cifar10-80sec.cfg")
    def rules(n):
        return [(name, l.shape, l.attrs) for name, l in n.layers.items()]
    assert rules(net) == rules(lf) and net.recipe == lf.recipe and net.total_params == lf.total_params
    assert (net.layers["conv1"]["epsW"][0].base, net.layers["fc10"]["wc"]) == (0.001, [0.03])  # the params file's
    text = (SPECS / "cifar10-80sec.cfg").read_text()
    line = text[:text.index("filters=32")].count("\n") + 1
    spec.write_bytes(text.replace("filters=32", "filters=x", 1).replace("\n", ending).encode())
    with pytest.raises(SpecError) as err:
        check_paths(spec)
    assert err.value.location.line == line


def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as err:
        check_paths(tmp_path / "nope.cfg")
    assert str(err.value).startswith(f"{tmp_path / 'nope.cfg'}: no such file")


def test_set_replaces_a_key_the_file_writes_in_its_old_spelling():
    """Runs trained with --set conv.filters=16 on a numFilters= file must still open."""
    old = "[c]\ntype=conv\ninputs=data\nnumFilters=8\nfilterSize=5\n" + FC + TAIL
    for override in ("c.filters=16", "c.numFilters=16"):
        net = check(parse_text(HEAD + old, "s.cfg"), None, None, overrides=[override])
        assert net.layers["c"].shape[0] == 16
    new = CONV + FC + TAIL  # filters=16
    assert check(parse_text(HEAD + new, "s.cfg"), None, None, overrides=["c.numFilters=4"]).layers["c"].shape[0] == 4


def test_unknown_params_section_is_noted_not_fatal():
    net = checked(CONV + FC + TAIL, "[c]\nepsW=0.1\n[conv9]\nepsW=0.1\n")
    assert any("params section [conv9] names no layer" in n for n in net.notes)


def test_costs_that_all_weigh_nothing_are_noted():
    note = ("coeff=0 on every cost (cost): the loss is always 0 and training learns nothing; give a cost a coeff "
            "above 0 (cuda-convnet's logprob has 1)")
    assert note in checked(CONV + FC + TAIL, "[cost]\ncoeff=0\n").notes
    assert not any(n.startswith("coeff=0") for n in checked(CONV + FC + TAIL, "[cost]\ncoeff=0.5\n").notes)


def test_a_topk_training_does_not_report_is_a_caution():
    """topk=3 was accepted and ignored without a word (cuda-convnet printed the top-3 error as it trained)."""
    caution = ("layer 'cost': topk=3 is reported by eval, not by training, whose lines give the top-1 and top-5 "
               "errors: convspec eval --topk 3")
    assert checked(CONV + FC + TAIL, "[cost]\ntopk=3\n").cautions == [caution]
    for same in ("1", "5"):  # what cuda-convnet printed, training prints too
        assert checked(CONV + FC + TAIL, f"[cost]\ntopk={same}\n").cautions == []


def test_several_cost_layers_are_noted_with_the_sum_they_train_on():
    aux = ("[aux]\ntype=fc\ninputs=c\noutputs=10\n[auxprobs]\ntype=softmax\ninputs=aux\n"
           "[auxcost]\ntype=cost.logreg\ninputs=labels,auxprobs\ncoeff=0.3\n")
    net = checked(CONV + FC + TAIL + aux)
    assert [c.name for c in net.costs] == ["cost", "auxcost"]
    assert ("2 cost layers: training minimises 1*cost + 0.3*auxcost; train and eval report the error of "
            "'cost', the first in the file") in net.notes
    assert not any("cost layers" in n for n in checked(CONV + FC + TAIL).notes)
    # Both heads score the one labels layer: a narrower one failed only at the first step, in cross-entropy.
    with pytest.raises(SpecError) as err:
        checked(CONV + FC + TAIL + aux.replace("outputs=10", "outputs=2"))
    assert str(err.value).splitlines()[0] == ("s.cfg:33:15: layer 'auxcost': its softmax 'auxprobs' has 2 outputs but 'cost''s has "
                              "10; every cost reads the same labels, so give each the same outputs")


def test_a_params_file_for_another_spec_is_refused():
    """Once only notes (one per section) and a net with no learning rates; bench timed it without its update."""
    with pytest.raises(SpecError) as err:
        checked(CONV + FC + TAIL, "[conv1a]\nepsW=0.1\n[fc8]\nepsW=0.1\n[cost]\ncoeff=1\n[train]\nepochs=2\n")
    assert str(err.value) == ("p.cfg: gives no learning rate (epsW) to the layers with weights in s.cfg (c, fc) and "
                              "names layers it lacks (conv1a, fc8); give the params file of this spec with --params")
    # A params file with only the recipe, or only for weightless layers, names no stranger: fine.
    assert checked(CONV + FC + TAIL, "[train]\nepochs=2\n").recipe.epochs == 2
    # The rates in the layer file, and a leftover section in the params file: the spec's own pair.
    in_layer_file = CONV + "epsW=0.01\n" + FC + "epsW=0.01\n" + TAIL
    assert any("[rnorm1] names no layer" in n for n in checked(in_layer_file, "[rnorm1]\nscale=0.001\n").notes)


# --- speed ---------------------------------------------------------------------------------------

def _chain_spec(n_layers: int) -> str:
    body = [HEAD]
    prev = "data"
    for i in range(n_layers):
        body.append(f"[n{i}]\ntype=neuron\ninputs={prev}\nneuron=relu\n")
        prev = f"n{i}"
    body.append(f"[fc]\ntype=fc\ninputs={prev}\noutputs=10\n" + TAIL)
    return "".join(body)


def test_a_long_cycle_is_one_short_line():
    body = _chain_spec(100).replace("inputs=data\nneuron", "inputs=n99\nneuron", 1)
    with pytest.raises(SpecError) as err:
        checked(body, head="")
    assert str(err.value).split("\n")[0] == (
        "s.cfg:10:8: layer 'n0': inputs form a cycle: n0 -> n1 -> n2 -> n3 -> n4 -> ... (91 more) -> n96 -> n97 -> "
        "n98 -> n99 -> n0; a layer cannot read its own output")


def test_check_time_grows_linearly_with_the_layers():
    """Guards against a quadratic pass: 8x the layers took 9-13x the time, and 26-68x while unused
    layers were found by asking each layer for its readers.  A ratio of best-of-5 times, not a
    wall-clock limit, so that a busy machine does not fail it."""
    def best(layers: int) -> float:
        text = _chain_spec(layers)
        times = []
        for _ in range(5):
            # The cyclic collector's full passes scale with every object the earlier tests left
            # alive: timed with it on, the whole file's run once measured 36x.
            gc.collect()
            gc.disable()
            try:
                start = time.perf_counter()
                net = check(parse_text(text, "big.cfg"))
                times.append(time.perf_counter() - start)
            finally:
                gc.enable()
        assert len(net.layers) == layers + 5
        return min(times)

    assert best(1600) < 20 * best(200)


# --- the [train] section (convspec extension) ------------------------------------------------------

def test_train_section_recipe_keys():
    net = checked(CONV + FC + TAIL, "[train]\nepochs=140\nbatchSize=64\nlrDrops=120,130\nlrFactor=0.5\n"
                                    "plateau=2\nvalFraction=0.2\nsplitSeed=7\nseed=3\nimageSize=32\n")
    r = net.recipe
    assert (r.epochs, r.batch_size, r.lr_drops, r.lr_factor, r.plateau) == (140, 64, (120, 130), 0.5, 2)
    assert (r.val_fraction, r.split_seed, r.seed, r.image_size) == (0.2, 7, 3, 32)
    assert r.with_options(epochs=5, seed=None).epochs == 5 and r.with_options(seed=None).seed == 3
    # lrDrops=none clears a spec's drops: the ablation once needed a drop past the last epoch.
    assert checked(CONV + FC + TAIL, "[train]\nlrDrops=None\n").recipe.lr_drops == ()
    with_drops = check(parse_text(HEAD + CONV + FC + TAIL, "s.cfg"), parse_text("[train]\nlrDrops=5\n", "p.cfg"),
                       None, overrides=["train.lrDrops=none"])
    assert with_drops.recipe.lr_drops == ()


@pytest.mark.parametrize("overrides, message", [
    (["conv1.epsW"], "--set takes LAYER.KEY=VALUE (e.g. --set conv1.epsW=0.002 or --set train.epochs=5), "
                     "not 'conv1.epsW'"),
    (["epsW=1"], "--set takes LAYER.KEY=VALUE (e.g. --set conv1.epsW=0.002 or --set train.epochs=5), not 'epsW=1'"),
    # The form is right, the value missing: it once said "--set takes LAYER.KEY=VALUE".
    (["c.neuron="], "--set c.neuron=: no value after '='; give one; to drop the neuron, --set c.neuron=ident"),
    (["c.filters= "], "--set c.filters= : no value after '='; give one"),
    (["c.filters=many"], "--set:1:11: layer 'c': filters must be a whole number, not 'many'"),
    (["c.filters=3]"], "--set:1:12: unexpected ']'; expected ',', a comment or end of line"),
    (["conv1.filters=3"], "--set conv1.filters=3: no layer 'conv1' in s.cfg; use a section name from the spec, "
                          "or train for the recipe"),
    (["a]b.epsW=1"], "--set a]b.epsW=1: 'a]b' cannot be a layer name; use a [section] name from the spec, or train "
                     "for the recipe"),
    (["train.epochs=0"], "--set:1:14: [train]: epochs=0 must be at least 1"),
    (["train.epoch=3"], "--set:1:7: [train]: unknown key 'epoch'; did you mean 'epochs'?"),
    (["c.filters=8\nneuron=tanh"], "--set takes one KEY=VALUE on one line, not 'c.filters=8\\nneuron=tanh'; give "
                                    "each key its own --set"),
    (["c.filters=3", "c.FILTERS=5"], "--set c.FILTERS is given twice (c.filters=3 and c.FILTERS=5); keep one"),
    # An error the override causes elsewhere is located in the file, and says the file was changed.
    (["data.inputSize=3x4x4", "fc.outputs=10"], "s.cfg:12:12: layer 'c': filterSize=5 is larger than the 4x4 input "
     "of 'data' plus padding=0; use a smaller filterSize or more padding (the file as changed by --set "
     "data.inputSize=3x4x4 --set fc.outputs=10)"),
])
def test_override_errors_point_into_the_option(overrides, message):
    from convspec.check import check as check_files
    from convspec.parse import parse_text

    with pytest.raises(SpecError) as err:
        check_files(parse_text(HEAD + CONV + FC + TAIL, "s.cfg"), None, None, overrides)
    assert str(err.value).split("\n")[0] == message


def test_an_input_size_on_the_labels_layer_is_noted():
    head = HEAD.replace("dataIdx=1\n", "dataIdx=1\ninputSize=3x32x32\n")
    assert "inputSize on 'labels' has no effect: dataIdx=1 is the labels" in checked(CONV + FC + TAIL, head=head).notes


def test_a_shape_error_caused_by_input_says_so():
    from convspec.check import check as check_files
    from convspec.parse import parse_text

    with pytest.raises(SpecError) as err:
        check_files(parse_text(HEAD + CONV + FC + TAIL, "s.cfg"), None, (3, 4, 4))
    assert str(err.value).split("\n")[0] == ("s.cfg:12:12: layer 'c': filterSize=5 is larger than the 4x4 input "
                                             "of 'data' plus padding=0; use a smaller filterSize or more padding "
                                             "(with --input 3x4x4)")


def test_overrides_replace_values_in_either_file_and_add_new_keys():
    from convspec.check import check as check_files
    from convspec.parse import parse_text

    spec, params = parse_text(HEAD + CONV + FC + TAIL, "s.cfg"), parse_text("[c]\nepsW=0.1\n", "p.cfg")
    net = check_files(spec, params, None, ["c.epsW=0.5", "c.filters=8", "c.epsB=0.25", "train.flip=1"])
    assert net.layers["c"]["epsW"][0].base == 0.5 and net.layers["c"]["epsB"].base == 0.25
    assert net.layers["c"].shape[0] == 8 and net.recipe.flip
    assert net.overrides == ["c.epsW=0.5", "c.filters=8", "c.epsB=0.25", "train.flip=1"]
    assert check_files(spec, params).layers["c"].shape[0] != 8  # the parsed files are not changed


def test_train_section_data_keys_and_crop_override():
    net = checked(CONV + FC + TAIL, "[train]\ncrop=24\nrandomCrop=1\nflip=true\npcaNoise=0.1\ntestViews=10\n")
    r = net.recipe
    assert (r.crop, r.random_crop, r.flip, r.pca_noise, r.test_views) == (24, True, True, 0.1, 10)
    assert r.precision == "fp32" and checked(CONV + FC + TAIL, "[train]\nprecision=bf16\n").recipe.precision == "bf16"
    assert net.layers["data"].shape == (3, 24, 24)  # the net sees the crops
    assert checked(CONV + FC + TAIL, "[train]\ncrop=24\n", input_shape=(3, 28, 28)).layers["data"].shape == (3, 28, 28)


@pytest.mark.parametrize("params, message", [
    ("[train]\ncropp=24\n", "p.cfg:2:1: [train]: unknown key 'cropp'; did you mean 'crop'?"),
    ("[train]\ntestViews=5\n", "p.cfg:2:11: [train]: testViews must be 1 (centre crop) or 10 (the paper's 10 views), not 5"),
    ("[train]\nflip=maybe\n", "p.cfg:2:6: [train]: flip must be 1, 0, true, false, yes, no, on or off, not 'maybe'"),
    ("[train]\npcaNoise=-1\n", "p.cfg:2:10: [train]: pcaNoise=-1 must be at least 0"),
    ("[train]\nimageSize=100000\n", "p.cfg:2:11: [train]: imageSize=100000 must be at most 4096"),
    ("[train]\npcaNoise=1e30\n", "p.cfg:2:10: [train]: pcaNoise=1e30 is the colour noise's standard deviation, in "
     "units of each principal component's (the paper's is 0.1); above 10 it would bury the image: use 0 to 10"),
    ("[train]\nepochs=0\n", "p.cfg:2:8: [train]: epochs=0 must be at least 1"),
    ("[train]\nseed=99999999999999999999\n",
     "p.cfg:2:6: [train]: seed=99999999999999999999 must be at most 9223372036854775807"),
    ("[train]\nepochs=2.5\n", "p.cfg:2:8: [train]: epochs must be a whole number, not '2.5'"),
    ("[train]\nlrDrops=130,120\n", "p.cfg:2:9: [train]: lrDrops must list increasing epochs, e.g. lrDrops=120,130"),
    ("[train]\nvalFraction=1\n", "p.cfg:2:13: [train]: valFraction=1 must be below 1 (a share of the training split)"),
    ("[train]\nlrFactor=0\n",
     "p.cfg:2:10: [train]: lrFactor=0 must be above 0 and at most 1 (each drop multiplies the learning rates by it)"),
    ("[train]\nbatchSize=128,256\n", "p.cfg:2:11: [train]: batchSize takes one value"),
    ("[train]\nprecision=fp16\n", "p.cfg:2:11: [train]: precision=fp16 is not one of fp32, bf16; did you mean 'bf16'?"),
    ("[train]\nepochs=2\nEPOCHS=3\n", "p.cfg:3:1: [train]: epochs is set twice (first at line 2); keep one"),
])
def test_train_section_errors(params, message):
    with pytest.raises(SpecError) as err:
        checked(CONV + FC + TAIL, params)
    assert str(err.value).split("\n")[0] == message


@pytest.mark.parametrize("body, message", [
    (CONV + FC.replace("outputs=10", "outputs=99999999999999999999999") + TAIL,
     "s.cfg:16:9: layer 'fc': outputs=99999999999999999999999 must be at most 2147483647"),
    (CONV.replace("filters=16", "filters=2147483648") + FC + TAIL,
     "s.cfg:11:9: layer 'c': filters=2147483648 must be at most 2147483647"),
])
def test_sizes_past_any_real_net_are_refused_where_written(body, message):
    """Once, a typo'd size passed the check and crashed torch in bench and train."""
    with pytest.raises(SpecError) as err:
        checked(body)
    assert str(err.value).split("\n")[0] == message


def test_an_input_size_past_any_real_image_is_refused():
    with pytest.raises(SpecError) as err:
        checked(CONV + FC + TAIL, head=HEAD.replace("3x32x32", "3x32x99999999999"))
    assert str(err.value).split("\n")[0] == (
        "s.cfg:3:11: layer 'data': inputSize=3x32x99999999999 has a side over 2147483647; give the image's real size")
