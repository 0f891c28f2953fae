"""Reconnecting to a workflow whose caller went away: ``Workflow.attach``."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idds_fat.backends import JobExit, Resources
from idds_fat.config import load_config
from idds_fat.errors import IddsFatError, ServiceError
from idds_fat.results import AsyncResult
from idds_fat.serialize import loads, open_envelope
from idds_fat.workflow.state import WorkflowState
from idds_fat.workflow.workdir import _write_private

if TYPE_CHECKING:
    from idds_fat.workflow.runtime import Workflow

logger = logging.getLogger(__name__)


def _refuse_if_followed(workflow_dir: Path) -> None:
    """Raise IddsFatError if the process that follows this workflow is still alive here."""
    try:
        caller = json.loads((workflow_dir / "connection.json").read_text()).get("caller") or {}
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


def attach(
    cls: type[Workflow],
    workflow_id: str,
    *,
    work_dir: str | os.PathLike | None = None,
    force: bool = False,
    **settings: Any,
) -> Workflow:
    """Do what :meth:`Workflow.attach` documents (``cls`` is the class to build)."""
    config = load_config(work_dir=work_dir, **settings)
    root = config.work_dir / "workflows"
    matches = sorted(p for p in root.glob(f"{workflow_id}*") if p.is_dir())
    exact = [p for p in matches if p.name == workflow_id]
    if exact:
        matches = exact
    if len(matches) != 1:
        what = "no workflow" if not matches else f"{len(matches)} workflows"
        raise IddsFatError(f"{what} matching {workflow_id!r} in {root}")
    workflow_dir = matches[0]
    if not force:
        _refuse_if_followed(workflow_dir)
    state = WorkflowState(workflow_dir / "state.sqlite3")
    try:
        record = state.workflow_record()
    finally:
        state.close()
    recorded = record["settings"]
    config = config.replace(backend=settings.get("backend") or recorded.get("backend"))
    if recorded.get("broker") and "broker" not in settings:
        config = config.replace(broker=recorded["broker"])
    wf = cls(record["name"], config=config, **recorded.get("placement", {}))
    wf.resources = Resources(**recorded.get("resources", {}))
    with wf._lock:
        try:
            _resume(wf, workflow_dir)
        except BaseException:
            wf._stop_parts()
            raise
        wf._started = True
    return wf


def _resume(workflow: Workflow, workflow_dir: Path) -> None:
    workflow.id = workflow_dir.name
    workflow.work_dir = workflow_dir
    workflow._key = (workflow_dir / "hmac.key").read_bytes()
    connection = json.loads((workflow_dir / "connection.json").read_text())
    connection["caller"] = {"host": socket.gethostname(), "pid": os.getpid()}
    _write_private(workflow_dir / "connection.json", json.dumps(connection).encode())
    if connection["embedded"] and not workflow.config.service_url:
        port = int(connection["service_url"].rsplit(":", 1)[1])
        try:
            workflow._start_embedded_service(connection["token"], port=port)
        except (OSError, ServiceError) as exc:
            # Jobs still running would not reach a service elsewhere; results
            # already stored are read all the same.
            logger.warning("port %d is taken (%s); starting on another", port, exc)
            workflow._start_embedded_service(connection["token"], port=0)
    else:
        workflow.service_url = workflow.config.service_url or connection["service_url"]
        workflow._token = workflow.config.token or connection["token"]
    workflow._open_cache(connection["cache"])
    workflow._state = WorkflowState(workflow_dir / "state.sqlite3")
    workflow._state.set_workflow_status("running")
    pending = _rebuild_futures(workflow)
    workflow._start_channels()
    workflow._collector.drain()  # settle what finished while nobody listened
    workflow._start_backend()
    running = [(workflow._jobs[j], ref) for j, ref in pending if ref]
    never_started = [workflow._jobs[j] for j, ref in pending if not ref]
    if running:
        workflow._backend.adopt(running)
    if never_started:
        workflow._backend.submit(never_started)
    logger.info(
        "attached to %s: %d jobs running, %d started again",
        workflow.id,
        len(running),
        len(never_started),
    )


def _rebuild_futures(workflow: Workflow) -> list[tuple[str, str | None]]:
    """Recreate every job's future from its spec; return unfinished (job id, ref)."""
    assert workflow._state is not None and workflow._cache is not None
    pending = []
    for task_id, task_name, jobs in workflow._state.tasks():
        futures = []
        for index, name, spec_key, status, returncode, ref in jobs:
            spec = json.loads(workflow._cache.get(spec_key))
            kwargs = _job_kwargs(workflow, spec)
            request = workflow._job_request(task_id, index, name, spec_key, workflow.resources)
            job_id = request.job_id
            future = AsyncResult(
                task_id, index, kwargs, name=request.name, canceller=workflow._cancel_future
            )
            workflow._futures[(task_id, index)] = future
            workflow._jobs[job_id] = request
            futures.append(future)
            if status == "cancelled":
                future.mark_cancelled()
            elif status == "lost":
                workflow._lose(request, JobExit(returncode, "lost before the caller went away"))
            elif status in ("queued", "running"):
                pending.append((job_id, ref))
        workflow._tasks[task_id] = futures
        workflow._task_names[task_id] = task_name
        workflow._task_count += 1
    return pending


def _job_kwargs(workflow: Workflow, spec: dict[str, Any]) -> dict[str, Any] | None:
    entry = spec.get("kwargs")
    if not entry:
        return None
    if "inline" in entry:
        raw = base64.b64decode(entry["inline"])
    else:
        raw = workflow._cache.get(entry["key"])
    return loads(open_envelope(raw, workflow._key)[1])
