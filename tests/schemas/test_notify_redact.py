"""Redaction and truncation of texts that go into notifications (and affected examples)."""

from __future__ import annotations

import doctest

import pytest

from genmon.schemas import redact as redact_module
from genmon.schemas.redact import Redactor, luhn_valid, redact, truncate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to ann.lee+ops@mail.example.co.uk now", "write to [REDACTED:email] now"),
        ("card 4111-1111-1111-1111 ok", "card [REDACTED:card] ok"),
        ("amex 378282246310005", "amex [REDACTED:card]"),
        ("call +1 (415) 555-2671", "call [REDACTED:phone]"),
        ("key sk-proj-AbCdEfGhIjKlMnOpQrStUv", "key [REDACTED:api_key]"),
        ("aws AKIAIOSFODNN7EXAMPLE", "aws [REDACTED:api_key]"),
        ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789", "gh [REDACTED:api_key]"),
        ("token 9f8e7d6c5b4a39281706f5e4d3c2b1a0ffeeddcc", "token [REDACTED:api_key]"),
    ],
)
def test_redacts_personal_data_and_credentials(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "order 4111 1111 1111 1112",  # Luhn fails: an order number, not a card
        "latency p99 1234.5 ms at 2026-11-29T04:50:43+00:00",
        "version 1.2.3, 42 tokens, score 0.9123",
        "a short_identifier_here",
    ],
)
def test_leaves_ordinary_text_alone(text: str) -> None:
    assert redact(text) == text


def test_luhn() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("5500000000000004")
    assert not luhn_valid("4111111111111112")


def test_truncate_says_how_much_was_cut() -> None:
    assert truncate("abcdef", 10) == "abcdef"
    assert truncate("abcdefghij" * 3, 10) == "abcdefghij…[+20 chars]"


def test_scrub_walks_json_and_can_skip_redaction() -> None:
    value = {"prompt": "mail x@y.io", "n": 3, "turns": [{"response": "z" * 50}], "ok": None}
    scrubbed = Redactor(max_text_chars=25).scrub(value)
    assert scrubbed["prompt"] == "mail [REDACTED:email]"
    assert scrubbed["n"] == 3 and scrubbed["ok"] is None
    assert scrubbed["turns"][0]["response"] == "z" * 25 + "…[+25 chars]"
    assert Redactor(enabled=False, max_text_chars=100).scrub(value)["prompt"] == "mail x@y.io"
    with pytest.raises(ValueError, match="max_text_chars"):
        Redactor(max_text_chars=0)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(redact_module)
    assert result.attempted > 0 and result.failed == 0


def test_a_secret_across_the_cut_is_redacted_and_unread_text_counts_as_cut() -> None:
    key = "sk-" + "a1" * 20
    text = "x" * 90 + " " + key + " " + "y" * 5000
    redacted = "x" * 90 + " [REDACTED:api_key] " + "y" * 5000

    shown = Redactor(max_text_chars=100).text(text)

    # Only the cut and its margin are read, yet the count is what redacting all would cut.
    assert shown == redacted[:100] + f"…[+{len(redacted) - 100} chars]"
    assert "a1a1" not in shown


def test_a_short_text_that_redaction_lengthens_is_still_cut() -> None:
    assert Redactor(max_text_chars=10).text("a@b.cc") == "[REDACTED:…[+6 chars]"


# genmon's own ids: 32 hex characters, which the long-token rule (and, for a run of digits,
# the card rule) would otherwise mask.
INCIDENT_ID = "4111111111111111a0b1c2d3e4f5a6b7"
FINGERPRINT = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def test_genmon_ids_are_masked_unless_kept() -> None:
    text = f"related to open incident {INCIDENT_ID} ({FINGERPRINT})"
    assert redact(text) == "related to open incident [REDACTED:api_key] ([REDACTED:api_key])"
    assert redact(text, keep={INCIDENT_ID, FINGERPRINT}) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a secret beside a kept id is still masked
        (f"{INCIDENT_ID} sk-proj-AbCdEfGhIjKlMnOpQrStUv", f"{INCIDENT_ID} [REDACTED:api_key]"),
        (f"{INCIDENT_ID}, card 4111 1111 1111 1111", f"{INCIDENT_ID}, card [REDACTED:card]"),
        (f"id={INCIDENT_ID};mail=jo@example.org", f"id={INCIDENT_ID};mail=[REDACTED:email]"),
        # a secret that contains a kept id is masked whole, never split around it
        (f"sk-{INCIDENT_ID}", "[REDACTED:api_key]"),
        (f"{INCIDENT_ID}9f8e7d6c5b4a", "[REDACTED:api_key]"),
        (f"{INCIDENT_ID}@example.org", "[REDACTED:email]"),
        # an id among genmon's own separators stays
        (f"{INCIDENT_ID}.3.trigger.pd", f"{INCIDENT_ID}.3.trigger.pd"),
    ],
)
def test_kept_ids_stay_and_secrets_around_them_do_not(text: str, expected: str) -> None:
    assert redact(text, keep={INCIDENT_ID}) == expected


def test_scrub_keeps_ids_at_every_depth() -> None:
    value = {
        "reason": f"opened {INCIDENT_ID}",
        "evidence": {"ids": [FINGERPRINT, "jo@example.org"]},
    }
    scrubbed = Redactor().scrub(value, keep={INCIDENT_ID, FINGERPRINT})
    assert scrubbed == {
        "reason": f"opened {INCIDENT_ID}",
        "evidence": {"ids": [FINGERPRINT, "[REDACTED:email]"]},
    }
