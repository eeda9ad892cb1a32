"""The README's configuration table is generated from Settings and must stay current."""

from __future__ import annotations

from pathlib import Path

import pytest

from genmon.config_doc import README_BEGIN, README_END, settings_markdown, settings_rows
from genmon.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_setting_exactly_as_generated() -> None:
    text = README.read_text()
    table = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert table == settings_markdown(), (
        "README's settings table is stale: regenerate it with `genmon config --markdown`"
    )


def test_every_setting_says_what_it_is_for() -> None:
    missing = [env for env, _kind, _default, text in settings_rows() if not text.strip()]
    assert missing == []


def test_env_names_in_the_table_set_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENMON_KAFKA__PORT", "29092")
    monkeypatch.setenv("GENMON_WINDOWS__TUMBLING_S", "7.5")
    settings = Settings()
    assert settings.kafka.port == 29092
    assert settings.kafka.bootstrap_servers == "127.0.0.1:29092"
    assert settings.windows.tumbling_s == 7.5
    envs = {row[0] for row in settings_rows()}
    assert {"GENMON_KAFKA__PORT", "GENMON_WINDOWS__TUMBLING_S"} <= envs
