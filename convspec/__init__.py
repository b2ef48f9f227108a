"""convspec: cuda-convnet's layer-definition language, compiled to PyTorch.

    import convspec
    net = convspec.build("specs/alexnet.cfg")       # the untrained nn.Module
    net = convspec.load("runs/alexnet-20261128")    # a trained one, ready for inference
    probs = net(net.preprocess("cat.jpg")).softmax(1)
    print(net.class_names[probs.argmax()])

Stages: ``parse`` (text -> tree), ``check`` (tree -> checked graph, no torch),
``builder`` (graph -> torch.nn.Module).  The CLI is ``convspec.cli``; training
and evaluation live in the ``runtime`` package.
"""

__version__ = "0.1.0"

from .check import CheckedNet, check, check_paths, find_params_file  # noqa: E402
from .errors import Location, SpecError  # noqa: E402


def _api_devices(devices):
    """``devices`` as --devices takes them: "cpu,cuda:0" or a list, checked the same way."""
    from runtime.train import parse_devices

    if devices is None or (not isinstance(devices, str) and len(devices) == 0):
        return None  # the default: visible GPUs, else the CPU
    text = devices if isinstance(devices, str) else ",".join(str(d) for d in devices)
    return parse_devices(text, "devices")


def _api_input_shape(shape):
    """``input_shape`` as --input takes it: "3x224x224" or (3, 224, 224)."""
    import operator

    from .values import parse_shape

    if shape is None:
        return None
    if isinstance(shape, str):
        return parse_shape(shape, "input_shape", None)
    try:  # operator.index: ints and numpy ints, not floats or bools
        dims = tuple(operator.index(d) for d in shape if not isinstance(d, bool))
    except TypeError:
        dims = ()
    if len(dims) != 3 or len(shape) != 3 or min(dims) < 1:
        raise SpecError(f"input_shape must be (C, H, W) with positive whole numbers or 'CxHxW', not {shape!r}")
    return dims


def build(spec, params=None, devices=None, input_shape=None, overrides=()):
    """The untrained net of a spec file (and its params file, found beside
    it), with ``--set``-style ``overrides``; ``devices`` and ``input_shape`` as
    ``--devices`` and ``--input`` take them ("cpu,cuda:0", "3x224x224") or as lists."""
    from .builder import build as build_net

    checked = check_paths(spec, params, _api_input_shape(input_shape), overrides=overrides)
    return build_net(checked, _api_devices(devices))


def load(run_or_checkpoint, devices=None):
    """A trained net from a run folder (its best.pt, else its newest
    checkpoint) or a checkpoint file, in eval mode, with ``classes``,
    ``class_names``, ``mean``, ``crop`` and ``preprocess(image)``."""
    from pathlib import Path

    from runtime import checkpoint, runs

    path = runs.eval_checkpoint(Path(run_or_checkpoint))
    return runs.net_from_checkpoint(checkpoint.load_training(path), _api_devices(devices) or ["cpu"], str(path))


__all__ = ["CheckedNet", "Location", "SpecError", "build", "check", "check_paths", "find_params_file", "load"]
