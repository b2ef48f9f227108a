"""convspec: cuda-convnet's layer-definition language, compiled to PyTorch.

    from convspec.check import check_paths
    from convspec.build import build          # imports torch
    net = build(check_paths("specs/alexnet.cfg"))

Stages: ``parse`` (text -> tree), ``check`` (tree -> checked graph, no torch),
``build`` (graph -> torch.nn.Module).  The CLI is ``convspec.cli``.
"""

__version__ = "0.1.0"

from .check import CheckedNet, check, check_paths, find_params_file  # noqa: E402
from .errors import Location, SpecError  # noqa: E402


__all__ = ["CheckedNet", "Location", "SpecError", "check", "check_paths", "find_params_file"]
