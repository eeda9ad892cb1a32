"""Redaction and truncation of texts that go into notifications (and affected examples)."""

from __future__ import annotations

import doctest

import pytest

from genmon.streams import redact as redact_module
from genmon.streams.redact import Redactor, luhn_valid, redact, truncate


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
