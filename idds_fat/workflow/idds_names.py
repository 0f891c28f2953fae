"""The iDDS names of a workflow (``idds.iworkflow.workflow``), for programs ported by import.

iDDS programs build a workflow around a function and set its placement as
attributes before they submit it::

    wf = Workflow(func=optimize, service="idds", init_env="singularity exec img.simg ")
    wf.queue, wf.cloud, wf.core_count = "Q", "US", 4      -> options.placement / resources
    wf.prepare()                                          -> start: pack and ship the code
    wf.submit()                                           -> run optimize() in the workflow

:class:`IddsWorkflowNames` gives :class:`~idds_fat.workflow.Workflow` those
attributes and verbs; :func:`idds_arguments` sorts ``Workflow(func, ...)`` out
before the options are resolved. Parameters with a meaning here take effect
(placement, resources, the body and its arguments); the others are recorded
and warned about once (``IgnoredParameterWarning``). docs/migrating-from-idds.md
lists every name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idds_fat.errors import IddsFatError, IgnoredParameterWarning, WorkflowStartedError
from idds_fat.workflow import driver as driver_process

if TYPE_CHECKING:
    from idds_fat.workflow.driver import Driver
    from idds_fat.workflow.options import WorkflowOptions

#: iDDS attributes and parameters that are a placement here (backends read them).
PLACEMENT_NAMES = ("queue", "site", "cloud", "init_env", "container_options", "service", "local")
#: iDDS resource names -> ours.
RESOURCE_NAMES = {"core_count": "cores", "total_memory": "memory_mb", "max_walltime": "walltime"}
#: What the workflow's body is called with: ``Workflow(func, args=, kwargs=, pre_kwargs=)``.
CALL_NAMES = ("func", "args", "kwargs", "pre_kwargs")
#: Where the code context comes from when ``source_dir`` is not given.
SOURCE_NAMES = ("use_func_dir", "source_dir_parent_level")
#: iDDS names with no effect here: recorded in the placement, warned about once.
IGNORED_NAMES = frozenset(
    {
        "vo",
        "priority",
        "max_attempt",
        "working_group",
        "task_type",
        "processing_type",
        "lifetime",
        "username",
        "userdn",
        "workflow_type",
        "campaign",
        "campaign_scope",
        "campaign_group",
        "campaign_tag",
        "max_processing_requests",
        "clean_env",
        "post_script",
        "primary",
        "no_wraps",
        "is_unique_func_name",
        "json_load",
        "context",
        "multi_jobs_kwargs_list",
        "current_job_kwargs",
    }
)
#: iDDS names whose iDDS meaning is what idds-fat always does: accepted, no warning.
ALWAYS_NAMES = frozenset({"enable_separate_log", "distributed"})

_warned: set[str] = set()


def warn_idds_ignored(name: str, stacklevel: int = 3) -> None:
    """Warn, once per process, that iDDS parameter ``name`` has no effect in idds-fat."""
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"{name} is an iDDS parameter with no effect in idds-fat; it is recorded but not used "
        "(docs/migrating-from-idds.md)",
        IgnoredParameterWarning,
        stacklevel=stacklevel,
    )


def is_set(value: Any) -> bool:
    """Whether an iDDS parameter was given a value other than iDDS's own default."""
    return value is not None and value is not False and value != {} and value != []


def idds_arguments(name: Any, options: dict[str, Any]) -> str | None:
    """Sort iDDS's ``Workflow(func, ...)`` out of a Workflow's arguments; return its name.

    iDDS's first positional argument is the workflow function: a callable
    ``name`` moves to ``options["func"]``. Without a name, a workflow is named
    after its function (iDDS does the same).
    """
    if callable(name):
        options["func"], name = name, None
    func = options.get("func")
    if name is None and func is not None:
        name = getattr(func, "__name__", None)
    return name


def body_of(call: Mapping[str, Any]) -> Callable[[], Any] | None:
    """Return the body iDDS's ``Workflow(func, args=, kwargs=, pre_kwargs=)`` runs, or None.

    As iDDS calls it: ``func(*args, **{**pre_kwargs, **kwargs})``.
    """
    func = call.get("func")
    if func is None:
        return None
    kwargs = {**(call.get("pre_kwargs") or {}), **(call.get("kwargs") or {})}
    return functools.partial(func, *(call.get("args") or ()), **kwargs)


