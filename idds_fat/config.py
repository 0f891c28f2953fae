"""Configuration: defaults < TOML file < ``IDDS_FAT_*`` environment < arguments.

The TOML file is ``$IDDS_FAT_CONFIG`` if set, else ``config.toml`` in the user's
config directory (``~/.config/idds-fat/config.toml`` on Linux). Its keys are the
field names of :class:`Config`, at top level or under an ``[idds_fat]`` table.
An environment variable is the field name in upper case behind ``IDDS_FAT_``
(``IDDS_FAT_MAX_WORKERS=4``); a list is comma-separated.

Path settings (``work_dir``, ``env_cache_dir``, a directory ``cache``, and a
``python`` given as a path) are made absolute once, against the current
directory when the settings are read: jobs and workers run in directories of
their own, where a relative path would name another place. URLs and bare
command names (``python3``) stay as they are.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import platformdirs

from idds_fat.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

ENV_PREFIX = "IDDS_FAT_"
MB = 1024 * 1024
#: Values of ``cache`` that name no directory.
_CACHE_KEYWORDS = ("service",)


def _default_work_dir() -> Path:
    return Path(platformdirs.user_cache_dir("idds-fat"))


@dataclass(frozen=True)
class Config:
    """Settings of the SDK, the embedded service and the local backend.

    Attributes:
        work_dir: where workflows keep their state, job logs and the local cache
            (made absolute, like every path setting: see the module's docstring).
        backend: ``"local"`` (the default); other backends come with their issues.
        service_url: URL of a running ``idds-fat serve``; ``None`` starts one in-process.
        token: bearer token for the service; generated per workflow when embedded.
        cache: ``None`` (a directory under ``work_dir``), ``"service"`` (the HTTP
            cache of the service), a directory path or ``file://`` URL, an HTTP
            URL, or ``s3://bucket/prefix`` (boto3's usual configuration).
        max_workers: jobs the local backend runs at once (default: the CPU count).
        max_argument_bytes: cap on the pickled arguments of one call.
        max_context_bytes: cap on the zipped code context.
        result_ttl_days: how long the service keeps results.
        gpu_devices: GPU ids the local backend hands out; ``None`` asks ``nvidia-smi -L``.
        on_exit: ``"wait"`` or ``"cancel"``: what leaving a workflow does with jobs
            still running (an exception in the body always cancels).
        publish_timeout: seconds a job keeps trying to deliver its result.
        python: the interpreter that local jobs run: a path, or a name looked up
            on ``PATH`` (``python3``).
        local_mode: ``"warm"`` (the default): the local backend keeps
            ``max_workers`` long-lived worker processes that run job after job
            through the wrapper; ``"cold"``: one new interpreter per job, as on
            a batch slot. Jobs asking for GPUs or a non-current environment
            always run cold.
        local_direct_results: local jobs hand each result straight back to the
            caller (a warm worker over its pipe, a cold job in a file in its job
            dir; the caller keeps the REST store's copy) when the workflow runs
            its own service and no broker; ``False`` makes them deliver through
            the result channels like any job.
        broker: STOMP brokers, ``stomp://host1:61613,host2:61613``; ``None``
            (the default) delivers results over REST only.
        broker_user, broker_password: broker credentials (given to jobs with
            their secrets, never on a command line or in logs).
        broker_queue_prefix: results go to ``/queue/PREFIX.WORKFLOW_ID`` and a
            copy to ``/queue/PREFIX.mirror.WORKFLOW_ID`` for the service's mirror.
        broker_heartbeat_ms: STOMP heart-beat interval of the caller's subscription.
        broker_timeout: seconds a job waits for the broker's connection and receipt.
        result_inline_bytes: results whose envelope is larger travel by
            reference through the cache (default 1 MiB).
        result_grace_seconds: how long the caller waits for the result of a job
            that exited cleanly (a channel took its result) before acting.
        max_resubmits: times a job whose accepted result never arrived (a broker
            lost it) is run again before it is reported lost.
        slurm_partition, slurm_account: ``--partition`` and ``--account`` of
            Slurm jobs (the iDDS ``queue`` option overrides the partition).
        slurm_options: further ``sbatch`` options, as they are.
        slurm_poll_min, slurm_poll_max: the Slurm watcher's ``squeue`` interval
            starts at the first and doubles up to the second (seconds).
        cache_url_lifetime: seconds the presigned URLs handed to jobs stay valid
            on an ``s3://`` cache (long enough for batch jobs to wait in a queue;
            S3 allows at most 7 days).
        env_cache_dir: node-local directory where jobs build and keep their
            venv and conda environments (``None``: ``~/.cache/idds-fat/envs`` on
            the node; a node's own ``IDDS_FAT_ENV_CACHE_DIR`` wins).
        container_runtime: the runtime of ``Container`` environments
            (``apptainer``, ``singularity``, ``podman``, ``docker``); ``None``
            takes the first the node has.
        container_run_options: options given to every container run, before
            the image's own (e.g. ``--runtime runc`` for podman on hosts where
            crun fails, ``--network host`` to reach loopback services).
        progress: show a progress bar while a blocking call waits for several
            jobs (tqdm.auto: a widget in Jupyter, text on a terminal, nothing
            when stderr is not a terminal).
    """

    work_dir: Path = field(default_factory=_default_work_dir)
    backend: str = "local"
    service_url: str | None = None
    token: str | None = field(default=None, repr=False)
    cache: str | None = None
    max_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_argument_bytes: int = 100 * MB
    max_context_bytes: int = 100 * MB
    result_ttl_days: float = 7.0
    gpu_devices: tuple[str, ...] | None = None
    on_exit: str = "wait"
    publish_timeout: float = 120.0
    python: str = sys.executable
    local_mode: str = "warm"
    local_direct_results: bool = True
    broker: str | None = None
    broker_user: str | None = None
    broker_password: str | None = field(default=None, repr=False)
    broker_queue_prefix: str = "idds-fat"
    broker_heartbeat_ms: int = 2000
    broker_timeout: float = 10.0
    result_inline_bytes: int = 1 * MB
    result_grace_seconds: float = 30.0
    max_resubmits: int = 1
    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_options: tuple[str, ...] = ()
    slurm_poll_min: float = 2.0
    slurm_poll_max: float = 30.0
    progress: bool = True
    cache_url_lifetime: float = 7 * 86400.0
    env_cache_dir: Path | None = None
    container_runtime: str | None = None
    container_run_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.on_exit not in ("wait", "cancel"):
            raise ConfigError(f"on_exit must be 'wait' or 'cancel', not {self.on_exit!r}")
        if self.local_mode not in ("warm", "cold"):
            raise ConfigError(f"local_mode must be 'warm' or 'cold', not {self.local_mode!r}")
        if self.max_workers < 1:
            raise ConfigError(f"max_workers must be at least 1, not {self.max_workers}")
        if self.broker is not None:
            broker_addresses(self.broker)  # fail early on a malformed broker list
        # Frozen: the absolute forms are set through object.__setattr__, once, here.
        object.__setattr__(self, "work_dir", _absolute_path(self.work_dir))
        if self.env_cache_dir is not None:
            object.__setattr__(self, "env_cache_dir", _absolute_path(self.env_cache_dir))
        if self.cache is not None and _is_directory_location(self.cache):
            object.__setattr__(self, "cache", str(_absolute_path(self.cache)))
        if os.sep in self.python:  # a path, not a name looked up on PATH
            object.__setattr__(self, "python", str(_absolute_path(self.python)))

    @property
    def brokers(self) -> list[tuple[str, int]]:
        """The ``(host, port)`` pairs of ``broker`` (empty when none is configured)."""
        return broker_addresses(self.broker) if self.broker else []

    def replace(self, **changes: Any) -> Config:
        """Return a copy with ``changes`` applied (``None`` values are ignored)."""
        return load_config(base=self, **changes)


def _absolute_path(value: str | os.PathLike[str]) -> Path:
    # ~ expanded, joined to the current directory, . and .. folded; symbolic links
    # kept (a shared file system's path may be a link that nodes resolve alike).
    return Path(os.path.abspath(Path(value).expanduser()))


def _is_directory_location(cache: str) -> bool:
    """Whether a ``cache`` setting names a directory (not ``service`` nor a URL)."""
    if not cache or cache in _CACHE_KEYWORDS:
        return False
    scheme = urlparse(cache).scheme
    return not scheme or len(scheme) == 1  # one letter is a Windows drive, not a scheme


def broker_addresses(broker: str) -> list[tuple[str, int]]:
    """Parse ``stomp://host1:61613,host2:61613`` into ``[(host, port), ...]``.

    Raises:
        ConfigError: not a ``stomp://`` list of ``host:port``.
    """
    if not broker.startswith("stomp://"):
        raise ConfigError(f"broker must look like stomp://host:port[,host:port], not {broker!r}")
    addresses = []
    for item in broker[len("stomp://") :].split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"broker address {item!r} is not host:port")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _convert(name: str, value: Any) -> Any:
    """Coerce a TOML or environment value to the type of field ``name``."""
    kind = _fields()[name].type
    try:
        if "Path" in kind:
            return Path(value).expanduser()
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.strip().lower() not in (
                    "1",
                    "0",
                    "true",
                    "false",
                    "yes",
                    "no",
                    "on",
                    "off",
                ):
                    raise ValueError("expected true or false")
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind.startswith("tuple"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(str(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}={value!r}: {exc}") from None
    return value


def config_file_path() -> Path:
    """Return the path of the TOML configuration file (it need not exist)."""
    explicit = os.environ.get(ENV_PREFIX + "CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    return Path(platformdirs.user_config_dir("idds-fat")) / "config.toml"


def _from_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    data = data.get("idds_fat", data)
    unknown = set(data) - set(_fields())
    if unknown:
        raise ConfigError(f"{path}: unknown settings {sorted(unknown)}")
    return {k: _convert(k, v) for k, v in data.items()}


def _from_env() -> dict[str, Any]:
    values = {}
    for name in _fields():
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _convert(name, raw)
    return values


def load_config(base: Config | None = None, **overrides: Any) -> Config:
    """Build a :class:`Config` from defaults, the TOML file, the environment and ``overrides``.

    With ``base``, only ``overrides`` are applied on top of it. ``None`` overrides
    are ignored, so callers can pass their optional arguments straight through.

    Raises:
        ConfigError: an unknown setting, or a value of the wrong kind.
    """
    unknown = set(overrides) - set(_fields())
    if unknown:
        raise ConfigError(f"unknown settings {sorted(unknown)}")
    given = {k: _convert(k, v) for k, v in overrides.items() if v is not None}
    if base is not None:
        return dataclasses.replace(base, **given)
    values: dict[str, Any] = {}
    values.update(_from_file(config_file_path()))
    values.update(_from_env())
    values.update(given)
    return Config(**values)
