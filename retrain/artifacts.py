"""Where datasets, checkpoints and adapters live: a folder or any fsspec URL.

A retrain job may be resumed by a worker on another machine, so everything a job leaves
behind goes under one root URI (``settings.retrain.artifacts_uri``): a local folder by
default, ``s3://...``, ``gs://...`` or ``memory://`` (tests) as installed fsspec backends
allow. Keys are relative paths under the root; methods that read take full URIs, so an
artifact recorded by one store can be read by any process.

A directory is complete only when its ``_COMPLETE`` marker exists, and the marker is
written last: a worker killed mid-upload leaves a folder every reader treats as missing.
On a local disk the folder is also staged under a temporary name and renamed into place,
so the final name never holds a partial upload at all.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from genmon.retrain.exceptions import ArtifactError

COMPLETE = "_COMPLETE"


def _fs_for(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, str(path)


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol
    names = protocol if isinstance(protocol, tuple | list) else (protocol,)
    return "file" in names or "local" in names


class ArtifactStore:
    """Artifacts under ``root_uri`` (a folder or an fsspec URL)."""

    def __init__(self, root_uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root_uri = root_uri
        self.storage_options = dict(storage_options or {})
        self.fs, root = _fs_for(root_uri, self.storage_options)
        self.local = _is_local(self.fs)
        self.root = root.rstrip("/")
        if self.local:
            self.fs.makedirs(self.root, exist_ok=True)

    @classmethod
    def for_uri(cls, uri: str) -> ArtifactStore:
        """A store able to read ``uri`` (rooted at its parent)."""
        return cls(uri.rstrip("/").rsplit("/", 1)[0] or uri)

    # -- naming ---------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        key = key.strip("/")
        if not key or ".." in key.split("/"):
            raise ArtifactError(f"artifact key {key!r} must be a relative path without '..'")
        return f"{self.root}/{key}"

    def _uri_of(self, path: str) -> str:
        return path if self.local else str(self.fs.unstrip_protocol(path))

    def uri(self, key: str) -> str:
        """The full URI of ``key`` (a plain path on a local disk)."""
        return self._uri_of(self._path(key))

    def _resolve(self, uri: str) -> tuple[Any, str]:
        return _fs_for(uri, self.storage_options)

    # -- directories ----------------------------------------------------------------------

    def put_dir(self, local: Path, key: str) -> str:
        """Upload the folder ``local`` to ``key`` (replacing what was there); return its URI."""
        local = Path(local)
        if not local.is_dir():
            raise ArtifactError(f"{local} is not a folder: nothing to upload")
        final = self._path(key)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        staging = f"{final}.tmp-{uuid.uuid4().hex}" if self.local else final
        self._remove(final)
        for path in files:
            target = f"{staging}/{path.relative_to(local).as_posix()}"
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(path), target)
        self.fs.makedirs(staging, exist_ok=True)
        manifest = {p.relative_to(local).as_posix(): p.stat().st_size for p in files}
        self.fs.pipe_file(f"{staging}/{COMPLETE}", json.dumps(manifest, sort_keys=True).encode())
        if staging != final:
            self.fs.mv(staging, final, recursive=True)
        return self._uri_of(final)

    def get_dir(self, uri: str, local: Path) -> Path:
        """Download the complete folder at ``uri`` into ``local``; return ``local``."""
        fs, path = self._resolve(uri)
        path = path.rstrip("/")
        if not fs.exists(f"{path}/{COMPLETE}"):
            raise ArtifactError(
                f"{uri} is missing or incomplete (no {COMPLETE} marker): "
                "its upload never finished; use an earlier checkpoint or rerun the job"
            )
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        for remote in sorted(fs.find(path)):
            rel = remote[len(path) :].lstrip("/")
            if rel == COMPLETE:
                continue
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
        return local

    def _remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    # -- text -----------------------------------------------------------------------------

    def put_text(self, key: str, text: str) -> str:
        """Write ``text`` at ``key`` (whole or not at all on a local disk); return its URI."""
        final = self._path(key)
        data = text.encode("utf-8")
        if self.local:
            staging = f"{final}.tmp-{uuid.uuid4().hex}"
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(staging, data)
            self.fs.mv(staging, final)
        else:
            self.fs.pipe_file(final, data)
        return self._uri_of(final)

    def get_text(self, uri: str) -> str:
        """The text at ``uri``."""
        fs, path = self._resolve(uri)
        try:
            return bytes(fs.cat_file(path)).decode("utf-8")
        except FileNotFoundError as exc:
            raise ArtifactError(f"{uri} not found: was it written by this store's job?") from exc

    def exists(self, uri: str) -> bool:
        """True for a written file or a complete folder."""
        fs, path = self._resolve(uri)
        path = path.rstrip("/")
        if fs.isdir(path):
            return bool(fs.exists(f"{path}/{COMPLETE}"))
        return bool(fs.exists(path))
