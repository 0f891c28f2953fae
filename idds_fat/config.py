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

Every value is checked where it is read, against its field's type and rule
(``_one_of``, ``_at_least``, ``_above`` in the field's metadata): a bool is
never a number, a number never a bool, a ``work_dir`` that is a file is refused.
A bad one raises :class:`~idds_fat.errors.ConfigError` naming the setting, the
value (secrets masked) and where it came from::

    backend = ['local'] from /home/me/idds-fat.toml: expected one of local, slurm, panda
    max_workers = 'many' from $IDDS_FAT_MAX_WORKERS: expected a whole number
    publish_timeout = -5 from the arguments: expected a number above 0
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import platformdirs

from idds_fat.errors import ConfigError
from idds_fat.node.environments import CONTAINER_RUNTIMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

ENV_PREFIX = "IDDS_FAT_"
MB = 1024 * 1024
#: Settings whose values are secrets: never printed (``config show``), and their
#: ``IDDS_FAT_*`` variables kept out of the environment jobs inherit.
SECRET_SETTINGS = frozenset({"token", "broker_password"})
#: Values of ``cache`` that name no directory.
_CACHE_KEYWORDS = ("service",)
#: The names ``backend`` takes: the keys of ``idds_fat.backends.BACKENDS``, which
#: this module cannot import (it imports nothing above it); a test keeps them equal.
BACKEND_NAMES = ("local", "slurm", "panda")
_MASK = "********"


def _one_of(*choices: str) -> dict[str, Any]:
    return {"choices": choices}


def _at_least(minimum: float) -> dict[str, Any]:
    return {"minimum": minimum}


def _above(bound: float) -> dict[str, Any]:
    return {"above": bound}


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
        slurm_mode: ``"array"`` (the default): each task is one ``sbatch`` job
            array; ``"pilot"``: pilots (Slurm jobs running warm workers, one per
            core) lease the jobs from the workflow's embedded service
            (docs/backends/slurm.md, "Pilot mode").
        slurm_pilots, slurm_max_pilots: pilots started with the workflow, and
            the most that run at once (more are added while jobs wait).
        slurm_pilot_cores: ``--cpus-per-task`` of a pilot: jobs it runs at once.
        slurm_pilot_walltime: ``--time`` of a pilot (seconds); a job declaring
            a longer walltime is refused, one that no longer fits waits for a
            younger pilot.
        slurm_pilot_idle: seconds without a job after which a pilot leaves.
        slurm_afterok: submit a job that takes other Slurm jobs' futures as
            arguments at once, with ``--dependency=afterok:`` on them, so a chain
            runs on while the caller sleeps (docs/dependencies.md); False: the
            caller submits it when its inputs are done.
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
        panda_cache: the ``panda`` backend puts the code context and each task's
            payload into PanDA's cache (``file_server/upload_cache_file``, as iDDS
            and prun put sources) and jobs read them from there; specs, arguments
            and results stay with the service. Off by default: PanDA's cache is
            readable by the site's users (docs/backends/panda.md).
        progress: show a progress bar while a blocking call waits for several
            jobs (tqdm.auto: a widget in Jupyter, text on a terminal, nothing
            when stderr is not a terminal).
    """

    work_dir: Path = field(default_factory=_default_work_dir, metadata={"directory": True})
    backend: str = field(default="local", metadata=_one_of(*BACKEND_NAMES))
    service_url: str | None = field(default=None, metadata={"url": ("http", "https")})
    token: str | None = field(default=None, repr=False)
    cache: str | None = None
    max_workers: int = field(default_factory=lambda: os.cpu_count() or 1, metadata=_at_least(1))
    max_argument_bytes: int = field(default=100 * MB, metadata=_at_least(1))
    max_context_bytes: int = field(default=100 * MB, metadata=_at_least(1))
    result_ttl_days: float = field(default=7.0, metadata=_above(0))
    gpu_devices: tuple[str, ...] | None = None
    on_exit: str = field(default="wait", metadata=_one_of("wait", "cancel"))
    publish_timeout: float = field(default=120.0, metadata=_above(0))
    python: str = sys.executable
    local_mode: str = field(default="warm", metadata=_one_of("warm", "cold"))
    local_direct_results: bool = True
    broker: str | None = None
    broker_user: str | None = None
    broker_password: str | None = field(default=None, repr=False)
    broker_queue_prefix: str = "idds-fat"
    broker_heartbeat_ms: int = field(default=2000, metadata=_at_least(0))
    broker_timeout: float = field(default=10.0, metadata=_above(0))
    result_inline_bytes: int = field(default=1 * MB, metadata=_at_least(0))
    result_grace_seconds: float = field(default=30.0, metadata=_at_least(0))
    max_resubmits: int = field(default=1, metadata=_at_least(0))
    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_options: tuple[str, ...] = ()
    slurm_poll_min: float = field(default=2.0, metadata=_above(0))
    slurm_poll_max: float = field(default=30.0, metadata=_above(0))
    slurm_mode: str = field(default="array", metadata=_one_of("array", "pilot"))
    slurm_pilots: int = field(default=1, metadata=_at_least(1))
    slurm_max_pilots: int = field(default=4, metadata=_at_least(1))
    slurm_pilot_cores: int = field(default=1, metadata=_at_least(1))
    slurm_pilot_walltime: float = field(default=3600.0, metadata=_above(0))
    slurm_pilot_idle: float = field(default=60.0, metadata=_above(0))
    slurm_afterok: bool = True
    progress: bool = True
    cache_url_lifetime: float = field(default=7 * 86400.0, metadata=_above(0))
    env_cache_dir: Path | None = None
    container_runtime: str | None = field(
        default=None, metadata={"choices": CONTAINER_RUNTIMES, "by_name": True}
    )
    container_run_options: tuple[str, ...] = ()
    panda_cache: bool = False

    def __post_init__(self) -> None:
        # Values given to Config() directly are checked here; load_config checked
        # each where it read it, naming its source, so these pass again unchanged.
        # Frozen: checked and absolute forms are set through object.__setattr__.
        for name in _fields():
            value = getattr(self, name)
            object.__setattr__(self, name, _checked(name, value, "Config()"))
        if self.broker is not None:
            broker_addresses(self.broker)  # fail early on a malformed broker list
        if self.slurm_poll_min > self.slurm_poll_max:
            raise ConfigError(
                f"slurm_poll_min = {self.slurm_poll_min} is above "
                f"slurm_poll_max = {self.slurm_poll_max}"
            )
        if self.slurm_pilots > self.slurm_max_pilots:
            raise ConfigError(
                f"slurm_pilots = {self.slurm_pilots} is above "
                f"slurm_max_pilots = {self.slurm_max_pilots}"
            )
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


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_kinds: dict[str, tuple[type, bool]] = {}


def _kind(name: str) -> tuple[type, bool]:
    """The type of field ``name`` (``tuple`` for ``tuple[str, ...]``) and whether it may be None."""
    if not _kinds:
        for field_name, hint in typing.get_type_hints(Config).items():
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            members = typing.get_args(hint) if union else (hint,)
            base = next(m for m in members if m is not type(None))
            _kinds[field_name] = (typing.get_origin(base) or base, type(None) in members)
    return _kinds[name]


def _coerce(kind: type, value: Any) -> Any:
    """``value`` as ``kind``; text as an environment variable spells it (``4``, ``yes``, ``a,b``).

    Raises:
        ValueError: it is not one, saying what was expected.
    """
    text = value.strip() if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError("expected true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None and text.lstrip("+-").isdigit():
            return int(text)
        raise ValueError("expected a whole number")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif text is not None:
            try:
                number = float(text)
            except ValueError:
                raise ValueError("expected a number") from None
        else:
            raise ValueError("expected a number")
        if math.isnan(number):
            raise ValueError("expected a number")
        return number
    if kind is Path:
        if isinstance(value, str | os.PathLike) and os.fspath(value):
            return Path(value).expanduser()
        raise ValueError("expected a path")
    if kind is tuple:
        if text is not None:
            return tuple(v.strip() for v in text.split(",") if v.strip())
        if isinstance(value, list | tuple) and all(
            isinstance(v, str | int) and not isinstance(v, bool) for v in value
        ):
            return tuple(str(v) for v in value)
        raise ValueError("expected a list of strings")
    if isinstance(value, str):
        return value
    raise ValueError("expected a string")


def _problem(name: str, value: Any) -> tuple[Any, str | None]:
    """Return ``(value checked and converted, None)``, or ``(value, what was expected)``."""
    kind, optional = _kind(name)
    rule = _fields()[name].metadata
    if value is None:
        return value, None if optional else f"expected a value ({kind.__name__})"
    choices = rule.get("choices")
    try:
        value = _coerce(kind, value)
    except ValueError as exc:
        return value, f"expected one of {', '.join(choices)}" if choices else str(exc)
    if choices:
        chosen = Path(value).name if rule.get("by_name") else value
        if chosen not in choices:
            return value, f"expected one of {', '.join(choices)}"
    if "minimum" in rule and value < rule["minimum"]:
        return value, f"expected a number of at least {rule['minimum']}"
    if "above" in rule and value <= rule["above"]:
        return value, f"expected a number above {rule['above']}"
    if "url" in rule and urlparse(value).scheme not in rule["url"]:
        return value, f"expected a URL starting {' or '.join(s + '://' for s in rule['url'])}"
    if rule.get("directory") or (name == "cache" and _is_directory_location(value)):
        blocker = _file_in_the_way(_absolute_path(value))
        if blocker is not None:
            return value, f"{blocker} is a file, not a directory"
    return value, None


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` (or itself) if it is not a directory."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _checked(name: str, value: Any, source: str) -> Any:
    """Return ``value`` converted to setting ``name``'s type, once it passed its rule.

    Raises:
        ConfigError: naming the setting, the value (a secret masked) and ``source``.
    """
    converted, problem = _problem(name, value)
    if problem is None:
        return converted
    shown = _MASK if name in SECRET_SETTINGS else repr(value)
    raise ConfigError(f"{name} = {shown} from {source}: {problem}")


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
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: [idds_fat] must be a table of settings")
    unknown = set(data) - set(_fields())
    if unknown:
        raise ConfigError(f"{path}: unknown settings {sorted(unknown)}")
    return {k: _checked(k, v, str(path)) for k, v in data.items()}


def _from_env() -> dict[str, Any]:
    values = {}
    for name in _fields():
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _checked(name, raw, "$" + ENV_PREFIX + name.upper())
    return values


def load_config(base: Config | None = None, **overrides: Any) -> Config:
    """Build a :class:`Config` from defaults, the TOML file, the environment and ``overrides``.

    With ``base``, only ``overrides`` are applied on top of it. ``None`` overrides
    are ignored, so callers can pass their optional arguments straight through.

    Raises:
        ConfigError: an unknown setting, or a value of the wrong kind or out of
            bounds, naming the setting, the value and where it came from.
    """
    unknown = set(overrides) - set(_fields())
    if unknown:
        raise ConfigError(f"unknown settings {sorted(unknown)}")
    given = {k: _checked(k, v, "the arguments") for k, v in overrides.items() if v is not None}
    if base is not None:
        return dataclasses.replace(base, **given)
    values: dict[str, Any] = {}
    values.update(_from_file(config_file_path()))
    values.update(_from_env())
    values.update(given)
    return Config(**values)
