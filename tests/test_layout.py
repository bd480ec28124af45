"""The house rules, checked from the code itself: one package per stage, arrows only downward, no circles,
SQL only in the store, no module with a second job's length, one slice-normal computation.

These read the source with `ast` (nothing is imported), so a rule broken in a lazily imported corner is
caught as well. The stage order is the one the README's architecture table shows.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ihd_node"

# Higher floors may import lower ones, never the reverse. Packages on one floor may import each other
# only where listed in SIDEWAYS (imaging and model share a floor: the model path uses the intracranial mask).
FLOORS: dict[str, int] = {
    "commands": 10,
    "node": 9,
    "web": 8,
    # The DICOM Conformance Statement: reads the receiver's (intake) and sender's (delivery) contexts and the
    # objects and codes the report stage creates; only `ihd-node conformance` (commands) uses it.
    "conformance": 8,
    "intake": 7,
    "monitoring": 7,  # reads vs results, drift: reads the store; web, node and commands show it
    # Builds the notices of a retraction (report's KOS and messages) and books it (store); the console (8),
    # the node (9, message files at analysis) and `ihd-node retract` (10) call it.
    "retraction": 7,
    "triage": 6,
    "imaging": 5, "model": 5,
    "report": 4,
    "delivery": 3,
    "store": 2,
    "config": 1, "sim": 1,
    # IHE ATNA audit messages (typed events -> PS3.15 XML, schema check): pure, so that every stage can build
    # its own event; the store records them (Database.audit), delivery/syslog.py sends them.
    "audit": 1,
}
SIDEWAYS = {("model", "imaging")}
SHARED_FLOOR = 0  # classes, errors, nodelog, faults, site, uids, sr_classes, charsets, values/
MAX_LINES = 520  # "about 500": past it a module has grown a second job
# SQLAlchemy names that build or run SQL; make_url (parsing a database URL in config) is not SQL.
SQL_NAMES = {"select", "insert", "update", "delete", "text", "func", "and_", "or_", "case", "exists", "Session",
             "literal", "union", "join", "outerjoin", "bindparam"}
SQL_CALLS = {"execute", "scalars", "scalar", "query", "execution_options"}


def _modules(base: Path, prefix: str) -> dict[str, Path]:
    found = {}
    for path in base.rglob("*.py"):
        parts = list(path.relative_to(base.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return {name: path for name, path in found.items() if name.startswith(prefix)}


MODULES = _modules(PACKAGE, "ihd_node")
TRAINING = _modules(ROOT / "training", "training")


def _imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of `known` that `path` imports, at any depth of the file (lazy imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def _floor(module: str) -> tuple[str, int]:
    parts = module.split(".")
    package = parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOORS) else ""
    return package, FLOORS.get(package, SHARED_FLOOR)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("tree", ["ihd_node", "training"])
def test_no_import_circles(tree: str) -> None:
    known = MODULES if tree == "ihd_node" else TRAINING
    graph = {name: _imports(path, known) - {name} for name, path in known.items()}
    # A package face re-exporting its own modules is not a circle with them (Python imports the face first).
    for name in graph:
        graph[name] = {m for m in graph[name] if not (known[name].name == "__init__.py" and m.startswith(name + "."))}
    assert _circles(graph) == []


def test_imports_go_only_downward() -> None:
    upward = []
    for name, path in MODULES.items():
        if name in ("ihd_node.__main__",):
            continue  # `python -m ihd_node` enters at the top by definition
        package, floor = _floor(name)
        for target in _imports(path, MODULES):
            target_package, target_floor = _floor(target)
            if target_package == package or (package, target_package) in SIDEWAYS or floor == SHARED_FLOOR:
                continue  # within a package, a listed sideways arrow, or among the shared modules (circles aside)
            if target_floor >= floor:
                upward.append(f"{name} (floor {floor}) -> {target} (floor {target_floor})")
    assert upward == []


def test_no_module_over_about_500_lines() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    long.update({name: n for name, path in TRAINING.items() if (n := len(path.read_text().splitlines())) > MAX_LINES})
    assert long == {}


def test_sql_only_in_the_store() -> None:
    outside = defaultdict(list)
    for name, path in MODULES.items():
        if name.startswith("ihd_node.store"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sqlalchemy"):
                bad = [a.name for a in node.names if a.name in SQL_NAMES or node.module.startswith("sqlalchemy.orm")]
                if bad:
                    outside[name].append(f"imports {', '.join(bad)} from {node.module}")
            elif isinstance(node, ast.Import) and any(a.name.startswith("sqlalchemy") for a in node.names):
                outside[name].append("imports sqlalchemy")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in SQL_CALLS and _looks_like_a_session(node.func.value)):
                outside[name].append(f"calls .{node.func.attr}() on line {node.lineno}")
    assert dict(outside) == {}


def _looks_like_a_session(value: ast.expr) -> bool:
    """`session.execute(...)`, `s.scalars(...)`, `conn.execute(...)`, `self.db.session().execute(...)`."""
    text = ast.unparse(value)
    return any(word in text for word in ("session", "conn", "engine")) or text in ("s", "c")


def test_one_slice_normal_computation() -> None:
    """The slice normal (row x column direction cosines) is computed in one function of imaging.

    The phantom generator builds its own scanner geometry (it makes the headers, it does not read them).
    """
    places = []
    for name, path in MODULES.items():
        if name.startswith("ihd_node.sim"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("np.cross", "numpy.cross"):
                places.append(f"{name}:{node.lineno}")
    assert len(places) == 1, places
    assert places[0].startswith("ihd_node.imaging.headers:"), places
