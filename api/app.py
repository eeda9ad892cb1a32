"""The API application: one FastAPI app for the API, ingest, the dashboard and /metrics.

Routes live one module per resource under :mod:`genmon.api.routes` (and the dashboard's
pages under :mod:`genmon.api.dashboard`); every module there that defines ``router`` is
included, so a new resource is a new file. A module may also define
``async def on_startup(app)`` and ``async def on_shutdown(app)`` (the ingest producer
starts and flushes there).

``app.state`` carries what routes share: ``settings``, ``engine`` (the database).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine

from genmon.api.auth import audit_writes
from genmon.db import make_engine
from genmon.settings import Settings, get_settings

#: Packages whose modules may define a ``router`` (and startup/shutdown hooks).
ROUTE_PACKAGES = ("genmon.api.routes", "genmon.api.dashboard")


def route_modules() -> list[ModuleType]:
    """Every module of :data:`ROUTE_PACKAGES`, in name order (a stable OpenAPI)."""
    modules: list[ModuleType] = []
    for package_name in ROUTE_PACKAGES:
        package = importlib.import_module(package_name)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                modules.append(importlib.import_module(f"{package_name}.{info.name}"))
    return modules


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The app over ``settings`` (default: the environment's) and ``engine``."""
    settings = settings or get_settings()
    engine = engine or make_engine(settings.database.url)
    modules = route_modules()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started: list[ModuleType] = []
        try:
            for module in modules:
                hook = getattr(module, "on_startup", None)
                if hook is not None:
                    await hook(app)
                started.append(module)
            yield
        finally:
            for module in reversed(started):
                hook = getattr(module, "on_shutdown", None)
                if hook is not None:
                    await hook(app)

    app = FastAPI(
        title="genmon",
        summary="Monitoring and feedback for generative-AI models in production",
        version=_version(),
        lifespan=lifespan,
        # FastAPI's /docs and /redoc pages load their JavaScript from a CDN: they would be
        # blank offline. The OpenAPI document itself is served at /openapi.json.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.middleware("http")(audit_writes)
    app.middleware("http")(_limit_body(settings.api.max_body_bytes))
    for module in modules:
        router = getattr(module, "router", None)
        if router is not None:
            app.include_router(router)
    return app


def _limit_body(
    limit: int,
) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """Middleware: 413 for a body whose declared length is over ``limit`` bytes (routes
    that read a body without a length, chunked, bound it themselves)."""

    async def middleware(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return JSONResponse(
                status_code=413,
                content={
                    "detail": f"request body of {int(declared)} bytes is over the limit of "
                    f"{limit} (api.max_body_bytes): send smaller batches"
                },
            )
        return await call_next(request)

    return middleware


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genmon")
    except PackageNotFoundError:  # pragma: no cover - a source tree without install
        return "0"


def serve(settings: Settings | None = None, **uvicorn_options: Any) -> None:
    """Run the app with uvicorn on ``api.host:api.port`` until interrupted."""
    import uvicorn

    settings = settings or get_settings()
    uvicorn.run(
        create_app(settings),
        host=settings.api.host,
        port=settings.api.port,
        log_level=uvicorn_options.pop("log_level", "info"),
        **uvicorn_options,
    )
