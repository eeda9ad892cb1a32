"""The one exception tree of genmon.

Every error genmon raises on purpose derives from :class:`GenmonError`, so callers
can catch the whole family with one clause. Packages keep their own
``exceptions.py`` whose classes hang under this tree::

    GenmonError
    ├── ConfigurationError            settings or hyperparameters that cannot work
    │   └── KafkaAuthenticationError  the broker refused the SASL login or TLS certificate
    ├── InfraError                    a local service (Kafka, PostgreSQL) would not start/stop
    │   ├── KafkaInfraError
    │   └── PostgresInfraError
    ├── SchemaError                   an event failed validation (carries the reason)
    ├── DetectorError                 (genmon.detectors.exceptions)
    │   ├── InvalidParameterError     also a ConfigurationError
    │   ├── NotFittedError            update() before a reference was set
    │   └── StateError                state_dict() that does not fit this detector
    ├── StreamError                   (genmon.streams.exceptions)
    ├── RetrainError                  (genmon.retrain.exceptions)
    │   ├── PolicyError               also a ConfigurationError: a retrain policy that cannot work
    │   ├── LeaseLost                 a fenced write matched no row: another worker owns the job
    │   ├── JobNotFound / JobStateError
    │   ├── DatasetError / ArtifactError / ModelLoadError / TrainerNotFound
    │   ├── NotServingError           a follower has not loaded any version yet
    │   └── RegistryError             ModelNotRegisteredError, VersionNotFoundError, ...
    └── DatabaseError                 a migration or persistence step failed

Messages say what to do next, not only what went wrong.
"""

from __future__ import annotations


class GenmonError(Exception):
    """Root of every error genmon raises on purpose."""


class ConfigurationError(GenmonError, ValueError):
    """A setting or hyperparameter has a value that cannot work."""


class KafkaAuthenticationError(ConfigurationError):
    """The broker refused genmon's SASL login or TLS certificate (wrong password, mechanism
    or CA): retrying cannot help, so it is raised at once instead of a timeout."""


class InfraError(GenmonError):
    """A local service could not be started, reached or stopped."""


class KafkaInfraError(InfraError):
    """The local Kafka broker could not be started, reached or stopped."""


class PostgresInfraError(InfraError):
    """The local PostgreSQL cluster could not be started, reached or stopped."""


class SchemaError(GenmonError, ValueError):
    """An event does not satisfy its schema; ``reason`` is a short machine-readable code."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class DatabaseError(GenmonError):
    """A migration or persistence step failed."""
