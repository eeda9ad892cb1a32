"""A port a local service needs is taken: one line naming the port and its holder, before
the service is started (no broker or database needed: nothing is started here)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from genmon.exceptions import InfraError, KafkaInfraError, PostgresInfraError
from genmon.infra._process import check_port_free, port_holder, port_in_use
from genmon.infra.postgres import PostgresCluster
from genmon.settings import PostgresSettings, Settings


def test_a_listening_holder_is_named_with_its_pid(free_port: Callable[[], int]) -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(KafkaInfraError) as caught:
            check_port_free(
                "127.0.0.1", port, "the local Kafka broker",
                setting="GENMON_KAFKA__PORT", error=KafkaInfraError,
            )  # fmt: skip

    message = str(caught.value)
    assert "\n" not in message
    assert f"127.0.0.1:{port} is already in use by" in message
    assert f"(pid {os.getpid()}" in message
    assert psutil.Process().name() in message
    assert message.endswith("choose a free port with GENMON_KAFKA__PORT")


def test_a_holder_on_every_address_blocks_loopback_too(free_port: Callable[[], int]) -> None:
    """A connection to 127.0.0.1 would answer here too, but a probe must not depend on it."""
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", port))
        holder.listen()
        assert port_in_use("127.0.0.1", port)
        assert f"(pid {os.getpid()}" in port_holder(port)


def test_a_bound_socket_that_does_not_listen_is_caught(free_port: Callable[[], int]) -> None:
    """It refuses connections, so only a bind shows it; the service's own bind would fail
    (Kafka then died with a Java stack trace)."""
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        with pytest.raises(InfraError, match=rf"127\.0\.0\.1:{port} is already in use by a socket"):
            check_port_free("127.0.0.1", port, "the local Kafka broker")


def test_a_free_port_passes(free_port: Callable[[], int]) -> None:
    port = free_port()
    check_port_free("127.0.0.1", port, "the local Kafka broker")
    # The probe leaves nothing behind: the port is still free for the service.
    with socket.socket() as service:
        service.bind(("127.0.0.1", port))
        service.listen()


def test_postgres_up_names_the_holder_before_touching_anything(
    free_port: Callable[[], int], tmp_path: Path
) -> None:
    port = free_port()
    cluster = PostgresCluster(Settings(home=tmp_path, postgres=PostgresSettings(port=port)))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(PostgresInfraError) as caught:
            cluster.up()

    message = str(caught.value)
    assert f"127.0.0.1:{port} is already in use by" in message
    assert f"(pid {os.getpid()}" in message
    assert "GENMON_POSTGRES__PORT" in message
    assert not cluster.data_dir.exists()  # refused before initdb or any folder
