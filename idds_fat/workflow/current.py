"""Which workflow is current: the process-wide stack of open workflows."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from idds_fat.errors import NoActiveWorkflowError

if TYPE_CHECKING:
    from idds_fat.workflow.runtime import Workflow

_active: list[Workflow] = []
_active_lock = threading.Lock()


def push_current(workflow: Workflow) -> None:
    """Make ``workflow`` the current one until :func:`drop_current` (``Workflow.open``)."""
    with _active_lock:
        _active.append(workflow)


def drop_current(workflow: Workflow) -> None:
    """Take ``workflow`` off the stack of open workflows, wherever it is (it closed)."""
    with _active_lock:
        _active[:] = [w for w in _active if w is not workflow]


def current_workflow() -> Workflow | None:
    """Return the innermost workflow that is open in this process, or ``None``.

    A process-wide stack rather than a context variable, so a workflow opened in
    one notebook cell is still current in the next.
    """
    with _active_lock:
        return _active[-1] if _active else None


def require_workflow() -> Workflow:
    """Return the current workflow.

    Raises:
        NoActiveWorkflowError: no workflow is open.
    """
    workflow = current_workflow()
    if workflow is None:
        raise NoActiveWorkflowError("no workflow is open: use @workflow or `with Workflow():`")
    return workflow


def open_workflow(workflow_id: str) -> Workflow | None:
    """Return the workflow with this id that is open in this process, or ``None``.

    The monitoring page steers a workflow open here through it directly: attaching
    a second follower in the same process would run its jobs twice.
    """
    with _active_lock:
        return next((w for w in reversed(_active) if w.id == workflow_id), None)
