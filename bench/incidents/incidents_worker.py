"""A worker with only the ingest and incident installers (no detector pipeline).

Used by ``bench_latency.py --mode kafka-incidents-only`` to measure the incident path
without the pipeline's CPU load in the same process.
"""

from __future__ import annotations

import faust

from genmon.settings import get_settings
from genmon.streams.app import create_app

INSTALLERS = ("genmon.streams.ingest:install", "genmon.streams.incidents.agent:install")

if __name__ == "__main__":
    app = create_app(get_settings(), installers=INSTALLERS)
    faust.Worker(app, loglevel="warning").execute_from_commandline()
