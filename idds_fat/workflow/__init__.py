"""A running workflow, and which workflow is current.

How one task moves through it::

    Workflow.submit_task(fn, kwargs_list)                        runtime.py: the public verbs
      | pickle the call and each job's arguments (serialize)     (nothing stored if one fails)
      v
    JobSpecs.store_task -> payload, job specs -> cache           specs.py
      | one JobRequest per job (spec_location, spec_key)
      v
    JobTracker.add_task -> futures; state.record_task            tracker.py, state.py
      v
    WorkflowParts.backend.submit(requests)                       parts.py
      :
    job ends -- Backend --> JobTracker.job_ended   -> lost? wait out a grace period? run again?
    result  -- STOMP / REST / a worker's pipe --> ResultCollector --> JobTracker.dispatch
                                                 -> the future is settled, the state records it

``WorkflowOptions`` (options.py) is what the workflow was asked for;
``WorkflowParts`` the service, cache, state, channels and backend it runs,
created by ``start`` or reopened by ``Workflow.attach`` (resume.py) from the
work dir. ``catalog`` reads every workflow's state for ``idds-fat status`` and
the monitoring page; ``current`` keeps the stack of open workflows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from idds_fat.workflow.current import current_workflow, require_workflow
from idds_fat.workflow.state import WorkflowState

if TYPE_CHECKING:
    from idds_fat.workflow.runtime import Workflow

__all__ = ["Workflow", "WorkflowState", "current_workflow", "require_workflow"]


def __getattr__(name: str) -> Any:
    """Import ``Workflow`` on first use (PEP 562).

    ``catalog``, which ``idds-fat status`` and the monitoring page read, then
    loads without the runtime and everything it starts (backends, service,
    result channels).

    Raises:
        AttributeError: ``name`` is not a public name of the package.
    """
    if name != "Workflow":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from idds_fat.workflow.runtime import Workflow

    globals()["Workflow"] = Workflow
    return Workflow


def __dir__() -> list[str]:
    """Return the package's names, ``Workflow`` included before it is imported."""
    return sorted(set(globals()) | set(__all__))