def default_source_dir(call: Mapping[str, Any]) -> Path:
    """Return iDDS's default code context: the current directory, or with
    ``use_func_dir`` the directory of the workflow function's file, raised by
    ``source_dir_parent_level`` levels (the current directory for a function
    with no file)."""
    import inspect

    func = call.get("func")
    if call.get("use_func_dir") and func is not None:
        try:
            source_file = inspect.getsourcefile(func)
        except TypeError:  # a builtin, a callable object
            source_file = None
        if source_file:
            directory = Path(source_file).resolve().parent
            for _ in range(int(call.get("source_dir_parent_level") or 0)):
                directory = directory.parent
            return directory
    return Path.cwd().resolve()


def code_context(
    source_dir: str | Path | bool | None,
    call: Mapping[str, Any],
    inside: tuple[Path | str | None, ...] = (),
) -> tuple[Path | None, tuple[str, ...]]:
    """Return the directory shipped as the code context and the patterns that leave
    out the directories of ``inside`` (the work dir, caches) where they are in it.

    ``source_dir=None`` is iDDS's default (:func:`default_source_dir`), except
    from the home directory or the file-system root, which would be walked
    whole: then nothing is shipped, with a warning. ``False`` ships nothing.
    """
    if source_dir is False or source_dir == "":
        return None, ()
    if source_dir is None:
        root = default_source_dir(call)
        if root == Path.home().resolve() or root == Path(root.anchor):
            warnings.warn(
                f"the code context defaults to the current directory, {root}, which is not "
                "packed whole: nothing is shipped; give source_dir= (or run from the "
                "project's directory)",
                UserWarning,
                stacklevel=4,
            )
            return None, ()
    else:
        root = Path(source_dir).expanduser().resolve()  # type: ignore[arg-type]
    excludes = []
    for directory in inside:
        if directory is None:
            continue
        real = Path(directory).expanduser().resolve()
        if root in real.parents:  # jobs write there: packing it would chase its own tail
            excludes.append("/" + real.relative_to(root).as_posix() + "/")
    return root, tuple(excludes)


def _placement_attribute(name: str, doc: str) -> property:
    def get(self: IddsWorkflowNames) -> Any:
        return self.options.placement.get(name)

    def set_(self: IddsWorkflowNames, value: Any) -> None:
        self._before_start(name)
        self.options.placement = {**self.options.placement, name: value}
        if name in IGNORED_NAMES:
            if is_set(value):
                warn_idds_ignored(name, stacklevel=3)
        else:
            self.options.warn_ignored_parameters()

    return property(get, set_, doc=doc)


def _resource_attribute(name: str) -> property:
    ours = RESOURCE_NAMES[name]

    def get(self: IddsWorkflowNames) -> Any:
        return getattr(self.options.resources, ours)

    def set_(self: IddsWorkflowNames, value: Any) -> None:
        self._before_start(name)
        self.options.resources = dataclasses.replace(self.options.resources, **{ours: value})
        self.options.warn_ignored_parameters()

    return property(get, set_, doc=f"iDDS's name of the default ``{ours}`` of its jobs.")


