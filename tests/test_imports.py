"""How the project's modules import each other: no cycle (imports under TYPE_CHECKING and inside functions
count), the data package builds on the core and never the other way round, and the light core modules load
without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from launch_support import REPO

PACKAGES = ("fdmobilenet", "pipelines", "benchmarks")


def project_modules() -> dict[str, Path]:
    """Module name -> file: every module of the packages, and the scripts at the top level."""
    modules = {path.stem: path for path in REPO.glob("*.py")}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` (at ``path``) imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:   # `from pkg import sub`: the submodule, when it is one
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    # a script's own folder is on sys.path: benchmarks/x.py's `from common import ...` is benchmarks.common
    found = {m if m in modules or not package else f"{package}.{m}" for m in found}
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_the_walk_sees_every_kind_of_import(tmp_path):
    """The walk itself: a TYPE_CHECKING import, a function-level one, a relative one and a submodule named
    in a from-import all count, and so does a cycle they close."""
    path = tmp_path / "a.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n"
                    "def f():\n    from . import c\n")
    modules = {"pkg.a": path, "pkg.b": tmp_path / "b.py", "pkg.c": tmp_path / "c.py"}
    assert imported("pkg.a", path, modules) == {"pkg.b", "pkg.c"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_the_projects_modules():
    graph = import_graph()
    assert {"train_ddp", "fdmobilenet.loop", "fdmobilenet.engine", "pipelines", "benchmarks.common"} <= set(graph)
    assert "fdmobilenet.engine" in graph["fdmobilenet.loop"]   # the walk does see the project's imports
    assert "benchmarks.common" in graph["benchmarks.collect_results"]
    assert cycles(graph) == []


def test_the_core_never_imports_the_data_package():
    """pipelines builds on fdmobilenet (its config, cli and errors); fdmobilenet reads no data module."""
    edges = [(a, b) for a, targets in import_graph().items() if a.split(".")[0] == "fdmobilenet"
             for b in targets if b.split(".")[0] == "pipelines"]
    assert edges == []


def test_the_light_core_modules_load_without_torch():
    """config, cli and slurm_port are what a launcher, a config check or a data tool needs: no torch import
    (seconds) for them. launch/common.sh runs `python -m fdmobilenet.slurm_port` for that reason."""
    code = ("import fdmobilenet.config, fdmobilenet.cli, fdmobilenet.slurm_port; import sys; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
