"""The local PostgreSQL cluster: the shared one for logins, private ones for the lifecycle.

Private clusters (own home, own port) share the installed binaries but never the data of
the cluster other tests use.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from genmon.exceptions import PostgresInfraError
from genmon.infra._process import port_answers, process_exists
from genmon.infra.postgres import PostgresCluster
from genmon.settings import PostgresSettings, Settings

pytestmark = pytest.mark.postgres


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture
def private_cluster(settings: Settings, free_port: Callable[[], int]) -> Iterator[PostgresCluster]:
    """A cluster (not started yet) that the test may start and stop."""
    # Not tmp_path: the `postgres` OS user cannot traverse pytest's private root folder.
    home = Path(tempfile.mkdtemp(prefix="genmon-pg-test-"))
    home.chmod(0o755)
    cluster = PostgresCluster(
        Settings(home=home, postgres=settings.postgres.model_copy(update={"port": free_port()}))
    )
    try:
        yield cluster
    finally:
        cluster.down()
        shutil.rmtree(home, ignore_errors=True)


def _server_processes(postmaster_pid: int) -> list[int]:
    try:
        postmaster = psutil.Process(postmaster_pid)
        return [postmaster_pid, *(child.pid for child in postmaster.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_shared_cluster_accepts_the_configured_role_by_password(
    postgres_url: str, settings: Settings
) -> None:
    with psycopg.connect(_libpq(postgres_url)) as connection:
        who = connection.execute("SELECT current_user, current_database()").fetchone()
        connection.execute("CREATE TEMP TABLE probe (value int)")
        connection.execute("INSERT INTO probe VALUES (41), (1)")
        total = connection.execute("SELECT sum(value) FROM probe").fetchone()

    assert who == (settings.postgres.user, settings.postgres.database)
    assert total == (42,)


def test_shared_cluster_rejects_a_wrong_password(postgres_url: str, settings: Settings) -> None:
    config = settings.postgres
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host=config.host,
            port=config.port,
            user=config.user,
            password=config.password + "-wrong",
            dbname=config.database,
        )


def test_up_twice_reuses_the_running_cluster(private_cluster: PostgresCluster) -> None:
    first = private_cluster.up()
    again = private_cluster.up()

    assert first.running and again.running
    assert first.pid is not None and again.pid == first.pid
    with psycopg.connect(_libpq(private_cluster.url)) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)


def _non_loopback_ipv4() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    return None


def test_listens_only_on_the_configured_loopback_address(private_cluster: PostgresCluster) -> None:
    status = private_cluster.up()
    assert status.pid is not None
    port = private_cluster.config.port

    # By port, not by pid: where the postgres user's /proc entries are hidden from the test's
    # user, psutil reports its sockets without a pid.
    listening = {
        conn.laddr.ip
        for conn in psutil.net_connections(kind="inet")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port
    }
    assert listening == {"127.0.0.1"}
    with psycopg.connect(_libpq(private_cluster.url)) as connection:
        assert connection.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)

    outside = _non_loopback_ipv4()
    if outside is not None:
        assert not port_answers(outside, port)


def test_down_stops_every_server_process(private_cluster: PostgresCluster) -> None:
    started = private_cluster.up()
    assert started.pid is not None
    processes = _server_processes(started.pid)
    assert len(processes) > 1  # the postmaster and its background workers

    assert private_cluster.down() is True

    # The postmaster's parent is init (pg_ctl daemonizes it), which reaps it in its own time.
    assert [pid for pid in processes if process_exists(pid)] == []
    assert not port_answers("127.0.0.1", private_cluster.config.port)
    assert private_cluster.status().running is False
    assert private_cluster.down() is False


def test_stale_postmaster_pid_is_cleared_and_data_kept(private_cluster: PostgresCluster) -> None:
    first = private_cluster.up()
    with psycopg.connect(_libpq(private_cluster.url), autocommit=True) as connection:
        connection.execute("CREATE TABLE kept (value text)")
        connection.execute("INSERT INTO kept VALUES ('survives restarts')")
    private_cluster.down()

    private_cluster.pid_path.write_text(f"{_dead_pid()}\n")
    assert private_cluster.status().running is False
    # A reused pid: this test process is alive but is no postmaster, and must survive.
    private_cluster.pid_path.write_text(f"{os.getpid()}\n{private_cluster.data_dir}\n")
    assert private_cluster.status().pid is None
    assert private_cluster.down() is False

    private_cluster.pid_path.write_text(f"{os.getpid()}\n{private_cluster.data_dir}\n")
    restarted = private_cluster.up()

    assert restarted.running and restarted.pid not in (None, os.getpid(), first.pid)
    with psycopg.connect(_libpq(private_cluster.url)) as connection:
        assert connection.execute("SELECT value FROM kept").fetchall() == [("survives restarts",)]


def test_up_refuses_a_port_held_by_someone_else(private_cluster: PostgresCluster) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", private_cluster.config.port))
        squatter.listen()
        with pytest.raises(PostgresInfraError, match=r"already in use.*GENMON_POSTGRES__PORT"):
            private_cluster.up()

    assert not private_cluster.pid_path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to another OS user")
def test_up_explains_a_home_the_server_user_cannot_reach(free_port: Callable[[], int]) -> None:
    private_root = Path(tempfile.mkdtemp(prefix="genmon-pg-private-"))  # mode 0700, root's
    try:
        cluster = PostgresCluster(
            Settings(home=private_root / "home", postgres=PostgresSettings(port=free_port()))
        )
        with pytest.raises(PostgresInfraError, match="GENMON_HOME"):
            cluster.up()
    finally:
        shutil.rmtree(private_root, ignore_errors=True)