class IddsWorkflowNames:
    """The iDDS attributes and verbs of a :class:`~idds_fat.workflow.Workflow`.

    Attributes set before the workflow starts take effect on every job
    (``queue``, ``site``, ``cloud``, ``init_env``, ``container_options``; the
    resources ``core_count``, ``total_memory`` in MiB, ``max_walltime`` in
    seconds); set once it started, they raise :class:`WorkflowStartedError`
    (its backend and jobs were set up with the old values). iDDS attributes
    with no effect here are recorded and warned about once.
    """

    options: WorkflowOptions
    id: str  # the Workflow's property
    name: str
    body: Callable[..., Any] | None
    _started: bool
    _returned: tuple[bool, Any]
    #: The driver running its body away from this process (``submit()``, or a
    #: workflow attached to whose body a driver runs); None otherwise.
    driver: Driver | None = None

    def _before_start(self, name: str) -> None:
        if self._started:
            raise WorkflowStartedError(
                f"{name} cannot change: workflow {self.id} started with the old value; "
                "set it before prepare(), submit() or the first task"
            )

    queue = _placement_attribute("queue", "iDDS/PanDA queue (the Slurm partition on Slurm).")
    site = _placement_attribute("site", "iDDS/PanDA site (PanDA only).")
    cloud = _placement_attribute("cloud", "iDDS/PanDA cloud (PanDA only).")
    init_env = _placement_attribute("init_env", "The shell prefix of every job's command.")
    container_options = _placement_attribute(
        "container_options", "``{'container_image': IMAGE}``: jobs run in that image."
    )
    service = _placement_attribute("service", "iDDS's service (panda, idds, sharefs): recorded.")
    core_count = _resource_attribute("core_count")
    total_memory = _resource_attribute("total_memory")
    max_walltime = _resource_attribute("max_walltime")
    enable_separate_log = _placement_attribute(
        "enable_separate_log", "Always so here: every job has its own stdout and stderr."
    )
    distributed = _placement_attribute(
        "distributed", "False: its ``@work`` calls run in the body's process, as in iDDS."
    )
    vo = _placement_attribute("vo", "iDDS only: recorded, no effect.")
    priority = _placement_attribute("priority", "iDDS only: recorded, no effect.")
    max_attempt = _placement_attribute("max_attempt", "iDDS only: recorded, no effect.")
    working_group = _placement_attribute("working_group", "iDDS only: recorded, no effect.")
    task_type = _placement_attribute("task_type", "iDDS only: recorded, no effect.")
    processing_type = _placement_attribute("processing_type", "iDDS only: recorded, no effect.")
    lifetime = _placement_attribute("lifetime", "iDDS only: recorded, no effect.")
    username = _placement_attribute("username", "iDDS only: recorded, no effect.")
    userdn = _placement_attribute("userdn", "iDDS only: recorded, no effect.")
    workflow_type = _placement_attribute("workflow_type", "iDDS only: recorded, no effect.")
    clean_env = _placement_attribute("clean_env", "iDDS only: recorded, no effect.")
    post_script = _placement_attribute("post_script", "iDDS only: recorded, no effect.")
    campaign = _placement_attribute("campaign", "iDDS only: recorded, no effect.")
    campaign_scope = _placement_attribute("campaign_scope", "iDDS only: recorded, no effect.")
    campaign_group = _placement_attribute("campaign_group", "iDDS only: recorded, no effect.")
    campaign_tag = _placement_attribute("campaign_tag", "iDDS only: recorded, no effect.")
    max_processing_requests = _placement_attribute(
        "max_processing_requests", "iDDS only: recorded, no effect."
    )

    @property
    def request_id(self) -> str:
        """iDDS's request id: the workflow's id here (a string; ``""`` until it starts)."""
        return self.id

    @property
    def workload_id(self) -> str:
        """iDDS's workload id: the workflow's id here (a string; ``""`` until it starts)."""
        return self.id

    def get_workload_id(self) -> str:
        """Return :attr:`workload_id`."""
        return self.id

    @property
    def multi_jobs_kwargs_list(self) -> list[Any]:
        """iDDS's ``multi_jobs_kwargs_list`` of a workflow function: always empty here
        (a workflow body runs once); setting it raises, as in iDDS."""
        return []

    @multi_jobs_kwargs_list.setter
    def multi_jobs_kwargs_list(self, value: Any) -> None:
        raise IddsFatError("multi_jobs_kwargs_list of a workflow cannot be set (as in iDDS)")

    def prepare(self) -> None:
        """Start the workflow (iDDS: upload the code): pack and store its code context,
        start its service and backend. Attributes cannot change afterwards.

        Raises:
            ContextError: the code context cannot be packed.
            ServiceError: the result service cannot be reached or started.
        """
        self.start()  # type: ignore[attr-defined]

    def setup(self) -> str | None:
        """iDDS's node setup command: the ``init_env`` prefix (None without one)."""
        return self.options.placement.get("init_env")

    def setup_source_files(self) -> None:
        """iDDS's node-side download of the code: nothing to do here, the wrapper
        fetches, verifies and unpacks the code context on every node; returns None
        (iDDS's "no setup command")."""
        return None

    def get_clean_env(self) -> str | None:
        """iDDS's clean-up command (``clean_env``): recorded, never run here."""
        return self.options.placement.get("clean_env")

    def get_func_name(self) -> str:
        """Return the qualified name of the workflow function (``""`` without one)."""
        func = self.options.call.get("func")
        return getattr(func, "__qualname__", "") if func is not None else ""

    def get_runner(self) -> str:
        """iDDS's shell command that runs the workflow: ``idds-fat status ID`` here,
        the command that follows it (``submit()`` starts its driver itself; the
        driver's command reads files only ``submit()`` writes). Before the
        workflow starts it is ``idds-fat status``.
        """
        return f"idds-fat status {self.id}".rstrip()

    def to_dict(self) -> dict[str, Any]:
        """Return what the workflow was asked for, JSON-serialisable (iDDS: for submission).

        Keys: ``name``, ``id``, ``func``, ``backend``, ``source_dir``,
        ``exclude_source_files``, ``placement``, ``resources``.
        """
        options = self.options
        return {
            "name": self.name,
            "id": self.id,
            "func": self.get_func_name(),
            "backend": options.config.backend,
            "source_dir": str(options.source_dir) if options.source_dir else None,
            "exclude_source_files": list(options.exclude_source_files),
            "placement": json.loads(json.dumps(dict(options.placement), default=str)),
            "resources": dataclasses.asdict(options.resources),
        }

    def store(self, source_dir: str | Path | None = None) -> Path:
        """Write :meth:`to_dict` to ``NAME.json`` in ``source_dir`` (default: the code
        context's directory, else the current one), as iDDS does; return its path."""
        directory = Path(source_dir or self.options.source_dir or Path.cwd())
        path = directory / f"{self.name}.json"
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def load(self, source_dir: str | Path | None = None) -> None:
        """Take the placement and resources that :meth:`store` wrote to ``NAME.json``
        (in ``source_dir``, default as ``store``); nothing if there is no such file.

        Raises:
            WorkflowStartedError: the workflow started already.
        """
        self._before_start("load")
        path = Path(source_dir or self.options.source_dir or Path.cwd()) / f"{self.name}.json"
        if not path.exists():
            return
        stored = json.loads(path.read_text())
        self.options.placement = {**self.options.placement, **stored.get("placement", {})}
        resources = {k: v for k, v in stored.get("resources", {}).items() if v is not None}
        self.options.resources = dataclasses.replace(self.options.resources, **resources)

    def submit_body(self) -> str:
        """``wf.submit()`` as iDDS calls it: run the workflow's body (``Workflow(func=...)``
        or ``@workflow(return_workflow=True)``) and return the workflow's id;
        :meth:`get_result` then returns the body's value.

        As in iDDS, the body runs as a driver away from this process (a detached
        process on ``local``, a Slurm job on ``slurm``: docs/drivers.md), and this
        returns at once; this process may exit, and ``Workflow.attach(id).get_result()``
        from another one returns the value. With ``local=True`` it runs here
        instead, inside the workflow: this returns when the body has (its jobs
        ran) and raises what the body raised (iDDS logs it).

        Raises:
            IddsFatError: the workflow has no body.
            ArgumentError: (driver) the body does not pickle.
            DriverError: (driver) it could not be started.
            Exception: (``local=True``) what the body raised.
        """
        body = self.body
        if body is None:
            raise IddsFatError(
                "this workflow has no function to submit: give Workflow(func=...), "
                "or use it as a context manager"
            )
        if self.options.placement.get("local") is not True:
            return self._submit_driver(body)
        try:
            with self:  # type: ignore[attr-defined]
                value = body()
        except BaseException as exc:
            self._returned = (False, exc)
            raise
        self._returned = (True, value)
        return self.id

    def _submit_driver(self, body: Callable[[], Any]) -> str:
        """Create the workflow here, hand its body to a driver, stop following it."""
        self._start_with(lambda: self.parts.create(self.name))  # type: ignore[attr-defined]
        # Stopped first: the driver restarts its embedded service on the same port.
        self.detach()  # type: ignore[attr-defined]
        self.driver = driver_process.launch(self, body)  # type: ignore[arg-type]
        return self.id

    def get_result(self, timeout: float | None = None) -> Any:
        """Return the value the body returned: waited for (up to ``timeout`` seconds)
        when a driver runs it, else the value :meth:`submit` got here.

        Raises:
            IddsFatError: the body has not run (``submit()`` was not called).
            Exception: what the body raised, with its remote traceback when a
                driver ran it.
            JobLostError: its driver ended without an outcome (killed, crashed);
                the message has the driver's stderr tail.
            TimeoutError: the driver had not ended after ``timeout`` seconds.
        """
        if self.driver is not None:
            return self.driver.result(timeout)
        returned = getattr(self, "_returned", None)
        if returned is None:
            raise IddsFatError("the workflow's body has not run: call submit() first")
        ok, value = returned
        if not ok:
            raise value
        return value
