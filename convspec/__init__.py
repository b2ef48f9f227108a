"""convspec: cuda-convnet's layer-definition language, compiled to PyTorch.

    from convspec import check_paths, build
    net = build(check_paths("specs/alexnet.cfg"))

Stages: ``parse`` (text -> tree), ``check`` (tree -> checked graph, no torch),
``build`` (graph -> torch.nn.Module).  The CLI is ``convspec.cli``.
"""

__version__ = "0.1.0"

from .check import CheckedNet, check, check_paths, find_params_file  # noqa: E402
from .errors import Location, SpecError  # noqa: E402


def build(*args, **kwargs):
    """Imported lazily so that checking never pays for importing torch."""
    from .build import build as _build

    return _build(*args, **kwargs)


__all__ = ["CheckedNet", "Location", "SpecError", "build", "check", "check_paths", "find_params_file"]
