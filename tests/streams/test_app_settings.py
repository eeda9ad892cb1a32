"""Consumer-group timing of the worker app comes from genmon's settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from genmon.settings import Settings
from genmon.streams.app import create_app


def test_session_timeout_and_heartbeat_reach_the_faust_consumer() -> None:
    settings = Settings(worker={"session_timeout_s": 6, "heartbeat_interval_s": 1})
    conf = create_app(settings, installers=()).conf
    assert (conf.broker_session_timeout, conf.broker_heartbeat_interval) == (6.0, 1.0)
    # Faust refuses a session timeout above its request timeout: that one follows.
    long = create_app(Settings(worker={"session_timeout_s": 300}), installers=()).conf
    assert long.broker_session_timeout == 300.0 <= long.broker_request_timeout


def test_session_timeout_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENMON_WORKER__SESSION_TIMEOUT_S", "7.5")
    monkeypatch.setenv("GENMON_WORKER__HEARTBEAT_INTERVAL_S", "2")
    conf = create_app(Settings(), installers=()).conf
    assert (conf.broker_session_timeout, conf.broker_heartbeat_interval) == (7.5, 2.0)


def test_a_heartbeat_not_below_the_session_timeout_is_refused() -> None:
    with pytest.raises(ValidationError, match="heartbeat_interval_s"):
        Settings(worker={"session_timeout_s": 6, "heartbeat_interval_s": 6})
