"""Backends: where jobs run. ``local`` now; ``slurm`` and ``panda`` join later."""

from idds_fat.backends.base import (
    Backend,
    BackendSetup,
    ExitCallback,
    InlineSpec,
    JobExit,
    JobRequest,
    Resources,
)
from idds_fat.backends.gpus import detect_gpus
from idds_fat.backends.local import LocalBackend
from idds_fat.backends.panda import PandaBackend, PandaError
from idds_fat.backends.pilot import SlurmPilotBackend
from idds_fat.backends.slurm import SlurmBackend, SlurmError

#: The backends this installation can run, by the name ``@workflow(backend=...)`` takes.
BACKENDS: dict[str, type[Backend]] = {
    "local": LocalBackend,
    "slurm": SlurmBackend,
    "panda": PandaBackend,
}


def backend_class(backend: str, slurm_mode: str = "array") -> type[Backend]:
    """The class that runs ``backend``: ``BACKENDS[backend]``, or the slurm backend's
    pilot mode (``slurm_mode="pilot"``). Raises KeyError for an unknown backend."""
    if backend == "slurm" and slurm_mode == "pilot":
        return SlurmPilotBackend
    return BACKENDS[backend]


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendSetup",
    "ExitCallback",
    "InlineSpec",
    "JobExit",
    "JobRequest",
    "LocalBackend",
    "PandaBackend",
    "PandaError",
    "Resources",
    "SlurmBackend",
    "SlurmError",
    "SlurmPilotBackend",
    "backend_class",
    "detect_gpus",
]
