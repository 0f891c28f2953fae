"""A running workflow, and which workflow is current."""

from idds_fat.workflow.runtime import Workflow, current_workflow, require_workflow
from idds_fat.workflow.state import WorkflowState

__all__ = ["Workflow", "WorkflowState", "current_workflow", "require_workflow"]
