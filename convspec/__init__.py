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


def build(spec, params=None, devices=None, input_shape=None, overrides=()):
    """The untrained net of a spec file (and its params file, found beside
    it), with ``--set``-style ``overrides``; ``devices`` as ``--devices``."""
    from .builder import build as build_net

    return build_net(check_paths(spec, params, input_shape, overrides=overrides), devices)


def load(run_or_checkpoint, devices=None):
    """A trained net from a run folder (its best.pt, else its newest
    checkpoint) or a checkpoint file, in eval mode, with ``classes``,
    ``class_names``, ``mean``, ``crop`` and ``preprocess(image)``."""
    from pathlib import Path

    from runtime import checkpoint, runs

    path = runs.eval_checkpoint(Path(run_or_checkpoint))
    return runs.net_from_checkpoint(checkpoint.load_training(path), devices or ["cpu"], str(path))


__all__ = ["CheckedNet", "Location", "SpecError", "build", "check", "check_paths", "find_params_file", "load"]
