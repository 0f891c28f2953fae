"""The errors of the ``panda`` backend: :class:`PandaError` and its kinds."""

from __future__ import annotations

from typing import Any

from idds_fat.errors import IddsFatError


class PandaError(IddsFatError):
    """PanDA refused a request or could not be reached.

    ``operation`` names the API call (``task/submit``), ``status`` the HTTP status
    (if any) and ``code`` PanDA's own return code (if any). Messages carry what
    PanDA said, never a token or a secret.
    """

    def __init__(
        self, message: str, operation: str = "", status: int | None = None, code: Any = None
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.status = status
        self.code = code


class PandaAuthError(PandaError):
    """No usable credentials, or PanDA rejected them (HTTP 401/403)."""


class PandaRejectedError(PandaError):
    """PanDA answered but refused the request (``success: false``), e.g. a task."""


class PandaUnavailableError(PandaError):
    """The server could not be reached, or kept failing (5xx), after all retries."""
