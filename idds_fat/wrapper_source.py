"""Where the job wrapper lives, and the wrapper loaded as a module.

The wrapper is one self-contained file. A wheel carries it as
``idds_fat/_wrapper/wrapper.py``; a source checkout (editable install) has it at
``wrapper/wrapper.py`` beside the package. The SDK ships its bytes to jobs
through the cache, and imports it here because it also defines the envelope
format, so the caller and the node can never disagree about it.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import ModuleType

_CANDIDATES = (
    Path(__file__).parent / "_wrapper" / "wrapper.py",
    Path(__file__).parent.parent / "wrapper" / "wrapper.py",
)


@functools.cache
def wrapper_path() -> Path:
    """Return the path of the wrapper file this SDK ships.

    Raises:
        FileNotFoundError: the installation is missing the wrapper.
    """
    for candidate in _CANDIDATES:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"idds-fat wrapper not found in {[str(c) for c in _CANDIDATES]}")


@functools.cache
def wrapper_bytes() -> bytes:
    """Return the wrapper file's bytes (what jobs run)."""
    return wrapper_path().read_bytes()


def launch_command(python: str, wrapper_file: Path) -> list[str]:
    """Return the command that runs ``wrapper_file`` as a job (arguments follow it).

    The wrapper is imported as a module rather than run as a script, so its
    bytecode is cached in ``__pycache__`` beside it: compiling the ~1,200 lines
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


@functools.cache
def wrapper_module() -> ModuleType:
    """Return the wrapper loaded as the module ``idds_fat_wrapper`` (loaded once)."""
    spec = importlib.util.spec_from_file_location("idds_fat_wrapper", wrapper_path())
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
