"""What every backend shares: the one training command, the remote run's environment,
its states, and the protocol a remote backend (Ray Jobs, Kubernetes Jobs) implements.

The command is the same everywhere -- ``python -m genmon.retrain.job JOB EPOCH OWNER``,
or that module under ``torchrun``/``accelerate launch`` (``retrain.launcher``) -- so a job
trains the same way on this machine and on a cluster. A remote run adds ``--remote``: its
OWNER is then the remote id, and its lease is fenced on that id rather than on the worker
that submitted it (:mod:`genmon.retrain.queue`, "Remote runs").
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from genmon import kafka_config
from genmon.retrain.exceptions import RetrainError
from genmon.retrain.queue import Lease
from genmon.settings import Settings

#: The job process's module (``python -m``).
JOB_MODULE = "genmon.retrain.job"
#: The job process's flag for a remote run: OWNER is the remote id it is fenced on.
REMOTE_FLAG = "--remote"
#: Longest remote id: a Kubernetes Job name must fit a label value (63 characters).
MAX_REMOTE_ID = 63


class BackendError(RetrainError):
    """A backend refused or could not be reached."""


class BackendUnavailable(BackendError):
    """The backend's client package is not installed."""


class RemoteState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    #: The backend does not know the id: never submitted, or forgotten.
    UNKNOWN = "unknown"


#: States after which the run writes nothing more.
ENDED = frozenset({RemoteState.SUCCEEDED, RemoteState.FAILED, RemoteState.STOPPED})


@dataclass(frozen=True)
class RemoteStatus:
    state: RemoteState
    message: str = ""

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def alive(self) -> bool:
        return self.state in (RemoteState.PENDING, RemoteState.RUNNING)


class RemoteBackend(Protocol):
    """A cluster that runs the training command for genmon, which keeps the job row.

    Implementations never retry a run themselves: genmon owns attempts.
    """

    name: str

    def command(self, lease: Lease) -> list[str]:
        """The training command of the attempt ``lease`` holds, fenced on its remote id."""
        ...

    def remote_id(self, lease: Lease) -> str:
        """The attempt's id on the cluster, a pure function of (job, epoch): a second
        submission of the attempt reuses it and is refused."""
        ...

    def submit(self, lease: Lease) -> bool:
        """Submit the attempt; ``False`` when the cluster already has its id (adopt it)."""
        ...

    def poll(self, remote_id: str) -> RemoteStatus: ...

    def cancel(self, remote_id: str) -> None:
        """Stop the run; a run that already ended or is unknown is left as it is."""
        ...

    def adopt(self, remote_id: str) -> RemoteStatus:
        """Look up a run another worker submitted (:attr:`RemoteState.UNKNOWN` if none)."""
        ...


def training_command(
    settings: Settings, lease: Lease, python: str, *, remote_id: str | None = None
) -> list[str]:
    """``python -m genmon.retrain.job JOB EPOCH OWNER`` under ``retrain.launcher``.

    ``torchrun``/``accelerate`` start ``retrain.processes_per_job`` processes on this node;
    the job is rank-aware (only rank 0 writes the job row and artifacts).
    """
    retrain = settings.retrain
    owner = remote_id if remote_id is not None else lease.owner
    args = [lease.job_id, str(lease.epoch), owner]
    if remote_id is not None:
        args.append(REMOTE_FLAG)
    n = str(retrain.processes_per_job)
    if retrain.launcher == "torchrun":
        launch = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", n]
        return [*launch, "--max-restarts", "0", "-m", JOB_MODULE, *args]
    if retrain.launcher == "accelerate":
        launch = [python, "-m", "accelerate.commands.launch", "--num_processes", n]
        if retrain.processes_per_job > 1:
            launch.append("--multi_gpu")
        return [*launch, "-m", JOB_MODULE, *args]
    return [python, "-m", JOB_MODULE, *args]


def settings_env(settings: Settings, loglevel: str | None = None) -> dict[str, str]:
    """The settings a job process needs, as ``GENMON_*`` variables (the database URL and
    Kafka credentials included: pass them only to a child or a cluster's secret store)."""
    retrain = settings.retrain
    env = {
        "GENMON_DATABASE__URL": settings.database.url,
        "GENMON_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
        "GENMON_RETRAIN__ARTIFACTS_URI": retrain.artifacts_uri,
        "GENMON_RETRAIN__LEASE_S": str(retrain.lease_s),
        "GENMON_RETRAIN__HEARTBEAT_S": str(retrain.heartbeat_s),
        "GENMON_RETRAIN__DEVICE": retrain.device,
        "GENMON_RETRAIN__REDACT": str(retrain.redact).lower(),
    }
    env.update(kafka_config.environment(settings.kafka))  # address, TLS/SASL, durability
    if retrain.policy_file is not None:
        env["GENMON_RETRAIN__POLICY_FILE"] = str(retrain.policy_file)
    env["GENMON_WORKER__LOGLEVEL"] = (loglevel or settings.worker.loglevel).lower()
    return env


#: Settings a Kubernetes Job takes from its Secret, never from the manifest.
SECRET_PREFIXES = ("GENMON_DATABASE__", "GENMON_KAFKA__SASL", "GENMON_KAFKA__SSL")


def remote_env(settings: Settings, *, with_secrets: bool = True) -> dict[str, str]:
    """A remote run's environment: the settings, and ``retrain.remote_env_vars`` as this
    worker has them. ``with_secrets=False`` leaves out what a secret store must give."""
    env = settings_env(settings)
    if not with_secrets:
        env = {k: v for k, v in env.items() if not k.startswith(SECRET_PREFIXES)}
    for name in settings.retrain.remote_env_vars:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def dns_label(job_id: str, epoch: int | None = None, prefix: str = "genmon") -> str:
    """``genmon-<job>-<hash>-e<epoch>``: lowercase, ``[a-z0-9-]``, at most 63 characters
    (a DNS-1123 label, a Kubernetes label value, a Ray submission id), one per attempt
    (without ``epoch``: one per job); the hash keeps job ids that clean up alike apart."""
    digest = hashlib.sha256(job_id.encode()).hexdigest()[:8]
    suffix = f"-{digest}" if epoch is None else f"-{digest}-e{epoch}"
    clean = re.sub(r"[^a-z0-9]+", "-", job_id.lower()).strip("-")
    room = MAX_REMOTE_ID - len(prefix) - 1 - len(suffix)
    body = clean[:room].strip("-")
    return f"{prefix}-{body}{suffix}" if body else f"{prefix}{suffix}"


__all__ = [
    "ENDED",
    "REMOTE_FLAG",
    "BackendError",
    "BackendUnavailable",
    "RemoteBackend",
    "RemoteState",
    "RemoteStatus",
    "dns_label",
    "remote_env",
    "settings_env",
    "training_command",
]
