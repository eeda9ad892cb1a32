"""Kafka over TLS and SASL, and the durability of genmon's topics (issue #14).

The first tests need no broker: the client options built from ``settings.kafka``, masked
secrets, refused combinations, the local listener's files. The ``kafka`` tests use the
SASL_SSL listener of the local broker (``genmon infra up`` adds it whenever ``openssl``
is installed, as in CI); where the running broker has none, a private one with the
listener is started for this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from kafka import KafkaConsumer
from kafka.admin import ConfigResource, ConfigResourceType
from pydantic import SecretStr
from worker_support import WorkerProcess

from genmon import Monitor, kafka_config
from genmon.cli import main
from genmon.exceptions import ConfigurationError
from genmon.infra.kafka import KafkaBroker, topics
from genmon.infra.kafka.security import MECHANISMS, USER, LocalSecurity, openssl_available
from genmon.schemas.events import Finding, InferenceStatus
from genmon.settings import KafkaSettings, Settings

PASSWORD = "pw-Never-Printed-4711"
GENMON = str(Path(sys.executable).parent / "genmon")
needs_openssl = pytest.mark.skipif(not openssl_available(), reason="needs the openssl command")


def sasl_kafka(**fields: Any) -> KafkaSettings:
    return KafkaSettings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
        sasl_password=SecretStr(PASSWORD),
        **fields,
    )


# -- client options, no broker ------------------------------------------------------------


def test_plaintext_stays_the_default_for_every_client() -> None:
    kafka = KafkaSettings()

    assert kafka_config.client_config(kafka) == {
        "bootstrap_servers": "127.0.0.1:19092",
        "security_protocol": "PLAINTEXT",
    }
    assert kafka_config.client_config(kafka, producer=True)["acks"] == "all"
    faust = kafka_config.faust_options(kafka)
    assert faust["broker_credentials"] is None
    assert (faust["topic_replication_factor"], faust["producer_acks"]) == (1, -1)
    assert kafka_config.topic_configs(kafka) == {"min.insync.replicas": "1"}


def test_sasl_ssl_options_fit_kafka_python_aiokafka_and_faust(tmp_path: Path) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
    from kafka import KafkaAdminClient, KafkaProducer

    kafka = sasl_kafka(acks="1", replication_factor=3, min_insync_replicas=2)
    config = kafka_config.client_config(kafka, "b1:9096,b2:9096", producer=True)

    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (config["sasl_plain_username"], config["sasl_plain_password"]) == ("svc", PASSWORD)
    assert (config["acks"], config["bootstrap_servers"]) == (1, "b1:9096,b2:9096")
    context = config["ssl_context"]
    assert context.check_hostname and context.verify_mode.name == "CERT_REQUIRED"
    # Every option is one the clients know (they reject unknown ones).
    assert set(config) <= set(KafkaProducer.DEFAULT_CONFIG)
    assert set(kafka_config.client_config(kafka)) <= set(KafkaAdminClient.DEFAULT_CONFIG)

    async def build() -> None:
        await AIOKafkaProducer(**config).stop()
        await AIOKafkaConsumer(**kafka_config.client_config(kafka)).stop()

    asyncio.run(build())
    faust = kafka_config.faust_options(kafka)
    auth = credentials_to_aiokafka_auth(faust["broker_credentials"])
    assert auth["security_protocol"] == "SASL_SSL"
    assert (auth["sasl_mechanism"], auth["sasl_plain_password"]) == ("SCRAM-SHA-512", PASSWORD)
    assert auth["ssl_context"] is not None
    assert (faust["topic_replication_factor"], faust["producer_acks"]) == (3, 1)
    assert kafka_config.topic_configs(kafka) == {"min.insync.replicas": "2"}


def test_secrets_are_masked_in_every_repr_and_log_line(
    caplog: pytest.LogCaptureFixture, free_port: Callable[[], int]
) -> None:
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    kafka = sasl_kafka(bootstrap_servers=f"127.0.0.1:{free_port()}")
    config = kafka_config.client_config(kafka)
    faust = kafka_config.faust_options(kafka)
    shown = [
        repr(config),
        str(config),
        "%s %r" % (config, config),  # noqa: UP031 - what logging does
        repr(faust),
        repr(credentials_to_aiokafka_auth(faust["broker_credentials"])),
        repr(kafka),
    ]
    for text in shown:
        assert PASSWORD not in text
    assert kafka_config.MASK in repr(config)
    # kafka-python's admin client logs its whole configuration at DEBUG.
    caplog.set_level(logging.DEBUG)
    with pytest.raises(KafkaError):
        KafkaAdminClient(**config, bootstrap_timeout_ms=300, request_timeout_ms=300)
    assert "Starting KafkaAdminClient with configuration" in caplog.text
    assert PASSWORD not in caplog.text


def test_genmon_config_masks_the_kafka_password() -> None:
    env = {"GENMON_KAFKA__SASL_PASSWORD": PASSWORD, "GENMON_KAFKA__SSL_KEY_PASSWORD": PASSWORD}
    from genmon.settings import get_settings

    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["config"], env=env)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert '"sasl_password": "' in result.output and '"ssl_key_password": "' in result.output
    assert PASSWORD not in result.output


def test_a_child_process_gets_the_same_connection_from_its_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    kafka = sasl_kafka(
        bootstrap_servers="b1:9096",
        ssl_cafile=tmp_path / "ca.pem",
        ssl_check_hostname=False,
        replication_factor=3,
        min_insync_replicas=2,
        acks="1",
    )
    env = kafka_config.environment(kafka)
    for name in list(os.environ):
        if name.startswith("GENMON_KAFKA__"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    assert Settings().kafka == kafka
    assert env["GENMON_KAFKA__SASL_PASSWORD"] == PASSWORD


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"security_protocol": "SASL_SSL", "sasl_username": "svc"}, "SASL_PASSWORD"),
        ({"sasl_username": "svc", "sasl_password": SecretStr("x")}, "SECURITY_PROTOCOL=SASL"),
        ({"ssl_cafile": Path("/ca.pem")}, "SECURITY_PROTOCOL=SSL"),
        ({"security_protocol": "SSL", "ssl_cafile": Path("/nowhere/ca.pem")}, "SSL_CAFILE"),
        (
            {"security_protocol": "SSL", "ssl_keyfile": Path("/k.pem")},
            "SSL_CERTFILE",
        ),
    ],
)
def test_settings_that_cannot_connect_are_refused_before_any_client(
    fields: dict[str, Any], names: str
) -> None:
    with pytest.raises(ConfigurationError, match=f"GENMON_KAFKA__{names}"):
        kafka_config.client_config(KafkaSettings(**fields))


def test_auth_failures_are_recognised_and_explained_without_the_password() -> None:
    from aiokafka.errors import KafkaConnectionError
    from kafka.errors import KafkaTimeoutError, SaslAuthenticationFailedError

    refused = SaslAuthenticationFailedError("Authentication failed: invalid credentials")
    assert kafka_config.is_auth_failure(refused)
    assert not kafka_config.is_auth_failure(KafkaTimeoutError())
    assert not kafka_config.is_auth_failure(KafkaConnectionError("down"))
    message = str(kafka_config.auth_failure(sasl_kafka(bootstrap_servers="b:9096"), refused))
    assert "b:9096" in message and "SCRAM-SHA-512" in message and "'svc'" in message
    assert "GENMON_KAFKA__SASL_PASSWORD" in message and PASSWORD not in message
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_code, mismatch.verify_message = 62, "Hostname mismatch"
    assert kafka_config.is_auth_failure(mismatch)
    message = str(kafka_config.auth_failure(sasl_kafka(), mismatch))
    assert "Hostname mismatch" in message and "SSL_CHECK_HOSTNAME=false" in message


def test_faust_creates_its_own_topics_with_min_insync_replicas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from faust.transport.drivers import aiokafka as faust_aiokafka

    from genmon.streams.app import create_app

    settings = Settings(kafka={"replication_factor": 3, "min_insync_replicas": 2})
    app = create_app(settings, installers=())
    seen: list[dict[str, Any]] = []

    async def create(self: Any, *args: Any, **kwargs: Any) -> None:
        seen.append({"args": args, **kwargs})

    monkeypatch.setattr(faust_aiokafka.Transport, "_create_topic", create)
    changelog = {"cleanup.policy": "compact"}
    asyncio.run(app.transport._create_topic(None, None, "t-changelog", 4, 3, config=changelog))

    assert seen[0]["config"] == {"min.insync.replicas": "2", "cleanup.policy": "compact"}
    assert app.conf.topic_replication_factor == 3


@needs_openssl
def test_the_local_listener_keeps_its_secrets_private(tmp_path: Path) -> None:
    settings = Settings.model_validate({"home": tmp_path, "kafka": {"sasl_port": 29094}})
    broker = KafkaBroker(settings)
    broker.security.ensure(settings.kafka.host)
    broker._write_config(with_sasl=True)

    text = broker.config_path.read_text()
    assert "listeners=PLAINTEXT://127.0.0.1:19092,SASL_SSL://127.0.0.1:29094," in text
    assert "advertised.listeners=PLAINTEXT://127.0.0.1:19092,SASL_SSL://127.0.0.1:29094\n" in text
    assert f"sasl.enabled.mechanisms={','.join(MECHANISMS)}" in text
    assert broker.security.password in text and broker.has_sasl_listener()
    for path in (broker.config_path, broker.security.secrets_path, broker.security.keystore_path):
        assert path.stat().st_mode & 0o077 == 0, path
    assert broker.security.folder.stat().st_mode & 0o077 == 0
    # The CA is a CA a client can load.
    kafka = KafkaSettings(**broker.sasl_settings("PLAIN"))
    assert kafka_config.ssl_context(kafka) is not None
    broker._write_config(with_sasl=False)
    assert "SASL_SSL" not in broker.config_path.read_text() and not broker.has_sasl_listener()


# -- against the broker --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sasl_broker(settings: Settings, free_port: Callable[[], int]) -> Iterator[KafkaBroker]:
    """The shared broker when it has the SASL_SSL listener, else a private one with it."""
    if not openssl_available():
        pytest.skip("the SASL_SSL listener needs the openssl command")
    shared = KafkaBroker(settings)
    if shared.status().sasl_bootstrap is not None and shared.security.ready():
        yield shared
        return
    home = Path(tempfile.mkdtemp(prefix="genmon-sasl-broker-"))
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    port, controller, sasl = sorted(ports)
    private = KafkaBroker(
        Settings.model_validate(
            {
                "home": home,
                "kafka": {
                    "version": settings.kafka.version,
                    "port": port,
                    "controller_port": controller,
                    "sasl_port": sasl,
                    "heap": "256m",
                    "partitions": 2,
                },
            }
        )
    )
    private.libs_dir.parent.mkdir(parents=True, exist_ok=True)
    private.libs_dir.symlink_to(shared.ensure_jars(), target_is_directory=True)
    try:
        private.up(sasl=True)
        yield private
    finally:
        private.down()
        shutil.rmtree(home, ignore_errors=True)


def sasl_settings(broker: KafkaBroker, prefix: str, mechanism: str, **kafka: Any) -> Settings:
    fields = {**broker.sasl_settings(mechanism), "topic_prefix": prefix, **kafka}
    return Settings(kafka=KafkaSettings(**fields))


def kafka_env(settings: Settings) -> dict[str, str]:
    return {
        **kafka_config.environment(settings.kafka),
        "GENMON_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
    }


@pytest.mark.kafka
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_each_mechanism_logs_in_and_creates_the_topics_with_their_durability(
    sasl_broker: KafkaBroker, unique_name: str, mechanism: str
) -> None:
    settings = sasl_settings(sasl_broker, unique_name, mechanism)
    bootstrap = settings.kafka.bootstrap_servers

    names = KafkaBroker(settings).ensure_topics(bootstrap)
    rows = {row.name: row for row in KafkaBroker(settings).describe_topics(bootstrap)}

    assert set(names) <= set(rows)  # and the Faust apps' topics of worker.app_id, if any
    row = rows[settings.topic("inference")]
    assert (row.partitions, row.replication_factor, row.min_insync_replicas) == (
        settings.kafka.partitions,
        1,
        1,
    )
    # min.insync.replicas is the topic's own setting, not the broker default showing through.
    with topics.connected(settings, bootstrap, secure=True) as admin:
        resource = ConfigResource(ConfigResourceType.TOPIC, settings.topic("inference"))
        modified = admin.describe_configs([resource], config_filter="modified")
    assert modified["topic"][settings.topic("inference")]["min.insync.replicas"]["value"] == "1"


@pytest.mark.kafka
def test_a_wrong_password_is_a_clear_error_at_once(
    sasl_broker: KafkaBroker, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = sasl_settings(
        sasl_broker, unique_name, "SCRAM-SHA-256", sasl_password=SecretStr(PASSWORD)
    )
    bootstrap = wrong.kafka.bootstrap_servers

    with pytest.raises(ConfigurationError) as refused:
        KafkaBroker(wrong).ensure_topics(bootstrap)
    message = str(refused.value)
    assert f"Kafka at {bootstrap} (SASL_SSL, SASL SCRAM-SHA-256 as user '{USER}')" in message
    assert "refused the login" in message and PASSWORD not in message

    # The SDK never raises into the service: it says why, as an error, and keeps the events.
    caplog.set_level(logging.WARNING, logger="genmon.sdk")
    monitor = Monitor(settings=wrong)
    try:
        assert monitor.log_inference(model_id="m", latency_ms=1.0)
        said = _wait_for_log(caplog, logging.ERROR, "refused the login", timeout_s=60)
        assert monitor.stats.sent == 0 and monitor.stats.buffered == 1
    finally:
        monitor.close(timeout=1)
    assert "SCRAM-SHA-256" in said and bootstrap in said
    assert PASSWORD not in caplog.text


def _wait_for_log(caplog: pytest.LogCaptureFixture, level: int, text: str, timeout_s: float) -> str:
    """The first record at ``level`` containing ``text``; the bound only ends a hang."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for record in list(caplog.records):
            if record.levelno == level and text in record.getMessage():
                return record.getMessage()
        time.sleep(0.2)
    raise AssertionError(f"no {logging.getLevelName(level)} log with {text!r}:\n{caplog.text}")


