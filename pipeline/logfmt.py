"""How log records and the one-line error look: text for people (the
default) or one JSON object per line for schedulers and log shippers.

A record may carry `extra={"event": "progress", "counters": {...}}`; the JSON
form puts the event name and the counters at the top level. Records without
them are event "log". Messages are the same text in both forms, and never
hold an API key (no module logs one).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
DEFAULT_EVENT = "log"  # a record that names no event
RESERVED_KEYS = frozenset({"ts", "level", "event", "message"})  # counters may not overwrite these
QUIET_LOGGERS = ("httpx", "urllib3", "sentence_transformers", "transformers", "filelock")  # chatty at INFO


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ts, level, event, message,
    then the record's counters."""

    def format(self, record: logging.LogRecord) -> str:
        counters = getattr(record, "counters", None) or {}
        return json_line(
            level=record.levelname.lower(),
            event=str(getattr(record, "event", DEFAULT_EVENT)),
            message=record.getMessage(),
            ts=record.created,
            exc=self.formatException(record.exc_info) if record.exc_info else None,
            **counters,
        )


def json_line(*, level: str, event: str, message: str, ts: float | None = None, exc: str | None = None,
              **counters: Any) -> str:
    obj: dict[str, Any] = {"ts": _iso(time.time() if ts is None else ts), "level": level, "event": event,
                           "message": message}
    obj.update((k, v) for k, v in counters.items() if k not in RESERVED_KEYS)
    if exc:
        obj["exc"] = exc
    # default=str: a Counter, Path or numpy number in counters still gives a line
    return json.dumps(obj, ensure_ascii=False, default=str, separators=(",", ":"))


def configure(log_format: LogFormat, debug: bool, stream: TextIO | None = None) -> None:
    """Route every record to stderr in the chosen form."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s" if debug else "%(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def is_json() -> bool:
    """Whether records go out as JSON (then the progress never draws a bar)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def error_line(message: str, exit_code: int) -> str:
    """The one line a failed command leaves on stderr."""
    if is_json():
        return json_line(level="error", event="error", message=message, exit_code=exit_code)
    return f"error: {message}"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"
