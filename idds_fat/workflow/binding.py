"""A call's arguments checked against its function's signature, before any job exists.

::

    add(1, 2, 3)  ->  check_call: inspect.signature(add).bind(1, 2, 3)
                  ->  SignatureError (a TypeError) at the call site, nothing stored or submitted

A call that does not fit (too many arguments, an unknown keyword, a map entry
with a wrong key) would otherwise raise on the node after a whole job round
trip: minutes on a batch backend. Ray checks its remote calls the same way.
Only the shape is checked (which parameters get a value), never the values, so
a future given as an argument binds like any other value. A function whose
signature cannot be read (some builtins and C callables) is not checked.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from idds_fat.errors import SignatureError


def check_call(
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    kwargs_list: Iterable[Any] | None = None,
) -> None:
    """Check that ``fn(*args, **kwargs)`` binds, or ``fn(*args, **{**kwargs, **k})`` for
    each ``k`` of ``kwargs_list`` (as the node merges them: an entry's key wins).

    Raises:
        SignatureError: the first call that does not fit, naming the function, its
            signature and the entry (``kwargs list entry 3``).
    """
    signature = _signature(fn)
    if signature is None:
        return
    if kwargs_list is None:
        _bind(fn, signature, args, kwargs, None)
        return
    shapes: set[frozenset[str]] = set()  # entries with the same keys bind alike
    for index, entry in enumerate(kwargs_list):
        where = f"kwargs list entry {index}"
        if not isinstance(entry, Mapping) or not all(isinstance(k, str) for k in entry):
            raise SignatureError(
                f"{_name(fn)}(): {where} is not a mapping of argument names to values: "
                f"{type(entry).__name__}",
                _name(fn),
                where,
            )
        shape = frozenset(entry)
        if shape not in shapes:
            _bind(fn, signature, args, {**kwargs, **entry}, where)
            shapes.add(shape)


def check_elements(fn: Callable[..., Any], elements: Iterable[Sequence[Any]]) -> None:
    """Check that ``fn(*element)`` binds for each element of an ``Executor.map``.

    Raises:
        SignatureError: the first element that does not fit (``element 2``).
    """
    signature = _signature(fn)
    if signature is None:
        return
    for index, element in enumerate(elements):
        _bind(fn, signature, element, {}, f"element {index}")


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and C callables may have none to read
        return None


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _bind(
    fn: Callable[..., Any],
    signature: inspect.Signature,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    where: str | None,
) -> None:
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        name = _name(fn)
        place = f" ({where})" if where else ""
        raise SignatureError(
            f"{name}(){place}: {exc}; its signature is {name}{signature}; nothing was submitted",
            name,
            where,
        ) from None


__all__ = ["check_call", "check_elements"]
