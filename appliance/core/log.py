"""Logging: structlog, JSON lines when not on a terminal (journald), readable on a TTY.

Event names are stable identifiers (`instance.stored`, `association.rejected`, ...) that
the operations center can alert on; fields carry opaque ids. Patient data never reaches
a log line: callers pass keyed hashes and ids only, and the stdlib loggers of pynetdicom
and pydicom (which print UIDs and names at INFO/DEBUG) are held at WARNING and routed
through the same renderer with their message text dropped below ERROR.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}

# Functions that see every log event at INFO or above, whatever `log_level` hides from the
# log itself (event name, fields): the ops link turns some of them into events for the
# operations center (ops/link.py), the metrics endpoint counts some (health/metrics.py).
# A tap must be quick and must not log; its failure never stops the log line.
_taps: list[Callable[[str, Mapping[str, Any]], None]] = []


def add_tap(tap: Callable[[str, Mapping[str, Any]], None]) -> Callable[[], None]:
    """Register `tap`; returns the function that removes it again."""
    _taps.append(tap)
    return lambda: _taps.remove(tap) if tap in _taps else None


def _tap(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for t in list(_taps):
        with contextlib.suppress(Exception):  # a tap must never cost the log line
            t(str(event.get("event", "")), event)
    return event


def redact_exc_info(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Render an exception as its type and stack (file:line function), never its message.

    Library exceptions quote values (pydicom: "Invalid value for VR UI: '1.2.840...'"),
    and a value can be a UID or a name; the frames are enough to find the bug.
    """
    exc = event.pop("exc_info", None)
    if not exc:
        return event
    if exc is True:
        exc = sys.exc_info()
    elif isinstance(exc, BaseException):
        exc = (type(exc), exc, exc.__traceback__)
    if not isinstance(exc, tuple) or exc[0] is None:
        return event
    frames = traceback.extract_tb(exc[2])
    event["exception"] = f"{exc[0].__name__} at " + " <- ".join(
        f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return event


# The level in force (`set_level` changes it at run time) and the lowest level the loggers
# were built to pass at all (`setup`): debug events cost nothing unless asked at start.
_level = {"threshold": logging.INFO, "floor": logging.INFO}


def _below(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop an event under the level in force, after the taps have seen it."""
    if _LEVELS.get(str(event.get("level")), logging.ERROR) < _level["threshold"]:
        raise structlog.DropEvent
    return event


def level() -> str:
    """The level in force, by name."""
    return next(n for n, v in _LEVELS.items() if v == _level["threshold"])


def set_level(name: str) -> str:
    """Change the level at run time (an operator's `log-level`, not kept over a restart);
    returns the level it replaced. ValueError for an unknown level, or for a level below
    the one the daemon started with when that is under INFO's floor (debug needs
    `log_level = "debug"` in the config and a restart)."""
    if name not in _LEVELS:
        raise ValueError(f"unknown level {name!r} (one of {', '.join(_LEVELS)})")
    if _LEVELS[name] < _level["floor"]:
        raise ValueError(f"{name} needs log_level = \"{name}\" in the config and a restart")
    before = level()
    _level["threshold"] = _LEVELS[name]
    return before


def setup(level: str = "info", fmt: str = "auto", stream: object = None) -> None:
    out = stream or sys.stdout
    _level["threshold"] = _LEVELS[level]
    _level["floor"] = min(_LEVELS[level], logging.INFO)
    json = fmt == "json" or (fmt == "auto" and not getattr(out, "isatty", lambda: False)())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _tap,
            _below,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_exc_info,
            renderer,
        ],
        # INFO and above reach the taps at any log_level; debug costs nothing unless asked
        wrapper_class=structlog.make_filtering_bound_logger(min(_LEVELS[level], logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=out),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # Third-party loggers may print identifiers (pynetdicom logs UIDs at INFO): keep them
    # quiet and pass on only their level and logger name, not their text.
    for name in ("pynetdicom", "pydicom", "paramiko"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [_Redacting()]
        lg.setLevel(logging.ERROR)
        lg.propagate = False


class _Redacting(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger("appliance.lib").error(
            "library.error", library=record.name, where=f"{record.module}:{record.lineno}")
