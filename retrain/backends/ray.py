"""``retrain.backend: ray``: each attempt is one Ray Job (``pip install 'genmon[ray]'``).

The submission id is the job id with the attempt's epoch (:func:`dns_label`), so the Ray
cluster itself refuses a second submission of one attempt ("already exists"): a worker
that adopts a run, or resubmits one whose submission it cannot prove, can never start
two. Ray Jobs do not retry an entrypoint; genmon's queue owns attempts. The run's
environment (``runtime_env.env_vars``) carries the settings the job needs, the database
URL among them: Ray has no secret store, so restrict who can read the Jobs API.
"""

from __future__ import annotations

import logging
import shlex
from typing import Any

from genmon.retrain.backends.base import (
    BackendError,
    BackendUnavailable,
    RemoteState,
    RemoteStatus,
    dns_label,
    remote_env,
    training_command,
)
from genmon.retrain.queue import Lease
from genmon.settings import Settings

log = logging.getLogger(__name__)

#: Ray's job states, as genmon reads them.
STATES = {
    "PENDING": RemoteState.PENDING,
    "RUNNING": RemoteState.RUNNING,
    "SUCCEEDED": RemoteState.SUCCEEDED,
    "FAILED": RemoteState.FAILED,
    "STOPPED": RemoteState.STOPPED,
}


def _client_class() -> Any:
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:
        raise BackendUnavailable(
            "retrain.backend is ray but the Ray Jobs client is not installed: "
            "pip install 'genmon[ray]'"
        ) from exc
    return JobSubmissionClient


class RayBackend:
    """Ray Jobs at ``retrain.ray_address`` (the dashboard's address)."""

    name = "ray"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            address = self.settings.retrain.ray_address
            try:
                self._client = _client_class()(address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BackendError(
                    f"cannot reach the Ray Jobs API at {address}: {exc}; start the cluster "
                    "with its dashboard (`ray start --head --include-dashboard true`) or set "
                    "retrain.ray_address"
                ) from exc
        return self._client

    def remote_id(self, lease: Lease) -> str:
        return dns_label(lease.job_id, lease.epoch)

    def command(self, lease: Lease) -> list[str]:
        python = self.settings.retrain.remote_python
        return training_command(self.settings, lease, python, remote_id=self.remote_id(lease))

    def submit(self, lease: Lease) -> bool:
        remote_id = self.remote_id(lease)
        try:
            self.client.submit_job(
                entrypoint=shlex.join(self.command(lease)),
                submission_id=remote_id,
                entrypoint_num_gpus=self.settings.retrain.gpus_per_job,
                runtime_env={"env_vars": remote_env(self.settings)},
                metadata={"genmon_job_id": lease.job_id, "genmon_epoch": str(lease.epoch)},
            )
        except RuntimeError as exc:
            if "already exists" in str(exc):
                log.info("ray already has %s: adopting it, not submitting again", remote_id)
                return False
            raise BackendError(f"ray refused {remote_id}: {exc}") from exc
        log.info("retrain job %s: submitted to ray as %s", lease.job_id, remote_id)
        return True

    def poll(self, remote_id: str) -> RemoteStatus:
        try:
            info = self.client.get_job_info(remote_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc):
                return RemoteStatus(RemoteState.UNKNOWN, f"ray has no job {remote_id}")
            raise BackendError(f"asking ray about {remote_id} failed: {exc}") from exc
        state = STATES.get(str(getattr(info.status, "value", info.status)), RemoteState.UNKNOWN)
        message = info.message or ""
        if info.driver_exit_code is not None:
            message = f"{message} (exit code {info.driver_exit_code})".strip()
        return RemoteStatus(state, message)

    def adopt(self, remote_id: str) -> RemoteStatus:
        return self.poll(remote_id)

    def cancel(self, remote_id: str) -> None:
        try:
            self.client.stop_job(remote_id)
        except RuntimeError as exc:
            if "does not exist" not in str(exc):
                raise BackendError(f"stopping ray job {remote_id} failed: {exc}") from exc

    def submissions(self, job_id: str) -> list[str]:
        """Submission ids of every attempt of ``job_id`` the cluster knows."""
        return [
            str(info.submission_id)
            for info in self.client.list_jobs()
            if (info.metadata or {}).get("genmon_job_id") == job_id
        ]


__all__ = ["RayBackend"]
