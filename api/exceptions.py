"""Errors of the API room (:mod:`genmon.api`), under genmon's one tree::

    GenmonError
    └── ApiError                      anything the API room raises on purpose
        ├── TokenError                a token that cannot be created or revoked as asked
        └── ApiUnavailable            the API's extra is not installed (`pip install genmon[api]`)

HTTP answers (401, 403, 404, 409, 413, 422, 503) are FastAPI's ``HTTPException``; these
are for the command line and the library calls behind it.
"""

from __future__ import annotations

from genmon.exceptions import GenmonError


class ApiError(GenmonError):
    """Root of the errors the API room raises on purpose."""


class TokenError(ApiError):
    """A token that cannot be created, found or revoked as asked."""


class ApiUnavailable(ApiError):
    """FastAPI, uvicorn or Jinja are missing: install the ``api`` extra."""
