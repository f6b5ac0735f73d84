"""The package's layers import only downward, and only the asyncio edge
imports asyncio, grpclib or h2 (read from the source, not from a run)."""

from __future__ import annotations

import ast
from pathlib import Path

import boxfiles

SRC = Path(boxfiles.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent

#: Lowest first. A module may import its own package's modules and anything
#: in a lower layer; never a higher layer, nor a sibling on its own layer.
LAYERS = [
    {"_proto", "_errors"},
    {"_target", "_supervise", "_wire", "_api"},
    {"_aio", "_chunks", "_fs", "_tar"},
    {"_client", "_server"},
    {"_demo", "testing"},
    {"_cli", "__init__"},
    {"__main__"},
]
FOREIGN_LOOP = {"asyncio", "grpclib", "h2", "hyperframe", "hpack"}


def _unit(module: str) -> str:
    """The layered unit ``boxfiles.x.y`` belongs to: ``x`` (a package or a
    top-level module)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> dict[str, set[str]]:
    """Every boxfiles module and the modules it imports, anywhere in it
    (function-level and TYPE_CHECKING imports included)."""
    graph: dict[str, set[str]] = {}
    named: dict[str, list[tuple[str, list[str]]]] = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                named.setdefault(name, []).append((target, [a.name for a in node.names]))
    for name, imports in named.items():
        for target, names in imports:
            # "from . import _pack" imports a module, not its package.
            modules = {f"{target}.{n}" for n in names} & graph.keys()
            graph[name].update(modules or {target})
    return graph


def _layer(unit: str) -> int:
    (level,) = [i for i, units in enumerate(LAYERS) if unit in units]
    return level


def test_every_unit_has_a_layer() -> None:
    units = {_unit(name) for name in _imports()}
    assert units == set().union(*LAYERS)


def test_layers_import_only_downward() -> None:
    graph = _imports()
    wrong = []
    for name, targets in sorted(graph.items()):
        unit = _unit(name)
        for target in sorted(targets & graph.keys()):
            other = _unit(target)
            if other != unit and _layer(other) >= _layer(unit):
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = _imports()
    edges = {name: targets & graph.keys() - {name} for name, targets in graph.items()}
    # Kahn's algorithm: whatever cannot be ordered is on a cycle.
    pending = {name: len(targets) for name, targets in edges.items()}
    ready = [name for name, count in pending.items() if count == 0]
    while ready:
        done = ready.pop()
        for name, targets in edges.items():
            if done in targets:
                pending[name] -= 1
                if pending[name] == 0:
                    ready.append(name)
    assert sorted(name for name, count in pending.items() if count) == []


def test_only_the_asyncio_edge_imports_asyncio_grpclib_or_h2() -> None:
    outside = {
        f"{name} -> {target}"
        for name, targets in _imports().items()
        if _unit(name) not in {"_aio", "_proto"}
        for target in targets
        if target.split(".")[0] in FOREIGN_LOOP
    }
    assert outside == set()


def test_the_tests_mirror_the_packages() -> None:
    folders = {p.name for p in TESTS.iterdir() if (p / "__init__.py").exists()}
    assert folders - {"helpers", "bench"} == {"aio", "client", "server", "tar"}
    for folder in folders - {"helpers", "bench"}:
        assert (SRC / f"_{folder}" / "__init__.py").exists(), folder


def test_tests_share_helpers_only_through_tests_helpers() -> None:
    """No test module imports another (or the conftest): what they share is
    in tests/helpers/."""
    wrong = []
    for path in sorted(TESTS.rglob("*.py")):
        if "bench" in path.parts or "helpers" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            module = node.module or ""
            if node.level:
                allowed = module == "helpers" or module.startswith("helpers.")
            else:
                allowed = module.split(".")[0] != "tests"
            if not allowed:
                wrong.append(f"{path.relative_to(TESTS)}: {'.' * node.level}{module}")
    assert wrong == []
