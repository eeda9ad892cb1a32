"""Chat calls in the SDK: the ``prompt`` detectors read, taken from the ``messages``.

An inference event's ``messages`` carry the conversation sent to the model; its ``prompt``
is what drift detectors embed and compare. A chat call logged without a ``prompt`` gets the
last user turn's content as its prompt (the question being answered), and message texts
longer than the SDK's ``max_text_chars`` are cut to it, as prompts and responses are.

>>> fields, cut = chat_fields(None, {"messages": [
...     {"role": "system", "content": "Be brief."},
...     {"role": "user", "content": "What is 2+2?"},
...     {"role": "assistant", "content": "4"},
...     {"role": "user", "content": "And 3+3?"}]}, max_chars=100)
>>> fields["prompt"], cut
('And 3+3?', False)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from genmon.schemas.events import ChatMessage


def chat_fields(
    event: BaseModel | Mapping[str, Any] | None, fields: dict[str, Any], max_chars: int
) -> tuple[dict[str, Any], bool]:
    """``fields`` with the prompt taken from the messages when none is given, and message
    texts cut to ``max_chars``; and whether a text was cut.

    An event object is left as it is (its ``prompt`` was set when it was built), and so is
    anything that is not a list of messages, which validation then refuses.
    """
    if isinstance(event, BaseModel):
        return fields, False
    data = {**(event or {}), **fields}
    messages = data.get("messages")
    if not isinstance(messages, list | tuple):
        return fields, False
    turns = [_cut(message, max_chars) for message in messages]
    cut = any(turn is not message for turn, message in zip(turns, messages, strict=True))
    out = {**fields, "messages": turns} if cut else fields
    if data.get("prompt") is None:
        prompt = last_user_content(turns)
        if prompt is not None:
            out = {**out, "prompt": prompt}
    return out, cut


def last_user_content(messages: list[Any]) -> str | None:
    """The content of the last ``user`` turn of ``messages`` (dicts or :class:`ChatMessage`)."""
    for message in reversed(messages):
        role, content = _parts(message)
        if role == "user" and isinstance(content, str):
            return content
    return None


def _parts(message: Any) -> tuple[Any, Any]:
    if isinstance(message, ChatMessage):
        return message.role, message.content
    if isinstance(message, Mapping):
        return message.get("role"), message.get("content")
    return None, None


def _cut(message: Any, max_chars: int) -> Any:
    """``message`` with its content cut to ``max_chars`` (the same object when not longer)."""
    _, content = _parts(message)
    if not isinstance(content, str) or len(content) <= max_chars:
        return message
    if isinstance(message, ChatMessage):
        return message.model_copy(update={"content": content[:max_chars]})
    return {**message, "content": content[:max_chars]}
