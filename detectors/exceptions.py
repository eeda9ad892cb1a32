"""Errors raised by detectors; all hang under :class:`genmon.exceptions.GenmonError`."""

from __future__ import annotations

from genmon.exceptions import ConfigurationError, GenmonError


class DetectorError(GenmonError):
    """Root of detector errors."""


class InvalidParameterError(DetectorError, ConfigurationError):
    """A hyperparameter is out of range; the message names it and the allowed range."""


class NotFittedError(DetectorError):
    """``update()`` needs a reference first: call ``fit(reference)`` or pass one at construction."""


class StateError(DetectorError):
    """A ``state_dict`` does not belong to this detector or this version of it."""


class InputError(DetectorError, ValueError):
    """A batch has the wrong shape or type for this detector."""
