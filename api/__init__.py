"""``genmon api``: genmon for people and for services in other languages.

The HTTP API (FastAPI, OpenAPI at ``/openapi.json``) with scoped bearer tokens, HTTP and
OTLP ingest onto the same topics as the SDK, the dashboard (server-rendered pages, htmx,
server-sent events, Plotly charts from its Python package), health probes and Prometheus
``/metrics``. It reads the database and talks to Kafka; it never runs Faust.
"""
