"""Backends: where jobs run. ``local`` now; ``slurm`` and ``panda`` join later."""

from idds_fat.backends.base import (
    Backend,
    BackendSetup,
    ExitCallback,
    JobExit,
    JobRequest,
    Resources,
)
from idds_fat.backends.gpus import detect_gpus
from idds_fat.backends.local import LocalBackend

#: The backends this installation can run, by the name ``@workflow(backend=...)`` takes.
BACKENDS = {"local": LocalBackend}

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendSetup",
    "ExitCallback",
    "JobExit",
    "JobRequest",
    "LocalBackend",
    "Resources",
    "detect_gpus",
]
