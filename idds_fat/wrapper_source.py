"""The job wrapper: the one file jobs run, built from the ``idds_fat.node`` package.

A node gets one self-contained file (a batch slot, a container, a PanDA pilot
run it alone): the modules of ``idds_fat/node`` in the order of their imports,
with their imports of each other removed and their standard-library imports
gathered at the top. The SDK builds it from the package's sources when it
first needs it (an editable checkout and a wheel alike; nothing to
regenerate), puts its bytes into the cache under their sha256 and launches
jobs on it. The build is deterministic, so the same sources give the same
file and the same cache key.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
from pathlib import Path

from idds_fat.workdir import WorkflowPaths, private_dir, write_private

NODE_DIR = Path(__file__).parent / "node"
_NODE_PACKAGE = "idds_fat.node"


def _intra_package_module(node: ast.ImportFrom) -> str | None:
    """The node module ``node`` imports from (``from .x import ...``), else None."""
    if node.level == 1 and node.module:
        return node.module
    if node.level == 0 and (node.module or "").startswith(_NODE_PACKAGE + "."):
        return node.module[len(_NODE_PACKAGE) + 1 :]
    return None


def _build_order(imports: dict[str, set[str]]) -> list[str]:
    """The modules in an order where each follows those it imports (ties by name)."""
    order: list[str] = []
    waiting = {name: set(deps) for name, deps in imports.items()}
    while waiting:
        ready = sorted(name for name, deps in waiting.items() if not deps - set(order))
        if not ready:
            raise ValueError(f"idds_fat/node: circular imports among {sorted(waiting)}")
        order.append(ready[0])
        del waiting[ready[0]]
    return order


class _NodeModule:
    """One module of the node package, read for the build."""

    def __init__(self, path: Path) -> None:
        self.name = path.stem
        self.where = f"idds_fat/node/{path.name}"
        self.lines = path.read_text(encoding="utf-8").splitlines()
        self.tree = ast.parse("\n".join(self.lines), filename=self.where)
        self.summary = (ast.get_docstring(self.tree) or "").split("\n", 1)[0]
        self.imports: dict[str, list[str]] = {}  # node module -> names taken from it
        self.stdlib: list[ast.Import | ast.ImportFrom] = []  # top-level, hoisted
        self.defines: set[str] = set()
        self._dropped: set[int] = set()
        for index, statement in enumerate(self.tree.body):
            if index == 0 and isinstance(statement, ast.Expr) and self.summary:
                self._drop(statement)  # the docstring: its first line heads the section
            elif isinstance(statement, ast.ImportFrom) and statement.module == "__future__":
                self._drop(statement)
            elif isinstance(statement, ast.ImportFrom) and _intra_package_module(statement):
                self._take(statement)
            elif isinstance(statement, (ast.Import, ast.ImportFrom)):
                self.stdlib.append(statement)
                self._drop(statement)
            else:
                self.defines.update(_bound_names(statement))
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                wrong = any(alias.name.startswith(_NODE_PACKAGE) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                wrong = (node.level and not node.module) or (
                    _intra_package_module(node) is not None and node not in self.tree.body
                )
            else:
                continue
            if wrong:
                raise ValueError(
                    f"{self.where}:{node.lineno}: import node modules' names at the top, "
                    "as 'from .module import name' (the built file has no modules)"
                )

    def _drop(self, statement: ast.stmt) -> None:
        self._dropped.update(range(statement.lineno, statement.end_lineno + 1))

    def _take(self, statement: ast.ImportFrom) -> None:
        module = _intra_package_module(statement)
        for alias in statement.names:
            if alias.asname or alias.name == "*":
                raise ValueError(
                    f"{self.where}:{statement.lineno}: import names of node modules as they "
                    "are (one file shares one namespace)"
                )
        self.imports.setdefault(module, []).extend(alias.name for alias in statement.names)
        self._drop(statement)

    def section(self) -> str:
        """The module's code without its docstring and imports, headed by its name."""
        kept = [line for number, line in enumerate(self.lines, 1) if number not in self._dropped]
        text = "\n".join(kept).strip("\n")
        while "\n\n\n\n" in text:
            text = text.replace("\n\n\n\n", "\n\n\n")
        heading = f"# --- {self.where} ".ljust(88, "-")
        if self.summary:
            heading += f"\n# {self.summary}"
        return f"{heading}\n\n{text}\n"


