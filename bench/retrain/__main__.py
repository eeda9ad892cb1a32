"""``python -m bench.retrain``: the same command line as ``python -m bench.retrain.run``."""

from bench.retrain.run import main

raise SystemExit(main())
