"""Reconnecting to a workflow whose caller went away: what ``Workflow.attach`` does.

``find_workflow`` finds its directory and record; ``resume`` reopens its parts
(:class:`~idds_fat.workflow.parts.WorkflowParts`), books its tasks again in the
job tracker from their specs, catches up on the results stored meanwhile, and
hands the unfinished jobs back to the backend: to watch, those a process of the
earlier caller runs (or took, though their start was never recorded); to run
again, the others.

A workflow whose body runs as a driver (:mod:`idds_fat.workflow.driver`) is
followed by its driver: any other process that attaches only observes it
(``wf.driver``: its status, the body's value), and never acts on its jobs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idds_fat.backends import JobExit, JobRequest
from idds_fat.config import Config, load_config
from idds_fat.context import ContextArchive
from idds_fat.errors import DependencyError, IddsFatError
from idds_fat.workdir import WorkDirPaths, WorkflowPaths
from idds_fat.workflow.catalog import resolve_workflow_id
from idds_fat.workflow.driver import Driver, is_driving
from idds_fat.workflow.state import WorkflowState

if TYPE_CHECKING:
    from idds_fat.results import AsyncResult
    from idds_fat.workflow.runtime import Workflow

logger = logging.getLogger(__name__)


def _refuse_if_followed(workflow_dir: Path) -> None:
    """Raise IddsFatError if the process that follows this workflow is still alive here."""
    try:
        connection = WorkflowPaths(workflow_dir).connection
        caller = json.loads(connection.read_text()).get("caller") or {}
    except (OSError, ValueError):
        return
    pid = caller.get("pid")
    if caller.get("host") != socket.gethostname() or not pid or pid == os.getpid():
        return
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, PermissionError):
        return
    raise IddsFatError(
        f"workflow {workflow_dir.name} is followed by process {pid}, which is still running; "
        "stop it first, or attach with force=True"
    )


def find_workflow(
    workflow_id: str,
    *,
    work_dir: str | os.PathLike | None = None,
    force: bool = False,
    **settings: Any,
) -> tuple[Path, Config, dict[str, Any]]:
    """Find the workflow ``workflow_id`` (or a unique prefix) to attach to.

    Returns its directory, the configuration to attach with (``settings`` over
    the backend and broker it recorded) and its record (``name``, ``settings``).

    Raises:
        WorkflowNotFound: no workflow matches, or several do.
        IddsFatError: its state is unreadable, or the process following it is still
            alive here (unless ``force``, or its driver follows it: then this
            process observes only).
    """
    config = load_config(work_dir=work_dir, **settings)
    paths = WorkDirPaths(config.work_dir).workflow(
        resolve_workflow_id(config.work_dir, workflow_id)
    )
    workflow_dir = paths.root
    if not force and Driver.of(workflow_dir) is None:
        _refuse_if_followed(workflow_dir)
    state = WorkflowState(paths.state)
    try:
        record = state.workflow_record()
    finally:
        state.close()
    recorded = record["settings"]
    config = config.replace(backend=settings.get("backend") or recorded.get("backend"))
    if recorded.get("broker") and "broker" not in settings:
        config = config.replace(broker=recorded["broker"])
    return workflow_dir, config, record


def resume(workflow: Workflow, workflow_dir: Path) -> None:
    """Make ``workflow`` (new, not started) follow the one recorded in ``workflow_dir``.

    Reopens its parts, rebuilds every task's futures from their specs, settles
    the results that arrived meanwhile, watches the jobs still running (those
    recorded queued that a process of the earlier caller took, as it died before
    recording their start, included: ``Backend.adopt_unrecorded``) and runs the
    jobs that never started and have no result. A workflow run by a driver other than this
    process is only observed: ``workflow.driver`` is set, nothing is reopened.

    Raises:
        ServiceError: its service cannot be reached or started.
        OSError: its work dir cannot be read.
    """
    parts = workflow.parts
    driver = Driver.of(workflow_dir)
    if driver is not None and not is_driving(workflow_dir.name):
        parts.workflow_id, parts.work_dir = workflow_dir.name, workflow_dir
        workflow.driver = driver
        return
    parts.reopen(workflow_dir)
    _reopen_context(workflow)
    pending, unsubmitted = _rebuild_tasks(workflow)
    parts.start(workflow.tracker, catch_up=True)
    assert parts.backend is not None and parts.collector is not None
    running = [(job, ref) for job, ref, _ in pending if ref]
    # A job whose result the catch-up settled ran, whatever its record says.
    unsettled = [(job, future) for job, ref, future in pending if not ref and not future.done()]
    # Recorded queued, yet maybe taken by a process of the earlier caller, which died
    # before it recorded the start: that process delivers its result, so it is
    # followed, not run again (docs/backends/local.md, "A caller killed").
    followed = {job.job_id for job in parts.backend.adopt_unrecorded([j for j, _ in unsettled])}
    if unsettled:
        # What such processes delivered between the catch-up and that look.
        parts.collector.drain()
    never_started = [
        job for job, future in unsettled if job.job_id not in followed and not future.done()
    ]
    if running:
        parts.backend.adopt(running)
    if never_started:
        parts.backend.submit(never_started)
    # After the catch-up, which settled any such job that ran from its inline spec
    # and left a result: lose() leaves a settled future as it is.
    for job in unsubmitted:
        workflow.tracker.lose(job, JobExit(None, _UNSUBMITTED))
    logger.info(
        "attached to %s: %d jobs running, %d taken unrecorded by an earlier caller's "
        "processes, %d started again, %d never submitted",
        parts.workflow_id,
        len(running),
        len(followed),
        len(never_started),
        len(unsubmitted),
    )


#: Why a job recorded queued without a spec key did not run: its caller was killed
#: while it handed a long task's jobs over (runtime.Workflow._submit_rest).
_UNSUBMITTED = (
    "it was never submitted: its caller went away while handing its task's jobs over, "
    "before its spec was stored, so it cannot be run again from here; submit it again"
)


def _reopen_context(workflow: Workflow) -> None:
    """Give the reopened workflow its packed code context again, so tasks submitted
    after attaching (a driver's) ship it as the first ones did."""
    parts = workflow.parts
    assert parts.state is not None
    recorded = parts.state.workflow_record()["settings"]
    if recorded.get("context_sha256"):
        source_dir = Path(recorded.get("source_dir") or ".")
        parts.archive = ContextArchive(None, recorded["context_sha256"], 0, 0, source_dir)


def _rebuild_tasks(
    workflow: Workflow,
) -> tuple[list[tuple[JobRequest, str | None, AsyncResult]], list[JobRequest]]:
    """Book every recorded task again from its jobs' specs; return the unfinished
    jobs with the backend's reference to each (None: it never started) and their
    futures, and the queued jobs that have no spec key (never submitted: they
    cannot run again)."""
    parts, specs, tracker = workflow.parts, workflow.specs, workflow.tracker
    assert parts.state is not None
    pending, unsubmitted = [], []
    for task_id, task_name, jobs in parts.state.tasks():
        requests, futures = [], []
        for index, name, spec_key, _status, _returncode, _ref, arguments in jobs:
            request = specs.request(task_id, index, name, spec_key or "", workflow.resources)
            # A job still waiting on its inputs has no spec yet (dependencies.py).
            kwargs = specs.job_kwargs(specs.read(request)) if spec_key else None
            requests.append(request)
            future = tracker.new_future(task_id, index, kwargs, request.name)
            if arguments is not None:
                future.arguments = arguments
            futures.append(future)
        tracker.add_task(task_id, task_name, futures, requests, restored=True)
        for (*_, status, returncode, ref, _arguments), request, future in zip(
            jobs, requests, futures, strict=True
        ):
            if status == "cancelled":
                future.mark_cancelled()
            elif status == "waiting":
                # Its inputs' futures lived in the caller that went away.
                reason = "its caller went away while it waited for its inputs; submit it again"
                error = DependencyError(f"{future.name} did not run: {reason}", future.name)
                tracker.fail(future, error)
            elif status == "lost":
                tracker.lose(request, JobExit(returncode, "lost before the caller went away"))
            elif status == "queued" and not request.spec_key:
                unsubmitted.append(request)
            elif status in ("queued", "running"):
                if status == "running":
                    future.mark_running()  # it started under the earlier caller
                pending.append((request, ref, future))
    return pending, unsubmitted
