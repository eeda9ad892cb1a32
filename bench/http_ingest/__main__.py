"""``python -m bench.http_ingest``: the same command line as ``python -m bench.http_ingest.run``."""

from bench.http_ingest.run import main

raise SystemExit(main())
