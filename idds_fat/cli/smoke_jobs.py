"""The jobs ``idds-fat smoke`` runs: tiny functions shipped by value.

This module imports nothing from idds-fat, and the smoke test registers it with
``cloudpickle.register_pickle_by_value``, so its functions (and its exception
class) travel with their code: a node needs cloudpickle, not idds-fat.
"""

from __future__ import annotations


class SmokeCheckError(Exception):
    """Raised on purpose by :func:`fail_on_purpose`; must come back as this very type."""


def square(x: int) -> int:
    """Return ``x * x``."""
    return x * x


def fail_on_purpose(token: str) -> None:
    """Raise :class:`SmokeCheckError` carrying ``token``.

    Raises:
        SmokeCheckError: always.
    """
    raise SmokeCheckError(token)
