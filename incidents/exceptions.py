"""Errors of the incident pipeline (``genmon.incidents``)."""

from __future__ import annotations

from genmon.exceptions import GenmonError


class IncidentError(GenmonError):
    """An incident, silence or notification operation could not be done."""


class IncidentNotFoundError(IncidentError, LookupError):
    """No incident (or silence) has the given id."""


class InvalidTransitionError(IncidentError, ValueError):
    """The incident's status does not allow the requested change."""
