"""A provider's request extras in the job file: `headers`, `query`, `extra_body`.

Each is a mapping of names to values, kept as `Fields`: read-only and
hashable, so a frozen ProviderConfig stays a value. `${VAR}` is filled in
every text value (header values are secrets: no error shows them). YAML
reads `2024-10-21` as a date; a query or header value takes it as written.
"""
from __future__ import annotations

import datetime
import json
import math
import re
from typing import Any, Callable, Iterator, Mapping

from .schema import Invalid, Reader, at

HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token (RFC 9110)
MAX_BODY_DEPTH = 16  # extra_body is a few flat fields; deeper nesting is a mistake
# The request's own fields: the job says them (embedding.model, embedding.dimensions, the rows).
RESERVED_BODY_KEYS = frozenset({"model", "input", "dimensions"})
# Body fields that change how an answer travels, not its vectors: not part of the vector space.
TRANSPORT_BODY_KEYS = frozenset({"encoding_format", "user"})


class Fields(Mapping[str, Any]):
    """A read-only mapping that hashes and compares by its JSON."""

    __slots__ = ("_items", "_canonical")

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        canonical = json.dumps(dict(items or {}), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        self._items: dict[str, Any] = json.loads(canonical)  # a deep copy the caller cannot change
        self._canonical = canonical

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._canonical)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self._items == dict(other)

    def __repr__(self) -> str:
        return f"Fields({self._items!r})"

    def to_dict(self) -> dict[str, Any]:
        """A fresh, plain copy (JSON values)."""
        return json.loads(self._canonical)


def as_fields(value: Any) -> Any:
    """A plain dict (a config built by hand) as Fields; anything else as it is, for check_fields to judge."""
    if isinstance(value, Mapping) and not isinstance(value, Fields):
        try:
            return Fields(value)
        except (TypeError, ValueError):
            return value
    return value


def header_problem(name: str, value: str) -> str | None:
    """What is wrong with a header (never quoting its value), or None."""
    if not HEADER_NAME.match(name):
        return f"{name!r} is not a header name (letters, digits and - only)"
    if any(c in value for c in "\r\n\x00"):
        return "a header value cannot hold a line break"
    return None


def read_text_fields(key: str) -> Callable[[Any, Reader], dict[str, Any]]:
    """A reader for `key:` as a mapping of names to text (headers, query)."""

    def read(value: Any, reader: Reader) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise Invalid("", "must be a mapping of names to values")
        out: dict[str, str] = {}
        for name, item in value.items():
            with at(str(name)):
                out[str(name)] = reader.text(scalar_text(item))
        return {key: Fields(out)}

    return read


def read_body(value: Any, reader: Reader) -> dict[str, Any]:
    """`extra_body:` as a mapping of JSON values, `${VAR}` filled in its texts."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Invalid("", "must be a mapping of request body fields")
    return {"extra_body": Fields(_json_value(value, reader, 0))}


def scalar_text(item: Any) -> str:
    """A header's or query value's text as the job file means it (YAML reads dates and numbers)."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, (datetime.date, datetime.datetime)):
        return item.isoformat()
    if isinstance(item, (int, float)):
        return str(item)
    if isinstance(item, str):
        return item
    raise Invalid("", "must be text, a number or a date")


def _json_value(value: Any, reader: Reader, depth: int) -> Any:
    if depth > MAX_BODY_DEPTH:
        raise Invalid("", f"nested deeper than {MAX_BODY_DEPTH} levels")
    if isinstance(value, Mapping):
        out = {}
        for name, item in value.items():
            with at(str(name)):
                out[str(name)] = _json_value(item, reader, depth + 1)
        return out
    if isinstance(value, list):
        items = []
        for i, item in enumerate(value):
            with at(f"[{i}]"):
                items.append(_json_value(item, reader, depth + 1))
        return items
    if isinstance(value, str):
        return reader.text(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        raise Invalid("", "must be a finite number")
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise Invalid("", "must be text, a number, true/false, a list or a mapping")
