"""The SDK may import the node; the node imports only itself and the standard library."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import idds_fat.node
from idds_fat.wrapper_source import build_wrapper

NODE_DIR = Path(idds_fat.node.__file__).parent
# Imported inside the functions that run a job (cloudpickle) or deliver over a broker (stomp.py).
LAZY_ONLY = {"cloudpickle", "stomp"}


def imports(tree: ast.AST, in_function: bool = False) -> Iterator[tuple[str, bool, int]]:
    """Every import below ``tree`` as ``(module, inside a function, line)``; relative as ``.x``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, in_function, node.lineno
        elif isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or ""), in_function, node.lineno
        function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from imports(node, in_function or function)


def refused_imports(source: str, where: str) -> list[str]:
    """What a node module (or the built wrapper) imports that it must not."""
    refused = []
    for module, in_function, line in imports(ast.parse(source, where)):
        top = module.split(".")[0]
        if (
            module.startswith(".")
            or module == "idds_fat.node"
            or module.startswith("idds_fat.node.")
        ):
            continue
        if top in sys.stdlib_module_names or (top in LAZY_ONLY and in_function):
            continue
        refused.append(f"{where}:{line}: {module}")
    return refused


def test_the_node_package_imports_only_itself_the_stdlib_and_cloudpickle_in_functions():
    paths = sorted(NODE_DIR.glob("*.py"))
    assert {p.stem for p in paths} >= {"__init__", "envelope", "spec", "errors", "main"}
    refused = [line for p in paths for line in refused_imports(p.read_text(), p.name)]
    assert not refused, "the node must run without the SDK:\n" + "\n".join(refused)


def test_the_built_wrapper_imports_the_stdlib_when_loaded_and_cloudpickle_only_in_a_job():
    source = build_wrapper().decode()
    assert not refused_imports(source, "wrapper.py")
    loaded = {module for module, in_function, _ in imports(ast.parse(source)) if not in_function}
    assert all(module.split(".")[0] in sys.stdlib_module_names for module in loaded), loaded


def test_the_import_check_refuses_the_sdk_a_third_party_module_and_an_eager_cloudpickle():
    source = (
        "import json\n"
        "import cloudpickle\n"
        "from idds_fat.errors import IddsFatError\n"
        "import requests\n"
        "from .spec import JobSpec\n"
        "def run():\n"
        "    import cloudpickle\n"
        "    from idds_fat.node.envelope import seal\n"
    )
    assert refused_imports(source, "m.py") == [
        "m.py:2: cloudpickle",
        "m.py:3: idds_fat.errors",
        "m.py:4: requests",
    ]
