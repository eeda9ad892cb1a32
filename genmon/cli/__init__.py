"""The ``genmon`` command line: one module per command group, registered here.

Heavy modules (Kafka clients, Faust, torch, SQLAlchemy) are imported inside the commands,
so ``genmon --help`` stays instant and works on the SDK-only install. Add a group by
writing ``genmon/cli/<group>.py`` with a ``click.group()`` and adding it to
:data:`COMMANDS`. Shared options (``--json``, ``--url``) and the map from errors to exit
codes are in :mod:`genmon.cli._common`.
"""

from __future__ import annotations

import click

from genmon.cli import (
    api,
    config,
    data,
    db,
    demo,
    detectors,
    incidents,
    infra,
    models,
    notify,
    replay,
    retrain,
    schedule,
    schemas,
    silences,
    tokens,
    worker,
)
from genmon.cli._common import GenmonGroup

#: Every command and group of ``genmon``, in the order ``--help`` lists them.
COMMANDS: tuple[click.Command, ...] = (
    infra.infra,
    worker.worker,
    worker.health,
    db.db,
    schemas.schemas,
    config.config,
    incidents.incidents,
    silences.silences,
    notify.notify,
    detectors.detectors,
    models.models,
    retrain.retrain,
    schedule.schedule,
    data.data,
    replay.replay,
    demo.demo,
    api.api,
    tokens.tokens,
)


@click.group(cls=GenmonGroup)
@click.version_option(package_name="genmon")
def main() -> None:
    """genmon: Kafka-native monitoring and feedback for generative-AI models in production."""


for _command in COMMANDS:
    main.add_command(_command)
