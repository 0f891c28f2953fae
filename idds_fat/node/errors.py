"""The errors idds-fat raises itself, as far as a node can raise them, and the exit statuses.

The SDK's ``idds_fat.errors`` builds on these classes (one class per concept
on both sides), so the node needs nothing of the SDK.
"""

from __future__ import annotations

# How a job that delivered no result exits (0: a result was delivered).
EXIT_UNREPORTED = 2  # it could not start, or not even report its failure
EXIT_UNDELIVERED = 3  # its result could not be delivered within the publish timeout


class IddsFatError(Exception):
    """Base class of the errors idds-fat raises itself."""


class WrapperError(IddsFatError):
    """A failure of the wrapper itself, before or after the user's function."""


class DeliveryError(WrapperError):
    """The result could not be handed to the result store in time."""


class IntegrityError(IddsFatError):
    """Bytes did not match their sha256 or HMAC: tampered, corrupted or forged."""


class UnsafeArchiveError(IntegrityError):
    """An archive tried to write outside its tree, hold a link, or expand too far."""


class JobEnvironmentError(IddsFatError):
    """The job's environment (venv, conda, container, init_env) could not be built or entered."""


class InterpreterMismatchError(JobEnvironmentError):
    """The job's Python (major.minor) or cloudpickle differs from the caller's.

    Raised before anything is unpickled; the message names both versions and
    the environment the job ran in.
    """
