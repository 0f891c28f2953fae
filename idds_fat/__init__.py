"""idds-fat: function-as-a-task for Python.

Decorate a function with :func:`work`, call it inside a :func:`workflow` (or a
``with Workflow():`` block), and each call runs as a job on the chosen backend
while the results come back into the calling loop as futures.
"""

from idds_fat.api import WorkFunction, work, workflow
from idds_fat.config import Config, load_config
from idds_fat.context.environment import Conda, Container, Current, Environment, Venv
from idds_fat.errors import (
    ArgumentError,
    CacheError,
    ConfigError,
    ContextError,
    ContextTooLargeError,
    DependencyError,
    IddsFatError,
    IgnoredParameterWarning,
    IntegrityError,
    InterpreterMismatchError,
    JobEnvironmentError,
    JobLostError,
    NoActiveWorkflowError,
    RemoteError,
    RemoteTraceback,
    ServiceAccessError,
    ServiceError,
    SignatureError,
    UnsafeArchiveError,
    WorkflowClosedError,
    WorkflowStartedError,
)
from idds_fat.results import AsyncResult, MapResult
from idds_fat.workflow import Workflow, current_workflow

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "AsyncResult",
    "CacheError",
    "Conda",
    "Config",
    "ConfigError",
    "Container",
    "ContextError",
    "ContextTooLargeError",
    "Current",
    "DependencyError",
    "Environment",
    "IddsFatError",
    "IgnoredParameterWarning",
    "IntegrityError",
    "InterpreterMismatchError",
    "JobEnvironmentError",
    "JobLostError",
    "MapResult",
    "NoActiveWorkflowError",
    "RemoteError",
    "RemoteTraceback",
    "ServiceAccessError",
    "ServiceError",
    "SignatureError",
    "UnsafeArchiveError",
    "Venv",
    "WorkFunction",
    "Workflow",
    "WorkflowClosedError",
    "WorkflowStartedError",
    "__version__",
    "current_workflow",
    "load_config",
    "work",
    "workflow",
]
