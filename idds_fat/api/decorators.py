"""The public decorators: ``@work`` and ``@workflow``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from idds_fat.backends import BACKENDS, Resources
from idds_fat.context.environment import Environment, as_environment
from idds_fat.results import AsyncResult, MapResult
from idds_fat.workflow import Workflow, current_workflow
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
    - with ``return_work=True``, both return the ``AsyncResult``/``MapResult`` at once.

    ``submit`` and ``map`` never block. Outside a workflow, every form runs the
    function in-process like the undecorated function (so code using it stays
    unit-testable): calls return values, ``submit``/``map`` completed results.

    A remote exception re-raises as its own type with the remote traceback as
    ``__cause__``; a job that dies without a result raises ``JobLostError``.
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
    ) -> None:
        functools.update_wrapper(self, fn)
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
        kwargs_list: list[Mapping[str, Any]] | None,
    ) -> list[AsyncResult]:
        backend = workflow.config.backend
        if self.container_options is not None and "container_options" in (
            BACKENDS[backend].supported_parameters
        ):  # such a backend takes them from the workflow only
            warn_ignored("container_options", backend, " on a task")
        return workflow.submit_task(
            self.fn,
            args,
            kwargs,
            kwargs_list,
            resources=self.resources,
            name=self.name,
            environment=self.environment,
            init_env=self.init_env,
            container_options=self.container_options,
        )

    def _run_here(
        self, args: Sequence[Any], kwargs: Mapping[str, Any], entry: Mapping[str, Any] | None
    ) -> AsyncResult:
        try:
            return _done(True, self.fn(*args, **kwargs, **(entry or {})), entry, self.name)
        except Exception as exc:
            return _done(False, exc, entry, self.name)

    def __call__(
        self,
        *args: Any,
        multi_jobs_kwargs_list: Iterable[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Any:
        workflow = current_workflow()
        kwargs_list = None if multi_jobs_kwargs_list is None else list(multi_jobs_kwargs_list)
        if workflow is None:
            if kwargs_list is None:
                return self.fn(*args, **kwargs)
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
    workflow's, ``jobs_per_worker`` (batch backends: jobs one batch job runs
    in sequence; the local backend's warm workers do this anyway),
    ``environment`` (where the jobs run: ``Venv([...])``,
    ``Conda("env.tar.gz")``, ``Container("image")``, ``Current()`` or a string
    form; docs/environments/), and the iDDS options ``init_env`` (a shell prefix
    run on the node before the job) and ``container_options``
    (``{"container_image": IMAGE}``, run as a ``Container``).
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
    ``container_options``, ``name``). Each call of the decorated function opens
    a new workflow, runs the body in it and closes it, returning the body's
    value. With ``return_workflow=True`` a call returns the (unstarted)
    :class:`Workflow` instead; its ``run()`` runs the body.

    Raises:
        ConfigError: an unknown option or a bad value (when called).
    """
    return_workflow = options.pop("return_workflow", False)

    def decorate(body: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(body)
        def run(*args: Any, **kwargs: Any) -> Any:
            settings = dict(options)
            name = settings.pop("name", None) or body.__name__
            wf = Workflow(name, **settings)
            if return_workflow:
                wf.body = functools.partial(body, *args, **kwargs)
                return wf
            with wf:
                return body(*args, **kwargs)

        return run

    return decorate if fn is None else decorate(fn)


__all__ = ["WorkFunction", "work", "workflow"]
