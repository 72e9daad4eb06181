"""The package's layers hold: imports go downward only, there is no import
cycle (imports inside functions count), and the few modules at the top of
`pipeline/` stay few. Read from the source, so the order cannot erode."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "pipeline"
# Bottom to top: a module may import its own layer's and lower layers' modules only.
LAYERS: list[tuple[str, ...]] = [
    ("pipeline", "pipeline.errors", "pipeline.logfmt"),
    ("pipeline.config",),
    ("pipeline.core",),
    ("pipeline.storage",),
    ("pipeline.inputs",),
    ("pipeline.cache",),
    ("pipeline.checkpoint",),
    ("pipeline.providers",),
    ("pipeline.engine",),
    ("pipeline.batch",),
    ("pipeline.commands",),
    ("pipeline.cli", "pipeline.__main__", "pipeline.airflow"),
]
MAX_TOP_MODULES = 12  # modules directly in pipeline/, __init__ and __main__ included
HTTP_CLIENTS = ("aiohttp",)
HTTP_LAYER = "pipeline.providers"  # the only code that speaks HTTP


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found[name] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(name: str, source: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """Every module of the package and every outside top-level package the
    module `name` imports at run time, at any depth (functions too);
    annotations-only imports under `if TYPE_CHECKING:` do not run and are left out."""
    package = name if is_package else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking_only(child):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in known]
                found.update(subs if len(subs) == len(child.names) else [base, *subs])
            visit(child)

    visit(ast.parse(source))
    resolved = set()
    for target in found:
        if target.startswith("pipeline"):
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != name:
                resolved.add(target)
        else:
            resolved.add(target.split(".")[0])
    return resolved


def layer_of(name: str) -> int:
    best = -1, ""
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best[1]):
                best = level, prefix
    assert best[0] >= 0, f"{name} belongs to no layer: add it to LAYERS"
    return best[0]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path.read_text(), path.name == "__init__.py", known) for name, path in known.items()}


def test_every_import_goes_downward() -> None:
    upward = [f"{name} ({layer_of(name)}) imports {target} ({layer_of(target)})"
              for name, targets in graph().items() for target in targets
              if target.startswith("pipeline") and layer_of(target) > layer_of(name)]
    assert upward == []


def test_there_is_no_import_cycle_even_through_imports_inside_functions() -> None:
    edges = {name: {t for t in targets if t.startswith("pipeline")} for name, targets in graph().items()}
    # A package's __init__ is run before its modules: an edge from a module to
    # its own package's __init__ is how Python works, not a cycle of ours.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, [*trail, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            walk(start, [start])
    assert cycles == []


def test_the_exception_tree_imports_nothing_of_the_pipeline_nor_the_http_client() -> None:
    targets = graph()["pipeline.errors"]
    assert not {t for t in targets if t.startswith("pipeline") or t in HTTP_CLIENTS}


def test_only_the_providers_speak_http() -> None:
    speaking = sorted(name for name, targets in graph().items() if set(HTTP_CLIENTS) & targets)
    assert speaking and all(name.startswith(HTTP_LAYER + ".") for name in speaking), speaking


def test_the_top_of_the_package_holds_few_modules() -> None:
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_MODULES, top


@pytest.mark.parametrize("planted", [
    "from ..engine.runner import Engine\n",
    "def later():\n    from ..cli.main import main\n",
    "import pipeline.batch.strategy\n",
])
def test_the_check_catches_an_upward_import_even_inside_a_function(planted: str) -> None:
    """The checker itself: a core module importing a higher layer (at the
    top, or hidden in a function) is reported, and the same module as it is is not."""
    name = "pipeline.core.packing"
    source = (PACKAGE / "core" / "packing.py").read_text()

    def upward(text: str) -> set[str]:
        found = imports(name, text, False, modules())
        return {t for t in found if t.startswith("pipeline") and layer_of(t) > layer_of(name)}

    assert upward(source) == set()
    assert upward(source + "\n" + planted)
