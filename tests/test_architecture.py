"""The package's shape: no import cycles, no module writing another object's private state, torch-free modules
that stay torch-free.

The import graph and the attribute writes are read from the source with ``ast`` (every import statement, at
module level and inside functions, and ``importlib.import_module`` over constant names), so the checks see the
imports that run late as well as the early ones. An edge goes to the module named, not to its parent packages
(Python has begun importing those already); imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator, Optional

import crd_fast

PACKAGE_DIR = Path(crd_fast.__file__).resolve().parent
ROOT = PACKAGE_DIR.parent
REPO = Path(__file__).resolve().parents[1]  # the checkout: docs/ is not installed with the package

#: Import cycles being removed on other branches right now, each as the set of modules of one strongly
#: connected component. Empty this once those branches are merged: a listed cycle that no longer exists
#: fails the test, so the list cannot go stale.
KNOWN_CYCLES: tuple[frozenset[str], ...] = ()

#: (module, "Owner._attr") writes of another object's underscored attribute being removed on other branches.
#: Same rule as KNOWN_CYCLES: empty it after merging; an entry that no longer occurs fails the test.
KNOWN_PRIVATE_WRITES: frozenset[tuple[str, str]] = frozenset()

#: Modules that must import without torch (the ONNX runtime, metrics, reports and the CLI's --help run on
#: machines without it).
TORCH_FREE_MODULES = (
    "crd_fast",
    "crd_fast.choices",
    "crd_fast.detector",
    "crd_fast.detector.config",
    "crd_fast.scoring",
    "crd_fast.scoring.registry",
    "crd_fast.selection",
    "crd_fast.selection.plan",
    "crd_fast.selection.record",
    "crd_fast.detector.reservoir",
    "crd_fast.io",
    "crd_fast.io.atomic",
    "crd_fast.io.commit",
    "crd_fast.io.outputs",
    "crd_fast.io.paths",
    "crd_fast.io.safety",
    "crd_fast.io.images",
    "crd_fast.io.tensors",
    "crd_fast.postprocess",
    "crd_fast.postprocess.results",
    "crd_fast.metrics.thresholds",
    "crd_fast.evaluation",
    "crd_fast.metrics.scores",
    "crd_fast.deploy",
    "crd_fast.deploy.runtime",
    "crd_fast.deploy.metadata",
    "crd_fast.deploy.imaging",
    "crd_fast.report",
    "crd_fast.report.figures",
    "crd_fast.report.overlay",
    "crd_fast.report.run_info",
    "crd_fast.evaluation.results",
    "crd_fast.metrics",
    "crd_fast.metrics.scores",
    "crd_fast.metrics.thresholds",
    "crd_fast.metrics.pixels",
    "crd_fast.report.writer",
    "crd_fast.cli.options",
    "crd_fast.cli.main",
    "crd_fast.benchmark",
    "crd_fast.benchmark.config",
    "crd_fast.benchmark.machine",
    "crd_fast.benchmark.table",
    "crd_fast.benchmark.timing",
)


# ---- reading the package -------------------------------------------------------------------------------------
def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of crd_fast: name -> (file, parsed source)."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        out[module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return out


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:``: imports for annotations only, never executed."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skip.update(id(n) for n in ast.walk(child))
    return skip


def _binds(package_tree: ast.Module, name: str) -> bool:
    """Whether a package's ``__init__`` defines ``name`` (or can: a module ``__getattr__`` serves any name)."""
    for stmt in package_tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.ClassDef)) and stmt.name in (name, "__getattr__"):
            return True
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) and any(
            (a.asname or a.name.split(".")[0]) == name for a in stmt.names
        ):
            return True
        for target in _targets(stmt):
            if any(isinstance(t, ast.Name) and t.id == name for t in ast.walk(target)):
                return True
    return False


