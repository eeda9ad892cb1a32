"""``/static/...``: the dashboard's CSS and scripts, and Plotly's JavaScript from the
installed ``plotly`` Python package (``plotly/package_data/plotly.min.js``), so charts
work offline with no CDN and no Node build.

Only the files listed here are served (no directory walking). They are public: the
sign-in page needs them before any token.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from genmon.api.dashboard.web import HERE

router = APIRouter(include_in_schema=False)

STATIC = HERE / "static"
#: A day: the files change only with a new genmon (or plotly) install.
CACHE = "public, max-age=86400"
TYPES = {".js": "text/javascript", ".css": "text/css"}


def plotly_js() -> Path:
    """Where the installed ``plotly`` package keeps its minified bundle."""
    return Path(str(files("plotly") / "package_data" / "plotly.min.js"))


def _asset(name: str) -> Path | None:
    if name == "plotly.min.js":
        return plotly_js()
    if name in {"htmx.min.js", "dashboard.js", "dashboard.css"}:
        return STATIC / name
    return None


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    path = _asset(name)
    if path is None or not path.is_file():
        raise HTTPException(status_code=404, detail=f"no static file {name!r}")
    return FileResponse(
        path,
        media_type=TYPES.get(path.suffix, "application/octet-stream"),
        headers={"Cache-Control": CACHE},
    )
