"""A structure-aware mutator for inference events, beside libFuzzer's byte mutations.

Byte mutations of a JSON event mostly make bad JSON: they test the parsers' error paths
(worth it, so half the mutations stay byte-level) but rarely reach what must agree on
*valid* events: event times across offsets and fractions, float parsing, counts, limits,
escapes, quality signals. This mutator parses the input and rewrites one field's JSON text:
a generated timestamp, number or string, a value from the schema's edge cases, the field's
own text mutated by libFuzzer, a repeated or dropped key; it writes the document back with
its own spacing. Deterministic for a given ``seed``, as libFuzzer requires.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

FIELDS = [
    "schema_version",
    "request_id",
    "model_id",
    "model_version",
    "started_at",
    "finished_at",
    "prompt",
    "response",
    "messages",
    "latency_ms",
    "time_to_first_token_ms",
    "prompt_tokens",
    "completion_tokens",
    "status",
    "error_code",
    "finish_reason",
    "segment",
    "subject_id",
    "metadata",
]
#: JSON texts at the schema's edges.
EDGES = [
    "null",
    "true",
    "false",
    "0",
    "-0",
    "-0.0",
    "1",
    "2",
    "5.0",
    "1e2",
    "1E+2",
    "1e400",
    "-1",
    "86400000",
    "86400000.0",
    "86400000.00000001",
    "10000000",
    "10000001",
    "9007199254740993",
    "18446744073709551615",
    "18446744073709551616",
    "1.7976931348623157e308",
    "5e-324",
    "NaN",
    "Infinity",
    '""',
    '"5"',
    '"ok"',
    '"error"',
    '"timeout"',
    '"truncated"',
    '"length"',
    '"stop"',
    "[]",
    "{}",
    '{"k": "v"}',
    '{"": "v"}',
    '"\\u0000"',
    '"\\ud800"',
    '"\\udc00\\ud800"',
    '"\\ud83d\\ude00"',
]
TEXTS = [
    "",
    " ",
    "\t\n\u3000\u1680\x1c\x85",
    "I'm sorry, but I can't help with that.",
    "**I cannot** do this",
    "\u2019I\u2019m sorry",
    "Le chat est sur la table et il est content.",
    "Der Hund ist nicht hier.",
    "El perro está en la casa.",
    "こんにちは",
    "你好",
    "Привет",
    "ΣΑΣ ς",
    "İstanbul",
    "d'il est l'été÷the",
    "\U0001f642",
]


def _timestamp(rng: random.Random) -> str:
    """A timestamp around the formats and ranges the decoders take (and just outside)."""
    year = rng.choice([1, 1969, 1970, 2000, 2024, 2026, 2100, 2200, 2201, 9999])
    month, day = rng.choice([0, 1, 2, 12, 13]), rng.choice([0, 1, 28, 29, 30, 31, 32])
    hour, minute, second = rng.choice([0, 23, 24]), rng.choice([0, 59, 60]), rng.choice([0, 59, 60])
    text = f"{year:04d}-{month:02d}-{day:02d}{rng.choice('TTTt ')}{hour:02d}:{minute:02d}"
    if rng.random() < 0.9:
        text += f":{second:02d}"
    if rng.random() < 0.5:
        text += "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 9)))
    sign = rng.choice("+-")
    offset_h, offset_m = rng.choice([0, 1, 5, 14, 23, 24]), rng.choice([0, 30, 59, 60])
    text += rng.choice(
        [
            "Z",
            "z",
            "",
            f"{sign}{offset_h:02d}:{offset_m:02d}",
            f"{sign}{offset_h:02d}{offset_m:02d}",
            f"{sign}{offset_h:02d}",
            f"{sign}{offset_h:02d}:{offset_m:02d}:30",
        ]
    )
    return json.dumps(text)


def _number(rng: random.Random) -> str:
    """A JSON number text: integer, fraction and exponent of varied length."""
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 20)))
    text = rng.choice(["", "-"]) + (digits.lstrip("0") or "0")
    if rng.random() < 0.6:
        text += "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 25)))
    if rng.random() < 0.3:
        text += rng.choice("eE") + rng.choice(["", "+", "-"]) + str(rng.randint(0, 330))
    return text


def _string(rng: random.Random) -> str:
    pieces = [rng.choice(TEXTS) for _ in range(rng.randint(1, 3))]
    text = "".join(pieces)
    if rng.random() < 0.3:
        text = text * rng.choice([2, 50, 200])
    return json.dumps(text, ensure_ascii=rng.random() < 0.5)


def _messages(rng: random.Random) -> str:
    """A ``messages`` array: chat turns, some with a wrong role, key or count."""
    roles = ["system", "user", "assistant", "tool", "bot", ""]
    turns = []
    for _ in range(rng.choice([0, 1, 2, 3])):
        role, content = json.dumps(rng.choice(roles)), rng.choice([*EDGES, _string(rng)])
        turns.append(f'{{"role": {role}, "content": {content}}}')
    if rng.random() < 0.2:
        turns.append(rng.choice(['{"role": "user"}', '{"role": "user", "content": "", "x": 1}']))
    if rng.random() < 0.05:
        turns *= 300  # past MAX_MESSAGES (256)
    return "[" + ", ".join(turns) + "]"


def _value(rng: random.Random, old: str, byte_mutate: Callable[[bytes, int], bytes]) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return _timestamp(rng)
    if kind == 1:
        return _number(rng)
    if kind == 2:
        return _string(rng)
    if kind == 3:
        return rng.choice(EDGES)
    if kind == 4:
        keys = ["k", "locale", "é", "k" * 64]
        pairs = ", ".join(
            f'"{rng.choice(keys)}{i}": {rng.choice([*EDGES, _string(rng)])}'
            for i in range(rng.choice([0, 1, 2, 33]))
        )
        return "{" + pairs + "}"
    if kind == 5:
        return _messages(rng)
    return byte_mutate(old.encode(), max(len(old) * 2, 16)).decode("utf-8", "surrogateescape")


def mutate(
    data: bytes, max_size: int, seed: int, byte_mutate: Callable[[bytes, int], bytes]
) -> bytes:
    """One mutation of ``data``; ``byte_mutate`` is libFuzzer's (``atheris.Mutate``)."""
    rng = random.Random(seed)
    try:
        document = json.loads(data)
    except ValueError:
        document = None
    if not isinstance(document, dict) or rng.random() < 0.5:
        return byte_mutate(data, max_size)
    items = [(key, json.dumps(value)) for key, value in document.items()]
    op = rng.randrange(10)
    if op == 0 and items:  # drop a field
        del items[rng.randrange(len(items))]
    elif op == 1 and items:  # repeat a field, with another value
        key, old = rng.choice(items)
        items.append((key, _value(rng, old, byte_mutate)))
    else:  # set a field, present or not
        key = rng.choice(FIELDS) if rng.random() < 0.8 or not items else rng.choice(items)[0]
        old = dict(items).get(key, "null")
        new = _value(rng, old, byte_mutate)
        items = [(k, v) for k, v in items if k != key] + [(key, new)]
        rng.shuffle(items)
    colon, comma = rng.choice([(": ", ", "), (":", ","), (" : ", " ,\n")])
    body = comma.join(f"{json.dumps(k)}{colon}{v}" for k, v in items)
    out = ("{" + body + "}").encode("utf-8", "surrogateescape")
    return out[:max_size]
