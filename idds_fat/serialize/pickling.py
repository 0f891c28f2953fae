"""cloudpickle with the user's own code by value, size caps, and named failures.

Code pickled by value keeps its file name (cloudpickle 3.1 and later would
write ``<dynamic-code>``), and a call carries the source text of those files,
so a remote traceback names the user's file and shows the raising line.
"""

from __future__ import annotations

import inspect
import io
import linecache
import logging
import marshal
import os
import site
import sys
import sysconfig
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

from idds_fat.errors import ArgumentError

logger = logging.getLogger(__name__)

#: pickle's ``persistent_id`` hook: an object's persistent id, or None to pickle it as usual.
PersistentId = Callable[[Any], Any]

_registered: set[str] = set()
# (root, module name, id(module)) already looked at: a call per job must not
# resolve the path of every loaded module again (that took ~20 ms a call).
_examined: set[tuple[str, str, int]] = set()
_last_scan: dict[str, int] = {}  # root -> len(sys.modules) when it was last scanned


def _library_roots() -> list[Path]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    roots.update(sysconfig.get_paths().get(k, "") for k in ("stdlib", "purelib", "platlib"))
    roots.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    return [Path(r).resolve() for r in roots if r]


def _is_under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def register_user_modules(source_dir: str | os.PathLike | None) -> list[str]:
    """Register the user's own modules for pickling by value; return the new names.

    The user's own modules are those loaded from under ``source_dir`` (or the
    current directory when it is ``None``), except installed libraries (anything
    under the interpreter's prefixes or site-packages) and idds-fat itself. Their
    functions then travel with their code, so the node needs no copy of them on
    its ``sys.path``. ``__main__`` is always pickled by value by cloudpickle.
    """
    root = Path(source_dir or os.getcwd()).resolve()
    where = str(root)
    if _last_scan.get(where) == len(sys.modules):
        return []  # nothing imported since the last call for this root
    _last_scan[where] = len(sys.modules)
    libraries: list[Path] | None = None
    added = []
    for name, module in list(sys.modules.items()):
        if name in _registered or name == "__main__" or name.split(".")[0] == "idds_fat":
            continue
        seen = (where, name, id(module))
        if seen in _examined:
            continue
        _examined.add(seen)
        if libraries is None:
            libraries = _library_roots()
        filename = getattr(module, "__file__", None)
        if not filename or "." in name and name.split(".")[0] in _registered:
            continue
        path = Path(filename).resolve()
        if not _is_under(path, root) or any(_is_under(path, lib) for lib in libraries):
            continue
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            cloudpickle.register_pickle_by_value(module)
        except (ValueError, TypeError):  # e.g. a module not in sys.modules any more
            continue
        _registered.add(name)
        added.append(name)
    if added:
        logger.debug("pickling by value: %s", ", ".join(sorted(added)))
    return added


# Sources travel in the call's header; past this much a file goes without (its
# traceback lines still name it, only the source line is missing).
MAX_SOURCE_BYTES = 1 << 20


class _CodePickler(cloudpickle.Pickler):
    """cloudpickle that pickles code objects whole, and notes their file names.

    cloudpickle 3.1 replaces ``co_filename`` with ``<dynamic-code>`` (for
    deterministic pickles); a remote traceback then names no file. marshal keeps
    every field, and ``marshal.loads`` is all the node needs to rebuild it. The
    interpreter check (same Python major.minor on both ends) is what makes
    marshal's format safe to share.
    """

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=cloudpickle.DEFAULT_PROTOCOL)
        self.code_files: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            self.code_files.add(obj.co_filename)
            try:
                return marshal.loads, (marshal.dumps(obj),)
            except ValueError:  # a hand-made code object with unmarshallable constants
                pass
        return super().reducer_override(obj)


def _dumps(obj: Any, persistent_id: PersistentId | None = None) -> tuple[bytes, set[str]]:
    buffer = io.BytesIO()
    pickler = _CodePickler(buffer)
    if persistent_id is not None:
        # Only then: a persistent_id hook is a Python call for every object pickled.
        pickler.persistent_id = persistent_id  # type: ignore[method-assign]
    pickler.dump(obj)
    return buffer.getvalue(), pickler.code_files


def _sources(files: set[str]) -> dict[str, str]:
    """The source text of each file (a module, the ``__main__`` script, a notebook cell)."""
    sources: dict[str, str] = {}
    total = 0
    for name in sorted(files):
        # linecache also knows IPython's cells, which exist in no file.
        text = "".join(linecache.getlines(name))
        if text and total + len(text) <= MAX_SOURCE_BYTES:
            sources[name] = text
            total += len(text)
    return sources


