"""The iDDS names of results: ``MapResult.get_result(name=, args=, key=)`` and the
``Work`` object's verbs (``get_results``, ``is_finished``, ``get_status``, ...).

In iDDS a job's result is found by ``name:key``, where ``key`` is the job's
``job_key`` or ``sha1(json.dumps(args, sort_keys=True))`` of its entry of
``multi_jobs_kwargs_list`` (a dict, or a tuple of positional arguments); a
lookup by ``name:key`` that misses falls back to ``key`` alone. ``return_work=True``
hands back a ``Work`` whose status is asked with ``is_finished()`` and the like;
here it is the :class:`AsyncResult` or :class:`MapResult`, which have these
verbs through the mixins below.

Unlike iDDS, a failed job is never ``None``: looking its value up raises its
exception (docs/migrating-from-idds.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from idds_fat.results.futures import AsyncResult

#: The keyword under which a job of a tuple entry receives its positional
#: arguments (``api/idds_compat.py``), and the one carrying the call's own.
POSITIONAL_ENTRY = "idds_job_args"
CALL_ARGS = "idds_call_args"

# iDDS transform statuses, as get_status() names them.
RUNNING, FINISHED, SUBFINISHED, FAILED, CANCELLED = (
    "Transforming",
    "Finished",
    "SubFinished",
    "Failed",
    "Cancelled",
)


def idds_key(arguments: Any) -> str | None:
    """Return iDDS's key of a job's arguments (``get_unique_id_for_dict``), or None
    when they are not JSON (iDDS could not key them either)."""
    try:
        return hashlib.sha1(json.dumps(arguments, sort_keys=True).encode()).hexdigest()
    except (TypeError, ValueError):
        return None


def entry_arguments(entry: Mapping[str, Any]) -> Any:
    """Return what iDDS calls a job's ``args``: its tuple for a tuple entry, else its keywords."""
    if POSITIONAL_ENTRY in entry:
        if entry[POSITIONAL_ENTRY] is not None:
            return tuple(entry[POSITIONAL_ENTRY])
        return {k: v for k, v in entry.items() if k not in (POSITIONAL_ENTRY, CALL_ARGS)}
    return dict(entry)


def task_name(future: AsyncResult) -> str:
    """Return the name of the task a job belongs to (``fn`` of ``wf/task/fn[3]``)."""
    last = future.name.rsplit("/", 1)[-1]
    return re.sub(r"\[\d+\]$", "", last)


def _details(future: AsyncResult) -> dict[str, Any]:
    return {"status": True, "error": None, "metrics": {"job": future.job, "task": future.task_id}}


class IddsAsyncResultNames:
    """iDDS's ``Work`` verbs on one job (what ``return_work=True`` returns)."""

    #: The ``job_key`` of its ``@work``, if any (iDDS's result key).
    job_key: str | None = None

    def get_status(self: AsyncResult) -> str:  # type: ignore[misc]
        """Return iDDS's status name: ``Transforming`` (not done), ``Finished``,
        ``Failed`` (raised or lost) or ``Cancelled``."""
        if not self.done():
            return RUNNING
        if self.cancelled():
            return CANCELLED
        return FAILED if self.exception() is not None else FINISHED

    def is_terminated(self: AsyncResult) -> bool:  # type: ignore[misc]
        """Whether the job ended, whichever way."""
        return self.done()

    def is_finished(self) -> bool:
        """Whether the job ended with a value."""
        return self.get_status() == FINISHED  # type: ignore[attr-defined]

    def is_subfinished(self) -> bool:
        """Always False for one job (iDDS: some jobs of a task failed)."""
        return False

    def is_failed(self) -> bool:
        """Whether the job ended without a value (raised, lost or cancelled)."""
        return self.get_status() in (FAILED, CANCELLED)  # type: ignore[attr-defined]

    def get_results(self: AsyncResult, timeout: float | None = None) -> Any:  # type: ignore[misc]
        """Return the job's value, waiting for it (iDDS's ``Work.get_results``).

        Raises what :meth:`AsyncResult.result` raises (iDDS would return None).
        """
        return self.result(timeout)

    def wait_results(self: AsyncResult, timeout: float | None = None) -> Any:  # type: ignore[misc]
        """Alias of :meth:`get_results` (iDDS's ``Work.wait_results``)."""
        return self.result(timeout)


