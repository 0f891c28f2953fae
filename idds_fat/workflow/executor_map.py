"""``Workflow.map`` as ``Executor.map``: one task whose jobs each call ``fn(*element)``.

::

    map(fn, xs, ys)  ->  map_entries: fn(x, y) checked against fn's signature (binding.py),
                         one job per (x, y), its own keyword ``args=(x, y)``
                         and call_with_args(fn) as the task's function (pickled by value)
                     ->  results_in_order: each value in input order, waited for when
                         reached; jobs not started are cancelled when the iterator is left
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from idds_fat.results import AsyncResult
from idds_fat.workflow.binding import check_elements


def map_entries(
    fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...]
) -> tuple[Callable[..., Any], list[dict[str, Any]], str]:
    """Return the task ``map`` submits: its function, one entry per element, its name.

    Elements are taken as ``zip`` takes them (up to the shortest iterable).

    Raises:
        SignatureError: an element does not fit ``fn``'s signature (the first such).
    """
    elements = list(zip(*iterables, strict=False))
    check_elements(fn, elements)
    entries = [{"args": args} for args in elements]
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "function")
    return _call_with_args(fn), entries, name


def is_kwargs_list(iterable: Iterable[Any]) -> bool:
    """The deprecated ``map(fn, kwargs_list)``: a non-empty list or tuple of mappings."""
    return (
        isinstance(iterable, list | tuple)
        and len(iterable) > 0
        and all(isinstance(item, Mapping) for item in iterable)
    )


def _call_with_args(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Return a function taking ``args`` as a keyword and calling ``fn(*args)``.

    It is what ``map`` runs as one task: each job's own keyword argument is its
    element's tuple. Defined here, it is pickled by value (the node has no SDK).
    """

    def call_with_args(args: tuple[Any, ...]) -> Any:
        return fn(*args)

    return call_with_args


def results_in_order(futures: list[AsyncResult], end_time: float | None) -> Iterator[Any]:
    """Yield the futures' values in order, as CPython's ``Executor.map`` does.

    Each future is cancelled (if it has not started) once its value is taken or
    its wait failed, and the rest when the iterator is left early.
    """
    try:
        futures.reverse()  # pop from the end: a future yielded is no longer held here
        while futures:
            timeout = None if end_time is None else end_time - time.monotonic()
            yield _result_or_cancel(futures.pop(), timeout)
    finally:
        for future in futures:
            future.cancel()


def _result_or_cancel(future: AsyncResult, timeout: float | None) -> Any:
    try:
        return future.result(timeout)
    finally:
        future.cancel()  # no-op once done; after a timeout, withdraws a job still queued
