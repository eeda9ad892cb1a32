"""A worker supervising a remote run: submit it (or adopt it), renew the lease, poll the
run, and settle the attempt when the run ends without ending the job.

The run writes the job row itself, fenced on its remote id (:mod:`genmon.retrain.queue`,
"Remote runs"); the worker never kills it for its own sake. It stops the run only when
the job fenced it out (cancelled, or a new attempt took over); when it stops itself it
lets go of the lease so that another worker adopts the run at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING

from genmon.exceptions import DatabaseError
from genmon.retrain.backends import make_backend
from genmon.retrain.backends.base import (
    BackendError,
    RemoteBackend,
    RemoteState,
    RemoteStatus,
)
from genmon.retrain.queue import Lease, get_job
from genmon.retrain.runner import Heartbeat
from genmon.schemas.events import RetrainStatus

if TYPE_CHECKING:
    from genmon.retrain.runner import RetrainWorker

log = logging.getLogger(__name__)

#: Longest single wait between two looks at a stop request or a lost lease.
WAKE_S = 0.2


def supervise(
    worker: RetrainWorker, lease: Lease, backend_name: str, remote_id: str | None
) -> None:
    """Run the attempt ``lease`` holds on ``backend_name``: submit it (``remote_id`` is
    ``None``), or adopt the run ``remote_id`` that a claim found; until it ends, the job
    is fenced away, or the worker stops."""
    queue = worker.queue
    try:
        backend = make_backend(backend_name, worker.settings)
        if remote_id is None:
            remote_id = backend.remote_id(lease)
            # Recorded before submitting: a worker that dies between the two leaves an id
            # that the adopter looks up, and the cluster refuses it twice.
            if not queue.update(lease, backend=backend.name, remote_id=remote_id):
                return
            known = RemoteStatus(RemoteState.UNKNOWN)
        else:
            known = _adopt(backend, remote_id)
            log.info(
                "retrain job %s: watching %s run %s (%s)",
                lease.job_id,
                backend_name,
                remote_id,
                known.state,
            )
        if known.state is RemoteState.UNKNOWN:  # never submitted: its worker died first
            backend.submit(lease)  # under the recorded id: refused if it did go through
    except BackendError as exc:
        _fail(worker, lease, f"{backend_name} run {remote_id}: {exc}")
        return
    _watch(worker, lease, backend, remote_id)


def _adopt(backend: RemoteBackend, remote_id: str) -> RemoteStatus:
    """The run as the cluster knows it; when the cluster cannot say now, it is watched
    as if pending (never resubmitted, never failed on an API outage alone)."""
    try:
        return backend.adopt(remote_id)
    except BackendError as exc:
        log.warning("looking up %s run %s: %s", backend.name, remote_id, exc)
        return RemoteStatus(RemoteState.PENDING, str(exc))


def _watch(worker: RetrainWorker, lease: Lease, backend: RemoteBackend, remote_id: str) -> None:
    lost = threading.Event()
    heartbeat = Heartbeat(
        worker.queue, lease, worker.settings.retrain.heartbeat_s, on_lost=lambda _: lost.set()
    )
    heartbeat.start()
    status = RemoteStatus(RemoteState.PENDING)
    try:
        while not (lost.is_set() or worker.stopping.is_set()):
            try:
                status = backend.poll(remote_id)
            except BackendError as exc:  # the cluster's API, not the run: look again
                log.warning("retrain job %s: %s", lease.job_id, exc)
            if status.ended or status.state is RemoteState.UNKNOWN:
                break
            _wait(worker.stopping, lost, worker.settings.retrain.remote_poll_s)
    finally:
        heartbeat.stop()
    if heartbeat.lost is not None:
        _after_lost(worker, lease, backend, remote_id)
    elif status.alive:  # the worker is stopping: the run goes on, adopted elsewhere
        with contextlib.suppress(DatabaseError):
            worker.queue.let_go(lease)
        log.info("retrain job %s: let go of %s run %s", lease.job_id, backend.name, remote_id)
    else:  # ended (or vanished) without ending the job: the attempt failed
        what = status.message or "no message"
        _fail(worker, lease, f"{backend.name} run {remote_id} {status.state}: {what}")


def _wait(stopping: threading.Event, lost: threading.Event, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not (stopping.is_set() or lost.is_set()):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        stopping.wait(min(left, WAKE_S))


def _after_lost(
    worker: RetrainWorker, lease: Lease, backend: RemoteBackend, remote_id: str
) -> None:
    """The lease is gone: stop the run if the job fenced it out (cancelled, a new
    attempt); leave it if it ended the job or another worker adopted it."""
    try:
        job = get_job(worker.engine, lease.job_id)
    except DatabaseError as exc:
        log.warning("retrain job %s: lease lost, job unreadable: %s", lease.job_id, exc)
        return
    fenced = (
        job.lease_epoch != lease.epoch
        or job.remote_id != remote_id
        or job.status == RetrainStatus.CANCELLED
    )
    if not fenced:
        log.info(
            "retrain job %s: %s run %s is another worker's to watch now",
            lease.job_id,
            backend.name,
            remote_id,
        )
        return
    log.warning(
        "retrain job %s: %s run %s was fenced out; stopping it",
        lease.job_id,
        backend.name,
        remote_id,
    )
    try:
        backend.cancel(remote_id)
    except BackendError as exc:
        log.warning("retrain job %s: %s", lease.job_id, exc)


def _fail(worker: RetrainWorker, lease: Lease, error: str) -> None:
    """The attempt failed (fenced: a run that ended the job or failed it itself wins)."""
    try:
        worker.queue.fail(lease, error[:4000])
    except DatabaseError as exc:
        log.error("could not record the end of retrain job %s: %s", lease.job_id, exc)


__all__ = ["supervise"]
