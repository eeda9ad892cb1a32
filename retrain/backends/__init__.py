"""Where a retrain job trains: this machine, a Ray cluster or a Kubernetes Job.

``retrain.backend`` picks one; the training command is the same for all
(:func:`~genmon.retrain.backends.base.training_command`), and genmon's job row stays the
source of truth: a remote run writes it fenced on its remote id, the worker that
submitted it only supervises, and a worker that dies is replaced by one that adopts the
run (:mod:`genmon.retrain.queue`, "Remote runs"). The cluster clients are optional
extras, imported only when their backend is used.
"""

from __future__ import annotations

from genmon.retrain.backends.base import (
    BackendError,
    BackendUnavailable,
    RemoteBackend,
    RemoteState,
    RemoteStatus,
    training_command,
)
from genmon.settings import Settings

#: The remote backends, by ``retrain.backend`` name.
REMOTE = ("ray", "kubernetes")


def make_backend(name: str, settings: Settings) -> RemoteBackend:
    """The remote backend ``name`` (``local`` runs in :mod:`genmon.retrain.runner`)."""
    if name == "ray":
        from genmon.retrain.backends.ray import RayBackend

        return RayBackend(settings)
    if name == "kubernetes":
        from genmon.retrain.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(settings)
    raise BackendError(f"no remote backend {name!r}; set retrain.backend to one of {REMOTE}")


__all__ = [
    "REMOTE",
    "BackendError",
    "BackendUnavailable",
    "RemoteBackend",
    "RemoteState",
    "RemoteStatus",
    "make_backend",
    "training_command",
]
