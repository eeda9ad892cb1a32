"""Errors of the feedback loop (:mod:`genmon.retrain`), under genmon's one tree::

    GenmonError
    └── RetrainError                  anything the retrain room raises on purpose
        ├── PolicyError               a retrain policy that cannot work (also a ConfigurationError)
        ├── LeaseLost                 a fenced write matched no row: another worker owns the job
        ├── JobNotFound               no retrain job with that id
        ├── JobStateError             the job is in a state that does not allow the action
        ├── DatasetError              a stored dataset is incomplete or does not match its manifest
        ├── ArtifactError             an artifact is missing, incomplete or could not be written
        ├── ModelLoadError            a base or adapter that cannot load (also a ConfigurationError)
        ├── TrainerNotFound           no trainer by that name (also a ConfigurationError)
        ├── NotServingError           a follower has not loaded any version yet
        └── RegistryError             a registry operation that cannot be done as asked
            ├── ModelNotRegisteredError
            ├── VersionNotFoundError
            ├── AliasConflictError    another alias move won a race; running again is safe
            └── RolloutError          a rollout that cannot start, or is no longer watching
                └── RolloutNotFound   no rollout with that id

A worker that meets :class:`LeaseLost` stops at once and writes nothing more: the job is
someone else's now (or was cancelled), and every write it could still make would be
refused by the same fence anyway.
"""

from __future__ import annotations

from genmon.exceptions import ConfigurationError, GenmonError


class RetrainError(GenmonError):
    """Root of the errors the retrain room raises on purpose."""


class PolicyError(RetrainError, ConfigurationError):
    """A retrain policy file that cannot work; the message lists every problem."""


class LeaseLost(RetrainError):
    """This worker no longer holds the job's lease: stop, write nothing more.

    Raised when a write fenced on ``(job_id, lease_epoch, lease_owner, unexpired)``
    matched no row: the lease expired (a pause longer than ``retrain.lease_s``), another
    worker took the job over (the epoch moved on) or someone cancelled it.
    """

    def __init__(self, job_id: str, epoch: int, owner: str, action: str = "write") -> None:
        super().__init__(
            f"lost the lease of retrain job {job_id} (epoch {epoch}, owner {owner}) "
            f"before {action}: another worker owns it now or it was cancelled; this process "
            "stops without writing (raise retrain.lease_s if pauses this long are expected)"
        )
        self.job_id = job_id
        self.epoch = epoch
        self.owner = owner


class JobNotFound(RetrainError, LookupError):
    """No retrain job has this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no retrain job {job_id!r}; `genmon retrain list` shows the jobs")
        self.job_id = job_id


class JobStateError(RetrainError):
    """The job's status does not allow what was asked (cancel a finished job, say)."""


class ArtifactError(RetrainError):
    """An artifact is missing, incomplete or could not be written."""


class DatasetError(RetrainError):
    """A stored dataset is incomplete or does not match its manifest."""


class NotServingError(RetrainError):
    """No version has loaded yet (nothing announced, or every load failed)."""


class ModelLoadError(RetrainError, ConfigurationError):
    """A base model or adapter could not be found or loaded."""


class RegistryError(RetrainError):
    """A registry operation that cannot be done as asked (the message says what to do)."""


class ModelNotRegisteredError(RegistryError):
    """The model has no ``registered_model`` row."""


class VersionNotFoundError(RegistryError):
    """The model has no such version."""


class AliasConflictError(RegistryError):
    """Another move of the same model's aliases won a race; running again is safe."""


class RolloutError(RegistryError):
    """A rollout that cannot start as asked (the champion, a rolled-back version, another
    one watching) or a decision on a rollout that is not watching any more."""


class RolloutNotFound(RolloutError, LookupError):
    """No rollout has this id."""

    def __init__(self, rollout_id: str) -> None:
        super().__init__(
            f"no rollout {rollout_id!r}; `genmon models rollouts --all` lists the rollouts"
        )
        self.rollout_id = rollout_id


class TrainerNotFound(RetrainError, ConfigurationError):
    """A trainer name that no entry point or import path provides."""


__all__ = [
    "AliasConflictError",
    "ArtifactError",
    "DatasetError",
    "JobNotFound",
    "JobStateError",
    "LeaseLost",
    "ModelLoadError",
    "ModelNotRegisteredError",
    "NotServingError",
    "PolicyError",
    "RegistryError",
    "RetrainError",
    "RolloutError",
    "RolloutNotFound",
    "TrainerNotFound",
    "VersionNotFoundError",
]
