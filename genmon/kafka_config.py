"""``settings.kafka`` as client configuration: the one place that knows how genmon's Kafka
clients (kafka-python, aiokafka, Faust) authenticate, encrypt and acknowledge.

Every client genmon builds takes its security options from here, so that a managed
cluster (Confluent Cloud, MSK, Aiven...) needs only settings::

    GENMON_KAFKA__BOOTSTRAP_SERVERS=broker-1.example.com:9096
    GENMON_KAFKA__SECURITY_PROTOCOL=SASL_SSL
    GENMON_KAFKA__SASL_MECHANISM=SCRAM-SHA-512
    GENMON_KAFKA__SASL_USERNAME=genmon
    GENMON_KAFKA__SASL_PASSWORD=...

>>> from genmon.settings import KafkaSettings
>>> client_config(KafkaSettings())
{'bootstrap_servers': '127.0.0.1:19092', 'security_protocol': 'PLAINTEXT'}
>>> config = client_config(KafkaSettings(security_protocol="SASL_PLAINTEXT",
...     sasl_username="genmon", sasl_password="s3cret"))
>>> config["sasl_plain_password"] == "s3cret", "s3cret" in repr(config)
(True, False)

kafka-python and aiokafka take the same option names (``security_protocol``,
``ssl_context``, ``sasl_mechanism``, ``sasl_plain_username``, ``sasl_plain_password``,
``acks``), so :func:`client_config` serves both; :func:`faust_options` serves Faust. The
password travels as a :class:`Secret`, a ``str`` whose ``repr`` is masked, so a library
that logs its configuration (kafka-python's admin client does, at DEBUG) prints stars.

This module is part of the SDK: it imports neither aiokafka nor Faust at import time.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

from genmon.exceptions import ConfigurationError, KafkaAuthenticationError

if TYPE_CHECKING:
    from genmon.settings import KafkaSettings

__all__ = [
    "MASK",
    "ClientConfig",
    "Secret",
    "auth_failure",
    "auth_failures_explained",
    "check_login",
    "client_config",
    "describe",
    "diagnose_tls",
    "environment",
    "faust_options",
    "is_auth_failure",
    "mechanism",
    "producer_acks",
    "ssl_context",
    "topic_configs",
    "uses_sasl",
    "uses_tls",
]

MASK: Final = "**********"
#: Client options whose values are secrets.
SECRET_KEYS: Final = frozenset({"sasl_plain_password", "ssl_password"})
_TLS: Final = frozenset({"SSL", "SASL_SSL"})
#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH.
_X509_HOSTNAME_MISMATCH: Final = 62
_SASL: Final = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})


class Secret(str):
    """A ``str`` whose ``repr`` is masked: dict reprs and ``%r`` print stars, the clients
    that need the text (``"\\0".join``, ``.encode()``) still get it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(MASK)


class ClientConfig(dict[str, Any]):
    """Keyword arguments of a Kafka client; its ``repr`` masks every secret value."""

    def __repr__(self) -> str:
        shown = {key: MASK if key in SECRET_KEYS else value for key, value in self.items()}
        return repr(shown)

    __str__ = __repr__


def uses_tls(kafka: KafkaSettings) -> bool:
    return kafka.security_protocol in _TLS


def uses_sasl(kafka: KafkaSettings) -> bool:
    return kafka.security_protocol in _SASL


def mechanism(kafka: KafkaSettings) -> str:
    """The SASL mechanism in effect (PLAIN when unset)."""
    return kafka.sasl_mechanism or "PLAIN"


def describe(kafka: KafkaSettings, bootstrap: str | None = None) -> str:
    """How genmon connects, for messages: never the password."""
    where = bootstrap or kafka.bootstrap_servers
    if uses_sasl(kafka):
        return (
            f"{where} ({kafka.security_protocol}, SASL {mechanism(kafka)} as user "
            f"{kafka.sasl_username!r})"
        )
    return f"{where} ({kafka.security_protocol})"


