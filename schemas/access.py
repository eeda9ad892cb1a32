"""Stored tables of the HTTP API's access control (SQLModel): pure data.

- ``api_token``: a bearer token, stored as a SHA-256 hash of its secret (the secret is shown
  once, at ``genmon tokens create``), with its scopes. A revoked or expired token is refused.
- ``api_audit``: every write through the API (and every refused attempt at one): which
  token, by name, did what to what, and the answer it got.

Scopes (:class:`Scope`) nest: ``admin`` can do all ``operate`` can, ``operate`` all ``read``
can; ``ingest`` stands alone (a service that sends events reads nothing back).

>>> Scope.ADMIN.allows(Scope.READ), Scope.INGEST.allows(Scope.READ)
(True, False)
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from genmon.schemas.events import MAX_ID_CHARS, new_id, utcnow
from genmon.schemas.tables import UTCDateTime

#: A token reads ``gm_<id>_<secret>``: the id finds its row, the secret's hash is checked.
TOKEN_PREFIX = "gm_"
TOKEN_ID_CHARS = 32
TOKEN_HASH_CHARS = 64
MAX_PATH_CHARS = 2048


class Scope(StrEnum):
    """What a token may do."""

    INGEST = "ingest"
    """send inference and feedback events (``POST /v1/inferences``, ``/v1/feedback``, OTLP)"""
    READ = "read"
    """read incidents, silences, findings, window signals, models, jobs, the dashboard"""
    OPERATE = "operate"
    """act on incidents and jobs: acknowledge, resolve, note, silence, approve, cancel"""
    ADMIN = "admin"
    """everything: model promotion and rollback, and every other scope"""

    def allows(self, needed: Scope) -> bool:
        """Whether a token with this scope may do what ``needed`` guards."""
        if self is needed:
            return True
        return needed in _IMPLIED.get(self, frozenset())


_IMPLIED: dict[Scope, frozenset[Scope]] = {
    Scope.ADMIN: frozenset({Scope.OPERATE, Scope.READ, Scope.INGEST}),
    Scope.OPERATE: frozenset({Scope.READ}),
}


class ApiToken(SQLModel, table=True):
    """One bearer token: its name, scopes and the hash of its secret (never the secret)."""

    __tablename__ = "api_token"
    __table_args__ = (sa.UniqueConstraint("name", name="uq_api_token_name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=TOKEN_ID_CHARS)
    name: str = Field(max_length=MAX_ID_CHARS, description="who holds it, e.g. oncall-dashboard")
    scopes: list[str] = Field(default_factory=list, sa_type=sa.JSON)
    secret_hash: str = Field(max_length=TOKEN_HASH_CHARS, description="sha256 of the secret, hex")
    created_by: str = Field(default="genmon", max_length=MAX_ID_CHARS)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ApiAudit(SQLModel, table=True):
    """One write through the API, or a refused attempt at one."""

    __tablename__ = "api_audit"
    __table_args__ = (sa.Index("ix_api_audit_at", "at"),)

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    token_name: str = Field(max_length=MAX_ID_CHARS, description="the token's name; '-' if none")
    method: str = Field(max_length=16)
    path: str = Field(max_length=MAX_PATH_CHARS)
    action: str = Field(default="", max_length=MAX_ID_CHARS, description="e.g. incident.ack")
    target: str | None = Field(default=None, max_length=MAX_ID_CHARS, description="e.g. its id")
    status_code: int
    detail: dict[str, Any] = Field(default_factory=dict, sa_type=sa.JSON)
