"""Window geometry the pipeline's unit tests share."""

from __future__ import annotations

#: 10 s tumbling and 20 s / 10 s hopping windows, 1 s allowed lateness, and an idle
#: timeout no test reaches (windows close by event time only).
WINDOWS = {
    "tumbling_s": 10,
    "hopping_size_s": 20,
    "hopping_step_s": 10,
    "allowed_lateness_s": 1,
    "idle_timeout_s": 1000,
}