class IddsMapResultNames:
    """iDDS's ``MapResult`` lookups and ``Work`` verbs on a task's jobs."""

    futures: list[AsyncResult]
    future_type: type[AsyncResult]  # set by MapResult: what add_result makes

    def _matches(self, name: str | None, args: Any, key: str | None) -> list[AsyncResult]:
        if key is None:
            args = tuple(args) if isinstance(args, list) else args
            wanted = [f for f in self.futures if entry_arguments(f.kwargs) == args]
        else:
            wanted = [
                f
                for f in self.futures
                if key == getattr(f, "job_key", None) or key == idds_key(entry_arguments(f.kwargs))
            ]
        named = [f for f in wanted if name is not None and task_name(f) == name]
        return named or wanted

    def _find(self, name: Any, args: Any, key: str | None) -> AsyncResult:
        if name is not None and not isinstance(name, str) and args is None:
            name, args = None, name  # idds-fat's get_result(kwargs)
        if key is None and isinstance(args, Mapping):
            try:  # the index by keywords, when it knows them
                return self.future_for(args)  # type: ignore[attr-defined]
            except KeyError:
                pass
        found = self._matches(name, args, key)
        if not found:
            what = f"key {key!r}" if key is not None else f"arguments {args!r}"
            raise KeyError(f"no job of this map was called with {what}")
        return found[0]

    def get_result(
        self,
        name: Any = None,
        args: Any = None,
        key: str | None = None,
        verbose: bool = False,
        with_details: bool = False,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Return the value of the job called with ``args``, waiting for it.

        As iDDS: ``args`` is the job's entry of ``multi_jobs_kwargs_list`` (a dict
        of keyword arguments, or a tuple of positional ones), or ``key`` is its
        ``job_key`` or iDDS's key of its arguments; ``name`` (the function's
        name) only chooses among jobs of several tasks; ``verbose`` is accepted.
        With ``with_details`` it returns ``(value, {"status": True, "error": None,
        "metrics": {...}})``. A first positional dict is ``args`` (idds-fat's
        ``get_result(kwargs)``).

        Raises:
            KeyError: no job has these arguments or this key (iDDS returns None).
            TimeoutError: it is not done within ``timeout`` seconds.
            Exception: the job's own exception, CancelledError or JobLostError
                (iDDS returns None with a status False in the details).
        """
        future = self._find(name, args, key)
        value = future.result(timeout)
        return (value, _details(future)) if with_details else value

    def has_result(self, name: Any = None, args: Any = None, key: str | None = None) -> bool:
        """Whether the job called with ``args`` (or with ``key``) has ended with a value;
        never waits."""
        try:
            future = self._find(name, args, key)
        except KeyError:
            return False
        return future.done() and not future.cancelled() and future.exception() is None

    def _keyed(self, timeout: float | None) -> list[tuple[str, str, AsyncResult, Any]]:
        self.wait(timeout)  # type: ignore[attr-defined]
        rows = []
        for future in self.futures:
            key = future.job_key or idds_key(entry_arguments(future.kwargs)) or str(future.job)
            rows.append((task_name(future), key, future, future.result()))
        return rows

    def get_all_results(self, timeout: float | None = None) -> dict[str, Any]:
        """Return every job's value by iDDS key (``job_key``, else the key of its
        arguments), once all are done.

        Raises:
            TimeoutError: some job is still unfinished after ``timeout`` seconds.
            Exception: the first failed job's exception, in input order (iDDS
                leaves failed jobs out).
        """
        return {key: value for _, key, _, value in self._keyed(timeout)}

    def get_dict_results(self, timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """Return iDDS's four maps: ``results`` and ``details`` by key, ``name_results``
        and ``name_details`` by ``name:key``, once all jobs are done.

        Raises: as :meth:`get_all_results`.
        """
        rows = self._keyed(timeout)
        return {
            "results": {key: value for _, key, _, value in rows},
            "name_results": {f"{name}:{key}": value for name, key, _, value in rows},
            "details": {key: _details(f) for _, key, f, _ in rows},
            "name_details": {f"{name}:{key}": _details(f) for name, key, f, _ in rows},
        }

    def add_result(
        self,
        name: str | None = None,
        args: Any = None,
        key: str | None = None,
        result: Any = None,
        details: Any = None,
    ) -> None:
        """Add a finished job with value ``result`` for ``args`` (iDDS builds maps so)."""
        if isinstance(args, Sequence) and not isinstance(args, str):
            entry: dict[str, Any] = {POSITIONAL_ENTRY: tuple(args), CALL_ARGS: None}
        else:
            entry = dict(args or {})
        index = len(self.futures)
        future = self.future_type("added", index, entry, name=f"{name}[{index}]")
        future.job_key = key
        future.set_result(result)
        self.futures.append(future)  # found by future_for's scan: it is not in its index

    def set_result(
        self,
        name: str | None = None,
        args: Any = None,
        key: str | None = None,
        value: Any = None,
        verbose: bool = False,
        details: Any = None,
    ) -> None:
        """iDDS's other name of :meth:`add_result` (the value as ``value``)."""
        self.add_result(name, args, key, value, details)

    def get_results(self, timeout: float | None = None) -> Any:
        """Wait for every job and return this map (iDDS's ``Work.get_results`` with
        ``map_results``); it reads as the list of values in input order too.

        Raises:
            TimeoutError: some job is still unfinished after ``timeout`` seconds.
        """
        return self.wait(timeout)  # type: ignore[attr-defined]

    wait_results = get_results

    def get_status(self) -> str:
        """Return iDDS's status name of the task: ``Transforming`` (some jobs not done),
        ``Finished`` (all with a value), ``SubFinished`` (some), ``Cancelled`` (all
        cancelled) or ``Failed``."""
        futures = self.futures
        if not all(f.done() for f in futures):
            return RUNNING
        ok = sum(1 for f in futures if not f.cancelled() and f.exception() is None)
        if ok == len(futures):
            return FINISHED
        if ok:
            return SUBFINISHED
        return CANCELLED if all(f.cancelled() for f in futures) else FAILED

    def is_terminated(self) -> bool:
        """Whether every job ended, whichever way."""
        return all(f.done() for f in self.futures)

    def is_finished(self) -> bool:
        """Whether every job ended with a value."""
        return self.get_status() == FINISHED

    def is_subfinished(self) -> bool:
        """Whether every job ended and some, not all, with a value."""
        return self.get_status() == SUBFINISHED

    def is_failed(self) -> bool:
        """Whether every job ended and none with a value."""
        return self.get_status() in (FAILED, CANCELLED)
