"""Hiding secrets in whatever genmon prints: URLs, settings, log and error text.

Printing is where secrets leak: a ``genmon config`` pasted into a ticket, a status line in a
CI log, a connection error in a shared terminal. Everything genmon prints about its
configuration goes through here::

    >>> mask_url("postgresql+psycopg://genmon:s3cret@db:5432/genmon")
    'postgresql+psycopg://genmon:***@db:5432/genmon'
    >>> mask_url("https://hooks.example.com/in?token=abc&team=ops")
    'https://hooks.example.com/in?token=***&team=ops'

:func:`masked` is the settings as a plain dict, ready for JSON, with every secret replaced:
each :class:`~pydantic.SecretStr` (Kafka's SASL and key passwords, every destination's URL,
signing secret, routing key and heartbeat URL), ``postgres.password``, and the password of
any URL among the values (``database.url``, ``retrain.artifacts_uri``...).

Masking errs on the side of hiding: a string that merely looks like ``user:secret@host``
loses its middle part, and a URL that cannot be parsed is still searched for credentials.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr

#: What replaces a secret.
MASK = "***"

# scheme://[userinfo@]rest; the userinfo ends at the last "@" before the path, so a
# password holding an unencoded "@" or ":" is still hidden whole.
_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>\S*)")
# Query parameters and libpq keywords that carry credentials.
_SECRET_NAMES = (
    r"password|passwd|pwd|pass|secret|token|api[_-]?key|apikey|access[_-]?key|"
    r"secret[_-]?key|client[_-]?secret|sasl[_-]?password|routing[_-]?key|sig|signature|auth"
)
_QUERY_SECRET = re.compile(rf"(?P<name>(?:^|[?&;])(?:{_SECRET_NAMES}))=(?P<value>[^&;#]*)", re.I)
# libpq's keyword form (``host=db password=s3cret``) in free text.
_KEYWORD_SECRET = re.compile(rf"(?P<name>\b(?:{_SECRET_NAMES}))=(?P<value>'[^']*'|\S+)", re.I)
# Setting names whose plain-string value is a secret (not typed SecretStr).
_SECRET_FIELD = re.compile(rf"(^|_)({_SECRET_NAMES})$", re.I)


def mask_url(url: str) -> str:
    """``url`` with its password and credential query parameters replaced by ``***``.

    The user name, host, port, path and other parameters stay, so the URL still says where
    genmon connects. Works on any scheme (SQLAlchemy's ``postgresql+psycopg://``, ``s3://``,
    ``https://``) and does not need the URL to be valid.
    """
    match = _URL.fullmatch(url.strip()) if url else None
    if match is None:
        return url
    scheme, rest = match.group("scheme"), match.group("rest")
    authority, tail = _split_authority(rest)
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        authority = f"{user}:{MASK}@{host}" if colon else authority
    return scheme + authority + _QUERY_SECRET.sub(_hide_value, tail)


def _split_authority(rest: str) -> tuple[str, str]:
    """``rest`` cut into the authority (``user:password@host:port``) and what follows.

    RFC 3986 ends the authority at the first ``/``, ``?`` or ``#``; a raw password may hold
    those and ``@`` too (base64 keys hold ``/``), so when the user part ends with ``:`` the
    authority runs to the last ``@`` before any ``?``. A URL with a port and an ``@`` in its
    path then loses its middle as well: hiding too much beats printing a password.
    """
    end = _first_of(rest, "/?#")
    user_end = _first_of(rest, ":/?#")
    at = rest.rfind("@")
    looks_like_userinfo = user_end < len(rest) and rest[user_end] == ":"
    if at >= end and looks_like_userinfo and "?" not in rest[user_end:at]:
        end = _first_of(rest, "/?#", start=at)
    return rest[:end], rest[end:]


def _first_of(text: str, characters: str, start: int = 0) -> int:
    positions = [text.find(c, start) for c in characters]
    found = [p for p in positions if p >= 0]
    return min(found) if found else len(text)


def _hide_value(match: re.Match[str]) -> str:
    return f"{match.group('name')}={MASK}"


def mask_text(text: str) -> str:
    """Free text (an error message, a log line) with every URL's password and every
    ``password=...``-style pair hidden."""
    text = _URL.sub(lambda m: mask_url(m.group(0)), text)
    return _KEYWORD_SECRET.sub(_hide_value, text)


def masked(settings: BaseModel) -> dict[str, Any]:
    """The settings as a JSON-ready dict in which no secret is left.

    SecretStr values print as ``***`` (``null`` when unset, so that "not configured" stays
    visible), plain fields named like a secret (``postgres.password``) too, and every other
    string is passed through :func:`mask_url`.
    """
    return _mask_model(settings)


def _mask_model(model: BaseModel) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        result[name] = _mask_value(value, secret_name=bool(_SECRET_FIELD.search(name)))
    return result


def _mask_value(value: Any, *, secret_name: bool = False) -> Any:
    if value is None:
        return None
    if isinstance(value, SecretStr | SecretBytes):
        return MASK
    if isinstance(value, BaseModel):
        return _mask_model(value)
    if isinstance(value, dict):
        return {
            str(key): _mask_value(item, secret_name=bool(_SECRET_FIELD.search(str(key))))
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_mask_value(item, secret_name=secret_name) for item in value]
    if secret_name and isinstance(value, str | bytes):
        return MASK
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, bool | int | float):
        return value
    return mask_text(str(value))  # paths, enums, dates: their text form, as JSON would
