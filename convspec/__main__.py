"""``python -m convspec`` is the ``convspec`` command."""

from .cli import main

main()
