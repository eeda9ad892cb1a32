"""``python -m bench.replay``: the same command line as ``python -m bench.replay.traffic``."""

from bench.replay.traffic import main

raise SystemExit(main())
