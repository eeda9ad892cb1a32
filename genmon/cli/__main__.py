"""``python -m genmon.cli``: the same as the ``genmon`` command."""

from genmon.cli import main

main()
