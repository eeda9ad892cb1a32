"""The worker's :class:`~genmon.streams.windows.store.StateStore`: a Faust table.

The pure cores (:mod:`~genmon.streams.windows.state`, the detector runner) read and write
state through the ``StateStore`` protocol so that tests and ``genmon replay`` can run them
on a dict; in the worker (:mod:`genmon.streams.pipeline`) that store is a Faust table
whose writes go to explicit changelog partitions, and whose changelog sends can be
awaited before an offset commit passes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from genmon.streams import native


class TableStore:
    """:class:`~genmon.streams.windows.store.StateStore` over a Faust table.

    Writes go to ``table.data`` and to the changelog partition given by the caller. A
    ``bytes`` value is JSON already (the native join table's segment records); the
    table's JSON codec reads it back on recovery as it reads the others. With
    ``native_json`` other values are encoded by the native module's ``dumps`` (4x the
    standard library's speed), falling back to the table's codec for a value it cannot
    encode.
    """

    def __init__(self, table: Any, *, native_json: bool = False, track_sends: bool = False) -> None:
        self.table = table
        self._dumps = native.dumps if native_json else None
        #: With ``track_sends``, the changelog sends since the last :meth:`wait_sent`.
        self._sends: list[asyncio.Future[Any]] | None = [] if track_sends else None

    async def wait_sent(self) -> None:
        """Wait until the broker has acknowledged every changelog write since the last call.

        Faust's ``Producer.flush`` gives up on its buffer after 0.1 s without a send (a
        new changelog topic's metadata, a loaded machine), and the commit that follows
        would then pass state still in that buffer: a crash loses the state of events
        whose offsets are committed. A failed send raises here, before any commit.
        """
        if not self._sends:
            return
        sends, self._sends = self._sends, []
        await asyncio.gather(*sends)

    def _send(self, partition: int, key: str, value: Any, **kwargs: Any) -> None:
        sent = self.table.send_changelog(partition, key, value, **kwargs)
        if self._sends is not None:
            self._sends.append(sent)

    def get(self, key: str) -> Any | None:
        return self.table.data.get(key)

    def put(self, partition: int, key: str, value: Any) -> None:
        self.table.data[key] = value
        if isinstance(value, bytes):  # JSON already: a native join segment record
            self._send(partition, key, value, value_serializer="raw")
            return
        if self._dumps is not None:
            try:
                encoded = self._dumps(value)
            except (TypeError, ValueError, OverflowError):
                pass
            else:
                self._send(partition, key, encoded, value_serializer="raw")
                return
        self._send(partition, key, value)

    def delete(self, partition: int, key: str) -> None:
        self.table.data.pop(key, None)
        self._send(partition, key, None, value_serializer="raw")

    def all_keys(self) -> Iterable[str]:
        return list(self.table.data.keys())
