"""``genmon api``: serve the HTTP API, HTTP and OTLP ingest, the dashboard and /metrics.

FastAPI and uvicorn come with the ``api`` extra and are imported inside the command, so
``genmon --help`` stays instant and works without them.
"""

from __future__ import annotations

import errno
import socket

import click

from genmon.settings import get_settings


@click.command("api")
@click.option("--host", default=None, help="Address to listen on (default: api.host).")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="Port (default: api.port)."
)
def api(host: str | None, port: int | None) -> None:
    """Serve the JSON API (/v1, OpenAPI at /docs), the dashboard and /metrics until Ctrl-C."""
    from genmon.api.exceptions import ApiUnavailable

    try:
        from genmon.api.app import serve
    except ImportError as exc:
        raise ApiUnavailable(
            f"the API needs the `api` extra ({exc.name or exc} is missing): "
            "pip install 'genmon[api]'"
        ) from exc
    settings = get_settings()
    options = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = settings.model_copy(update={"api": settings.api.model_copy(update=options)})
    _check_port_free(settings.api.host, settings.api.port)
    click.echo(f"genmon API and dashboard on {settings.api.link_base()} (Ctrl-C stops)")
    serve(settings)


def _check_port_free(host: str, port: int) -> None:
    """Fail in one line, before uvicorn logs a traceback, when the port is taken."""
    from genmon.api.exceptions import ApiError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            taken = exc.errno == errno.EADDRINUSE
            why = "is in use" if taken else f"cannot be listened on ({exc.strerror})"
            raise ApiError(
                f"{host}:{port} {why}: stop what listens there or pass --port "
                "(or set GENMON_API__PORT)"
            ) from exc
