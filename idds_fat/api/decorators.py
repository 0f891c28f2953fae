"""The public decorators: ``@work`` and ``@workflow``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from idds_fat.api import idds_compat
from idds_fat.backends import BACKENDS, Resources
from idds_fat.context.environment import Environment, as_environment
from idds_fat.results import AsyncResult, MapResult
from idds_fat.workflow import Workflow, current_workflow
from idds_fat.workflow.dependencies import values_now
from idds_fat.workflow.options import warn_ignored


def _done(ok: bool, value: Any, kwargs: Mapping[str, Any] | None, name: str) -> AsyncResult:
    future = AsyncResult("in-process", 0, kwargs, name=name)
    future.set_result(value) if ok else future.set_exception(value)
    return future


class WorkFunction:
    """A function decorated with ``@work``.

    Inside an open workflow, calling it runs it as a task of jobs:

    - ``fn(*args, **kwargs)`` runs one job and returns its value (blocking);
    - ``fn(*args, multi_jobs_kwargs_list=[k0, k1, ...], **kwargs)`` runs one job
      per ``ki`` (called as ``fn(*args, **kwargs, **ki)``), blocks until all are
      back, and returns a :class:`MapResult` (``map_results=True``) or a list of
      values in input order (raising the first failure in input order);
    - with ``return_work=True``, both return the ``AsyncResult``/``MapResult`` at once
      (iDDS's ``Work``: ``get_results()``, ``is_finished()``, ``get_status()``, ...).

    As iDDS: an entry of ``multi_jobs_kwargs_list`` that is a tuple is the job's
    positional arguments (``fn(*entry, **kwargs)``); ``workflow=wf`` among the
    call's keywords chooses the workflow; ``pre_kwargs`` go under the call's
    keywords; a workflow with ``distributed=False`` runs the calls in-process.

    ``submit`` and ``map`` never block. Outside a workflow, every form runs the
    function in-process like the undecorated function (so code using it stays
    unit-testable): calls return values, ``submit``/``map`` completed results.

    Arguments that do not fit the function's signature (``add(1, 2, 3)``, an
    entry of ``multi_jobs_kwargs_list`` with an unknown key) raise
    :class:`~idds_fat.errors.SignatureError`, a ``TypeError``, before any job is
    submitted. A remote exception re-raises as its own type with the remote
    traceback as ``__cause__``; a job that dies without a result raises ``JobLostError``.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        map_results: bool = False,
        name: str | None = None,
        init_env: str | None = None,
        container_options: Mapping[str, Any] | None = None,
        environment: Environment | str | None = None,
        return_work: bool = False,
        cores: int | None = None,
        memory_mb: int | None = None,
        gpus: int | None = None,
        walltime: float | None = None,
        jobs_per_worker: int | None = None,
        workflow: Workflow | None = None,
        pre_kwargs: Mapping[str, Any] | None = None,
        job_key: str | None = None,
        **idds_options: Any,
    ) -> None:
        functools.update_wrapper(self, fn)
        self.idds_options = idds_compat.check_idds_options(idds_options)
        self.workflow = workflow
        self.pre_kwargs = dict(pre_kwargs or {})
        self.job_key = job_key
        self.fn = fn
        self.map_results = map_results
        self.name = name or getattr(fn, "__qualname__", "work")
        self.init_env = init_env
        self.container_options = container_options
        self.environment = None if environment is None else as_environment(environment)
        self.return_work = return_work
        if jobs_per_worker is not None and jobs_per_worker < 1:
            raise ValueError(f"jobs_per_worker must be at least 1, not {jobs_per_worker}")
        self.resources = Resources(
            cores=cores,
            memory_mb=memory_mb,
            gpus=gpus,
            walltime=walltime,
            jobs_per_worker=jobs_per_worker,
        )

    def _submit(
        self,
        workflow: Workflow,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        kwargs_list: list[Any] | None,
    ) -> list[AsyncResult]:
        fn = self.fn
        kwargs = {**self.pre_kwargs, **kwargs}
        if idds_compat.has_positional_entries(kwargs_list):
            assert kwargs_list is not None
            fn, args, kwargs_list = idds_compat.positional_task(fn, args, kwargs, kwargs_list)
        backend = workflow.config.backend
        if self.container_options is not None and "container_options" in (
            BACKENDS[backend].supported_parameters
        ):  # such a backend takes them from the workflow only
            warn_ignored("container_options", backend, " on a task")
        futures = workflow.submit_task(
            fn,
            args,
            kwargs,
            kwargs_list,
            resources=self.resources,
            name=self.name,
            environment=self.environment,
            init_env=self.init_env,
            container_options=self.container_options,
        )
        for future in futures:
            future.job_key = self.job_key
        return futures

    def _run_here(self, args: Sequence[Any], kwargs: Mapping[str, Any], entry: Any) -> AsyncResult:
        kwargs = {**self.pre_kwargs, **kwargs}
        if isinstance(entry, tuple | list):  # iDDS: a tuple entry is the positional arguments
            args, entry = entry, {idds_compat.POSITIONAL_ENTRY: tuple(entry)}
        try:
            args, kwargs = values_now(tuple(args)), values_now(dict(kwargs))
            own = {k: v for k, v in (entry or {}).items() if k != idds_compat.POSITIONAL_ENTRY}
            value = self.fn(*args, **kwargs, **values_now(own))
            result = _done(True, value, entry, self.name)
        except Exception as exc:
            result = _done(False, exc, entry, self.name)
        result.job_key = self.job_key
        return result

    def _workflow_of(self, kwargs: dict[str, Any]) -> Workflow | None:
        """The workflow a call goes to: iDDS's ``workflow=wf`` keyword (taken out of
        ``kwargs``), else ``@work(workflow=wf)``, else the current one; None to run
        here (none, or iDDS's ``distributed=False``)."""
        given = kwargs.get("workflow")
        if isinstance(given, Workflow):
            del kwargs["workflow"]
        else:
            given = None
        workflow = given or self.workflow or current_workflow()
        if workflow is not None and workflow.placement.get("distributed") is False:
            return None
        return workflow

    def __call__(
        self,
        *args: Any,
        multi_jobs_kwargs_list: Iterable[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Any:
        workflow = self._workflow_of(kwargs)
        kwargs_list = None if multi_jobs_kwargs_list is None else list(multi_jobs_kwargs_list)
        if workflow is None:
            if kwargs_list is None:
                kwargs = {**self.pre_kwargs, **kwargs}
                return self.fn(*values_now(args), **values_now(kwargs))
            results = MapResult([self._run_here(args, kwargs, e) for e in kwargs_list])
            return results if self.map_results or self.return_work else results.results()
        futures = self._submit(workflow, args, kwargs, kwargs_list)
        if kwargs_list is None:
            if self.return_work:
                return futures[0]
            workflow.wait(futures)
            return futures[0].result()
        results = MapResult(futures)
        if self.return_work:
            return results
        workflow.wait(futures)
        return results if self.map_results else results.results()

    def submit(self, *args: Any, **kwargs: Any) -> AsyncResult:
        """Run one job with these arguments; return its :class:`AsyncResult` without blocking.

        Raises:
            SignatureError: a ``TypeError``: the arguments do not fit the function's
                signature (checked before any job is submitted).
            ArgumentError: an argument does not pickle or is too large.
        """
        workflow = current_workflow()
        if workflow is None:
            return self._run_here(args, kwargs, None)
        return self._submit(workflow, args, kwargs, None)[0]

    def map(self, kwargs_list: Iterable[Mapping[str, Any]], *args: Any, **kwargs: Any) -> MapResult:
        """Run one job per entry of ``kwargs_list``; return a :class:`MapResult` without blocking.

        The keyword-list map, as ``Workflow.map_kwargs`` (``Workflow.map`` is
        ``Executor.map``).

        Raises:
            SignatureError: a ``TypeError``: the arguments do not fit the function's
                signature (checked before any job is submitted).
            ArgumentError: an argument does not pickle or is too large.
        """
        workflow = current_workflow()
        entries = list(kwargs_list)
        if workflow is None:
            return MapResult([self._run_here(args, kwargs, e) for e in entries])
        return MapResult(self._submit(workflow, args, kwargs, entries))

    def __repr__(self) -> str:
        return f"<work {self.name}>"


def work(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Decorate a function so that, inside a workflow, each call runs as a distributed task.

    Usable bare (``@work``) or with options (``@work(map_results=True, gpus=1)``):
    ``map_results``, ``name``, ``return_work``, the resources ``cores``,
    ``memory_mb``, ``gpus`` and ``walltime`` (seconds), which override the
    workflow's, ``jobs_per_worker`` (batch backends: jobs one batch job runs,
    in sequence, or on Slurm one per core of ``cores`` at once; unset, Slurm
    packs tasks of over 100 jobs: docs/backends/slurm.md; the local backend's
    warm workers do this anyway),
    ``environment`` (where the jobs run: ``Venv([...])``,
    ``Conda("env.tar.gz")``, ``Container("image")``, ``Current()`` or a string
    form; docs/environments/), and the iDDS options ``init_env`` (a shell prefix
    run on the node before the job) and ``container_options``
    (``{"container_image": IMAGE}``, run as a ``Container``), ``workflow``
    (the workflow its calls go to, instead of the current one), ``pre_kwargs``
    (keywords every call gets, under its own), ``job_key`` (the key
    ``MapResult.get_result(key=...)`` finds its jobs by), and iDDS's other
    names (``lazy``, ``no_wraps``, dataset and PanDA options, ``post_script``),
    recorded and warned about once (docs/migrating-from-idds.md).
    Outside a workflow the function runs in-process, unchanged. The options
    are the keyword arguments of :class:`WorkFunction`, which says what calls return.

    Raises:
        TypeError: an unknown option.
        ValueError: ``jobs_per_worker`` below 1.
    """
    if fn is None:
        return lambda f: WorkFunction(f, **options)
    return WorkFunction(fn, **options)


def workflow(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
    """Decorate a function whose body is a workflow: its ``@work`` calls run as jobs.

    Usable bare (``@workflow``) or with the options of :class:`Workflow`
    (``backend``, ``source_dir``, ``exclude_source_files``, resources, Config
    settings, and the iDDS parameters ``service``, ``local``, ``queue``, ``site``,
    ``cloud``, ``core_count``, ``total_memory``, ``max_walltime``, ``init_env``,
    ``container_options``, ``name``, ``pre_kwargs`` (keywords the body is
    called with, under the call's), ``use_func_dir``, ``source_dir_parent_level``,
    ``distributed`` (False: its ``@work`` calls run in its process), and iDDS's
    other names, recorded and warned about once: docs/migrating-from-idds.md).
    Each call of the decorated function opens a new workflow, runs the body in
    it and closes it, returning the body's value (iDDS returns a status). With
    ``local=False`` (iDDS's) a call runs the body as a driver away from this
    process and returns the :class:`Workflow` at once; its ``get_result()``
    waits for the body's value (docs/drivers.md). With
    ``return_workflow=True`` a call returns the (unstarted) :class:`Workflow`
    instead; its ``run()`` or ``submit()`` runs the body.

    Raises:
        ConfigError: an unknown option or a bad value (when called).
    """
    return_workflow = options.pop("return_workflow", False)

    def decorate(body: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(body)
        def run(*args: Any, **kwargs: Any) -> Any:
            settings = dict(options)
            name = settings.pop("name", None) or body.__name__
            # iDDS's Workflow(func, args=, kwargs=): pre_kwargs and use_func_dir apply.
            wf = Workflow(name, func=body, args=args, kwargs=kwargs, **settings)
            if return_workflow:
                return wf
            if settings.get("local") is False:  # iDDS: the body runs as a driver
                wf.submit()
                return wf
            assert wf.body is not None
            with wf:
                return wf.body()

        return run

    return decorate if fn is None else decorate(fn)


__all__ = ["WorkFunction", "work", "workflow"]
