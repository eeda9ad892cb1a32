"""Probes: ``/healthz`` (the process lives) and ``/readyz`` (it can do its work: the
database answers and the broker accepts connections). No token: orchestrators call them.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool

from genmon.api.payloads import Health, Readiness

router = APIRouter(tags=["probes"])

#: How long /readyz waits for each dependency: a probe must answer before the
#: orchestrator's own timeout (usually 1 to 5 s).
PROBE_TIMEOUT_S = 2.0


@router.get(
    "/healthz", response_model=Health, summary="The process is alive", operation_id="healthz"
)
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="The database and the broker answer",
    operation_id="readyz",
    responses={503: {"model": Readiness, "description": "the checks that failed say why"}},
)
async def readyz(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    database, broker = await asyncio.gather(
        _check_database(request.app.state.engine),
        _check_broker(settings.kafka.bootstrap_servers),
    )
    checks = {"database": database, "broker": broker}
    ready = all(value == "ok" for value in checks.values())
    body = Readiness(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(status_code=200 if ready else 503, content=body.model_dump())


async def _check_database(engine: Engine) -> str:
    def ping() -> None:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))

    try:
        await asyncio.wait_for(run_in_threadpool(ping), PROBE_TIMEOUT_S)
    except TimeoutError:
        return f"database did not answer within {PROBE_TIMEOUT_S:g} s"
    except Exception as exc:  # any failure is "not ready", said in words
        return f"database unreachable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return "ok"


async def _check_broker(bootstrap_servers: str) -> str:
    """Ready when any bootstrap server accepts a TCP connection (what a client needs
    first; the ingest producer reports sends that fail on its own)."""
    errors = []
    for server in (s.strip() for s in bootstrap_servers.split(",") if s.strip()):
        host, _, port = server.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]") or "localhost", int(port)),
                PROBE_TIMEOUT_S,
            )
        except (OSError, ValueError, TimeoutError) as exc:
            errors.append(f"{server}: {type(exc).__name__}")
            continue
        writer.close()
        await writer.wait_closed()
        return "ok"
    return "broker unreachable at " + ("; ".join(errors) or "(no bootstrap servers)")
