"""The local broker's SASL_SSL listener: a self-signed CA, the broker's certificate, a user.

``genmon infra up`` (``--sasl``) adds a listener on ``kafka.sasl_port`` that speaks TLS and
takes SASL logins by PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512, so that genmon's clients are
tested against the same handshake as a managed cluster's. Everything lives under
``<home>/kafka/security`` (mode 0700), made once and reused::

    ca.pem            the CA certificate clients trust (GENMON_KAFKA__SSL_CAFILE)
    ca.key            its private key (only used here, to sign the broker's certificate)
    broker.p12        the broker's key and certificate, a PKCS#12 keystore
    secrets.json      the keystore password and the user's password
    client.env        GENMON_KAFKA__... lines that point a client at the listener

The certificates are made with the ``openssl`` command; the user's password never reaches a
command line or a log (the broker's config file holding it is mode 0600).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from genmon.exceptions import KafkaInfraError

log = logging.getLogger(__name__)

#: The user genmon's clients log in as on the local listener.
USER = "genmon"
#: Every mechanism the local listener takes, in the order `genmon infra up` names them.
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: Name of the listener in server.properties.
LISTENER = "SASL_SSL"
#: Certificates of the local CA stay valid this long (days).
VALIDITY_DAYS = 3650

_PLAIN_MODULE = "org.apache.kafka.common.security.plain.PlainLoginModule"
_SCRAM_MODULE = "org.apache.kafka.common.security.scram.ScramLoginModule"


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


@dataclass(frozen=True)
class LocalSecurity:
    """The CA, keystore and credentials of one broker home (``<home>/kafka``)."""

    folder: Path

    @property
    def ca_path(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def keystore_path(self) -> Path:
        return self.folder / "broker.p12"

    @property
    def secrets_path(self) -> Path:
        return self.folder / "secrets.json"

    @property
    def env_path(self) -> Path:
        return self.folder / "client.env"

    def ready(self) -> bool:
        return all(p.exists() for p in (self.ca_path, self.keystore_path, self.secrets_path))

    def ensure(self, host: str) -> None:
        """Make the CA, the broker's keystore and the credentials unless already there."""
        if self.ready():
            return
        if not openssl_available():
            raise KafkaInfraError(
                "the SASL_SSL listener needs the `openssl` command to make its certificates; "
                "install it (e.g. `apt-get install -y openssl`) or start without it: "
                "`genmon infra up --no-sasl`"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        values = {"keystore": secrets.token_urlsafe(24), "password": secrets.token_urlsafe(24)}
        _write_private(self.secrets_path, json.dumps(values) + "\n")
        self._make_certificates(host, values["keystore"])

    def _secrets(self) -> dict[str, str]:
        try:
            values: dict[str, str] = json.loads(self.secrets_path.read_text())
        except (OSError, ValueError) as error:
            raise KafkaInfraError(
                f"cannot read {self.secrets_path} ({error}); remove {self.folder} and run "
                "`genmon infra down && genmon infra up` to make new credentials"
            ) from None
        return values

    @property
    def password(self) -> str:
        """The password of :data:`USER` on the local listener."""
        return self._secrets()["password"]

    def client_settings(self, host: str, port: int, mechanism: str = "PLAIN") -> dict[str, Any]:
        """``settings.kafka`` fields (a dict for ``KafkaSettings.model_copy(update=...)`` or
        ``Settings(kafka=...)``) that reach the local listener as :data:`USER`."""
        from pydantic import SecretStr

        return {
            "bootstrap_servers": f"{host}:{port}",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": mechanism,
            "sasl_username": USER,
            "sasl_password": SecretStr(self.password),
            "ssl_cafile": self.ca_path,
        }

    def write_client_env(self, host: str, port: int, mechanism: str = "SCRAM-SHA-512") -> Path:
        """``client.env``: ``set -a; . client.env; set +a`` points genmon at the listener."""
        lines = {
            "GENMON_KAFKA__BOOTSTRAP_SERVERS": f"{host}:{port}",
            "GENMON_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "GENMON_KAFKA__SASL_MECHANISM": mechanism,
            "GENMON_KAFKA__SASL_USERNAME": USER,
            "GENMON_KAFKA__SASL_PASSWORD": self.password,
            "GENMON_KAFKA__SSL_CAFILE": str(self.ca_path),
        }
        _write_private(self.env_path, "".join(f"{k}={v}\n" for k, v in lines.items()))
        return self.env_path

    def server_properties(self) -> dict[str, str]:
        """Broker settings of the SASL_SSL listener (the caller adds it to ``listeners``)."""
        prefix = f"listener.name.{LISTENER.lower()}"
        values = self._secrets()
        password = values["password"]
        plain = f'{_PLAIN_MODULE} required user_{USER}="{password}";'
        return {
            f"{prefix}.sasl.enabled.mechanisms": ",".join(MECHANISMS),
            f"{prefix}.plain.sasl.jaas.config": plain,
            f"{prefix}.scram-sha-256.sasl.jaas.config": f"{_SCRAM_MODULE} required;",
            f"{prefix}.scram-sha-512.sasl.jaas.config": f"{_SCRAM_MODULE} required;",
            f"{prefix}.ssl.keystore.type": "PKCS12",
            f"{prefix}.ssl.keystore.location": str(self.keystore_path),
            f"{prefix}.ssl.keystore.password": values["keystore"],
        }

    def add_scram_users(self, admin: Any) -> None:
        """Create (or reset) :data:`USER`'s SCRAM credentials through ``admin`` (a
        kafka-python admin client on the broker's PLAINTEXT listener); KRaft keeps them in
        its metadata log, so this is done after every start, cheaply and idempotently."""
        if not hasattr(admin, "alter_user_scram_credentials"):  # kafka-python < 3.0
            log.warning(
                "kafka-python %s cannot create SCRAM users: the local SASL_SSL listener takes "
                "PLAIN logins only (pip install 'kafka-python>=3' for SCRAM)",
                getattr(import_module("kafka"), "__version__", "?"),
            )
            return
        from kafka.admin import UserScramCredentialUpsertion

        password = self.password
        for mechanism in MECHANISMS[1:]:
            # One request per mechanism: Kafka refuses two changes of one user in a request.
            upsert = UserScramCredentialUpsertion(USER, mechanism, password)
            error = admin.alter_user_scram_credentials([upsert]).get(USER)
            if error:
                raise KafkaInfraError(
                    f"the local broker refused the {mechanism} credentials of {USER} "
                    f"({error}); see the broker's log"
                )

    # -- certificates ------------------------------------------------------------------

    def _make_certificates(self, host: str, keystore_password: str) -> None:
        names = ["DNS:localhost", "IP:127.0.0.1", "IP:::1"]
        if host not in ("localhost", "127.0.0.1", "::1"):
            kind = "IP" if _is_address(host) else "DNS"
            names.append(f"{kind}:{host}")
        with tempfile.TemporaryDirectory(dir=self.folder) as scratch:
            work = Path(scratch)
            (work / "leaf.ext").write_text(
                f"subjectAltName={','.join(names)}\n"
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                "subjectKeyIdentifier=hash\n"
                "authorityKeyIdentifier=keyid,issuer\n"
            )
            _write_private(work / "pass", keystore_password)
            ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
            ca_key = self.folder / "ca.key"
            _openssl(
                "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(work / "ca.pem"),
                "-days", str(VALIDITY_DAYS), "-subj", "/CN=genmon local Kafka CA",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            )  # fmt: skip
            ca_key.chmod(0o600)
            _openssl(
                "req", "-new", *ec, "-keyout", str(work / "broker.key"),
                "-out", str(work / "broker.csr"), "-subj", "/CN=localhost",
            )  # fmt: skip
            _openssl(
                "x509", "-req", "-in", str(work / "broker.csr"), "-CA", str(work / "ca.pem"),
                "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(work / "broker.pem"),
                "-days", str(VALIDITY_DAYS), "-extfile", str(work / "leaf.ext"),
            )  # fmt: skip
            _openssl(
                "pkcs12", "-export", "-in", str(work / "broker.pem"),
                "-inkey", str(work / "broker.key"), "-certfile", str(work / "ca.pem"),
                "-name", "broker", "-out", str(work / "broker.p12"),
                "-passout", f"file:{work / 'pass'}",
            )  # fmt: skip
            # Last: ready() looks for these, so an interrupted run is made again next time.
            os.replace(work / "broker.p12", self.keystore_path)
            self.keystore_path.chmod(0o600)
            os.replace(work / "ca.pem", self.ca_path)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise KafkaInfraError(
            f"`openssl {args[0]}` failed (exit {result.returncode}) making the local broker's "
            f"certificates: {result.stderr.strip()[-1500:]}"
        )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, from the first byte on."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    path.chmod(0o600)