@dataclass(frozen=True)
class PickledCall:
    """A pickled call ``(fn, args, kwargs)`` and the source of its by-value code.

    ``sources`` maps each file name that code pickled by value came from to that
    file's text; it goes into the call's header, and the node shows its lines
    in a remote traceback.
    """

    body: bytes
    sources: dict[str, str] = field(default_factory=dict)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def dumps_value(value: Any, name: str, max_bytes: int) -> bytes:
    """Pickle ``value`` (called ``name`` in messages) under a size cap.

    Raises:
        ArgumentError: it does not pickle, or its pickle is larger than ``max_bytes``.
    """
    try:
        data, _ = _dumps(value)
    except Exception as exc:
        raise ArgumentError(
            f"argument {name} cannot be pickled: {type(exc).__name__}: {exc}", name
        ) from exc
    if len(data) > max_bytes:
        raise ArgumentError(
            f"argument {name} is {_size(len(data))} pickled, over the cap of "
            f"{_size(max_bytes)} (setting max_argument_bytes)",
            name,
        )
    return data


def _named_arguments(
    fn: Callable, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> list[tuple[str, Any]]:
    """Name each argument as the function's signature does, else by position."""
    names: list[tuple[str, Any]] = []
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for i, value in enumerate(args):
        names.append((positional[i] if i < len(positional) else f"args[{i}]", value))
    names.extend(kwargs.items())
    return names


def dumps_call(
    fn: Callable,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    max_bytes: int,
    persistent_id: PersistentId | None = None,
) -> PickledCall:
    """Pickle the call ``fn(*args, **kwargs)`` as one object under a size cap.

    Returns the pickle and the source text of the code it carries by value.
    ``persistent_id`` (pickle's hook) writes some objects as references the
    node resolves (a dependency's large result, ``idds_fat.workflow.dependencies``).

    Raises:
        ArgumentError: naming the argument (or the function) that does not pickle
            or that makes the call exceed ``max_bytes``.
    """
    call = (fn, tuple(args), dict(kwargs))
    try:
        data, files = _dumps(call, persistent_id)
    except Exception:
        data, files = None, set()
    if data is not None and len(data) <= max_bytes:
        return PickledCall(data, _sources(files))
    # Something failed or is too big: find which part, so the message can name it.
    dumps_value(fn, f"function {getattr(fn, '__qualname__', fn)!r}", max_bytes)
    sizes = [(len(dumps_value(v, n, max_bytes)), n) for n, v in _named_arguments(fn, args, kwargs)]
    if data is None:  # pragma: no cover - each part pickles alone but not together
        raise ArgumentError(f"the call to {getattr(fn, '__qualname__', fn)} cannot be pickled")
    biggest, name = max(sizes) if sizes else (0, "")
    raise ArgumentError(
        f"the call's arguments are {_size(len(data))} pickled, over the cap of "
        f"{_size(max_bytes)}; the largest is {name} ({_size(biggest)}). Pass large data "
        "by file or raise max_argument_bytes",
        name or None,
    )


def dumps_job_kwargs(
    kwargs: Mapping[str, Any],
    index: int,
    max_bytes: int,
    persistent_id: PersistentId | None = None,
) -> bytes:
    """Pickle the keyword arguments of job ``index`` of a map under a size cap
    (``persistent_id`` as for :func:`dumps_call`).

    Raises:
        ArgumentError: naming ``multi_jobs_kwargs_list[index]['key']``.
    """
    if not isinstance(kwargs, Mapping):
        raise ArgumentError(
            f"multi_jobs_kwargs_list[{index}] must be a dict of keyword arguments, "
            f"not {type(kwargs).__name__}",
            f"multi_jobs_kwargs_list[{index}]",
        )
    try:
        data, _ = _dumps(dict(kwargs), persistent_id)
    except Exception:
        data = None
    if data is not None and len(data) <= max_bytes:
        return data
    for key, value in kwargs.items():
        dumps_value(value, f"multi_jobs_kwargs_list[{index}][{key!r}]", max_bytes)
    return dumps_value(dict(kwargs), f"multi_jobs_kwargs_list[{index}]", max_bytes)


def loads(data: bytes) -> Any:
    """Unpickle ``data``. Call only on bytes whose envelope was verified."""
    return cloudpickle.loads(data)
