"""The import structure: no cycle between modules or between packages ("rooms"), and
the CNI executable stays a leaf that nothing in the runtime imports.

Walks the source with `ast` (no module is imported): every `import` counts, also
the lazy ones inside functions, because a lazy import that closes a cycle is still a
cycle in what must be understood together. Imports under `if TYPE_CHECKING:` are
types only and don't count."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cni_plugin", "runtime", "netpolicy")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(tree: ast.AST, modules: dict[str, Path], here: str) -> set[str]:
    """The project modules `tree` imports (a name imported from a package counts as
    its submodule when one of that name exists)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in PACKAGES:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(here)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(ast.parse(path.read_text()), modules, name) for name, path in modules.items()}


def _package(module: str, graph: dict[str, set[str]]) -> str:
    """A module's room: its package (a package's own __init__ is its room)."""
    if any(other.startswith(module + ".") for other in graph):
        return module
    return module.rsplit(".", 1)[0] if "." in module else module


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Rooms and what they import. The modules directly in a package (runtime/errors.py,
    runtime/defaults.py, ...) are that package's room, so the rooms below may use
    them and they may use none of the rooms below."""
    out: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        src = _package(mod, graph)
        for dep in deps:
            dst = _package(dep, graph)
            if dst != src:
                out.setdefault(src, set()).add(dst)
    return out


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_between_packages():
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("package", ["runtime", "netpolicy"])
def test_nothing_in_the_runtime_imports_the_cni_executable(package):
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items() if m.startswith(package)
                       and any(d.startswith("cni_plugin") for d in deps))
    assert offenders == []


def test_the_cni_executable_imports_the_runtime_only_through_stdlib_modules_and_one_lazy_handler():
    """Its start path (module level) reaches only stdlib-only modules: the defaults and
    the wire format. The in-process handler is imported inside a function."""
    modules = _modules()
    allowed = {"runtime", "runtime.defaults", "runtime.wire", "runtime.errors"}
    for name, path in modules.items():
        if not name.startswith("cni_plugin"):
            continue
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        deps = _imported(ast.Module(body=top, type_ignores=[]), modules, name)
        assert {d for d in deps if not d.startswith("cni_plugin")} <= allowed, name


def _module_level_closure(start: str) -> set[str]:
    """The project modules importing `start` loads (imports inside functions aside)."""
    modules = _modules()
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        # A package's __init__ runs before any of its modules.
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in modules]
        tree = ast.parse(modules[name].read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        todo += sorted(_imported(ast.Module(body=top, type_ignores=[]), modules, name))
    return seen


@pytest.mark.parametrize("entry", ["cni_plugin.shim", "runtime.cli.main", "runtime.agent.service",
                                   "runtime.cni.handlers", "runtime.docker.http"])
def test_the_agent_and_the_cni_executable_load_neither_the_lab_nor_the_benchmarks(entry):
    """`sockgate agent` starts in runtime.cli.main; the lab (and dnslib, an extra) is
    imported only by the commands that use it (demo, lab-cleanup)."""
    loaded = _module_level_closure(entry)
    assert entry in loaded
    assert sorted(m for m in loaded if m.startswith(("runtime.lab", "runtime.bench", "tests"))) == []
