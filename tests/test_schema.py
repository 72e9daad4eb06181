"""The generic job-file rules (pipeline/schema.py) on small dataclasses of
their own: types, ranges, choices, null, lists, unknown keys, ${VAR}, secrets,
and the key path every error names. A config key is one dataclass field; these
tables are what each new field gets without a line of parsing code."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from pipeline.config.job import JobConfig, ProviderConfig
from pipeline.errors import ConfigError
from pipeline.config.schema import Invalid, Reader, at, check_fields, file_fields, rules, setting

Mode = Literal["fast", "slow"]
BASE = Path("/jobs/here")
TOKEN_VAR = "SCHEMA_TEST_TOKEN"
TOKEN = "tok-schema-test-0a9b8c"


@dataclass(frozen=True)
class Inner:
    limit: int = setting(4, low=1, high=10)
    token: str | None = setting(None, env_only=True)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class Item:
    name: str
    rate: float = setting(1.0, low=0, high=100)
    inner: Inner = Inner()

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.name:
            raise Invalid("", "every item needs a 'name'")


@dataclass(frozen=True)
class Root:
    items: tuple[Item, ...] = field(metadata=rules(expect="a list of one or more items"))
    words: tuple[str, ...] = ()
    mode: Mode = "fast"
    flag: bool = False
    where: str | None = setting(None, path=True)
    count: int | None = setting(None, low=0, high=2**63)
    floor: float = setting(0.5, low=0.5)  # open above
    secret: str | None = setting(None, secret=True)
    files: tuple[str, ...] = setting((), key="file", path=True)

    def __post_init__(self) -> None:
        check_fields(self)


def read(raw: Any, require_env: bool = True) -> Root:
    return Reader(BASE, require_env).build(Root, raw)


def error(raw: Any) -> str:
    with pytest.raises(Invalid) as info:
        read(raw)
    return str(info.value)


@pytest.fixture(autouse=True)
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    monkeypatch.delenv("SCHEMA_TEST_UNSET", raising=False)


ONE: dict[Any, Any] = {"items": [{"name": "a"}]}

# ---------------------------------------------------------------------------
# Nasty values: each names its key path and says what is wrong

BAD_TABLE = [
    # id, raw, the whole message
    ("int as text", {**ONE, "count": "7"}, "count: expected a whole number, got '7'"),
    ("int as float", {**ONE, "count": 7.0}, "count: expected a whole number, got 7.0"),
    ("int as true", {**ONE, "count": True}, "count: expected a whole number, got True"),
    ("int as false", {**ONE, "count": False}, "count: expected a whole number, got False"),
    ("int negative", {**ONE, "count": -1}, f"count: -1 is out of range (0..{2**63})"),
    ("int past the range", {**ONE, "count": 2**63 + 1}, f"count: {2**63 + 1} is out of range (0..{2**63})"),
    ("int huge is cut short", {**ONE, "count": 10**400}, f"count: {'1' + '0' * 46}...0000000000 is out of range (0..{2**63})"),
    ("float nan", {"items": [{"name": "a", "rate": math.nan}]}, "items[0].rate: expected a number, got nan"),
    ("float inf", {"items": [{"name": "a", "rate": math.inf}]}, "items[0].rate: inf is out of range (0..100)"),
    ("float -inf", {"items": [{"name": "a", "rate": -math.inf}]}, "items[0].rate: -inf is out of range (0..100)"),
    ("float as bool", {"items": [{"name": "a", "rate": True}]}, "items[0].rate: expected a number, got True"),
    ("float from a whole number too big for a float", {"items": [{"name": "a", "rate": 10**400}]},
     f"items[0].rate: {'1' + '0' * 46}...0000000000 is out of range (0..100)"),
    ("one-sided range", {**ONE, "floor": 0.25}, "floor: 0.25 is out of range (0.5..)"),
    ("one-sided range, nan", {**ONE, "floor": math.nan}, "floor: expected a number, got nan"),
    ("choice unknown", {**ONE, "mode": "medium"}, "mode: 'medium' is not one of fast, slow"),
    ("choice empty", {**ONE, "mode": ""}, "mode: '' is not one of fast, slow"),
    ("choice as a number", {**ONE, "mode": 1}, "mode: 1 is not one of fast, slow"),
    ("bool as text", {**ONE, "flag": "yes"}, "flag: expected true or false, got 'yes'"),
    ("bool as 1", {**ONE, "flag": 1}, "flag: expected true or false, got 1"),
    ("text as a number", {**ONE, "where": 5}, "where: expected text, got 5"),
    ("text as a list", {**ONE, "where": ["a"]}, "where: expected text, got ['a']"),
    ("secret never echoed", {**ONE, "secret": 884123456789}, "secret: expected text, got int"),
    ("list as a mapping", {**ONE, "words": {"a": 1}}, "words: must be a list of text"),
    ("list as a number", {**ONE, "words": 3}, "words: must be a list of text"),
    ("list of numbers", {**ONE, "words": ["a", 1]}, "words: expected a list of text, got ('a', 1)"),
    ("list with an empty word", {**ONE, "words": ["a", ""]}, "words: expected a list of text, got ('a', '')"),
    ("list of lists", {**ONE, "words": [["a"]]}, "words: expected a list of text, got (['a'],)"),
    ("required list empty", {"items": []}, "items: must be a list of one or more items"),
    ("required list as a mapping", {"items": {"name": "a"}}, "items: must be a list of one or more items"),
    ("required list missing", {}, "items: required (a list of one or more items)"),
    ("required list null", {"items": None}, "items: required (a list of one or more items)"),
    ("item not a mapping", {"items": [{"name": "a"}, "b"]}, "items[1]: must be a mapping (name, rate, inner)"),
    ("item null", {"items": [None]}, "items[0]: must be a mapping (name, rate, inner)"),
    ("item missing a required key", {"items": [{"name": "a"}, {"rate": 2}]}, "items[1].name: required"),
    ("item's own rule", {"items": [{"name": "a"}, {"name": ""}]}, "items[1]: every item needs a 'name'"),
    ("nested two deep", {"items": [{"name": "a"}, {"name": "b", "inner": {"limit": 0}}]},
     "items[1].inner.limit: 0 is out of range (1..10)"),
    ("nested mapping as a list", {"items": [{"name": "a", "inner": []}]}, "items[0].inner: must be a mapping (limit, token)"),
    ("scalar null", {**ONE, "mode": None}, "mode: must not be empty"),
    ("root not a mapping", ["items"], "must be a mapping (items, words, mode, ...)"),
    ("unknown key, close", {**ONE, "mdoe": "fast"}, "mdoe: unknown key; did you mean 'mode'?"),
    ("unknown key, nested", {"items": [{"name": "a", "inner": {"limt": 2}}]},
     "items[0].inner.limt: unknown key; did you mean 'limit'?"),
    ("unknown key, far", {**ONE, "zzzz": 1},
     "zzzz: unknown key; known keys: items, words, mode, flag, where, count, floor, secret, file"),
    ("unknown key, not text", {**ONE, 7: 1},
     "7: unknown key; known keys: items, words, mode, flag, where, count, floor, secret, file"),
    ("field name is not the key", {**ONE, "files": ["a"]}, "files: unknown key; did you mean 'file'?"),
    ("secret written in the file", {"items": [{"name": "a", "inner": {"token": "tok-in-file"}}]},
     "items[0].inner.token: write it as ${ENV_VAR}; secrets never go in the job file"),
    ("secret half a reference", {"items": [{"name": "a", "inner": {"token": "x${" + TOKEN_VAR + "}"}}]},
     "items[0].inner.token: write it as ${ENV_VAR}; secrets never go in the job file"),
    ("secret as a number", {"items": [{"name": "a", "inner": {"token": 12345}}]},
     "items[0].inner.token: write it as ${ENV_VAR}; secrets never go in the job file"),
    ("unset variable in a list", {**ONE, "words": ["a", "${SCHEMA_TEST_UNSET}"]},
     "words[1]: environment variable ${SCHEMA_TEST_UNSET} is not set"),
    ("unset variable nested", {"items": [{"name": "a"}, {"name": "x${SCHEMA_TEST_UNSET}"}]},
     "items[1].name: environment variable ${SCHEMA_TEST_UNSET} is not set"),
]


@pytest.mark.parametrize("raw, message", [row[1:] for row in BAD_TABLE], ids=[row[0] for row in BAD_TABLE])
def test_a_bad_value_is_one_line_naming_its_key_path(raw, message):
    assert error(raw) == message


def test_a_bad_value_is_a_config_error_so_the_cli_exits_2():
    with pytest.raises(ConfigError):
        read({"items": []})


# ---------------------------------------------------------------------------
# Good values and what the reader makes of them

GOOD_TABLE = [
    # id, raw, attribute, value
    ("defaults", ONE, "words", ()),
    ("a word is a one-item list", {**ONE, "words": "a"}, "words", ("a",)),
    ("an empty word is no list", {**ONE, "words": ""}, "words", ()),
    ("a list null takes its default", {**ONE, "words": None}, "words", ()),
    ("repeats kept once, in order", {**ONE, "words": ["b", "a", "b"]}, "words", ("b", "a")),
    ("optional null", {**ONE, "count": None}, "count", None),
    ("zero", {**ONE, "count": 0}, "count", 0),
    ("open above", {**ONE, "floor": 1e308}, "floor", 1e308),
    ("open above, inf", {**ONE, "floor": math.inf}, "floor", math.inf),
    ("the top of the range", {**ONE, "count": 2**63}, "count", 2**63),
    ("relative path", {**ONE, "where": "data/x.parquet"}, "where", "/jobs/here/data/x.parquet"),
    ("dotted path", {**ONE, "where": "../x"}, "where", "/jobs/x"),
    ("absolute path", {**ONE, "where": "/abs/x"}, "where", "/abs/x"),
    ("uri kept", {**ONE, "where": "s3://b/p/*.parquet"}, "where", "s3://b/p/*.parquet"),
    ("empty path not made the job folder", {**ONE, "where": ""}, "where", ""),
    ("paths in a list", {**ONE, "file": ["a", "/b"]}, "files", ("/jobs/here/a", "/b")),
    ("variable filled", {**ONE, "where": "s3://${" + TOKEN_VAR + "}/x"}, "where", f"s3://{TOKEN}/x"),
    ("double dollar is a dollar", {**ONE, "where": "s3://b/$${X}"}, "where", "s3://b/${X}"),
    ("secret given as a variable", {"items": [{"name": "a", "inner": {"token": "${" + TOKEN_VAR + "}"}}]},
     "items", (Item("a", inner=Inner(token=TOKEN)),)),
]


@pytest.mark.parametrize("raw, attr, value", [row[1:] for row in GOOD_TABLE], ids=[row[0] for row in GOOD_TABLE])
def test_a_good_value_is_read_as_the_field_wants_it(raw, attr, value):
    assert getattr(read(raw), attr) == value


@pytest.mark.parametrize("rate", [0, 100, 7, -0.0, 2.5])
def test_a_whole_number_for_a_float_field_becomes_a_float(rate):
    (item,) = read({"items": [{"name": "a", "rate": rate}]}).items
    assert item.rate == rate and type(item.rate) is float


def test_an_unset_variable_stays_as_written_and_is_listed_when_not_required():
    reader = Reader(BASE, require_env=False)
    root = reader.build(Root, {"items": [{"name": "${SCHEMA_TEST_UNSET}"}], "words": ["${SCHEMA_TEST_UNSET}", "b"]})
    assert root.items[0].name == "${SCHEMA_TEST_UNSET}"
    assert root.words == ("${SCHEMA_TEST_UNSET}", "b")
    assert reader.missing == ["SCHEMA_TEST_UNSET", "SCHEMA_TEST_UNSET"]


def test_a_secret_field_is_out_of_repr():
    root = read({"items": [{"name": "a", "inner": {"token": "${" + TOKEN_VAR + "}"}}], "secret": "shh-123"})
    assert TOKEN not in repr(root) and "shh-123" not in repr(root)


# ---------------------------------------------------------------------------
# Built by hand, checked the same way (no key path above the dataclass)

HAND_TABLE = [
    ("int range", lambda: Inner(limit=11), "limit: 11 is out of range (1..10)"),
    ("int as bool", lambda: Inner(limit=True), "limit: expected a whole number, got True"),
    ("float nan", lambda: Item("a", rate=math.nan), "rate: expected a number, got nan"),
    ("choice", lambda: Root(items=(Item("a"),), mode="x"), "mode: 'x' is not one of fast, slow"),  # type: ignore[arg-type]
    ("a list is not a tuple", lambda: Root(items=[Item("a")]), "items: must be a list of one or more items"),  # type: ignore[arg-type]
    ("required tuple empty", lambda: Root(items=()), "items: must be a list of one or more items"),
    ("null for a plain field", lambda: Root(items=(Item("a"),), flag=None), "flag: must not be empty"),  # type: ignore[arg-type]
    ("own rule", lambda: Item(""), "every item needs a 'name'"),
]


@pytest.mark.parametrize("make, message", [row[1:] for row in HAND_TABLE], ids=[row[0] for row in HAND_TABLE])
def test_a_dataclass_built_by_hand_checks_itself(make, message):
    with pytest.raises(Invalid) as info:
        make()
    assert str(info.value) == message


# ---------------------------------------------------------------------------
# Key paths grow in one place


@pytest.mark.parametrize(
    "prefixes, key, expected",
    [
        pytest.param(["providers", "[1]"], "max_concurrency", "providers[1].max_concurrency", id="list item"),
        pytest.param(["input", "storage"], "", "input.storage", id="a mapping's own rule"),
        pytest.param(["input", "path"], "[2]", "input.path[2]", id="list item of text"),
        pytest.param(["a", "[0]", "[3]"], "b", "a[0][3].b", id="list in a list"),
        pytest.param([], "name", "name", id="top level"),
    ],
)
def test_at_prefixes_the_key_path_as_the_error_leaves_each_level(prefixes, key, expected):
    def raise_at(levels: list[str]) -> None:
        if not levels:
            raise Invalid(key, "wrong")
        with at(levels[-1]):
            raise_at(levels[:-1])

    with pytest.raises(Invalid) as info:
        raise_at(list(reversed(prefixes)))
    assert (info.value.key, str(info.value)) == (expected, f"{expected}: wrong")


# ---------------------------------------------------------------------------
# A new key is one field: the keys other work adds (CONTRACT.md), tried on
# subclasses so the real configs stay as they are


def test_every_field_of_the_job_configs_is_a_key_of_the_job_file():
    assert list(file_fields(ProviderConfig)) == [f.name for f in dataclasses.fields(ProviderConfig)]
    set_by_the_loader = {"job_path", "cache_storage", "env_missing"}
    assert set(file_fields(JobConfig)) == {f.name for f in dataclasses.fields(JobConfig)} - set_by_the_loader


WithBatch = dataclasses.make_dataclass(
    "WithBatch",
    [("max_inputs_per_batch", "int | None", setting(None, low=1, high=50_000)),
     ("poll_interval_s", "float", setting(60.0, low=0.1, high=86_400))],
    bases=(ProviderConfig,), frozen=True,
)
WithBudget = dataclasses.make_dataclass(
    "WithBudget", [("budget_usd", "float | None", setting(None, low=0, high=10**9))], bases=(JobConfig,), frozen=True
)
PROVIDER = {"name": "p", "base_url": "https://p.example/v1", "api_key": "sk-x"}


def test_a_provider_key_added_as_a_field_is_read_checked_and_named():
    reader = Reader(BASE)
    ok = reader.read(tuple[WithBatch, ...], [PROVIDER, {**PROVIDER, "name": "q", "max_inputs_per_batch": 50_000}])
    assert [(p.max_inputs_per_batch, p.poll_interval_s) for p in ok] == [(None, 60.0), (50_000, 60.0)]
    bad = [(50_001, "50001 is out of range (1..50000)"), (True, "expected a whole number, got True")]
    for value, problem in bad:
        with pytest.raises(Invalid) as info, at("providers"):
            reader.read(tuple[WithBatch, ...], [PROVIDER, {**PROVIDER, "name": "q", "max_inputs_per_batch": value}])
        assert str(info.value) == f"providers[1].max_inputs_per_batch: {problem}"
    with pytest.raises(Invalid, match=r"^\[0\]\.poll_intervals: unknown key; did you mean 'poll_interval_s'\?$"):
        reader.read(tuple[WithBatch, ...], [{**PROVIDER, "poll_intervals": 5}])


def test_a_top_level_key_added_as_a_field_is_read_checked_and_named():
    raw = {"name": "docs", "input": {"path": "d.parquet", "text_column": "body"}, "output": {"path": "out"},
           "embedding": {"model": "m"}, "providers": [PROVIDER]}
    reader = Reader(BASE)
    assert reader.values(WithBudget, {**raw, "budget_usd": 50})["budget_usd"] == 50.0
    assert "budget_usd" not in reader.values(WithBudget, raw)  # its default, from the dataclass
    for value, message in [(-1, "budget_usd: -1.0 is out of range (0..1000000000)"),
                           (math.nan, "budget_usd: expected a number, got nan"),
                           ("50$", "budget_usd: expected a number, got '50$'")]:
        values = reader.values(WithBudget, {**raw, "budget_usd": value})
        with pytest.raises(Invalid) as info:
            WithBudget(**values, job_path=BASE / "job.yaml")
        assert str(info.value) == message
    with pytest.raises(Invalid, match=r"^budget: unknown key; did you mean 'budget_usd'\?$"):
        reader.values(WithBudget, {**raw, "budget": 5})
