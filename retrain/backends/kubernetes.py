"""``retrain.backend: kubernetes``: each attempt is one batch/v1 Job
(``pip install 'genmon[kubernetes]'``).

The Job is named from the job id and the attempt's epoch (:func:`dns_label`), so the API
server refuses a second create of one attempt with 409 Conflict: that answer is adoption,
never a second run. ``backoffLimit: 0`` and ``restartPolicy: Never``: Kubernetes retries
nothing, genmon's queue owns attempts. ``activeDeadlineSeconds`` bounds a run,
``ttlSecondsAfterFinished`` keeps an ended Job long enough for a worker to read how it
ended. Secrets (the database URL, Kafka credentials) come from the Secret
``retrain.kubernetes_secret`` (``envFrom``), never from the manifest.
"""

from __future__ import annotations

import logging
import math
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

#: Label (and annotation) keys genmon puts on its Jobs and their pods.
JOB_LABEL = "genmon.io/job-id"
EPOCH_ANNOTATION = "genmon.io/epoch"
GPU_RESOURCE = "nvidia.com/gpu"


def manifest(settings: Settings, lease: Lease) -> dict[str, Any]:
    """The batch/v1 Job of the attempt ``lease`` holds."""
    retrain = settings.retrain
    name = dns_label(lease.job_id, lease.epoch)
    labels = {
        "app.kubernetes.io/name": "genmon-retrain",
        "app.kubernetes.io/managed-by": "genmon",
        JOB_LABEL: dns_label(lease.job_id),
    }
    plain = remote_env(settings, with_secrets=False)
    env = [{"name": k, "value": v} for k, v in sorted(plain.items())]
    container: dict[str, Any] = {
        "name": "train",
        "image": retrain.kubernetes_image,
        "command": training_command(settings, lease, retrain.remote_python, remote_id=name),
        "env": env,
    }
    if retrain.kubernetes_secret:
        container["envFrom"] = [{"secretRef": {"name": retrain.kubernetes_secret}}]
    gpus = math.ceil(retrain.gpus_per_job)  # Kubernetes counts whole devices
    if gpus:
        container["resources"] = {"limits": {GPU_RESOURCE: str(gpus)}}
    annotations = {JOB_LABEL: lease.job_id, EPOCH_ANNOTATION: str(lease.epoch)}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": retrain.kubernetes_namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": retrain.kubernetes_deadline_s,
            "ttlSecondsAfterFinished": retrain.kubernetes_ttl_s,
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {"restartPolicy": "Never", "containers": [container]},
            },
        },
    }


def job_state(status: dict[str, Any]) -> RemoteStatus:
    """A Job's ``status`` (as the API returns it) in genmon's terms."""
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        message = condition.get("message") or condition.get("reason") or ""
        if condition.get("type") == "Complete":
            return RemoteStatus(RemoteState.SUCCEEDED, message)
        if condition.get("type") == "Failed":
            return RemoteStatus(RemoteState.FAILED, message)
    if status.get("succeeded"):
        return RemoteStatus(RemoteState.SUCCEEDED)
    if status.get("failed"):
        return RemoteStatus(RemoteState.FAILED, f"{status['failed']} pod(s) failed")
    if status.get("active") or status.get("ready"):
        return RemoteStatus(RemoteState.RUNNING)
    return RemoteStatus(RemoteState.PENDING)


def _client() -> Any:
    try:
        import kubernetes
    except ImportError as exc:
        raise BackendUnavailable(
            "retrain.backend is kubernetes but its client is not installed: "
            "pip install 'genmon[kubernetes]'"
        ) from exc
    return kubernetes


class KubernetesBackend:
    """Jobs in ``retrain.kubernetes_namespace``, with the in-cluster configuration or the
    local kubeconfig."""

    name = "kubernetes"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.namespace = settings.retrain.kubernetes_namespace
        self._api: Any = None

    @property
    def api(self) -> Any:
        if self._api is None:
            k8s = _client()
            try:
                k8s.config.load_incluster_config()
            except k8s.config.ConfigException:
                try:
                    k8s.config.load_kube_config()
                except (k8s.config.ConfigException, OSError) as exc:
                    raise BackendError(
                        f"no Kubernetes configuration: {exc}; run in the cluster or set KUBECONFIG"
                    ) from exc
            self._api = k8s.client.BatchV1Api()
        return self._api

    def remote_id(self, lease: Lease) -> str:
        return dns_label(lease.job_id, lease.epoch)

    def command(self, lease: Lease) -> list[str]:
        python = self.settings.retrain.remote_python
        return training_command(self.settings, lease, python, remote_id=self.remote_id(lease))

    def submit(self, lease: Lease) -> bool:
        body = manifest(self.settings, lease)
        name = body["metadata"]["name"]
        try:
            self.api.create_namespaced_job(self.namespace, body)
        except _client().client.ApiException as exc:
            if exc.status == 409:
                log.info("kubernetes already has Job %s: adopting it", name)
                return False
            raise BackendError(f"creating Job {name} failed: {exc.status} {exc.reason}") from exc
        log.info("retrain job %s: Job %s created in %s", lease.job_id, name, self.namespace)
        return True

    def poll(self, remote_id: str) -> RemoteStatus:
        try:
            job = self.api.read_namespaced_job_status(remote_id, self.namespace)
        except _client().client.ApiException as exc:
            if exc.status == 404:
                return RemoteStatus(RemoteState.UNKNOWN, f"no Job {remote_id}")
            raise BackendError(f"reading Job {remote_id} failed: {exc.status}") from exc
        return job_state(self.api.api_client.sanitize_for_serialization(job.status) or {})

    def adopt(self, remote_id: str) -> RemoteStatus:
        return self.poll(remote_id)

    def cancel(self, remote_id: str) -> None:
        try:
            self.api.delete_namespaced_job(
                remote_id, self.namespace, propagation_policy="Background"
            )
        except _client().client.ApiException as exc:
            if exc.status != 404:
                raise BackendError(f"deleting Job {remote_id} failed: {exc.status}") from exc


__all__ = ["KubernetesBackend", "job_state", "manifest"]
