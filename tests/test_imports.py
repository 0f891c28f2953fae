"""The modules of idds_fat import each other in one direction: no import cycle, lazy or not."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

import idds_fat
from idds_fat.workdir import WorkDirPaths
from idds_fat.workflow.state import WorkflowState

PACKAGE_DIR = Path(idds_fat.__file__).resolve().parent


def _module_names() -> dict[str, Path]:
    """Every module of idds_fat by dotted name (a package by its own name)."""
    names = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = ["idds_fat", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, inside functions too; not those under ``if TYPE_CHECKING:``."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _type_checking_only(node):
            yield from _imports(node.orelse)
        else:
            yield from _imports(ast.iter_child_nodes(node))


def _edges(name: str, path: Path, modules: set[str]) -> set[str]:
    """The idds_fat modules that module ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _imports(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            found.add(submodule if submodule in modules else base)
    return {target for target in found if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    """Return, for every idds_fat module, the idds_fat modules it imports."""
    names = _module_names()
    return {name: _edges(name, path, set(names)) for name, path in names.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return one cycle (``[a, b, ..., a]``) through each strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle through the group's first module (breadth first)."""
    start = min(group)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & group):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle in the group {sorted(group)}")


def test_no_module_of_idds_fat_takes_part_in_an_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_names_a_cycle_and_follows_every_import_form():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    edges = import_graph()
    # `from idds_fat.workflow import catalog` is an edge to the submodule, a lazy
    # import inside a function counts, and a TYPE_CHECKING import does not.
    assert "idds_fat.workflow.catalog" in edges["idds_fat.monitor.views"]
    assert "idds_fat.service.server" in edges["idds_fat.cli"]
    assert "idds_fat.workflow.runtime" not in edges["idds_fat.workflow.current"]


# What only a workflow's run needs: the web server, the broker client, HTTP, the runtime.
_HEAVY = ("uvicorn", "starlette", "stomp", "requests", "tenacity", "idds_fat.workflow.runtime")


def _loaded_after(code: str) -> list[str]:
    """The modules of ``_HEAVY`` in ``sys.modules`` after a fresh interpreter runs ``code``."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {_HEAVY!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_importing_the_package_loads_neither_the_runtime_nor_its_servers():
    assert _loaded_after("import idds_fat") == []
    # The probe sees them once something asks for the runtime.
    assert "idds_fat.workflow.runtime" in _loaded_after("from idds_fat import Workflow")


def test_the_status_command_loads_neither_the_runtime_nor_its_servers(tmp_path):
    workflow_id = "imports-20261130T000000-abcdef"
    paths = WorkDirPaths(tmp_path).workflow(workflow_id)
    paths.root.mkdir(parents=True)
    state = WorkflowState(paths.state)
    state.record_workflow(workflow_id, "imports", {"backend": "local"})
    state.record_task("t0001", "f", "f", [(0, "f[0]", "spec")])
    state.close()
    code = (
        "from click.testing import CliRunner\n"
        "from idds_fat.cli import main\n"
        f"for args in ([], ['imports'], ['imports', 't0001']):\n"
        f"    done = CliRunner().invoke(main, ['status', '--work-dir', {str(tmp_path)!r}, *args])\n"
        "    assert done.exit_code == 0 and 'imports' in done.output, done.output\n"
    )
    assert _loaded_after(code) == []


def test_every_public_name_resolves_and_is_listed():
    assert set(idds_fat.__all__) <= set(dir(idds_fat))
    for name in idds_fat.__all__:
        assert getattr(idds_fat, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        idds_fat.no_such_name  # noqa: B018


def test_workflow_stays_the_decorator_when_its_subpackage_loads_first():
    code = (
        "import idds_fat.workflow.catalog\n"
        "from idds_fat import Workflow, workflow\n"
        "import idds_fat.api\n"
        "assert workflow is idds_fat.api.workflow and idds_fat.workflow is workflow, workflow\n"
        "import sys\n"
        "assert Workflow is sys.modules['idds_fat.workflow'].Workflow\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
