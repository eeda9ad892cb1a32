"""The API's audit: every write, and every refused attempt at one, with the token's name.

Reads are not audited (the dashboard would drown the table); a refused write is, because
someone trying operations their token does not allow is what an audit is for.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine

from genmon.db import session_scope
from genmon.schemas.access import ApiAudit


def record(
    engine: Engine,
    *,
    token_name: str,
    method: str,
    path: str,
    status_code: int,
    action: str = "",
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Store one audit row in its own transaction."""
    with session_scope(engine) as session:
        session.add(
            ApiAudit(
                token_name=token_name,
                method=method,
                path=path[:2048],
                action=action,
                target=target,
                status_code=status_code,
                detail=detail or {},
            )
        )
