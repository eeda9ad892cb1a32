"""Bearer tokens: created once with their secret shown once, stored as a hash, scoped.

A token reads ``gm_<id>_<secret>``. The id finds the row in one lookup; the secret is
compared by its SHA-256 (a random 32-byte secret needs no slow hash: it cannot be
guessed from a dictionary). ``genmon tokens create|list|revoke`` manage them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import select

from genmon.api.exceptions import TokenError
from genmon.db import session_scope
from genmon.schemas.access import TOKEN_PREFIX, ApiToken, Scope
from genmon.schemas.events import new_id, utcnow


@dataclass(frozen=True)
class Caller:
    """Who is calling: the token's name and scopes (what the audit and the checks use)."""

    token_name: str
    scopes: frozenset[Scope]

    def can(self, needed: Scope) -> bool:
        """Whether any of the caller's scopes allows ``needed``."""
        return any(scope.allows(needed) for scope in self.scopes)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_scopes(values: list[str] | tuple[str, ...]) -> list[Scope]:
    """The scopes named in ``values``; raises :class:`TokenError` naming an unknown one."""
    known = {scope.value: scope for scope in Scope}
    unknown = [v for v in values if v not in known]
    if unknown or not values:
        raise TokenError(
            f"unknown scope(s) {', '.join(unknown) or '(none given)'}: use "
            f"{', '.join(known)} (e.g. `genmon tokens create NAME --scope read`)"
        )
    return [known[v] for v in dict.fromkeys(values)]


def create_token(
    engine: Engine,
    name: str,
    scopes: list[Scope],
    *,
    created_by: str = "genmon",
    expires_at: datetime | None = None,
) -> tuple[ApiToken, str]:
    """Store a new token and return it with its full text, which is never stored."""
    token_id = new_id()
    secret = secrets.token_urlsafe(32)
    row = ApiToken(
        id=token_id,
        name=name,
        scopes=[s.value for s in scopes],
        secret_hash=_hash(secret),
        created_by=created_by,
        expires_at=expires_at,
    )
    try:
        with session_scope(engine) as session:
            session.add(row)
    except sa.exc.IntegrityError as exc:
        raise TokenError(
            f"a token named {name!r} exists: revoke it (`genmon tokens revoke {name}`) or "
            "choose another name"
        ) from exc
    return row, f"{TOKEN_PREFIX}{token_id}_{secret}"


def list_tokens(engine: Engine, *, include_revoked: bool = False) -> list[ApiToken]:
    """Every token, oldest first (revoked ones only with ``include_revoked``)."""
    with session_scope(engine) as session:
        query = select(ApiToken).order_by(ApiToken.created_at)
        if not include_revoked:
            query = query.where(ApiToken.revoked_at.is_(None))
        return list(session.exec(query))


def revoke_token(engine: Engine, name_or_id: str) -> ApiToken:
    """Revoke the live token with this name or id; raises :class:`TokenError` if none."""
    with session_scope(engine) as session:
        row = session.exec(
            select(ApiToken).where(
                sa.or_(ApiToken.name == name_or_id, ApiToken.id == name_or_id),
                ApiToken.revoked_at.is_(None),
            )
        ).first()
        if row is None:
            raise TokenError(f"no live token named {name_or_id!r}: `genmon tokens list` shows them")
        row.revoked_at = utcnow()
        session.add(row)
        return row


def verify_token(engine: Engine, text: str) -> Caller | None:
    """The caller behind a presented token, or None: malformed, unknown, wrong secret,
    revoked or expired (the API answers 401 to all of them alike)."""
    if not text.startswith(TOKEN_PREFIX):
        return None
    token_id, sep, secret = text[len(TOKEN_PREFIX) :].partition("_")
    if not sep or not token_id or not secret:
        return None
    now = utcnow()
    with session_scope(engine) as session:
        row = session.get(ApiToken, token_id)
        if row is None or not hmac.compare_digest(row.secret_hash, _hash(secret)):
            return None
        if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
            return None
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
            row.last_used_at = now  # at most once a minute: reads stay reads
            session.add(row)
        known = {scope.value for scope in Scope}
        return Caller(row.name, frozenset(Scope(s) for s in row.scopes if s in known))
