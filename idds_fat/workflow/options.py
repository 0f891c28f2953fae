"""What a workflow was asked for, resolved once: configuration, resources, placement, queues."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

from idds_fat.backends import BACKENDS, Resources
from idds_fat.config import Config, load_config
from idds_fat.context.environment import Environment, as_environment
from idds_fat.errors import ConfigError, IgnoredParameterWarning
from idds_fat.workflow import idds_names

# iDDS parameter names -> our resource names.
_IDDS_RESOURCES = {"core_count": "cores", "total_memory": "memory_mb", "max_walltime": "walltime"}
_RESOURCE_NAMES = ("cores", "memory_mb", "gpus", "walltime", "jobs_per_worker")
# iDDS parameters that only some backends use.
_PLACEMENT_PARAMETERS = ("queue", "site", "cloud", "init_env", "container_options")
# Applied by the wrapper on every backend (docs/environments/), so never "ignored".
_ENVIRONMENT_PARAMETERS = ("init_env", "container_options")

_warned: set[tuple[str, str]] = set()

T = TypeVar("T")


def warn_ignored(parameter: str, backend: str, what: str = "") -> None:
    """Warn, once per process, that ``parameter`` has no effect on ``backend``."""
    if (parameter, backend) in _warned:
        return
    _warned.add((parameter, backend))
    warnings.warn(
        f"{parameter} has no effect on the {backend} backend{what}; it is recorded but not used",
        IgnoredParameterWarning,
        stacklevel=4,
    )


def _cache_dir(config: Config) -> str | None:
    """The directory cache's path, when the cache is a directory."""
    cache = config.cache
    if not cache or cache == "service" or "://" in cache and not cache.startswith("file://"):
        return None
    return cache.removeprefix("file://")


