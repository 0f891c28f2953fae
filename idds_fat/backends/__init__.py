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
from idds_fat.backends.panda import PandaBackend, PandaError
from idds_fat.backends.slurm import SlurmBackend, SlurmError

#: The backends this installation can run, by the name ``@workflow(backend=...)`` takes.
BACKENDS: dict[str, type[Backend]] = {
    "local": LocalBackend,
    "slurm": SlurmBackend,
    "panda": PandaBackend,
}

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendSetup",
    "ExitCallback",
    "JobExit",
    "JobRequest",
    "LocalBackend",
    "PandaBackend",
    "PandaError",
    "Resources",
    "SlurmBackend",
    "SlurmError",
    "detect_gpus",
]
