"""Exceptions raised by idds-fat.

Every exception the SDK raises on purpose derives from :class:`IddsFatError`, so
``except IddsFatError`` catches them all; a remote exception raised by the user's
own function re-raises as its own type instead (see :class:`RemoteTraceback`).

The errors a job can raise on its node (``IntegrityError``, ``UnsafeArchiveError``,
``JobEnvironmentError``, ``InterpreterMismatchError``) and the root are defined
in ``idds_fat.node.errors``, which must run without the SDK; they are the same
classes here.
"""

from __future__ import annotations

from typing import Any

from idds_fat.node.errors import IddsFatError as IddsFatError
from idds_fat.node.errors import IntegrityError as IntegrityError
from idds_fat.node.errors import InterpreterMismatchError as InterpreterMismatchError
from idds_fat.node.errors import JobEnvironmentError as JobEnvironmentError
from idds_fat.node.errors import UnsafeArchiveError as UnsafeArchiveError


class ConfigError(IddsFatError, ValueError):
    """A setting is missing, unknown or has a value of the wrong kind."""


class ArgumentError(IddsFatError, ValueError):
    """An argument of a ``@work`` call cannot travel: unpicklable or too large.

    ``argument`` names the offending argument (``"x"``, ``"args[1]"``,
    ``"multi_jobs_kwargs_list[3]['lr']"``).
    """

    def __init__(self, message: str, argument: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument


class SignatureError(IddsFatError, TypeError):
    """The arguments of a call do not fit its function's signature.

    Raised at the call site, before anything is stored or submitted, as calling
    the function here would raise; a ``TypeError`` too, as that call's error is.
    ``function`` names the function; ``argument`` says which call of a map did
    not fit (``"multi_jobs_kwargs_list[3]"``, ``"element 2"``), else ``None``.
    """

    def __init__(self, message: str, function: str, argument: str | None = None) -> None:
        super().__init__(message)
        self.function = function
        self.argument = argument


class ContextError(IddsFatError):
    """The code context (``source_dir``) cannot be packed."""


class ContextTooLargeError(ContextError):
    """The code context is larger than its cap; the message lists the largest entries."""


class CacheError(IddsFatError):
    """The cache could not store or return an object."""


class ServiceError(IddsFatError):
    """The idds-fat HTTP service answered with an error or could not be reached."""


class ServiceAccessError(ServiceError):
    """The workflow's service (``service_url``) cannot be used: checked when the workflow opens.

    ``url`` is the service's address; ``status`` the HTTP status it answered
    (401: a wrong or missing ``token``), ``None`` when it could not be reached.
    """

    def __init__(self, message: str, url: str, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class NoActiveWorkflowError(IddsFatError, RuntimeError):
    """A call needs a running workflow and none is active."""


class WorkflowClosedError(IddsFatError, RuntimeError):
    """A task was submitted to a workflow that was closed, detached or shut down.

    A ``RuntimeError`` too, as ``concurrent.futures.Executor.submit`` raises
    after ``shutdown``.
    """


class WorkflowStartedError(IddsFatError, RuntimeError):
    """A workflow setting (``wf.queue``, ``wf.core_count``, ...) was changed after the
    workflow started: its backend and jobs were set up with the old value."""


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a job.

    It is attached as ``__cause__`` of the re-raised exception, so Python prints it
    above the caller's own traceback, as ``concurrent.futures`` does.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class RemoteError(IddsFatError):
    """A job failed with an exception that could not be sent back as itself.

    Raised when the remote exception does not pickle or unpickle, and for failures
    of the wrapper on the node before the function ran (fetching, verifying).
    ``type_name``, ``message`` and ``traceback`` carry what the job reported.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback


class JobLostError(IddsFatError):
    """A job ended without delivering a result (killed, crashed, out of memory).

    Carries the evidence: ``job`` (a readable job name), ``exit_status`` (the
    return code, negative for a signal), ``reason``, the ``stderr_path`` and the
    last lines of stderr in ``stderr_tail``.
    """

    def __init__(
        self,
        job: str,
        exit_status: int | None,
        reason: str,
        stderr_tail: str = "",
        stderr_path: str | None = None,
    ) -> None:
        lines = [f"job {job} ended without a result: {reason}"]
        if exit_status is not None:
            lines[0] += f" (exit status {exit_status})"
        if stderr_path:
            lines.append(f"stderr: {stderr_path}")
        if stderr_tail:
            lines.append("last lines of stderr:")
            lines.extend("    " + line for line in stderr_tail.rstrip().splitlines())
        super().__init__("\n".join(lines))
        self.job = job
        self.exit_status = exit_status
        self.reason = reason
        self.stderr_tail = stderr_tail
        self.stderr_path = stderr_path


class DependencyError(IddsFatError):
    """A job did not run because a job whose future it took as an argument failed.

    ``job`` names the job that did not run, ``dependency`` the input that failed
    and ``failed_job`` the job at the root of the failure (``dependency`` itself,
    or the job its own failure came from). The input's exception is the
    ``__cause__``, so the chain of failures prints as a chain of causes.
    """

    def __init__(
        self, message: str, job: str = "", dependency: str = "", failed_job: str = ""
    ) -> None:
        super().__init__(message)
        self.job = job
        self.dependency = dependency
        self.failed_job = failed_job or dependency

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.job, self.dependency, self.failed_job))


class IgnoredParameterWarning(UserWarning):
    """A workflow or work parameter has no effect on the chosen backend (warned once)."""
