"""Quiet logs through outages: repeated connection errors become one line per interval.

While the broker is away, Kafka clients log every failed connect, metadata refresh and
fetch, many times a second per connection: a 133 s broker outage once wrote 500,346 lines
(52 MB), burying everything else and filling disks. :class:`RepeatFilter` lets the first
record of each kind through, counts the repeats for ``worker.log_repeat_interval_s`` and then
logs one line saying how many there were::

    [ERROR] Unable connect to node with id 1: [Errno 111] Connect call failed ('127.0.0.1', 19092)
    [ERROR] Unable connect to node with id 1: [Errno 111] Connect call failed ('127.0.0.1', 19092)
        [repeated 1090 times in the last 30 s]

A worker through a 124 s broker stop wrote 38 lines with it, 7,693 without.

A "kind" is the logger and the message template (``record.msg`` before ``%`` formatting,
digits ignored), so a different error still shows at once. Records it limits: WARNING and
above from the Kafka clients (``aiokafka``, ``kafka``), and from genmon's and Faust's own
loggers those that read like a connection error (:data:`CONNECTION_ERROR`). Everything else
passes untouched.

Call :func:`install` once logging is configured (it filters the root logger's handlers), or
:func:`install_on_worker` for a Faust worker, which replaces the root handlers when it starts.
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genmon.settings import Settings

#: HTTP client loggers that print whole URLs (tokens included) at INFO: kept at WARNING.
URL_LOGGERS = ("httpx", "httpcore")
#: Loggers whose every WARNING+ record is a client complaining about the connection.
CLIENT_LOGGERS = ("aiokafka", "kafka")
#: Loggers whose WARNING+ records are limited when they read like a connection error.
OWN_LOGGERS = ("genmon", "faust", "mode")
#: What a connection error reads like (message template, or the exception's type and text).
CONNECTION_ERROR = re.compile(
    r"connect|unreachable|unavailable|refused|timed out|timeout|broker|disconnect|"
    r"heartbeat|coordinator|metadata|no ?brokers|retrying|reconnect|network|socket|"
    r"could not translate host|name or service not known|operationalerror",
    re.IGNORECASE,
)
#: Distinct kinds remembered at once; the oldest is reported and forgotten beyond it.
MAX_KINDS = 256
#: Characters of the first message repeated in the summary line.
MAX_MESSAGE_CHARS = 500

_VERDICT = "_genmon_repeat_verdicts"  # on a record: every handler gets the same answer
_SUMMARY = "genmon_repeat_summary"  # set on the summary records this module writes
_DIGITS = re.compile(r"\d+")


@dataclass
class _Kind:
    """One (logger, template) seen in the current interval."""

    started: float
    name: str
    levelno: int
    message: str
    pathname: str
    lineno: int
    repeats: int = 0


class RepeatFilter(logging.Filter):
    """A handler filter: the first record of a kind passes, repeats within ``interval_s``
    are counted, and one summary line is logged when the interval ends (or, at the latest,
    when that kind is seen again after it)."""

    def __init__(
        self,
        interval_s: float = 30.0,
        *,
        max_kinds: int = MAX_KINDS,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.max_kinds = max_kinds
        self.clock = clock
        self.suppressed = 0  #: records held back since creation (for tests and metrics)
        self._kinds: OrderedDict[tuple[str, str], _Kind] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._background = background
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the filter -----------------------------------------------------------------------

    def filter(self, record: logging.LogRecord) -> bool:
        # One record reaches the filter once per handler it is attached to; count it once.
        verdicts: dict[int, bool] = record.__dict__.setdefault(_VERDICT, {})
        verdict = verdicts.get(id(self))
        if verdict is None:
            verdict = verdicts[id(self)] = self._decide(record)
        return verdict

    def _decide(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SUMMARY, False) or not applies(record):
            return True
        key = (record.name, template(record))
        now = self.clock()
        with self._lock:
            due = self._take_due(now)
            kind = self._kinds.get(key)
            if kind is not None:
                kind.repeats += 1
                self.suppressed += 1
                self._start_thread()
                passes = False
            else:
                self._kinds[key] = _Kind(
                    now, record.name, record.levelno, _first_line(record), record.pathname,
                    record.lineno,
                )  # fmt: skip
                while len(self._kinds) > self.max_kinds:
                    due.append(self._kinds.popitem(last=False)[1])
                passes = True
        self._report(due, now)
        return passes

    # -- summaries ------------------------------------------------------------------------

    def flush(self, *, everything: bool = False) -> int:
        """Log the summary of every interval that has ended (all of them with
        ``everything``, at exit); returns how many lines that wrote."""
        now = self.clock()
        with self._lock:
            if everything:
                due = list(self._kinds.values())
                self._kinds.clear()
            else:
                due = self._take_due(now)
        return self._report(due, now)

    def _take_due(self, now: float) -> list[_Kind]:
        """Remove and return the kinds whose interval has ended (caller holds the lock)."""
        due: list[_Kind] = []
        while self._kinds:
            kind = next(iter(self._kinds.values()))
            if now - kind.started < self.interval_s:
                break
            due.append(self._kinds.popitem(last=False)[1])
        return due

    def _report(self, kinds: Iterable[_Kind], now: float) -> int:
        written = 0
        for kind in kinds:
            if kind.repeats == 0:
                continue
            span = min(now - kind.started, self.interval_s)
            summary = logging.LogRecord(
                kind.name, kind.levelno, kind.pathname, kind.lineno,
                "%s [repeated %d time%s in the last %.0f s]",
                (kind.message, kind.repeats, "" if kind.repeats == 1 else "s", span), None,
            )  # fmt: skip
            setattr(summary, _SUMMARY, True)
            logging.getLogger(kind.name).handle(summary)
            written += 1
        return written

    # -- the interval timer ---------------------------------------------------------------

    def _start_thread(self) -> None:
        """Start the thread that writes summaries when intervals end (caller holds the lock):
        without it the last count of an outage would wait for the next error."""
        if not self._background or (self._thread is not None and self._thread.is_alive()):
            return
        self._thread = threading.Thread(target=self._run, name="genmon-log-repeats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._kinds:
                    self._thread = None
                    return
                first = next(iter(self._kinds.values()))
                wait = max(first.started + self.interval_s - self.clock(), 0.0)
            self._wake.wait(min(wait, self.interval_s) + 0.01)
            self.flush()


def applies(record: logging.LogRecord) -> bool:
    """Whether ``record`` is a connection error this filter may hold back."""
    if record.levelno < logging.WARNING:
        return False
    if _under(record.name, CLIENT_LOGGERS):
        return True
    if not _under(record.name, OWN_LOGGERS):
        return False
    text = str(record.msg)
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        text += f" {type(error).__name__} {error}"
    elif record.args:
        text += " " + " ".join(map(str, _args(record)))
    return CONNECTION_ERROR.search(text) is not None


def template(record: logging.LogRecord) -> str:
    """The kind of a record: its message before formatting, digits ignored (node ids, ports
    and retry delays change; the complaint does not)."""
    return _DIGITS.sub("#", str(record.msg)[:300])


def _args(record: logging.LogRecord) -> Iterable[Any]:
    args = record.args
    if isinstance(args, dict):
        return args.values()
    return args if isinstance(args, tuple) else (args,)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _first_line(record: logging.LogRecord) -> str:
    try:
        message = record.getMessage()
    except Exception:  # a broken %-format: the handler reports it; keep the template
        message = str(record.msg)
    line = message.splitlines()[0] if message else ""
    return line[:MAX_MESSAGE_CHARS]


# -- installing -------------------------------------------------------------------------

_installed: RepeatFilter | None = None


def install(settings: Settings | None = None) -> RepeatFilter:
    """Filter the root logger's handlers (and any handler of the noisy loggers themselves)
    with the process's one :class:`RepeatFilter`; call it after logging is configured.

    Idempotent: calling it again (after handlers were replaced) filters the new handlers
    with the same filter, whose counts carry on.
    """
    global _installed
    if settings is None:
        from genmon.settings import get_settings

        settings = get_settings()
    interval = settings.worker.log_repeat_interval_s
    if _installed is None:
        _installed = RepeatFilter(interval)
        atexit.register(_installed.flush, everything=True)
    _installed.interval_s = interval
    # httpx logs every request's full URL at INFO; webhook, Slack and heartbeat URLs carry
    # tokens, and workers log at INFO by default.
    for name in URL_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    for handler in _handlers():
        if _installed not in handler.filters:
            handler.addFilter(_installed)
    return _installed


def install_on_worker(worker: Any, settings: Settings | None = None) -> None:
    """Have a Faust (mode) worker call :func:`install` right after it sets up logging.

    ``faust.Worker`` clears the root handlers and builds its own when it starts, after the
    code that created it has run; its ``on_setup_root_logger`` hook runs just after that.
    """
    original = worker.on_setup_root_logger

    def on_setup_root_logger(logger: logging.Logger, level: int) -> None:
        original(logger, level)
        install(settings)

    worker.on_setup_root_logger = on_setup_root_logger


def _handlers() -> list[logging.Handler]:
    handlers = list(logging.root.handlers)
    for name in (*CLIENT_LOGGERS, *OWN_LOGGERS):
        handlers += logging.getLogger(name).handlers
    if not handlers and logging.lastResort is not None:
        handlers.append(logging.lastResort)  # no configuration: warnings go to stderr
    return handlers
