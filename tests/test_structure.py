"""The shape of relay/: what each layer may load, no import cycle, no module over 600 lines.

docs/architecture.md ("Who may import what") says why: the fan-out core is read and tested
without the server, the poll loop or Redis, and the Python client ships to backends that
run none of them.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .servers import ROOT

PACKAGE = ROOT / "relay"
MAX_LINES = 600

LAYERS = [
    ["relay", "relay.protocol", "relay.patch", "relay.retry", "relay.logs"],
    ["relay.subscriber", "relay.hub", "relay.backend"],
    ["relay.upstream"],
    ["relay.poll_loop"],
    ["relay.watches"],
    ["relay.client"],
    ["relay.config", "relay.tokens", "relay.metrics"],
    ["relay.cluster"],
    ["relay.workarounds", "relay.watchdog"],
    ["relay.service"],
    ["relay.responses", "relay.sse", "relay.ws", "relay.origins", "relay.limits"],
    ["relay.app", "relay.simulator", "relay.openapi"],
    ["relay.server", "relay.workers", "relay.cli", "relay.__main__"],
]
"""relay/ from the bottom up, as docs/architecture.md draws it: a module imports only from
its own layer and those before it (a name stands for a package and everything in it)."""
CORE = [*LAYERS[0][1:], *LAYERS[1]]
"""The vocabulary and the fan-out core: task state, events, cursors, the cluster interface."""
IO_LIBRARIES = {"httpx", "httpcore", "httptools", "starlette", "uvicorn", "redis", "websockets"}
SERVER_LIBRARIES = {"starlette", "uvicorn", "redis", "websockets", "prometheus_client"}


def loaded_by(module: str) -> set[str]:
    """The top-level packages that `import <module>` loads, in a fresh interpreter."""
    script = (
        f"import json, sys; import {module}; "
        "print(json.dumps(sorted({name.partition('.')[0] for name in sys.modules})))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module", CORE)
def test_the_core_loads_no_io_library(module: str) -> None:
    assert loaded_by(module) & IO_LIBRARIES == set()


@pytest.mark.parametrize("module", ["relay.poll_loop", "relay.upstream", "relay.watches"])
def test_the_poll_loop_upstream_and_watches_load_no_server(module: str) -> None:
    assert loaded_by(module) & SERVER_LIBRARIES == set()


def test_the_python_client_loads_nothing_of_the_server() -> None:
    assert loaded_by("relay.client") & SERVER_LIBRARIES == set()


@pytest.mark.parametrize("module", ["relay.app", "relay.cli"])
def test_the_relay_runs_without_sse_starlette(module: str) -> None:
    assert "sse_starlette" not in loaded_by(module)


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def test_no_module_is_over_600_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def runtime_imports(
    name: str, path: Path, known: set[str], *, in_functions: bool = False
) -> set[str]:
    """The relay modules `name` imports when it is imported: at module level (class bodies
    and conditions included), not under `TYPE_CHECKING`; with `in_functions`, also those
    imported when a function runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if not in_functions and isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            ):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit_all(child.orelse)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    source = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    source = child.module or ""
                found.add(source)
                found.update(f"{source}.{alias.name}" for alias in child.names)
            visit(child)

    def visit_all(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            visit(ast.Module(body=[node], type_ignores=[]))

    visit(ast.parse(path.read_text()))
    return {module for module in found if module in known and module != name}


def test_no_runtime_import_cycle() -> None:
    found = modules()
    graph = {name: runtime_imports(name, path, set(found)) for name, path in found.items()}
    assert graph["relay.hub"] >= {"relay.subscriber", "relay.protocol"}, "the graph is read"
    done: set[str] = set()

    def walk(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for imported in sorted(graph[name]):
            walk(imported, [*path, name])
        done.add(name)

    for name in sorted(graph):
        walk(name, [])


def layer_of(module: str) -> int:
    for number, layer in enumerate(LAYERS):
        # A name stands for itself and, for a sub-package of relay, all in it.
        if any(module == name or ("." in name and module.startswith(name + ".")) for name in layer):
            return number
    raise AssertionError(f"{module} is in no layer: place it in LAYERS and the docs")


def test_each_module_imports_only_from_its_layer_and_those_below() -> None:
    found = modules()
    upward = [
        f"{name} -> {imported}"
        for name, path in found.items()
        for imported in sorted(runtime_imports(name, path, set(found), in_functions=True))
        if layer_of(imported) > layer_of(name)
    ]
    assert upward == []
