"""Generic job-file rules: a YAML mapping -> a frozen dataclass, read by the
dataclass's type hints and its fields' `setting(...)`.

Two halves, so a dataclass built by hand is checked as strictly as one read
from a file:
- `check_fields(self)`, called first in every config's `__post_init__`: types,
  `Literal` choices, ranges, non-empty required lists.
- `Reader`: what YAML cannot say by itself. Unknown keys (with the closest
  known one), required keys, null, lists to tuples, a word for a one-item
  list, whole numbers for floats, `${VAR}`, paths relative to the job file,
  secrets that must be `${VAR}`.

Errors are `Invalid(key, problem)` with the key relative to the mapping being
read; `at` prefixes the path as the error leaves each mapping or list item, so
the user reads `providers[1].max_concurrency: ...`.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Union, get_args, get_origin, get_type_hints

from ..errors import ConfigError

ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # $$ writes a literal $
WHOLE_ENV_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")  # a secret's only allowed form
MAX_SHOWN_CHARS = 60  # a pasted blob or a 400-digit number is not worth echoing whole
MAPPING_HINT_KEYS = 3  # keys named in "must be a mapping (a, b, c, ...)"
KINDS: dict[Any, str] = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


class Invalid(ConfigError):
    """A wrong value at `key`, a path relative to the mapping it was found in."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key, self.problem = key, problem

    def under(self, prefix: str) -> Invalid:
        if not self.key:
            return Invalid(prefix, self.problem)
        return Invalid(prefix + self.key if self.key.startswith("[") else f"{prefix}.{self.key}", self.problem)


@contextmanager
def at(key: str) -> Iterator[None]:
    """The one place key paths grow: an error inside gets `key` in front."""
    try:
        yield
    except Invalid as err:
        raise err.under(key) from None


@dataclass(frozen=True)
class Spec:
    """What the job file says about a field beyond its type hint."""

    key: str | None = None  # its name in the job file, when not the field's
    low: float | None = None  # inclusive bounds, for numbers; either may be left open
    high: float | None = None
    expect: str | None = None  # what a wrong value "must be", instead of the generic words
    path: bool = False  # relative to the job file's folder; URIs kept as written
    env_only: bool = False  # a secret: only `${VAR}` may stand in the file
    in_file: bool = True  # False: set by the loader, not a key of the file
    custom: Callable[[Any, Reader], dict[str, Any]] | None = None  # reads the key itself into field values


PLAIN = Spec()
_SPEC = "job_file"  # the key of a Spec in a field's metadata


def setting(default: Any, *, secret: bool = False, **spec: Any) -> Any:
    """A field with a default and its job-file rules: `setting(8, low=1, high=1024)`.
    `secret` keeps it out of repr and out of error messages. A required field
    is `field(metadata=rules(...))`, so type checkers see it has no default."""
    env_only = spec.get("env_only", False)
    return field(default=default, repr=not (secret or env_only), metadata=rules(**spec))


def rules(**spec: Any) -> dict[str, Spec]:
    """A field's metadata holding its job-file rules (see Spec)."""
    return {_SPEC: Spec(**spec)}


def spec_of(f: dataclasses.Field[Any]) -> Spec:
    return f.metadata.get(_SPEC, PLAIN)


def key_of(f: dataclasses.Field[Any]) -> str:
    return spec_of(f).key or f.name


def required(f: dataclasses.Field[Any]) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


@functools.cache
def hints(cls: Any) -> dict[str, Any]:
    """Each field's type, `X | None` split: name -> (optional, type)."""
    return {name: _unwrap(hint) for name, hint in get_type_hints(cls).items()}


@functools.cache
def file_fields(cls: Any) -> dict[str, dataclasses.Field[Any]]:
    """The job file's keys for `cls`, in field order."""
    return {key_of(f): f for f in fields(cls) if spec_of(f).in_file}


def _unwrap(hint: Any) -> tuple[bool, Any]:
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"a config field may be one type or None, not {hint}")
        return True, args[0]
    return False, hint


def _describe(hint: Any) -> str:
    if get_origin(hint) is tuple:
        return f"a list of {_describe(get_args(hint)[0])}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return KINDS.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _is(hint: Any, value: Any) -> bool:
    """Whether `value` has type `hint` (bool is not a number; nan is no number)."""
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if get_origin(hint) is Literal:
        return any(value == choice and type(value) is type(choice) for choice in get_args(hint))
    return isinstance(value, hint)


# ---------------------------------------------------------------------------
# check_fields: every config's __post_init__


def check_fields(obj: Any) -> None:
    """Raise Invalid for the first field whose value breaks its type hint or range."""
    types_ = hints(obj.__class__)
    for f in fields(obj):
        optional, hint = types_[f.name]
        problem = _problem(hint, getattr(obj, f.name), optional, f)
        if problem:
            raise Invalid(key_of(f), problem)


def _problem(hint: Any, value: Any, optional: bool, f: dataclasses.Field[Any]) -> str | None:
    spec = spec_of(f)
    shown = _shown(value) if f.repr else type(value).__name__  # never echo a secret
    if value is None:
        return None if optional else "must not be empty"
    if get_origin(hint) is Literal:
        return None if _is(hint, value) else f"{shown} is not one of {', '.join(map(str, get_args(hint)))}"
    if get_origin(hint) is tuple:
        item = get_args(hint)[0]
        empty = not value and required(f)
        ok = isinstance(value, tuple) and not empty and all(_is(item, v) and v != "" for v in value)
    else:
        ok = _is(hint, value)
    if not ok:
        return f"must be {spec.expect}" if spec.expect else f"expected {_describe(hint)}, got {shown}"
    low, high = spec.low, spec.high
    if (low is not None and not low <= value) or (high is not None and not value <= high):
        bounds = f"{'' if low is None else low}..{'' if high is None else high}"
        return f"{shown if f.repr else 'the value'} is out of range ({bounds})"
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else f"{text[:MAX_SHOWN_CHARS - 13]}...{text[-10:]}"


# ---------------------------------------------------------------------------
# Reader: the job file's mapping -> dataclasses


class Reader:
    """Reads mappings into config dataclasses; fills `${VAR}` as it goes.
    Unset vars are an error unless `require_env` is False; then they stay as
    written and are listed in `missing`."""

    def __init__(self, base: Path, require_env: bool = True) -> None:
        self.base = base
        self.require_env = require_env
        self.missing: list[str] = []

    def build(self, cls: type, raw: Any) -> Any:
        return cls(**self.values(cls, raw))

    def values(self, cls: type, raw: Any) -> dict[str, Any]:
        """The keyword arguments for `cls` that `raw` gives (defaults left out)."""
        known = file_fields(cls)
        if not isinstance(raw, Mapping):
            names = list(known)
            shown = names[:MAPPING_HINT_KEYS] + (["..."] if len(names) > MAPPING_HINT_KEYS else [])
            raise Invalid("", f"must be a mapping ({', '.join(shown)})")
        reject_unknown(raw, known)
        out: dict[str, Any] = {}
        for key, f in known.items():
            spec = spec_of(f)
            optional, hint = hints(cls)[f.name]
            value = raw.get(key)
            with at(key):
                if spec.custom is not None:
                    out.update(spec.custom(value, self))
                elif value is not None:
                    out[f.name] = self.read(hint, value, spec)
                elif required(f):
                    raise Invalid("", f"required ({spec.expect})" if spec.expect else "required")
                elif key in raw and optional:  # `key:` with no value
                    out[f.name] = None
                elif key in raw and not _is_container(hint):  # a list or a mapping takes its default
                    raise Invalid("", "must not be empty")
        return out

    def read(self, hint: Any, value: Any, spec: Spec = PLAIN) -> Any:
        """One value as `hint` wants it; what cannot be made right is left for check_fields."""
        if spec.env_only and not (isinstance(value, str) and WHOLE_ENV_REF.fullmatch(value)):
            raise Invalid("", "write it as ${ENV_VAR}; secrets never go in the job file")
        if dataclasses.is_dataclass(hint):
            return self.build(hint, value)  # type: ignore[arg-type]
        if get_origin(hint) is tuple:
            return self._list(get_args(hint)[0], value, spec)
        if isinstance(value, str):
            return self.text(value, path=spec.path)
        if hint is float and _is(int, value):
            try:
                return float(value)
            except OverflowError:
                return value  # too large for a float: check_fields says it is out of range
        return value

    def text(self, value: str, *, path: bool = False) -> str:
        """`${VAR}` filled; a path made absolute against the job file's folder."""
        filled = self._fill(value)
        return resolve(self.base, filled) if path and filled else filled

    def _list(self, item: Any, value: Any, spec: Spec) -> tuple[Any, ...]:
        if isinstance(value, str) and item is str:
            value = [value] if value else []  # a word for a one-item list
        if not isinstance(value, list):
            raise Invalid("", f"must be {spec.expect or _describe(tuple[item, ...])}")  # type: ignore[valid-type]
        items = []
        for i, v in enumerate(value):
            with at(f"[{i}]"):
                items.append(self.read(item, v, spec))
        if item is str and all(isinstance(v, str) for v in items):
            return tuple(dict.fromkeys(items))  # a path or a column once is enough
        return tuple(items)

    def _fill(self, text: str) -> str:
        filled, missing = fill_env(text, os.environ)
        if missing and self.require_env:
            raise Invalid("", f"environment variable ${{{missing[0]}}} is not set")
        self.missing.extend(missing)
        return filled


def fill_env(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """`text` with its `${VAR}`s filled from `env` (`$$` is a `$`), and the
    names that `env` lacks (left as written)."""
    missing: list[str] = []

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        if name in env:
            return env[name]
        missing.append(name)
        return match.group(0)

    return ENV_REF.sub(fill, text), missing


def _is_container(hint: Any) -> bool:
    return get_origin(hint) is tuple or dataclasses.is_dataclass(hint)


def reject_unknown(values: Mapping[Any, Any], known: Mapping[str, Any]) -> None:
    """The first key not in `known`, named with the closest known key."""
    names = list(known)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(names)}"
            raise Invalid(str(key), f"unknown key; {hint}")


def resolve(base: Path, path: str) -> str:
    """Paths are relative to the job file; URIs (s3://...) are kept as written."""
    if "://" in path:
        return path
    expanded = Path(os.path.expanduser(path))
    return os.path.normpath(expanded if expanded.is_absolute() else base / expanded)