def _bound_names(statement: ast.stmt) -> set[str]:
    """The names a top-level statement binds."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    targets: list[ast.expr] = []
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, (ast.AnnAssign, ast.AugAssign)):
        targets = [statement.target]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def _hoisted_imports(modules: list[_NodeModule]) -> list[str]:
    """The modules' top-level imports as one sorted block; a name bound twice is refused."""
    plain: set[str] = set()
    taken: dict[str, set[str]] = {}
    for module in modules:
        for statement in module.stdlib:
            names = [a.name + (f" as {a.asname}" if a.asname else "") for a in statement.names]
            if isinstance(statement, ast.Import):
                plain.update(names)
            else:
                taken.setdefault(statement.module or "", set()).update(names)
    lines = [f"import {name}" for name in sorted(plain)]
    lines += [f"from {m} import {', '.join(sorted(names))}" for m, names in sorted(taken.items())]
    return lines


def _check_namespace(modules: list[_NodeModule]) -> None:
    """Refuse a name two modules define, or one imported from a module that lacks it."""
    owner: dict[str, str] = {}
    for module in modules:
        for statement in module.stdlib:
            for alias in statement.names:
                owner.setdefault((alias.asname or alias.name).split(".")[0], "(import)")
    by_name = {module.name: module for module in modules}
    for module in modules:
        for name in sorted(module.defines):
            if owner.setdefault(name, module.where) != module.where:
                raise ValueError(f"{module.where} defines {name}, as does {owner[name]}")
        for source, names in module.imports.items():
            if source not in by_name:
                raise ValueError(f"{module.where} imports .{source}, not a node module")
            missing = sorted(set(names) - by_name[source].defines)
            if missing:
                raise ValueError(f"{module.where} imports {missing} that .{source} lacks")


def build_wrapper(node_dir: Path = NODE_DIR) -> bytes:
    """Return the one-file wrapper built from the node package in ``node_dir``.

    Raises:
        ValueError: the package cannot share one namespace (a name defined
            twice, an aliased or lazy import of another node module, a
            circular import).
    """
    modules = {
        path.stem: _NodeModule(path)
        for path in sorted(Path(node_dir).glob("*.py"))
        if path.stem != "__init__"
    }
    order = _build_order({name: set(module.imports) for name, module in modules.items()})
    ordered = [modules[name] for name in order]
    _check_namespace(ordered)
    package_doc = ast.get_docstring(ast.parse((Path(node_dir) / "__init__.py").read_bytes()))
    if not package_doc or "\\" in package_doc or '"""' in package_doc:
        raise ValueError("idds_fat/node/__init__.py needs a plain docstring")
    note = (
        "Built from the modules of ``idds_fat/node`` by ``idds_fat.wrapper_source``, in\n"
        f"this order: {', '.join(order)}. Edit those, not this file."
    )
    parts = [
        "#!/usr/bin/env python3",
        f'"""{package_doc}\n\n{note}\n"""',
        "",
        "from __future__ import annotations",
        "",
        *_hoisted_imports(ordered),
        "",
        "",
        "\n\n".join(module.section() for module in ordered),
    ]
    return "\n".join(parts).encode("utf-8")


@functools.cache
def wrapper_bytes() -> bytes:
    """Return the wrapper file's bytes (what jobs run), built once per process."""
    return build_wrapper()


def wrapper_file(directory: Path) -> Path:
    """Write the wrapper into ``directory`` as ``wrapper_HASH.py`` (unless there); return its path.

    The name is a module name, so jobs can import it (``launch_command``).
    """
    data = wrapper_bytes()
    path = WorkflowPaths(Path(directory)).wrapper(hashlib.sha256(data).hexdigest())
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write_private(tmp, data)  # 0600, like everything in a workflow dir
        os.replace(tmp, path)
    # Made here 0700: the jobs importing the wrapper would make it under their umask.
    private_dir(path.parent / "__pycache__")
    return path


def launch_command(python: str, wrapper_file: Path) -> list[str]:
    """Return the command that runs ``wrapper_file`` as a job (arguments follow it).

    The wrapper is imported as a module rather than run as a script, so its
    bytecode is cached in ``__pycache__`` beside it: compiling the ~1,500 lines
    again would cost every cold job ~8 ms. The file's name must therefore be a
    valid module name (``wrapper_HASH.py``). Its directory leaves ``sys.path``
    before the job runs.
    """
    wrapper_file = Path(wrapper_file)
    if not wrapper_file.stem.isidentifier():
        raise ValueError(f"the wrapper file name must be a module name, not {wrapper_file.name}")
    # The cache is written even under PYTHONDONTWRITEBYTECODE: it lives in our
    # own work dir, beside our own file, and jobs run as the user's code wants.
    code = (
        f"import sys; sys.path.insert(0, {str(wrapper_file.parent)!r}); "
        f"b = sys.dont_write_bytecode; sys.dont_write_bytecode = False; "
        f"import {wrapper_file.stem} as w; sys.path.pop(0); sys.dont_write_bytecode = b; "
        f"sys.exit(w.main())"
    )
    return [python, "-c", code]