def validate(kafka: KafkaSettings) -> None:
    """Refuse combinations that cannot connect, before any client tries (and hangs)."""
    if uses_sasl(kafka) and (not kafka.sasl_username or kafka.sasl_password is None):
        raise ConfigurationError(
            f"kafka.security_protocol={kafka.security_protocol} needs a user name and a "
            "password: set GENMON_KAFKA__SASL_USERNAME and GENMON_KAFKA__SASL_PASSWORD"
        )
    if not uses_sasl(kafka) and (kafka.sasl_username or kafka.sasl_password is not None):
        raise ConfigurationError(
            f"SASL credentials are set but kafka.security_protocol is "
            f"{kafka.security_protocol}, which would not use them: set "
            "GENMON_KAFKA__SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT)"
        )
    tls_files = (kafka.ssl_cafile, kafka.ssl_certfile, kafka.ssl_keyfile)
    if not uses_tls(kafka) and any(path is not None for path in tls_files):
        raise ConfigurationError(
            f"TLS files are set but kafka.security_protocol is {kafka.security_protocol}, "
            "which would not use them: set GENMON_KAFKA__SECURITY_PROTOCOL=SSL or SASL_SSL"
        )
    if kafka.ssl_keyfile is not None and kafka.ssl_certfile is None:
        raise ConfigurationError(
            "kafka.ssl_keyfile needs kafka.ssl_certfile (the client certificate it signs): "
            "set GENMON_KAFKA__SSL_CERTFILE"
        )


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context of SSL and SASL_SSL (None otherwise): the CA file, or the system's
    CAs when unset, and the client certificate for mutual TLS."""
    if not uses_tls(kafka):
        return None
    cafile = kafka.ssl_cafile
    try:
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    except (OSError, ssl.SSLError) as error:
        raise ConfigurationError(
            f"cannot load the Kafka CA certificate {cafile} ({error}); point "
            "GENMON_KAFKA__SSL_CAFILE at the PEM file that signed the broker's certificate"
        ) from None
    context.check_hostname = kafka.ssl_check_hostname
    if kafka.ssl_certfile is not None:
        password = kafka.ssl_key_password
        try:
            context.load_cert_chain(
                str(kafka.ssl_certfile),
                str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None,
                password=password.get_secret_value() if password else None,
            )
        except (OSError, ssl.SSLError) as error:
            raise ConfigurationError(
                f"cannot load the Kafka client certificate {kafka.ssl_certfile} "
                f"(key {kafka.ssl_keyfile}): {error}; check GENMON_KAFKA__SSL_CERTFILE, "
                "GENMON_KAFKA__SSL_KEYFILE and GENMON_KAFKA__SSL_KEY_PASSWORD"
            ) from None
    return context


def producer_acks(kafka: KafkaSettings) -> int | str:
    """``acks`` as kafka-python and aiokafka take it: ``"all"``, 1 or 0."""
    return "all" if kafka.acks == "all" else int(kafka.acks)


def client_config(
    kafka: KafkaSettings,
    bootstrap_servers: str | None = None,
    *,
    producer: bool = False,
    **options: Any,
) -> ClientConfig:
    """Keyword arguments of a kafka-python or aiokafka client: the bootstrap servers, the
    security options and, for a producer, ``acks``; ``options`` are added (and win)."""
    validate(kafka)
    config = ClientConfig(
        bootstrap_servers=bootstrap_servers or kafka.bootstrap_servers,
        security_protocol=kafka.security_protocol,
    )
    context = ssl_context(kafka)
    if context is not None:
        config["ssl_context"] = context
    if uses_sasl(kafka):
        assert kafka.sasl_password is not None  # validate() checked
        config["sasl_mechanism"] = mechanism(kafka)
        config["sasl_plain_username"] = kafka.sasl_username
        config["sasl_plain_password"] = Secret(kafka.sasl_password.get_secret_value())
    if producer:
        config["acks"] = producer_acks(kafka)
    config.update(options)
    return config


def faust_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Faust app settings: brokers, credentials, replication of its own topics, acks."""
    from faust.auth import SASLCredentials, SSLCredentials

    validate(kafka)
    context = ssl_context(kafka)
    credentials: SASLCredentials | SSLCredentials | None = None
    if uses_sasl(kafka):
        assert kafka.sasl_password is not None
        credentials = SASLCredentials(
            username=kafka.sasl_username,
            password=Secret(kafka.sasl_password.get_secret_value()),
            ssl_context=context,
            mechanism=mechanism(kafka),
        )
    elif context is not None:
        credentials = SSLCredentials(context)
    acks = producer_acks(kafka)
    return {
        "broker": [f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")],
        "broker_credentials": credentials,
        "topic_replication_factor": kafka.replication_factor,
        "producer_acks": -1 if acks == "all" else acks,
    }


def environment(kafka: KafkaSettings) -> dict[str, str]:
    """``GENMON_KAFKA__*`` variables that give a child process the same connection (address,
    security, durability): for a subprocess whose parent got its settings otherwise than
    from the environment. They hold the password: pass them only to the child's ``env``."""
    names = (
        "bootstrap_servers", "security_protocol", "sasl_mechanism", "sasl_username",
        "sasl_password", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_key_password",
        "ssl_check_hostname", "replication_factor", "min_insync_replicas", "acks",
    )  # fmt: skip
    env = {}
    for name in names:
        value = getattr(kafka, name)
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[f"GENMON_KAFKA__{name.upper()}"] = text
    return env


def topic_configs(kafka: KafkaSettings) -> dict[str, str]:
    """Topic-level configs every topic genmon creates carries (durability)."""
    return {"min.insync.replicas": str(kafka.min_insync_replicas)}


def is_auth_failure(error: BaseException) -> bool:
    """Whether ``error`` (from any of the clients) means the broker refused who we are:
    a rejected SASL login, or a certificate that failed verification."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(
        names
        & {
            "SaslAuthenticationFailedError",  # kafka-python
            "AuthenticationFailedError",  # aiokafka
            "SaslAuthenticationFailed",  # aiokafka, the broker's error code
            "IllegalSaslStateError",
            "UnsupportedSaslMechanismError",
            "UnsupportedSaslMechanism",
        }
    )


def diagnose_tls(
    kafka: KafkaSettings, bootstrap: str | None = None, timeout_s: float = 5.0
) -> ConfigurationError | None:
    """The error to raise when the broker's certificate fails verification (None when it
    passes, or no broker answers): a client that cannot verify it retries until its timeout
    and then says only that it could not connect, so genmon shakes hands once itself."""
    context = ssl_context(kafka)
    if context is None:
        return None
    for server in (bootstrap or kafka.bootstrap_servers).split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with (
                socket.create_connection((host.strip("[]"), int(port)), timeout_s) as raw,
                context.wrap_socket(raw, server_hostname=host.strip("[]")),
            ):
                return None
        except ssl.SSLCertVerificationError as error:
            return auth_failure(kafka, error, bootstrap)
        except (OSError, ValueError):
            continue
    return None


def check_login(
    kafka: KafkaSettings, bootstrap: str | None = None, timeout_s: float = 10.0
) -> None:
    """Raise :func:`auth_failure` when the broker refuses the certificate or the SASL login;
    return when it accepts them, or when no broker answers (the client says that itself).

    kafka-python (3.0) retries a refused SASL login like a broker that is down, until its
    bootstrap timeout, and then reports only a timeout; aiokafka's connection raises the
    broker's verdict at once, so the login is tried with it (where installed, as with
    the worker; else only the TLS handshake is checked).
    """
    if not (uses_tls(kafka) or uses_sasl(kafka)):
        return
    try:
        from aiokafka.conn import create_conn
    except ImportError:
        create_conn = None
    if create_conn is None or not uses_sasl(kafka):
        refused = diagnose_tls(kafka, bootstrap, timeout_s)
        if refused is not None:
            raise refused
        return
    config = client_config(kafka, bootstrap)
    options = {key: value for key, value in config.items() if key != "bootstrap_servers"}

    async def attempt(host: str, port: int) -> None:
        conn = await asyncio.wait_for(
            create_conn(host, port, request_timeout_ms=int(timeout_s * 1000), **options),
            timeout_s,
        )
        conn.close()

    for server in config["bootstrap_servers"].split(","):
        host, _, port = server.strip().rpartition(":")
        # A thread of its own: the caller may be inside an event loop already.
        with ThreadPoolExecutor(1, thread_name_prefix="genmon-kafka-login") as pool:
            try:
                pool.submit(asyncio.run, attempt(host.strip("[]"), int(port))).result()
                return
            except Exception as error:
                if is_auth_failure(error):
                    raise auth_failure(kafka, error, bootstrap) from None


@contextmanager
def auth_failures_explained(kafka: KafkaSettings, bootstrap: str | None = None) -> Iterator[None]:
    """Inside the block, a refused login or certificate (from any client) becomes
    :func:`auth_failure`, also when the client reported it as a mere timeout
    (:func:`check_login` then asks the broker); other errors pass unchanged."""
    try:
        yield
    except Exception as error:
        if is_auth_failure(error):
            raise auth_failure(kafka, error, bootstrap) from None
        check_login(kafka, bootstrap)
        raise


def auth_failure(
    kafka: KafkaSettings, error: BaseException, bootstrap: str | None = None
) -> KafkaAuthenticationError:
    """The error genmon raises when the broker refuses its credentials or certificate:
    names the broker, the protocol and mechanism, and the settings to check."""
    where = describe(kafka, bootstrap)
    if isinstance(error, ssl.SSLCertVerificationError):
        hint = (
            "connect by a name the certificate holds, or set GENMON_KAFKA__SSL_CHECK_HOSTNAME=false"
            if error.verify_code == _X509_HOSTNAME_MISMATCH
            else "set GENMON_KAFKA__SSL_CAFILE to the CA that signed it"
        )
        return KafkaAuthenticationError(
            f"Kafka at {where}: the broker's TLS certificate failed verification "
            f"({error.verify_message or error}); {hint}"
        )
    return KafkaAuthenticationError(
        f"Kafka at {where} refused the login ({type(error).__name__}: {error}); check "
        "GENMON_KAFKA__SASL_USERNAME, GENMON_KAFKA__SASL_PASSWORD and "
        "GENMON_KAFKA__SASL_MECHANISM"
    )
