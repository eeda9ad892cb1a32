"""Errors of the streaming worker (``genmon.streams``)."""

from __future__ import annotations

from genmon.exceptions import GenmonError


class StreamError(GenmonError):
    """The streaming worker could not start or keep running."""
