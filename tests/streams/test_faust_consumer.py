"""Faust's private internals that genmon overrides: a Faust or aiokafka upgrade that
changes one fails here, naming what to review, instead of losing events at run time."""

from __future__ import annotations

import hashlib
import importlib
import inspect

import pytest

from genmon.streams import faust_consumer
from genmon.streams.faust_consumer import FAUST_PRIVATE_INTERFACE, REVIEWED_FAUST_SOURCES

FAUST_DRIVER = "faust.transport.drivers.aiokafka"


def _assigned_in_init(cls: type, name: str) -> bool:
    """Whether some ``__init__`` in ``cls``'s MRO assigns ``self.<name>``."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            source = inspect.getsource(init)
        except (OSError, TypeError):
            continue
        if f"self.{name} =" in source or f"self.{name}:" in source:
            return True
    return False


@pytest.mark.parametrize(
    ("module", "cls", "name"),
    [(module, cls, name) for module, cls, names in FAUST_PRIVATE_INTERFACE for name in names],
)
def test_every_private_name_genmon_uses_still_exists(module: str, cls: str, name: str) -> None:
    klass = getattr(importlib.import_module(module), cls)
    assert hasattr(klass, name) or _assigned_in_init(klass, name), (
        f"{module}.{cls}.{name} is gone: genmon.streams.faust_consumer uses it; adapt the"
        " override to the installed version before raising pyproject.toml's upper bound"
    )


@pytest.mark.parametrize("qualname", sorted(REVIEWED_FAUST_SOURCES))
def test_faust_methods_the_batch_loop_repeats_are_the_reviewed_ones(qualname: str) -> None:
    cls, method = qualname.split(".")
    source = inspect.getsource(getattr(getattr(importlib.import_module(FAUST_DRIVER), cls), method))
    digest = hashlib.sha256(inspect.cleandoc(source).encode()).hexdigest()[:16]
    reviewed, override = REVIEWED_FAUST_SOURCES[qualname]
    assert digest == reviewed, (
        f"faust-streaming changed {cls}.{method} (digest {digest}, reviewed {reviewed}):"
        f" read it against {override} in genmon.streams.faust_consumer, then record {digest}"
    )


def test_the_overrides_are_the_ones_listed() -> None:
    """Every private Faust method BatchingConsumer defines is in the checked interface."""
    listed = {name for _, cls, names in FAUST_PRIVATE_INTERFACE for name in names}
    consumer = faust_consumer.BatchingConsumer
    base = importlib.import_module(FAUST_DRIVER).Consumer
    overridden = {
        name
        for name in vars(consumer)
        if name.startswith("_")
        and not name.startswith("__")
        and callable(getattr(base, name, None))
    }
    assert overridden <= listed, overridden - listed
