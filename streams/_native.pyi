"""Types of the compiled fast path (streams/native-rs/src); see :mod:`genmon.streams.native`."""

from typing import Any

class Batch:
    deferred: list[int]
    def __len__(self) -> int: ...
    def raw(self, i: int) -> bytes: ...
    def accepted(self) -> list[tuple[int, int, int]]: ...
    def partitions(self) -> list[int]: ...
    def aggregate(
        self,
        partition: int,
        done_offset: int,
        now_ms: int,
        skew_ms: int,
        watermarks: dict[str, int],
        plan: Any,
        ttl_ms: int,
        max_text_chars: int,
        joins: dict[str, Any],
    ) -> dict[str, Any]: ...

class Decoder:
    def __init__(
        self,
        openings: list[str],
        anywhere: list[str],
        scan_chars: int,
        languages: list[str],
        function_words: dict[str, list[int]],
    ) -> None: ...
    def decode(
        self, values: list[bytes | None], partitions: list[int], offsets: list[int], max_bytes: int
    ) -> Batch: ...
    def extend(
        self,
        batch: Batch,
        values: list[bytes],
        partitions: list[int],
        offsets: list[int],
        max_bytes: int,
    ) -> list[int]: ...
    def signals(self, response: str) -> tuple[bool, bool, int, str]: ...

def dumps(value: Any) -> bytes: ...