def imported_modules(
    name: str, path: Path, tree: ast.Module, modules: dict[str, tuple[Path, ast.Module]]
) -> Iterator[tuple[str, int]]:
    """(crd_fast module, line) for every import of a package module in ``tree``, at any depth.

    ``from pkg import x`` imports ``pkg.x`` when that is a module, else ``pkg`` when its ``__init__``
    defines x (else x is a compiled submodule, ``_C`` or ``_crd_head_cpu``: a leaf, no edge);
    ``importlib.import_module("crd_fast...")`` with a constant name counts too.
    """
    known = set(modules)
    tables = _string_tables(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "crd_fast":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    yield sub, node.lineno
                elif base in known and (alias.name == "*" or _binds(modules[base][1], alias.name)):
                    yield base, node.lineno
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if called == "import_module" and node.args:
                anchor = name if len(node.args) > 1 else package  # import_module(".x", __name__)
                for target in _import_module_names(node.args[0], tables):
                    if target.startswith("."):
                        level = len(target) - len(target.lstrip("."))
                        parts = anchor.split(".")
                        target = ".".join(parts[: len(parts) - (level - 1)] + [target.lstrip(".")])
                    if target in known:
                        yield target, node.lineno


def _string_tables(tree: ast.Module) -> dict[str, list[str]]:
    """Module-level dicts of string values (``_LAZY = {"name": ".module"}``): name -> values."""
    out = {}
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and isinstance(stmt.value, ast.Dict):
            values = [v.value for v in stmt.value.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            for target in _targets(stmt):
                if isinstance(target, ast.Name) and len(values) == len(stmt.value.values):
                    out[target.id] = values
    return out


def _import_module_names(arg: ast.expr, tables: dict[str, list[str]]) -> list[str]:
    """The module names an ``import_module`` argument can take: a constant, ``TABLE[key]`` or ``f".{TABLE[key]}"``
    over a module-level table of strings; anything else is not followed."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.Subscript) and isinstance(arg.value, ast.Name):
        return list(tables.get(arg.value.id, []))
    if (
        isinstance(arg, ast.JoinedStr)
        and len(arg.values) == 2
        and isinstance(arg.values[0], ast.Constant)
        and isinstance(arg.values[1], ast.FormattedValue)
    ):
        return [arg.values[0].value + v for v in _import_module_names(arg.values[1].value, tables)]
    return []


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported package module: first line}; a module importing itself is left out."""
    modules = package_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, (path, tree) in modules.items():
        edges: dict[str, int] = {}
        for target, line in imported_modules(name, path, tree, modules):
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (each one holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
                out.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def one_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle through the first module of ``component`` (breadth-first), closed: [a, ..., a]."""
    members, start = set(component), component[0]
    parent: dict[str, Optional[str]] = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {component}")  # a component always has one


def describe_cycle(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def private_writes() -> list[tuple[str, str, int]]:
    """(module, "Owner._attr", line) for every write of an underscored attribute of another object.

    A write is an assignment (plain, augmented, annotated, or ``setattr`` with a constant name) to
    ``X._attr`` where X is not ``self``/``cls``. Allowed: inside a class, writes of an attribute that class
    itself keeps (``self._attr`` assigned in its methods, or ``_attr`` in its body), as in a classmethod
    that builds an instance or a method merging another instance of the same class. Dunder names are not
    private state.
    """
    found = []
    for name, (_, tree) in package_modules().items():
        found.extend((name, attr, line) for attr, line in _writes_in(tree.body, own=frozenset()))
    return found


def _is_private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return node.targets
    return [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []


def _class_attributes(cls: ast.ClassDef) -> frozenset[str]:
    """What a class keeps: ``self._x`` / ``cls._x`` written in its methods and names assigned in its body."""
    own = {t.id for stmt in cls.body for target in _targets(stmt) for t in ast.walk(target) if isinstance(t, ast.Name)}
    for node in ast.walk(cls):
        for target in _targets(node):
            own.update(
                t.attr
                for t in ast.walk(target)
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in ("self", "cls")
            )
    return frozenset(own)


def _written_attributes(node: ast.AST) -> Iterator[tuple[ast.expr, str]]:
    """(object, attribute name) of each attribute this statement or call writes."""
    for target in _targets(node):
        for t in ast.walk(target):  # tuple unpacking: a, b._x = ...
            if isinstance(t, ast.Attribute) and isinstance(t.ctx, ast.Store):
                yield t.value, t.attr
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "setattr"
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    ):
        yield node.args[0], node.args[1].value


def _writes_in(body: list[ast.stmt], own: frozenset[str]) -> Iterator[tuple[str, int]]:
    for stmt in body:
        if isinstance(stmt, ast.ClassDef):
            yield from _writes_in(stmt.body, own | _class_attributes(stmt))
            continue
        for node in _walk_outside_classes(stmt):
            for obj, attr in _written_attributes(node):
                if not _is_private(attr) or (isinstance(obj, ast.Name) and obj.id in ("self", "cls")):
                    continue
                if attr in own:
                    continue
                yield f"{ast.unparse(obj)}.{attr}", node.lineno
        for inner in _classes_inside(stmt):
            yield from _writes_in(inner.body, own | _class_attributes(inner))


def _walk_outside_classes(node: ast.AST) -> Iterator[ast.AST]:
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, ast.ClassDef):
            yield from _walk_outside_classes(child)


def _classes_inside(node: ast.AST) -> Iterator[ast.ClassDef]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            yield child
        else:
            yield from _classes_inside(child)


# ---- the checks ----------------------------------------------------------------------------------------------
def test_the_graph_sees_module_and_function_level_imports() -> None:
    """The reader itself: relative and absolute, module-level and late imports all become edges."""
    graph = import_graph()
    assert "crd_fast.ops.reference" in graph["crd_fast.benchmark.paths"]  # from ..ops import reference
    assert "crd_fast.detector.detector" in graph["crd_fast.cli.fit"]  # inside a function
    assert "crd_fast.ops.operands" in graph["crd_fast.ops.cuda_dispatch"]  # from .operands import ...
    assert "crd_fast.evaluation.mvtec" in graph["crd_fast.evaluation"]  # from . import mvtec, in __getattr__
    assert "crd_fast.io.tensors" in graph["crd_fast.io.images"]  # from .tensors import ...
    assert "crd_fast.deploy.export" in graph["crd_fast.deploy"]  # import_module(f".{_LAZY[name]}", __name__)
    assert "crd_fast.scorers" in graph["crd_fast"]  # import_module(_LAZY[name], __name__)
    assert all(name not in edges for name, edges in graph.items())


def test_cycle_finder_reports_a_cycle() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e": 5}}
    (component,) = strongly_connected(graph)
    assert component == ["a", "b", "c"]
    cycle = one_cycle(graph, component)
    assert cycle == ["a", "b", "c", "a"]
    assert describe_cycle(graph, cycle) == "a (line 1) -> b (line 2) -> c (line 3) -> a"


def test_no_import_cycles() -> None:
    graph = import_graph()
    components = strongly_connected(graph)
    found = {frozenset(c) for c in components}
    new = [c for c in components if frozenset(c) not in KNOWN_CYCLES]
    stale = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    problems = [f"import cycle: {describe_cycle(graph, one_cycle(graph, c))}" for c in new]
    problems += [f"KNOWN_CYCLES lists {c}, which is no longer a cycle: remove it" for c in stale]
    assert not problems, "\n".join(problems)


# ---- layers: every package imports only packages below it (docs/DESIGN.md "Layers") ---------------------------
#: Modules outside the layers: the lazy facade and the ``python -m crd_fast`` entry point.
OUTSIDE_LAYERS = ("crd_fast", "crd_fast.__main__")


def design_layers() -> list[list[str]]:
    """The layer block of docs/DESIGN.md "Layers", top to bottom: one list of package names per line."""
    design = REPO / "docs" / ("DESIGN" + ".md")  # spelt so tests/test_docs.py does not read it as a citation
    text = design.read_text(encoding="utf-8")
    section = text.split("### Layers\n", 1)[1].split("\n#", 1)[0]
    lines = [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]
    return [line.split() for line in lines]


def package_of(module: str) -> str:
    """The top-level package (or module, e.g. choices) of crd_fast that ``module`` belongs to."""
    return module.split(".")[1] if module.count(".") >= 1 else module


def layer_violations(graph: dict[str, dict[str, int]], layers: list[list[str]]) -> list[str]:
    """Every import of a package on the same line or a higher one, as "module (line N) -> imported"."""
    height = {pkg: len(layers) - i for i, line in enumerate(layers) for pkg in line}
    out = []
    for module, edges in sorted(graph.items()):
        if module in OUTSIDE_LAYERS:
            continue
        here = package_of(module)
        for target, line in sorted(edges.items()):
            there = package_of(target)
            if there != here and (target in OUTSIDE_LAYERS or height[there] >= height[here]):
                out.append(f"{module} (line {line}) -> {target}: {here!r} may not import {there!r}")
    return out


def test_the_layer_block_names_every_package_once() -> None:
    layers = design_layers()
    listed = [pkg for line in layers for pkg in line]
    found = sorted({package_of(m) for m in package_modules() if m not in OUTSIDE_LAYERS})
    assert sorted(listed) == found and len(set(listed)) == len(listed), (listed, found)


def test_the_layer_check_can_fail() -> None:
    graph = {"crd_fast.io.a": {"crd_fast.core.b": 3}, "crd_fast.core.b": {"crd_fast.core.c": 4, "crd_fast.io.a": 5}}
    assert layer_violations(graph, [["core"], ["io"]]) == ["crd_fast.io.a (line 3) -> crd_fast.core.b: 'io' may not "
                                                          "import 'core'"]  # fmt: skip
    assert len(layer_violations(graph, [["core", "io"]])) == 2  # the same line: refused both ways


def test_packages_import_only_packages_below_them() -> None:
    problems = layer_violations(import_graph(), design_layers())
    assert not problems, 'imports against docs/DESIGN.md "Layers":\n' + "\n".join(problems)


def test_private_write_finder() -> None:
    source = textwrap.dedent("""
        class A:
            def __init__(self):
                self._x = 1
            @classmethod
            def make(cls):
                a = cls.__new__(cls)
                a._x = 2            # A's own attribute: allowed
                return a
            def poke(self, b):
                b._y += 1           # not A's: flagged
        def f(d):
            d._sample, d.ok = [], 1  # flagged
            setattr(d, "_seen", 0)   # flagged
            d.__doc__ = "fine"       # dunder: not private state
            d.public = 1
    """)
    tree = ast.parse(source)
    assert sorted(_writes_in(tree.body, frozenset())) == [("b._y", 11), ("d._sample", 13), ("d._seen", 14)]


def test_no_module_writes_another_objects_private_attributes() -> None:
    writes = private_writes()
    seen = {(module, attr) for module, attr, _ in writes}
    new = [
        f"{module} line {line}: writes {attr}"
        for module, attr, line in writes
        if (module, attr) not in KNOWN_PRIVATE_WRITES
    ]
    stale = [
        f"KNOWN_PRIVATE_WRITES lists {entry}, which no longer occurs: remove it"
        for entry in sorted(KNOWN_PRIVATE_WRITES - seen)
    ]
    assert not new + stale, "\n".join(new + stale)


NO_TORCH = textwrap.dedent("""
    import contextlib, importlib, io, json, sys, tempfile

    class BlockTorch:  # any "import torch" now raises ImportError, as on a machine without torch
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"{name} is blocked in this test")

    # A finder, not sys.modules["torch"] = None: scipy.stats reads sys.modules["torch"] and fails on None.
    sys.meta_path.insert(0, BlockTorch())
    for name in json.loads(sys.argv[1]):
        importlib.import_module(name)

    # --help of the command and of every subcommand
    import argparse
    from crd_fast.cli.main import COMMANDS, main

    class Names:  # collects the command names the modules register
        names = []
        def add_parser(self, name, **kwargs):
            self.names.append(name)
            return argparse.ArgumentParser()
    for command in COMMANDS:
        command.register(Names())
    helps = {}
    for argv in [["--help"]] + [[name, "--help"] for name in Names.names]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(argv)
        helps[" ".join(argv)] = len(out.getvalue())

    # a report with a PNG written to disk, and a labelled threshold
    import numpy as np
    from crd_fast.postprocess import f1_threshold
    from crd_fast.report import CategoryResult, RunInfo, write_report
    from crd_fast.report.overlay import heatmap_overlay, save_png
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 0, 1, 1, 1])
    maps = rng.random((6, 16, 16)).astype(np.float32)
    masks = np.zeros((6, 16, 16), dtype=np.uint8)
    masks[3:, 4:9, 4:9] = 1
    maps[3:, 4:9, 4:9] += 1.0
    scores = maps.reshape(6, -1).max(axis=1)
    images = (rng.random((6, 16, 16, 3)) * 255).astype(np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        save_png(tmp + "/overlay.png", heatmap_overlay(images[3], maps[3]))
        write_report(tmp, [CategoryResult("cat", labels, scores, masks, maps, images)], RunInfo(weights="random"))
    threshold = f1_threshold(scores, labels)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))
    print(json.dumps({"helps": helps, "threshold": float(threshold), "torch_modules": loaded}))
""")


def test_torch_free_modules_import_and_work_without_torch() -> None:
    """Import the torch-free modules, print every --help, write a PNG report and choose a threshold, with torch
    made unimportable."""
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, json.dumps(TORCH_FREE_MODULES)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch_modules"] == []
    from crd_fast.cli.main import COMMANDS

    assert len(out["helps"]) == 1 + len(COMMANDS) and min(out["helps"].values()) > 200  # real help text
    assert out["threshold"] > 0


def test_the_no_torch_check_can_fail() -> None:
    """The same subprocess set-up rejects a module that does need torch (so the check above is not vacuous)."""
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, json.dumps(["crd_fast.detector.detector"])],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )
    assert proc.returncode != 0 and "torch" in proc.stderr
