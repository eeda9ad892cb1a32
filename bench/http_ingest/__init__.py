"""HTTP ingest throughput: ``POST /v1/inferences`` against the SDK, on the same broker.

    .venv/bin/python -m bench.http_ingest [--events 20000] [--batch 500] [--clients 4]

See :mod:`bench.http_ingest.run`.
"""
