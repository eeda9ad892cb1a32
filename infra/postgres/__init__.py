"""The local PostgreSQL cluster behind ``genmon infra up --postgres``.

The cluster lives in ``<home>/postgres`` (data, unix socket, log), listens only on
``settings.postgres.host:port`` and holds the role and database named in
``settings.postgres`` with password authentication over TCP::

    cluster = PostgresCluster(Settings())
    cluster.up()      # idempotent; installs the Debian `postgresql` package when missing
    cluster.url       # postgresql+psycopg://genmon:genmon@127.0.0.1:55432/genmon
    cluster.down()

PostgreSQL refuses to run as root, so when genmon runs as root the server runs as the
``postgres`` OS user (created by the Debian package), which must be able to reach the home.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from genmon.exceptions import PostgresInfraError
from genmon.infra._process import (
    check_port_free,
    live_process,
    port_answers,
    read_pid,
    remove_quietly,
    shorten,
    tail,
    terminate,
)
from genmon.settings import Settings

if TYPE_CHECKING:
    import psycopg

SERVER_USER = "postgres"
#: The superuser initdb creates; it may log in only through the unix socket (trust).
SUPERUSER = "postgres"
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ClusterStatus:
    """What ``genmon infra status`` reports about the local PostgreSQL cluster."""

    running: bool
    pid: int | None
    url: str
    log_path: Path


class PostgresCluster:
    """Start, stop and inspect the local cluster described by ``settings.postgres``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = settings.postgres
        self.home = settings.home.resolve() / "postgres"
        self.data_dir = self.home / "data"
        self.socket_dir = self.home / "run"
        self.log_path = self.home / "log" / "postgres.log"
        self.pid_path = self.data_dir / "postmaster.pid"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the genmon database (use it as GENMON_DATABASE__URL)."""
        return self.config.url

    # -- inspection ---------------------------------------------------------------------

    def status(self) -> ClusterStatus:
        pid = read_pid(self.pid_path)
        ours = self._is_our_postmaster(pid)
        running = ours and port_answers(self.config.host, self.config.port)
        return ClusterStatus(running, pid if ours else None, self.url, self.log_path)

    def _is_our_postmaster(self, pid: int | None) -> bool:
        data_dir = str(self.data_dir)

        def serves_our_data_dir(process: psutil.Process) -> bool:
            # The postmaster chdirs into its data directory; its command line has it too.
            if "postgres" not in process.name() and "postmaster" not in process.name():
                return False
            try:
                return process.cwd() == data_dir
            except psutil.AccessDenied:
                return any(data_dir in arg for arg in process.cmdline())

        return live_process(pid, serves_our_data_dir)

    # -- lifecycle ----------------------------------------------------------------------

    def up(self) -> ClusterStatus:
        """Start the cluster unless it already runs; create the role and database."""
        pid = read_pid(self.pid_path)
        if not self._is_our_postmaster(pid):
            # A postmaster.pid whose process is gone (or is now someone else) would make
            # PostgreSQL refuse to start; it is ours to clear.
            remove_quietly(self.pid_path)
            self._start()
        self._wait_until_ready()
        self._ensure_role_and_database()
        return self.status()

    def down(self) -> bool:
        """Stop the cluster this home started; True when one was running."""
        pid = read_pid(self.pid_path)
        if not self._is_our_postmaster(pid):
            remove_quietly(self.pid_path)
            return False
        assert pid is not None
        try:
            workers = [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            workers = []
        bin_dir = self.ensure_binaries()
        command = [str(bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast",
                   "-w", "-t", str(int(STOP_TIMEOUT_S))]  # fmt: skip
        subprocess.run(self._as_server_user(command), capture_output=True, check=False)
        # pg_ctl gives up after its timeout, and a worker can still be exiting when the
        # postmaster is gone; make sure nothing is left either way.
        for server_pid in (pid, *workers):
            terminate(server_pid, 5.0)
        if self._is_our_postmaster(pid):
            raise PostgresInfraError(
                f"PostgreSQL (pid {pid}) did not stop; check `ps -p {pid}` and stop it by hand"
            )
        return True

    # -- binaries -----------------------------------------------------------------------

    def ensure_binaries(self) -> Path:
        """The bin folder of the newest installed PostgreSQL; installs the package if none."""
        found = self._find_bin_dir()
        if found is not None:
            return found
        self._install_package()
        found = self._find_bin_dir()
        if found is None:
            raise PostgresInfraError(
                "the `postgresql` package was installed but no initdb was found under "
                "/usr/lib/postgresql/*/bin; install PostgreSQL's server binaries by hand"
            )
        return found

    @staticmethod
    def _find_bin_dir() -> Path | None:
        def major(path: str) -> int:
            match = re.search(r"/postgresql/(\d+)/bin/", path)
            return int(match.group(1)) if match else 0

        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=major)
        if candidates:
            return Path(candidates[-1]).parent
        on_path = shutil.which("initdb")
        return Path(on_path).resolve().parent if on_path else None

    @staticmethod
    def _install_package() -> None:
        apt_get = shutil.which("apt-get")
        if apt_get is None or os.geteuid() != 0:
            raise PostgresInfraError(
                "PostgreSQL's server binaries (initdb, pg_ctl) are not installed; install the "
                "`postgresql` package (as root: `apt-get install -y postgresql`) and try again"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = [apt_get, "install", "-y", "--no-install-recommends", "postgresql"]
        result = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            # A fresh image often has no package lists yet.
            subprocess.run([apt_get, "update"], capture_output=True, env=env, check=False)
            result = subprocess.run(install, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            raise PostgresInfraError(
                f"`apt-get install postgresql` failed (exit {result.returncode}); install it "
                "by hand and try again.\n" + shorten((result.stdout + result.stderr).strip(), 2000)
            )

    # -- starting -------------------------------------------------------------------------

    def _as_server_user(self, command: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return command
        return ["runuser", "-u", SERVER_USER, "--", *command]

    def _prepare_directories(self) -> None:
        for folder in (self.data_dir, self.socket_dir, self.log_path.parent):
            folder.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if os.geteuid() != 0:
            return
        try:
            owner = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise PostgresInfraError(
                f"genmon runs as root, and PostgreSQL must then run as the `{SERVER_USER}` OS "
                "user, which does not exist; install the `postgresql` package (it creates the "
                "user) or run genmon as an ordinary user"
            ) from None
        for folder in (self.home, self.data_dir, self.socket_dir, self.log_path.parent):
            os.chown(folder, owner.pw_uid, owner.pw_gid)
        reachable = subprocess.run(
            self._as_server_user(["test", "-w", str(self.data_dir)]), check=False
        )
        if reachable.returncode != 0:
            raise PostgresInfraError(
                f"the `{SERVER_USER}` OS user cannot reach {self.data_dir} (a parent folder is "
                "private to root); set GENMON_HOME to a folder every user can traverse"
            )

    def _start(self) -> None:
        host, port = self.config.host, self.config.port
        check_port_free(
            host,
            port,
            f"the local PostgreSQL of {self.home}",
            setting="GENMON_POSTGRES__PORT",
            error=PostgresInfraError,
        )
        bin_dir = self.ensure_binaries()
        self._prepare_directories()
        if not (self.data_dir / "PG_VERSION").exists():
            initdb = [
                str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale",
            ]  # fmt: skip
            result = subprocess.run(
                self._as_server_user(initdb), capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                raise PostgresInfraError(
                    f"initdb in {self.data_dir} failed (exit {result.returncode}); remove that "
                    "folder if it is left over and try again.\n"
                    + shorten((result.stdout + result.stderr).strip(), 2000)
                )
        # pg_ctl hands these to a shell, hence the quoting.
        server_options = " ".join(
            f"-c {shlex.quote(option)}"
            for option in (
                f"listen_addresses={host}",
                f"port={port}",
                f"unix_socket_directories={self.socket_dir}",
                "unix_socket_permissions=0700",
            )
        )
        start = [
            str(bin_dir / "pg_ctl"), "start", "-D", str(self.data_dir), "-l", str(self.log_path),
            "-o", server_options, "-w", "-t", str(int(self.config.start_timeout_s)),
        ]  # fmt: skip
        # pg_ctl daemonizes the postmaster itself, so it outlives this process.
        result = subprocess.run(
            self._as_server_user(start), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise PostgresInfraError(
                f"PostgreSQL did not start (pg_ctl exit {result.returncode}); see "
                f"{self.log_path}.\n"
                + shorten((result.stdout + result.stderr).strip(), 1000)
                + "\n"
                + tail(self.log_path, 20)
            )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            if self._superuser_connection_works():
                return
            time.sleep(0.3)
        raise PostgresInfraError(
            f"PostgreSQL in {self.data_dir} does not accept connections within "
            f"{self.config.start_timeout_s:.0f}s; see {self.log_path}, or run "
            f"`genmon infra down` and try again.\n{tail(self.log_path, 20)}"
        )

    def _superuser_connection_works(self) -> bool:
        import psycopg

        try:
            with self._superuser_connection() as connection:
                connection.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def _superuser_connection(self) -> psycopg.Connection[Any]:
        import psycopg

        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.config.port,
            user=SUPERUSER,
            dbname="postgres",
            autocommit=True,
            connect_timeout=5,
        )

    def _ensure_role_and_database(self) -> None:
        from psycopg import sql

        role = sql.Identifier(self.config.user)
        password = sql.Literal(self.config.password)
        with self._superuser_connection() as connection:
            exists = connection.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (self.config.user,)
            ).fetchone()
            verb = sql.SQL("ALTER" if exists else "CREATE")
            # ALTER keeps the password in step with the settings on every start.
            connection.execute(
                sql.SQL("{} ROLE {} WITH LOGIN PASSWORD {}").format(verb, role, password)
            )
            has_database = connection.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.config.database,)
            ).fetchone()
            if not has_database:
                connection.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(self.config.database), role
                    )
                )