@dataclass
class WorkflowOptions:
    """A workflow's options, resolved: what :class:`Workflow` was given, checked and merged.

    One instance is shared by the workflow and its parts; ``attach`` sets
    ``resources`` to those the workflow recorded.

    Attributes:
        config: the configuration (defaults, file, environment, then arguments).
        resources: the default resources of every job.
        placement: iDDS placement parameters (``queue``, ``site``, ``cloud``,
            ``init_env``, ``container_options``, ``service``, ``local``).
        environment: the default environment of its tasks (``None``: the current one).
        source_dir: the directory shipped as the jobs' code context, if any
            (default: iDDS's, the current directory; ``idds_names.code_context``).
        exclude_source_files: ``.gitignore``-style patterns left out of it.
        call: iDDS's workflow function and its arguments (``func``, ``args``,
            ``kwargs``, ``pre_kwargs``), and ``use_func_dir``,
            ``source_dir_parent_level`` (idds_names.py).
    """

    config: Config
    resources: Resources
    placement: Mapping[str, Any]
    environment: Environment | None = None
    source_dir: Path | None = None
    exclude_source_files: tuple[str, ...] = ()
    call: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def resolve(
        cls,
        *,
        resources: Mapping[str, Any],
        options: Mapping[str, Any],
        backend: str | None = None,
        on_exit: str | None = None,
        source_dir: str | Path | bool | None = None,
        exclude_source_files: Sequence[str] = (),
        config: Config | None = None,
    ) -> WorkflowOptions:
        """Sort ``options`` (iDDS parameters, ``environment``, :class:`Config` settings)
        into their places over ``config`` and ``resources``.

        Raises:
            ConfigError: an unknown option, backend or a bad value.
        """
        resolved = dict(resources)
        placement: dict[str, Any] = {}
        call: dict[str, Any] = {}
        environment = None
        settings: dict[str, Any] = {"backend": backend, "on_exit": on_exit}
        config_fields = set(Config.__dataclass_fields__)
        for key, value in options.items():
            if key in _IDDS_RESOURCES:
                resolved[_IDDS_RESOURCES[key]] = resolved[_IDDS_RESOURCES[key]] or value
            elif key == "environment":
                environment = as_environment(value)  # a malformed one fails here
            elif key in _PLACEMENT_PARAMETERS or key in ("service", "local"):
                placement[key] = value
            elif key in config_fields:
                settings[key] = value
            elif key in idds_names.CALL_NAMES or key in idds_names.SOURCE_NAMES:
                call[key] = value
            elif key in idds_names.IGNORED_NAMES or key in idds_names.ALWAYS_NAMES:
                placement[key] = value  # recorded; warn_ignored_parameters says so
            else:
                raise ConfigError(f"Workflow got an unknown option {key!r}")
        loaded = load_config(base=config, **settings) if config else load_config(**settings)
        if loaded.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {loaded.backend!r}; available: {sorted(BACKENDS)}")
        # Absolute now, against the current directory: jobs run elsewhere.
        root, own_dirs = idds_names.code_context(
            source_dir, call, (loaded.work_dir, loaded.env_cache_dir, _cache_dir(loaded))
        )
        return cls(
            config=loaded,
            resources=Resources(**resolved),
            placement=placement,
            environment=environment,
            source_dir=root,
            exclude_source_files=(*own_dirs, *exclude_source_files),
            call=call,
        )

    def warn_ignored_parameters(self) -> None:
        """Warn, once per process and parameter, about each one the backend does not use.

        Call it from the constructor the user called: the warning points at its caller.
        """
        backend = self.config.backend
        supported = BACKENDS[backend].supported_parameters
        for key, value in self.placement.items():
            if key in idds_names.IGNORED_NAMES or key in idds_names.ALWAYS_NAMES:
                if key in idds_names.IGNORED_NAMES and idds_names.is_set(value):
                    idds_names.warn_idds_ignored(key, stacklevel=4)
            elif key == "local":
                pass  # local=False: submit() runs the body as a driver (workflow/driver.py)
            elif value is not None and key not in supported and key not in _ENVIRONMENT_PARAMETERS:
                warn_ignored(key, backend)
        for key in _RESOURCE_NAMES:
            if getattr(self.resources, key) is not None and key not in supported:
                warn_ignored(key, backend)

    def result_queue(self, workflow_id: str) -> str:
        """Return the STOMP destination of the results of workflow ``workflow_id``."""
        return f"/queue/{self.config.broker_queue_prefix}.{workflow_id}"

    def mirror_queue(self, workflow_id: str) -> str:
        """Return the STOMP destination of the copy of its results that the service mirrors."""
        return f"/queue/{self.config.broker_queue_prefix}.mirror.{workflow_id}"

    def mirror_settings(self, workflow_id: str) -> dict[str, Any] | None:
        """Return what the embedded service's broker mirror needs, or None without a broker."""
        config = self.config
        if not config.broker:
            return None
        return {
            "brokers": config.brokers,
            "destination": self.mirror_queue(workflow_id),
            "user": config.broker_user,
            "password": config.broker_password,
        }

    def stomp_spec(self, workflow_id: str) -> dict[str, Any] | None:
        """Return the ``stomp`` entry of a job spec (where jobs publish); None without a broker."""
        config = self.config
        if not config.broker:
            return None
        return {
            "brokers": config.brokers,
            "destination": self.result_queue(workflow_id),
            "mirror": self.mirror_queue(workflow_id),
            "mirror_ttl": config.result_ttl_days * 86400,
            "timeout": config.broker_timeout,
        }


class OptionAttribute(Generic[T]):
    """An attribute of an object with ``options`` that reads and sets the option of
    the same name: ``Workflow.config`` is ``workflow.options.config``."""

    def __init__(self, doc: str) -> None:
        self.__doc__ = doc
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, instance: None, owner: type) -> OptionAttribute[T]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...
    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return getattr(instance.options, self._name)  # type: ignore[attr-defined]

    def __set__(self, instance: object, value: T) -> None:
        setattr(instance.options, self._name, value)  # type: ignore[attr-defined]
