"""The local single-node Apache Kafka broker behind ``genmon infra up``.

The broker runs in KRaft mode (combined broker + controller) on loopback, from jars that
Maven resolves from Maven Central into ``<home>/kafka/libs-<version>``; no Kafka
distribution or Docker is needed, only a JDK 17 and Maven. Everything the broker keeps
(data, logs, pid file, cluster id) lives under ``<home>/kafka``::

    broker = KafkaBroker(Settings())
    broker.up()       # idempotent: reuses a running broker
    broker.status()   # BrokerStatus(running=True, pid=..., bootstrap='127.0.0.1:19092', ...)
    broker.down()     # SIGTERM, then SIGKILL after a timeout

The broker is started in its own session so it outlives the command that started it.
``up(sasl=True)`` (``genmon infra up`` does so whenever ``openssl`` is there) adds a
SASL_SSL listener on ``kafka.sasl_port`` with a CA and a user of its own
(:mod:`genmon.infra.kafka.security`); genmon's clients use it with the settings in
``<home>/kafka/security/client.env``.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genmon.exceptions import KafkaInfraError
from genmon.infra._process import (
    check_port_free,
    cmdline_contains,
    exit_description,
    has_exited,
    live_process,
    port_answers,
    read_pid,
    remove_quietly,
    shorten,
    spawn_detached,
    tail,
    terminate,
)
from genmon.infra.kafka import topics
from genmon.infra.kafka.security import LISTENER, LocalSecurity, openssl_available
from genmon.infra.kafka.topics import TopicDurability
from genmon.settings import Settings

POM = Path(__file__).with_name("pom.xml")
LOG4J_CONFIG = Path(__file__).with_name("log4j.properties")

#: How long a broker gets to shut down cleanly after SIGTERM before it is killed.
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class BrokerStatus:
    """What ``genmon infra status`` reports about the local broker."""

    running: bool
    pid: int | None
    bootstrap: str
    log_path: Path
    sasl_bootstrap: str | None = None
    """``host:sasl_port`` when the broker has a SASL_SSL listener."""


class KafkaBroker:
    """Start, stop and inspect the local broker described by ``settings.kafka``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config = settings.kafka
        self.home = settings.home.resolve() / "kafka"
        self.libs_dir = self.home / f"libs-{self.config.version}"
        self.data_dir = self.home / "data"
        self.config_path = self.home / "server.properties"
        self.pid_path = self.home / "kafka.pid"
        self.cluster_id_path = self.home / "cluster.id"
        self.log_path = self.home / "logs" / "server.log"
        # JVM output that never reaches log4j (bad flags, out of memory, crashes).
        self.console_path = self.home / "logs" / "console.out"
        self.security = LocalSecurity(self.home / "security")

    @property
    def bootstrap(self) -> str:
        """Address of the local broker; ``settings.kafka.bootstrap_servers`` may differ."""
        return f"{self.config.host}:{self.config.port}"

    # -- inspection ---------------------------------------------------------------------

    def status(self) -> BrokerStatus:
        pid = read_pid(self.pid_path)
        ours = self._is_our_broker(pid)
        running = ours and port_answers(self.config.host, self.config.port)
        return BrokerStatus(
            running=running,
            pid=pid if ours else None,
            bootstrap=self.bootstrap,
            log_path=self.log_path,
            sasl_bootstrap=self.sasl_bootstrap if running and self.has_sasl_listener() else None,
        )

    @property
    def sasl_bootstrap(self) -> str:
        return f"{self.config.host}:{self.config.sasl_port}"

    def has_sasl_listener(self) -> bool:
        """Whether the broker was (last) started with the SASL_SSL listener."""
        try:
            return f"{LISTENER}://" in self.config_path.read_text()
        except OSError:
            return False

    def sasl_settings(self, mechanism: str = "PLAIN") -> dict[str, Any]:
        """``settings.kafka`` fields that reach this broker's SASL_SSL listener as its user
        (see :meth:`LocalSecurity.client_settings`)."""
        return self.security.client_settings(self.config.host, self.config.sasl_port, mechanism)

    def _is_our_broker(self, pid: int | None) -> bool:
        return live_process(pid, cmdline_contains("kafka.Kafka", str(self.config_path)))

    # -- lifecycle ----------------------------------------------------------------------

    def up(self, sasl: bool | None = False) -> BrokerStatus:
        """Start the broker unless it already runs, wait until it answers, create the topics.

        ``sasl``: True adds the SASL_SSL listener on ``kafka.sasl_port`` (a running broker
        without it is an error), None adds it when ``openssl`` is there to make its
        certificates, False leaves it out.
        """
        pid = read_pid(self.pid_path)
        if self._is_our_broker(pid):
            assert pid is not None
            if sasl and not self.has_sasl_listener():
                raise KafkaInfraError(
                    f"the running local broker (pid {pid}) has no SASL_SSL listener; restart "
                    "it with one: `genmon infra down && genmon infra up --sasl`"
                )
            self._wait_until_ready(pid)
            self._prepare_listener()
            self.ensure_topics()
            return self.status()
        remove_quietly(self.pid_path)
        with_sasl = sasl if sasl is not None else openssl_available()
        self._check_ports_free(with_sasl)
        self.ensure_jars()
        if with_sasl:
            self.security.ensure(self.config.host)
        self._write_config(with_sasl)
        self._format_storage()
        pid = spawn_detached(
            self._java_command("kafka.Kafka", str(self.config_path)),
            output=self.console_path,
            cwd=self.home,
        )
        self.pid_path.write_text(f"{pid}\n")
        self._wait_until_ready(pid)
        self._prepare_listener()
        self.ensure_topics()
        return self.status()

    def _prepare_listener(self) -> None:
        """The SCRAM users (kept in the metadata log, so made after the broker answers) and
        the client.env of the SASL_SSL listener, when the broker has one."""
        if not self.has_sasl_listener():
            return
        admin = self._admin(self.bootstrap, timeout_ms=15000)
        try:
            self.security.add_scram_users(admin)
        finally:
            admin.close()
        self.security.write_client_env(self.config.host, self.config.sasl_port)

    def down(self) -> bool:
        """Stop the broker this home started; True when one was running."""
        pid = read_pid(self.pid_path)
        stopped = False
        if self._is_our_broker(pid):
            assert pid is not None
            terminate(pid, STOP_TIMEOUT_S)
            if self._is_our_broker(pid):
                raise KafkaInfraError(
                    f"the Kafka broker (pid {pid}) survived SIGKILL; check `ps -p {pid}` "
                    "and stop it by hand"
                )
            stopped = True
        remove_quietly(self.pid_path)
        return stopped

    # -- jars -----------------------------------------------------------------------------

    def ensure_jars(self) -> Path:
        """Resolve the broker's jars with Maven once; later calls reuse the cache."""
        marker = self.libs_dir / ".complete"
        if marker.exists():
            return self.libs_dir
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaInfraError(
                "Maven (`mvn`) is needed to fetch the Kafka jars from Maven Central; install it "
                "(e.g. `apt-get install -y maven`) and run `genmon infra up` again"
            )
        self.libs_dir.parent.mkdir(parents=True, exist_ok=True)
        # Resolve next to the cache and rename, so an interrupted download never looks done.
        partial = self.libs_dir.with_name(f"{self.libs_dir.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        command = [
            mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
            f"-Dkafka.version={self.config.version}",
            f"-DoutputDirectory={partial}",
            "-DincludeScope=runtime",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        kafka_jar = partial / f"kafka_2.13-{self.config.version}.jar"
        if result.returncode != 0 or not kafka_jar.exists():
            shutil.rmtree(partial, ignore_errors=True)
            output = shorten((result.stdout + result.stderr).strip(), 2000)
            raise KafkaInfraError(
                f"Maven could not resolve org.apache.kafka:kafka_2.13:{self.config.version} "
                f"(exit {result.returncode}). Check access to Maven Central (or the mirror in "
                f"~/.m2/settings.xml) and that GENMON_KAFKA__VERSION names a released "
                f"version.\n{output}"
            )
        (partial / ".complete").write_text(self.config.version + "\n")
        try:
            partial.rename(self.libs_dir)
        except OSError:
            # Another process finished the same download first; its copy is as good.
            shutil.rmtree(partial, ignore_errors=True)
            if not marker.exists():
                raise KafkaInfraError(
                    f"could not move the Kafka jars into {self.libs_dir}; remove that "
                    "folder and run `genmon infra up` again"
                ) from None
        return self.libs_dir

    # -- starting -------------------------------------------------------------------------

    def _check_ports_free(self, with_sasl: bool = False) -> None:
        """One line naming the port and its holder, before Kafka fails with a stack trace."""
        ports = {"PORT": self.config.port, "CONTROLLER_PORT": self.config.controller_port}
        if with_sasl:
            ports["SASL_PORT"] = self.config.sasl_port
        for setting, port in ports.items():
            check_port_free(
                self.config.host, port, "the local Kafka broker",
                setting=f"GENMON_KAFKA__{setting}", error=KafkaInfraError,
            )  # fmt: skip

    def _write_config(self, with_sasl: bool = False) -> None:
        host, port, controller = self.config.host, self.config.port, self.config.controller_port
        listeners = [f"PLAINTEXT://{host}:{port}"]
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        if with_sasl:
            listeners.append(f"{LISTENER}://{host}:{self.config.sasl_port}")
            protocols += f",{LISTENER}:SASL_SSL"
        lines = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{host}:{controller}",
            "listeners": ",".join([*listeners, f"CONTROLLER://{host}:{controller}"]),
            "advertised.listeners": ",".join(listeners),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": protocols,
            "log.dirs": str(self.data_dir),
            "num.partitions": str(self.config.partitions),
            # A single node cannot replicate; the defaults of 3 would block every group.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            # 50 offset partitions cost seconds of CPU at the first consumer group on a laptop.
            "offsets.topic.num.partitions": "8",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
        }
        if with_sasl:
            lines.update(self.security.server_properties())
        self.home.mkdir(parents=True, exist_ok=True)
        text = "# Written by genmon.infra.kafka on every start; edits are lost.\n"
        text += "".join(f"{key}={value}\n" for key, value in lines.items())
        # It may hold the listener's passwords: readable by its owner only, from the start.
        remove_quietly(self.config_path)
        descriptor = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)

    def _format_storage(self) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        if self.cluster_id_path.exists():
            cluster_id = self.cluster_id_path.read_text().strip()
        else:
            cluster_id = new_cluster_id()
            self.cluster_id_path.write_text(cluster_id + "\n")
        command = self._java_command(
            "kafka.tools.StorageTool", "format", "--ignore-formatted",
            f"--cluster-id={cluster_id}", "-c", str(self.config_path),
        )  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise KafkaInfraError(
                f"formatting the KRaft storage in {self.data_dir} failed "
                f"(exit {result.returncode}); if the folder is left over from another Kafka, "
                f"remove {self.data_dir} and run `genmon infra up` again.\n"
                + shorten((result.stdout + result.stderr).strip(), 2000)
            )

    def _java_command(self, main_class: str, *args: str) -> list[str]:
        java_home = os.environ.get("JAVA_HOME")
        java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
        if not java or not Path(java).exists():
            raise KafkaInfraError(
                "a Java runtime (17 or newer) is needed to run Kafka; install one "
                "(e.g. `apt-get install -y openjdk-17-jre-headless`) or set JAVA_HOME"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        heap = self.config.heap
        return [
            java,
            f"-Xms{heap}",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration={LOG4J_CONFIG.as_uri()}",
            f"-Dgenmon.kafka.log={self.log_path}",
            "-cp",
            f"{self.libs_dir}/*",
            main_class,
            *args,
        ]

    def _wait_until_ready(self, pid: int) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if has_exited(pid):
                raise KafkaInfraError(
                    f"the Kafka broker (pid {pid}) stopped while starting "
                    f"({exit_description(pid)}); see {self.log_path} "
                    f"and {self.console_path}.\n{self._recent_output()}"
                )
            if port_answers(self.config.host, self.config.port):
                try:
                    admin = self._admin(self.bootstrap, timeout_ms=5000)
                    try:
                        admin.describe_cluster()
                    finally:
                        admin.close()
                    return
                except Exception as error:  # kafka-python raises many kinds while starting
                    last_error = f"{type(error).__name__}: {error}"
            time.sleep(0.5)
        raise KafkaInfraError(
            f"the Kafka broker (pid {pid}) did not answer on {self.bootstrap} within "
            f"{self.config.start_timeout_s:.0f}s ({last_error}); see {self.log_path}, raise "
            f"GENMON_KAFKA__START_TIMEOUT_S on a slow machine, or run `genmon infra down` and "
            f"try again.\n{self._recent_output()}"
        )

    def _recent_output(self) -> str:
        return (tail(self.console_path, 20) + tail(self.log_path, 20)).strip()

    # -- topics ---------------------------------------------------------------------------

    def ensure_topics(self, bootstrap: str | None = None) -> list[str]:
        """Create genmon's topics (existing ones are left as they are); returns their names.

        They get ``kafka.partitions``, ``kafka.replication_factor``, ``min.insync.replicas``
        and retention from the settings (:mod:`genmon.infra.kafka.topics`). ``bootstrap``
        defaults to the local broker's own listener; pass ``settings.kafka.bootstrap_servers``
        to prepare a cluster genmon did not start, reached with ``settings.kafka``'s
        security (TLS, SASL).
        """
        address = bootstrap or self.bootstrap
        with topics.connected(self.settings, address, secure=bootstrap is not None) as admin:
            return topics.create_topics(admin, self.settings, address, self.log_path)

    def describe_topics(self, bootstrap: str | None = None) -> list[TopicDurability]:
        """genmon's topics, then those its workers' Faust apps made (changelogs...), as the
        cluster at ``bootstrap`` holds them; topics not created yet are left out."""
        address = bootstrap or self.bootstrap
        with topics.connected(self.settings, address, secure=bootstrap is not None) as admin:
            names = topics.topic_names(self.settings)
            names += topics.faust_topic_names(admin, self.settings)
            return topics.describe_topics(admin, names)

    def _admin(self, bootstrap: str, timeout_ms: int) -> Any:
        """An admin client on the local broker's own (PLAINTEXT) listener."""
        return topics.new_admin(self.settings, bootstrap, secure=False, timeout_ms=timeout_ms)


def new_cluster_id() -> str:
    """Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding.

    Like Kafka's ``Uuid.randomUuid``, never one starting with "-", which command lines
    would read as an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id
