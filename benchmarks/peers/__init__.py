"""The systems the benchmarks compare, one module each, behind one small interface.

``make_system(key)`` returns an unstarted :class:`~peers.base.System`;
``SYSTEM_KEYS`` lists them in the order tables show them.
"""

from __future__ import annotations

import dataclasses
import importlib.util

from peers.base import System

SYSTEM_KEYS: tuple[str, ...] = ("idds-warm", "idds-cold", "ppe", "dask", "parsl")
"""Every system, idds-fat first (ratios are idds-fat / peer)."""

PEER_MODULES: dict[str, str] = {"dask": "distributed", "parsl": "parsl"}
"""The import each peer needs (installed by the ``bench`` extra)."""


def warm_available() -> bool:
    """Return whether this idds-fat has the ``local_mode`` setting (warm workers)."""
    from idds_fat.config import Config

    return "local_mode" in {f.name for f in dataclasses.fields(Config)}


def missing_peers(keys: list[str]) -> list[str]:
    """Return the keys among ``keys`` whose package is not installed."""
    return [
        key
        for key in keys
        if key in PEER_MODULES and importlib.util.find_spec(PEER_MODULES[key]) is None
    ]


def make_system(key: str, workers: int) -> System:
    """Return the unstarted system ``key`` running ``workers`` jobs at once.

    Raises:
        KeyError: ``key`` is not one of :data:`SYSTEM_KEYS`.
    """
    if key in ("idds-warm", "idds-cold"):
        from peers.idds import IddsFatSystem

        return IddsFatSystem(key.removeprefix("idds-"), workers)
    if key == "ppe":
        from peers.ppe import ProcessPoolSystem

        return ProcessPoolSystem(workers)
    if key == "dask":
        from peers.dask_cluster import DaskSystem

        return DaskSystem(workers)
    if key == "parsl":
        from peers.parsl_htex import ParslSystem

        return ParslSystem(workers)
    raise KeyError(f"unknown system {key!r}; known: {', '.join(SYSTEM_KEYS)}")


__all__ = [
    "PEER_MODULES",
    "SYSTEM_KEYS",
    "System",
    "make_system",
    "missing_peers",
    "warm_available",
]
