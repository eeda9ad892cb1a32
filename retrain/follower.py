"""Serving the announced version: a model that follows its alias and hot-swaps its adapter.

:class:`AdapterFollower` follows one alias of one model on ``<prefix>.models``
(:class:`genmon.follow.ModelFollower`) and, on each change, loads the announced base and
adapter (:func:`genmon.retrain.lm.load_lm`) in a thread of its own. Until the new model
has loaded, the previous one keeps serving; the swap is one assignment under a lock, so
a :meth:`~AdapterFollower.generate` call uses one version from start to end and
:attr:`~AdapterFollower.version` names the version that actually answers (log it as the
inference's ``model_version``: :meth:`~AdapterFollower.generate` returns it with the
answers). A load that fails is logged and the previous version
stays; announcements that arrive while a load runs collapse into the latest.

>>> server = AdapterFollower(settings, "chat")                  # doctest: +SKIP
>>> server.wait_loaded(timeout=120)                              # doctest: +SKIP
>>> server.generate(["Where is my card?"])                       # doctest: +SKIP
Generation(version='v3', answers=['It was sent on Monday.'])
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import NamedTuple

from genmon.follow import ModelFollower
from genmon.retrain.exceptions import NotServingError
from genmon.retrain.lm import CausalLM, load_lm
from genmon.schemas.events import ModelAlias, ModelEvent
from genmon.settings import Settings

__all__ = ["AdapterFollower", "Generation", "NotServingError"]

log = logging.getLogger(__name__)

Loader = Callable[[str, str | None, str], CausalLM]


class Generation(NamedTuple):
    """Answers, and the version that gave them (log it as ``model_version``)."""

    version: str
    answers: list[str]


class AdapterFollower:
    """A :class:`CausalLM` that is always the latest loadable announced version.

    Args:
        settings: Kafka and topic prefix (and ``retrain.device`` unless ``device``).
        model_id, alias: what to follow (``champion`` serves production traffic).
        device: ``auto``, ``cuda`` or ``cpu``.
        loader: ``load_lm`` (tests may inject their own).
        on_loaded: called with each event whose model now serves (in the loader thread).
    """

    def __init__(
        self,
        settings: Settings,
        model_id: str,
        alias: str | ModelAlias = ModelAlias.CHAMPION,
        *,
        device: str | None = None,
        loader: Loader = load_lm,
        on_loaded: Callable[[ModelEvent], object] | None = None,
    ) -> None:
        self.model_id = model_id
        self.device = device or settings.retrain.device
        self._loader = loader
        self._on_loaded = on_loaded
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._lm: CausalLM | None = None
        self._serving: ModelEvent | None = None
        self._pending: ModelEvent | None = None
        self._closed = False
        self.last_error: str | None = None
        self._thread = threading.Thread(
            target=self._load_loop, name=f"genmon-adapter-{model_id[:24]}", daemon=True
        )
        self._thread.start()
        self.follower = ModelFollower(settings, model_id, alias, on_change=self._announced)

    # ------------------------------------------------------------------- serving

    @property
    def version(self) -> str | None:
        """The version that answers :meth:`generate` now (``None`` until one has loaded)."""
        with self._lock:
            return self._serving.version if self._serving is not None else None

    @property
    def serving(self) -> ModelEvent | None:
        """The announcement whose model serves now."""
        with self._lock:
            return self._serving

    def model(self) -> tuple[str, CausalLM]:
        """``(version, model)`` serving now, taken together so they cannot disagree."""
        with self._lock:
            if self._lm is None or self._serving is None or self._serving.version is None:
                raise NotServingError(
                    f"no version of {self.model_id} has loaded yet"
                    + (f" (last load failed: {self.last_error})" if self.last_error else "")
                    + "; wait with wait_loaded(), or check that it is registered "
                    "(`genmon models show`)"
                )
            return self._serving.version, self._lm

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 48) -> Generation:
        """Greedy answers of the version serving now, with that version (one version
        answers the whole batch, even when a swap happens meanwhile)."""
        version, lm = self.model()
        return Generation(version, lm.generate(prompts, max_new_tokens=max_new_tokens))

    def wait_loaded(self, version: str | None = None, timeout: float | None = None) -> bool:
        """Block until ``version`` (default: any) serves; ``False`` on timeout."""

        def loaded() -> bool:
            if self._serving is None:
                return False
            return version is None or self._serving.version == version

        with self._lock:
            return self._changed.wait_for(lambda: self._closed or loaded(), timeout) and loaded()

    def start(self) -> AdapterFollower:
        """Nothing to do (following starts at construction); kept for symmetry with
        :meth:`stop`."""
        return self

    def close(self) -> None:
        """Stop following and loading; the model loaded last stays usable."""
        self.follower.close()
        with self._lock:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout=5)

    stop = close

    def __enter__(self) -> AdapterFollower:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AdapterFollower {self.model_id} serving {self.version}>"

    # ------------------------------------------------------------------- loading

    def _announced(self, event: ModelEvent) -> None:
        """The follower's callback: queue the load (the latest announcement wins)."""
        if event.version is None or event.base_uri is None:
            log.warning(
                "%s %s was unset (%s); %s keeps serving",
                self.model_id,
                event.alias.value,
                event.action,
                self.version,
            )
            return
        with self._lock:
            self._pending = event
            self._changed.notify_all()

    def _load_loop(self) -> None:
        while True:
            with self._lock:
                self._changed.wait_for(lambda: self._closed or self._pending is not None)
                if self._closed:
                    return
                event, self._pending = self._pending, None
            assert event is not None and event.base_uri is not None
            started = time.perf_counter()
            try:
                lm = self._loader(event.base_uri, event.artifact_uri, self.device)
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "%s %s could not be loaded (%s); %s keeps serving",
                    self.model_id,
                    event.version,
                    self.last_error,
                    self.version,
                )
                continue
            with self._lock:
                self._lm, self._serving = lm, event
                self.last_error = None
                self._changed.notify_all()
            log.info(
                "%s now serves %s (loaded in %.1f s)",
                self.model_id,
                event.version,
                time.perf_counter() - started,
            )
            if self._on_loaded is not None:
                try:
                    self._on_loaded(event)
                except Exception:
                    log.exception("on_loaded of %s raised", self.model_id)