@pytest.mark.kafka
def test_a_broker_certificate_from_another_ca_is_a_clear_error(
    sasl_broker: KafkaBroker, unique_name: str, tmp_path: Path
) -> None:
    other = LocalSecurity(tmp_path / "other-ca")
    other.ensure("127.0.0.1")
    settings = sasl_settings(sasl_broker, unique_name, "PLAIN", ssl_cafile=other.ca_path)

    with pytest.raises(ConfigurationError, match="certificate failed verification") as refused:
        KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    assert "GENMON_KAFKA__SSL_CAFILE" in str(refused.value)


@pytest.mark.kafka
def test_the_worker_stops_with_one_clear_line_on_a_wrong_password(
    sasl_broker: KafkaBroker, unique_name: str, tmp_path: Path
) -> None:
    wrong = sasl_settings(sasl_broker, unique_name, "PLAIN", sasl_password=SecretStr(PASSWORD))
    env = {**os.environ, **kafka_env(wrong), "GENMON_HOME": str(tmp_path / "home")}
    # The bound only turns a hang into a failure; a refused login ends in seconds.
    result = subprocess.run(
        [GENMON, "worker"], env=env, capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "refused the login" in last and "SASL PLAIN" in last
    assert wrong.kafka.bootstrap_servers in last
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.kafka
def test_the_broker_logs_no_password(sasl_broker: KafkaBroker) -> None:
    password = sasl_broker.security.password
    logs = [path for path in (sasl_broker.log_path, sasl_broker.console_path) if path.exists()]
    assert logs
    for path in logs:
        assert password not in path.read_text(errors="replace"), path


@pytest.mark.kafka
@pytest.mark.slow
def test_sdk_worker_findings_round_trip_over_sasl_ssl(
    sasl_broker: KafkaBroker,
    unique_name: str,
    tmp_path: Path,
    free_port: Callable[[], int],
) -> None:
    settings = sasl_settings(sasl_broker, unique_name, "SCRAM-SHA-512")
    KafkaBroker(settings).ensure_topics(settings.kafka.bootstrap_servers)
    env = {
        **os.environ,
        **kafka_env(settings),
        "GENMON_WORKER__APP_ID": unique_name,
        "GENMON_WORKER__WEB_PORT": str(free_port()),
        "GENMON_HOME": str(tmp_path / "home"),
        "GENMON_DATABASE__URL": f"sqlite:///{tmp_path / 'genmon.sqlite'}",
        "GENMON_EMBEDDING__ENABLED": "false",
        "GENMON_WORKER__BATCH_WITHIN_S": "0.2",
        "GENMON_WINDOWS__TUMBLING_S": "2",
        "GENMON_WINDOWS__HOPPING_SIZE_S": "4",
        "GENMON_WINDOWS__HOPPING_STEP_S": "2",
        "GENMON_WINDOWS__ALLOWED_LATENESS_S": "1",
        "GENMON_WINDOWS__IDLE_TIMEOUT_S": "2",
        "GENMON_WINDOWS__CLOSE_INTERVAL_S": "0.5",
        "GENMON_DETECTORS__MIN_WINDOW_REQUESTS": "1",
        "GENMON_DETECTORS__SLOS": '{"*": ["error_rate <= 5%"]}',
    }
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    findings = KafkaConsumer(
        settings.topic("findings"),
        **kafka_config.client_config(settings.kafka),
        auto_offset_reset="earliest",
        consumer_timeout_ms=500,
        group_id=f"{unique_name}-reader",
    )
    try:
        worker.wait_ready(timeout=180)
        now = int(time.time() - 30)
        t0 = datetime.fromtimestamp(now - now % 2, UTC)
        with Monitor(settings=settings) as monitor:
            for i in range(20):
                assert monitor.log_inference(
                    request_id=f"r{i}",
                    model_id="m-sasl",
                    latency_ms=10.0,
                    started_at=t0 + timedelta(milliseconds=50 * i),
                    status=InferenceStatus.ERROR if i % 2 else InferenceStatus.OK,
                    error_code="E503" if i % 2 else None,
                )
            assert monitor.flush(timeout=60)
            assert monitor.stats.sent == 20
        fired = _first_finding(findings, "error_rate", timeout_s=120, log=worker.log)
        assert fired.model_id == "m-sasl" and fired.detector == "slo"
    finally:
        findings.close()
        worker.stop()
    log = worker.log.read_text(errors="replace")
    assert PASSWORD not in log and settings.kafka.sasl_password is not None
    assert settings.kafka.sasl_password.get_secret_value() not in log
    # Faust's own topics (table changelogs) carry min.insync.replicas too.
    changelog = f"{unique_name}-pipeline-state-changelog"
    with topics.connected(settings, settings.kafka.bootstrap_servers, secure=True) as admin:
        resource = ConfigResource(ConfigResourceType.TOPIC, changelog)
        modified = admin.describe_configs([resource], config_filter="modified")
    assert modified["topic"][changelog]["min.insync.replicas"]["value"] == "1"


def _first_finding(consumer: KafkaConsumer, signal: str, timeout_s: float, log: Path) -> Finding:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for message in consumer:
            finding = Finding.model_validate_json(message.value)
            if finding.signal == signal and finding.detected:
                return finding
    raise AssertionError(f"no {signal} finding in {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.kafka
def test_infra_topics_shows_replication_and_min_insync_replicas(
    kafka_settings: Settings, unique_name: str
) -> None:
    env = {
        "GENMON_KAFKA__BOOTSTRAP_SERVERS": kafka_settings.kafka.bootstrap_servers,
        "GENMON_KAFKA__TOPIC_PREFIX": unique_name,
    }
    from genmon.settings import get_settings

    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(main, ["infra", "topics"], env=env)
    finally:
        get_settings.cache_clear()

    assert result.exit_code == 0, result.output
    assert "settings: replication 1, min.insync.replicas 1, producer acks all" in result.output
    lines = [line.split() for line in result.output.splitlines()]
    row = next(cols for cols in lines if cols and cols[0] == f"{unique_name}.inference")
    assert row[1:] == [str(kafka_settings.kafka.partitions), "1", "1"]


@needs_openssl
def test_local_security_reuses_what_it_made(tmp_path: Path) -> None:
    security = LocalSecurity(tmp_path / "security")
    security.ensure("127.0.0.1")
    password, ca = security.password, security.ca_path.read_bytes()
    security.ensure("127.0.0.1")
    assert (security.password, security.ca_path.read_bytes()) == (password, ca)
    env = security.write_client_env("127.0.0.1", 19094)
    assert f"GENMON_KAFKA__SASL_USERNAME={USER}\n" in env.read_text()
    assert env.stat().st_mode & 0o077 == 0
