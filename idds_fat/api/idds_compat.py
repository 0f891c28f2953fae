"""The iDDS parameters of ``@work`` (``idds.iworkflow.work.work``) and how a call uses them.

iDDS calls look like this, and run here unchanged::

    @work(map_results=True, pre_kwargs={"hist": True}, job_key="trial", lazy=True)
    def train(x, y, hist=False): ...

    train(x=1, multi_jobs_kwargs_list=[{"y": 1}, (1, 2)], workflow=wf)
      pre_kwargs under the call's keywords  -> train(x=1, hist=True, y=1)
      a tuple entry replaces the positional arguments -> train(1, 2, hist=True)
      workflow=wf (at the call or in @work) -> the workflow the jobs go to

``pre_kwargs``, ``workflow`` and ``job_key`` (the key ``MapResult.get_result(key=...)``
finds the jobs by) have their iDDS meaning; ``enable_separate_log`` is what
idds-fat always does; the others are iDDS data-management or wrapper options
that are accepted, recorded and warned about once (docs/migrating-from-idds.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from idds_fat.results.idds_names import CALL_ARGS, POSITIONAL_ENTRY
from idds_fat.workflow.binding import check_call
from idds_fat.workflow.idds_names import is_set, warn_idds_ignored

#: iDDS ``@work`` parameters with no effect here: recorded, warned about once.
WORK_IGNORED = frozenset(
    {
        "lazy",
        "no_wraps",
        "parent_workload_id",
        "no_wait_parent",
        "input_datasets",
        "output_file_name",
        "output_dataset_name",
        "log_dataset_name",
        "num_events",
        "num_events_per_job",
        "parent_transform_id",
        "parent_internal_id",
        "post_script",
    }
)
#: iDDS ``@work`` parameters whose meaning is what idds-fat always does.
WORK_ALWAYS = frozenset({"enable_separate_log"})


def check_idds_options(options: Mapping[str, Any], stacklevel: int = 5) -> dict[str, Any]:
    """Return the iDDS-only options of ``@work``, warning once about each one set.

    Raises:
        TypeError: an option that is neither idds-fat's nor iDDS's.
    """
    unknown = sorted(set(options) - WORK_IGNORED - WORK_ALWAYS)
    if unknown:
        raise TypeError(f"@work got unknown options: {', '.join(unknown)}")
    for name, value in options.items():
        if name in WORK_IGNORED and is_set(value):
            warn_idds_ignored(name, stacklevel=stacklevel)
    return dict(options)


def has_positional_entries(kwargs_list: Sequence[Any] | None) -> bool:
    """Whether ``multi_jobs_kwargs_list`` has iDDS's tuple (or list) entries."""
    return kwargs_list is not None and any(isinstance(e, tuple | list) for e in kwargs_list)


def positional_task(
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    kwargs_list: Sequence[Any],
) -> tuple[Callable[..., Any], tuple[Any, ...], list[dict[str, Any]]]:
    """Return the task that runs iDDS's mixed ``multi_jobs_kwargs_list``: its function,
    positional arguments and one dict entry per job.

    A tuple entry replaces the call's positional arguments (``fn(*entry, **kwargs)``,
    as iDDS runs it); a dict entry adds keywords to them. Each job's tuple travels
    as its keyword ``idds_job_args``; the function, pickled by value, unpacks it.

    Raises:
        SignatureError: an entry does not fit ``fn``'s signature (checked here).
    """
    entries: list[dict[str, Any]] = []
    for entry in kwargs_list:
        if isinstance(entry, tuple | list):
            check_call(fn, tuple(entry), kwargs)
            entries.append({POSITIONAL_ENTRY: tuple(entry), CALL_ARGS: None})
        else:
            check_call(fn, args, {**kwargs, **entry})
            entries.append({POSITIONAL_ENTRY: None, CALL_ARGS: tuple(args), **entry})
    return _with_positional_entries(fn), (), entries


def _with_positional_entries(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``fn`` taking each job's positional arguments as keywords. Defined
    here, it is pickled by value (the node has no SDK)."""

    def call_with_entry(
        idds_job_args: tuple[Any, ...] | None, idds_call_args: tuple[Any, ...] | None, **kwargs: Any
    ) -> Any:
        return fn(*(idds_job_args if idds_job_args is not None else idds_call_args or ()), **kwargs)

    return call_with_entry
