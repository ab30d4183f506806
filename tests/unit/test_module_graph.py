"""The client package's module graph: acyclic, and ``import cloudmodal`` stays light.

The graph counts every ``import`` of a ``cloudmodal`` module written in the package's top-level modules —
at module level, under ``if TYPE_CHECKING:`` and inside functions alike — so a cycle cannot hide behind a
function-level import or a typing-only one. The layers below (``cloudmodal.client``, ``server``, ``worker``,
``cli``) are reached only lazily by design and are not part of this graph.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cloudmodal

PACKAGE = Path(cloudmodal.__file__).parent
# the modules of the public API that the private ones sit below
CORE = {"app", "functions", "partial_function"}


def _imports(path: Path) -> set[str]:
    """Top-level ``cloudmodal`` modules (``cloudmodal.<name>``, by ``<name>``) that ``path`` imports anywhere."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "cloudmodal":
                names = [f"cloudmodal.{a.name}" for a in node.names]
            else:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "cloudmodal" and len(parts) > 1:
                out.add(parts[1])
    return out


def _graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & modules.keys() - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_graph_sees_the_modules_and_their_imports():
    graph = _graph()
    assert CORE <= graph.keys()
    assert {"functions", "_partial", "_options", "_spec_build", "_registry"} <= graph["app"]
    assert "_user_class" in graph["functions"]  # a function-level import would count as well


def test_the_package_modules_import_each_other_without_a_cycle():
    assert _cycle(_graph()) is None


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_lower_modules_do_not_know_the_app():
    graph = _graph()
    for low in ("functions", "partial_function", "_partial", "_user_class", "_web_decorators", "_options"):
        assert not graph[low] & {"app", "_spec_build", "_registry"}, low
    assert not graph["_partial"] & {"functions", "partial_function"}
    assert "image" not in graph["image_render"]


def test_import_cloudmodal_loads_no_event_loop_or_validation_library(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import cloudmodal
            print(sorted(m for m in ("asyncio", "pydantic", "cloudmodal.client") if m in sys.modules))
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout
