"""idds-fat: function-as-a-task for Python.

Decorate a function with :func:`work`, call it inside a :func:`workflow` (or a
``with Workflow():`` block), and each call runs as a job on the chosen backend
while the results come back into the calling loop as futures.
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

# The errors are cheap (they import nothing beyond the node's errors) and are
# what a caller catches, so they are bound now; every other name is bound on
# first use (PEP 562), so that `idds-fat status` and a job's helpers do not pay
# for the runtime, the backends, the service, uvicorn, requests and stomp.
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

if TYPE_CHECKING:
    from idds_fat.api import WorkFunction, work, workflow
    from idds_fat.config import Config, load_config
    from idds_fat.context.environment import Conda, Container, Current, Environment, Venv
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


def __getattr__(name: str) -> Any:
    """Import and bind a public name on first use (PEP 562).

    Raises:
        AttributeError: ``name`` is not a public name of the package.
    """
    # Plain import statements rather than a table for importlib: they keep the
    # arrows visible to readers and to tests/test_imports.py.
    if name in ("WorkFunction", "work", "workflow"):
        from idds_fat import api as module
    elif name in ("Config", "load_config"):
        from idds_fat import config as module
    elif name in ("Conda", "Container", "Current", "Environment", "Venv"):
        from idds_fat.context import environment as module
    elif name in ("AsyncResult", "MapResult"):
        from idds_fat import results as module
    elif name == "Workflow":
        # Not `from idds_fat import workflow`: that name is the decorator.
        from idds_fat.workflow import runtime as module
    elif name == "current_workflow":
        from idds_fat.workflow import current as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Return the package's names, the ones not imported yet included."""
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's module type: ``idds_fat.workflow`` stays the decorator.

    The import system binds each submodule it loads as an attribute of its package,
    so loading the subpackage ``idds_fat.workflow`` (which any import of the
    runtime or the catalog does) would replace the decorator ``workflow``; the
    subpackage is still found through ``sys.modules`` by every import statement.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "workflow" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
