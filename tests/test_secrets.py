"""No secret is printed: URLs, settings and `genmon config` (genmon.secrets)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from genmon.cli.config import config
from genmon.secrets import MASK, mask_text, mask_url, masked
from genmon.settings import DestinationSettings, Settings, get_settings


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql+psycopg://genmon:s3cret@127.0.0.1:55432/genmon",
            "postgresql+psycopg://genmon:***@127.0.0.1:55432/genmon",
        ),
        # Unencoded "@", "/" and ":" in a password (base64 keys hold "/" and "+").
        ("postgresql://u:p@ss:w/rd@db/genmon", "postgresql://u:***@db/genmon"),
        ("s3://AKIAXXXX:ab/cd+ef=@bucket/artifacts", "s3://AKIAXXXX:***@bucket/artifacts"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        (
            "postgresql://u@db1:5432,db2:5432/g?sslmode=require&password=s3cret",
            "postgresql://u@db1:5432,db2:5432/g?sslmode=require&password=***",
        ),
        (
            "https://hooks.example.com/in?token=s3cret&team=ops",
            "https://hooks.example.com/in?token=***&team=ops",
        ),
        # Nothing secret: unchanged, every part still says where genmon connects.
        ("postgresql+psycopg://genmon@db/genmon", "postgresql+psycopg://genmon@db/genmon"),
        ("sqlite:///.build/genmon.sqlite", "sqlite:///.build/genmon.sqlite"),
        (
            "https://api.example.com/v1?to=ops@example.com",
            "https://api.example.com/v1?to=ops@example.com",
        ),
        ("not a url", "not a url"),
    ],
)
def test_mask_url_hides_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_mask_text_hides_urls_and_keyword_passwords_in_messages() -> None:
    message = (
        "cannot connect to postgresql://genmon:s3cret@db/genmon "
        "(dsn: host=db user=genmon password=s3cret)"
    )
    assert "s3cret" not in mask_text(message)
    assert "postgresql://genmon:***@db/genmon" in mask_text(message)


SECRETS = {
    "GENMON_DATABASE__URL": "postgresql+psycopg://genmon:db-s3cret@db:5432/genmon",
    "GENMON_POSTGRES__PASSWORD": "pg-s3cret",
    "GENMON_KAFKA__SASL_USERNAME": "genmon-user",
    "GENMON_KAFKA__SASL_PASSWORD": "sasl-s3cret",
    "GENMON_KAFKA__SSL_KEY_PASSWORD": "key-s3cret",
    "GENMON_RETRAIN__ARTIFACTS_URI": "s3://AKIA:aws-s3cret@bucket/artifacts",
    "GENMON_NOTIFY__DESTINATIONS": json.dumps(
        [
            {
                "name": "ops",
                "type": "pagerduty",
                "url": "https://events.example.com/v2/enqueue?token=url-s3cret",
                "secret": "whsec_sign-s3cret",
                "routing_key": "routing-s3cret",
                "heartbeat_url": "https://hc.example.com/ping/hb-s3cret",
            }
        ]
    ),
}


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_masked_settings_hold_no_secret(secret_env: None) -> None:
    shown = masked(Settings())
    text = json.dumps(shown)
    assert "s3cret" not in text
    assert shown["database"]["url"] == "postgresql+psycopg://genmon:***@db:5432/genmon"
    assert shown["postgres"]["password"] == MASK
    assert shown["kafka"]["sasl_password"] == MASK
    assert shown["kafka"]["sasl_username"] == "genmon-user"  # not a secret: helps debugging
    assert shown["retrain"]["artifacts_uri"] == "s3://AKIA:***@bucket/artifacts"
    (destination,) = shown["notify"]["destinations"]
    for field in ("url", "secret", "routing_key", "heartbeat_url"):
        assert destination[field] == MASK
    assert destination["name"] == "ops"


def test_an_unset_secret_shows_as_unset() -> None:
    shown = masked(DestinationSettings(name="hook", url="https://example.com/hook"))
    assert shown["url"] == MASK
    assert shown["routing_key"] is None and shown["heartbeat_url"] is None


def test_genmon_config_prints_no_secret(secret_env: None) -> None:
    result = CliRunner().invoke(config, [])
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    shown = json.loads(result.output)
    assert shown["database"]["url"] == "postgresql+psycopg://genmon:***@db:5432/genmon"
    assert shown["kafka"]["bootstrap_servers"] == "127.0.0.1:19092"  # the rest is all there
