"""``retrain.backend: kubernetes`` without a cluster: the Job manifest genmon submits,
checked against the batch/v1 Job schema (``kubernetes_validate``, the newest Kubernetes
version it knows), and how a Job's status reads. No test here claims a Job ran."""

from __future__ import annotations

import re
import sys

import kubernetes_validate
import pytest

from genmon.retrain.backends import make_backend
from genmon.retrain.backends.base import BackendUnavailable, RemoteState
from genmon.retrain.backends.kubernetes import GPU_RESOURCE, JOB_LABEL, job_state, manifest
from genmon.retrain.queue import Lease
from genmon.settings import Settings

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: A job id as a user could make it: long, upper case, dots and underscores.
JOB_ID = "Support_Desk.v2/" + "refusals-" * 8 + "0007"


def settings(**retrain: object) -> Settings:
    values = {
        "backend": "kubernetes",
        "kubernetes_image": "registry.example/genmon:1.4",
        "kubernetes_namespace": "training",
        "gpus_per_job": 1.5,
        **retrain,
    }
    return Settings(
        database={"url": "postgresql+psycopg://genmon:s3cret@db:5432/genmon"},
        retrain=values,
    )


def test_the_job_manifest_is_a_valid_batch_v1_job_with_gpus_and_no_retries() -> None:
    body = manifest(settings(), Lease(JOB_ID, "host:1:abc", 3))
    kubernetes_validate.validate(body, kubernetes_validate.latest_version(), strict=True)

    name = body["metadata"]["name"]
    assert DNS_1123_LABEL.match(name) and len(name) <= 63 and name.endswith("-e3")
    spec = body["spec"]
    assert spec["backoffLimit"] == 0  # genmon owns retries
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/genmon:1.4"
    assert container["resources"]["limits"] == {GPU_RESOURCE: "2"}  # whole devices
    assert container["command"][-4:] == [JOB_ID, "3", name, "--remote"]
    assert container["envFrom"] == [{"secretRef": {"name": "genmon-retrain"}}]
    # Secrets come from the Secret, never from the manifest.
    literal = {item["name"]: item["value"] for item in container["env"]}
    assert "GENMON_DATABASE__URL" not in literal and "s3cret" not in str(body)
    assert literal["GENMON_RETRAIN__LEASE_S"] == str(Settings().retrain.lease_s)
    for labels in (body["metadata"]["labels"], spec["template"]["metadata"]["labels"]):
        assert DNS_1123_LABEL.match(labels[JOB_LABEL])
    assert body["metadata"]["annotations"][JOB_LABEL] == JOB_ID


def test_the_schema_check_catches_a_broken_manifest() -> None:
    """The validation above is a real check: a Job the API server would refuse fails it."""
    body = manifest(settings(), Lease("job-1", "w", 1))
    body["spec"]["backoffLimit"] = "none"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(body, kubernetes_validate.latest_version(), strict=True)


def test_a_cpu_job_asks_for_no_gpu_and_each_attempt_has_its_own_name() -> None:
    cpu = manifest(settings(gpus_per_job=0, kubernetes_secret=None), Lease("job-1", "w", 1))
    (container,) = cpu["spec"]["template"]["spec"]["containers"]
    assert "resources" not in container and "envFrom" not in container
    kubernetes_validate.validate(cpu, kubernetes_validate.latest_version(), strict=True)
    again = manifest(settings(), Lease("job-1", "other-worker", 1))
    retry = manifest(settings(), Lease("job-1", "w", 2))
    # The same attempt is the same name (a second create is a 409: adoption); a new
    # attempt is a new Job.
    assert again["metadata"]["name"] == cpu["metadata"]["name"]
    assert retry["metadata"]["name"] != cpu["metadata"]["name"]


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ({}, RemoteState.PENDING),
        ({"active": 1}, RemoteState.RUNNING),
        ({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}, "succeeded"),
        (
            {
                "failed": 1,
                "conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}],
            },
            RemoteState.FAILED,
        ),
        ({"failed": 1}, RemoteState.FAILED),
    ],
)
def test_a_jobs_status_reads_as_a_remote_state(status: dict[str, object], state: str) -> None:
    assert job_state(status).state == state


def test_without_the_client_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    backend = make_backend("kubernetes", settings())
    with pytest.raises(BackendUnavailable, match=r"pip install 'genmon\[kubernetes\]'"):
        backend.submit(Lease("job-1", "w", 1))
