"""Where a job's function runs: the environment specs, and what the caller packs for them.

A task names its environment with ``@work(environment=...)`` (or a workflow's
default with ``Workflow(environment=...)``):

- :class:`Current` (the default): the interpreter the backend starts the wrapper with;
- :class:`Venv`: a virtual environment the node builds from requirements with its
  own Python (once per node, cached by the hash of requirements and Python), or a
  ``venv-pack`` tarball;
- :class:`Conda`: a ``conda-pack`` tarball (given, or packed here from a named env);
- :class:`Container`: an image run by apptainer, singularity, podman or docker.

Each becomes the ``environment`` object of the job spec (see ``docs/contracts.md``);
tarballs go into the content cache by sha256 and travel like the code context.
The wrapper applies the spec on the node (``idds_fat.node.environments``).
A string form is accepted too: ``"current"``, ``"venv:numpy==1.26 scipy"``,
``"venv:packed.tar.gz"``, ``"conda:NAME-OR-PATH"``, ``"container:IMAGE"``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cloudpickle

from idds_fat.cache import ContentStore
from idds_fat.errors import ConfigError, ContextError

_TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz", ".tar.zst")


def caller_versions() -> dict[str, str]:
    """Return this interpreter's Python (major.minor) and cloudpickle versions.

    They go into every call payload's header; the wrapper refuses to unpickle
    under other versions (the interpreter check).
    """
    return {
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "cloudpickle": cloudpickle.__version__,
    }


class Environment:
    """Base of the environment specs; ``kind`` names it in the job spec."""

    kind: ClassVar[str] = ""

    def describe(self) -> str:
        """Return a short human-readable name used in messages and on the node."""
        return self.kind

    def node_spec(self, store: ContentStore) -> dict[str, Any]:
        """Return the job spec's ``environment`` object, putting any archive into ``store``.

        Raises:
            ContextError: an archive cannot be read or packed.
        """
        return {"kind": self.kind, "label": self.describe()}


@dataclass(frozen=True)
class Current(Environment):
    """Run in the interpreter the backend starts the wrapper with (``Config.python`` on local)."""

    kind: ClassVar[str] = "current"


@dataclass(frozen=True)
class Venv(Environment):
    """A virtual environment: built on the node from requirements, or a venv-pack tarball.

    Args:
        requirements: pip requirement strings, installed into a venv the node
            creates with its own Python. ``cloudpickle==`` the caller's version is
            added unless ``pin_cloudpickle=False`` or a requirement names it.
        requirements_file: a requirements file read here (its lines join
            ``requirements``; ``-r`` includes and local paths are not followed).
        packed: a ``venv-pack`` tarball to unpack on the node instead (it runs
            only where the interpreter it was made with exists at the same path).
        pip_options: extra ``pip install`` options, e.g.
            ``("--no-index", "--find-links", "/shared/wheels")``.
        pin_cloudpickle: add the caller's cloudpickle to the requirements.
    """

    kind: ClassVar[str] = "venv"
    requirements: Sequence[str] = ()
    requirements_file: str | os.PathLike | None = None
    packed: str | os.PathLike | None = None
    pip_options: Sequence[str] = ()
    pin_cloudpickle: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.requirements, str):
            object.__setattr__(self, "requirements", (self.requirements,))
        object.__setattr__(self, "requirements", tuple(self.requirements))
        object.__setattr__(self, "pip_options", tuple(self.pip_options))
        if self.packed is not None and (self.requirements or self.requirements_file):
            raise ConfigError("Venv: give requirements or a packed tarball, not both")

    def all_requirements(self) -> list[str]:
        """Return the requirements the node installs (file lines, then the cloudpickle pin).

        Raises:
            ContextError: the requirements file cannot be read.
        """
        lines = list(self.requirements)
        if self.requirements_file is not None:
            try:
                text = Path(self.requirements_file).read_text()
            except OSError as exc:
                raise ContextError(f"venv requirements file: {exc}") from None
            lines += [
                s.strip() for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")
            ]
        named = {_project_name(line) for line in lines}
        if self.pin_cloudpickle and "cloudpickle" not in named:
            lines.append(f"cloudpickle=={cloudpickle.__version__}")
        return lines

    def describe(self) -> str:
        """Return ``venv [req, ...]`` or ``venv-pack NAME``."""
        if self.packed is not None:
            return f"venv-pack {Path(self.packed).name}"
        shown = list(self.requirements) + (
            [str(self.requirements_file)] if self.requirements_file else []
        )
        return "venv [" + ", ".join(shown) + "]"

    def node_spec(self, store: ContentStore) -> dict[str, Any]:
        """Return the spec: requirements and pip options, or the tarball's cache key."""
        spec = super().node_spec(store)
        if self.packed is not None:
            spec["archive"] = {"key": put_file(store, Path(self.packed))}
        else:
            spec["requirements"] = self.all_requirements()
            spec["pip_options"] = list(self.pip_options)
        return spec


@dataclass(frozen=True)
class Conda(Environment):
    """A conda environment shipped as a ``conda-pack`` tarball.

    ``source`` is a tarball (``.tar.gz`` and friends), a conda env directory, or
    the name of a local conda env; the last two are packed here once per
    process with ``conda-pack`` (which must be installed). The node unpacks it
    once, runs its ``bin/conda-unpack`` and runs the job with its ``bin/python``.
    """

    kind: ClassVar[str] = "conda"
    source: str | os.PathLike = ""

    def __post_init__(self) -> None:
        if not str(self.source):
            raise ConfigError("Conda needs a conda-pack tarball, an env directory or an env name")

    def describe(self) -> str:
        """Return ``conda NAME``."""
        return f"conda {Path(self.source).name}"

    def node_spec(self, store: ContentStore) -> dict[str, Any]:
        """Return the spec naming the tarball's cache key (packing the env first if needed)."""
        spec = super().node_spec(store)
        spec["archive"] = {"key": put_file(store, conda_tarball(self.source))}
        return spec


@dataclass(frozen=True)
class Container(Environment):
    """A container image the wrapper re-executes itself in.

    Args:
        image: what the runtime runs (``docker://…``, a ``.sif`` path, a local image name).
        runtime: ``apptainer``, ``singularity``, ``podman`` or ``docker``; ``None``
            takes the first of them the node has (or the ``container_runtime`` setting).
        options: runtime options placed after ``run`` / ``exec``, added to the
            ``container_run_options`` setting (e.g. ``--network host`` to reach
            services on the caller's loopback).
        python: the image's interpreter (same Python major.minor and cloudpickle
            as the caller, or the job fails with the interpreter check's message).
    """

    kind: ClassVar[str] = "container"
    image: str = ""
    runtime: str | None = None
    options: Sequence[str] = ()
    python: str = "python3"

    def __post_init__(self) -> None:
        if not self.image:
            raise ConfigError("Container needs an image")
        if self.runtime is not None and self.runtime not in (
            "apptainer",
            "singularity",
            "podman",
            "docker",
        ):
            raise ConfigError(f"unknown container runtime {self.runtime!r}")
        object.__setattr__(self, "options", tuple(str(o) for o in self.options))

    def describe(self) -> str:
        """Return ``container IMAGE``."""
        return f"container {self.image}"

    def node_spec(self, store: ContentStore) -> dict[str, Any]:
        """Return the spec: image, runtime, options and the image's Python."""
        spec = super().node_spec(store)
        spec.update(
            image=self.image, runtime=self.runtime, options=list(self.options), python=self.python
        )
        return spec


def _project_name(requirement: str) -> str:
    name = requirement.strip()
    for stop in "<>=!~;[ @":
        name = name.split(stop, 1)[0]
    return name.lower().replace("_", "-")


def as_environment(value: Environment | str | None) -> Environment:
    """Return ``value`` as an :class:`Environment` (``None`` is :class:`Current`).

    Strings: ``"current"``, ``"venv:REQ REQ…"`` (or ``"venv:PACKED.tar.gz"``),
    ``"conda:NAME-OR-PATH"``, ``"container:IMAGE"``.

    Raises:
        ConfigError: anything else.
    """
    if value is None:
        return Current()
    if isinstance(value, Environment):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"environment must be an Environment or a string, not {value!r}")
    kind, _, rest = value.partition(":")
    rest = rest.strip()
    if kind == "current" and not rest:
        return Current()
    if kind == "venv" and rest:
        if rest.endswith(_TARBALL_SUFFIXES):
            return Venv(packed=rest)
        return Venv(tuple(rest.replace(",", " ").split()))
    if kind == "conda" and rest:
        return Conda(rest)
    if kind == "container" and rest:
        return Container(rest)
    raise ConfigError(
        f"environment {value!r} is not 'current', 'venv:REQUIREMENTS', 'venv:PACKED.tar.gz', "
        "'conda:NAME-OR-PATH' or 'container:IMAGE'"
    )


def from_idds_container_options(options: Mapping[str, Any] | None) -> Container | None:
    """Map iDDS ``container_options`` (``{"container_image": IMAGE, ...}``) onto a Container.

    ``container_type`` (when given) names the runtime. Returns ``None`` when
    there is no image.

    Raises:
        ConfigError: an unknown runtime.
    """
    if not options:
        return None
    image = options.get("container_image") or options.get("image")
    if not image:
        return None
    runtime = options.get("container_type") or options.get("runtime")
    return Container(
        str(image), runtime=runtime or None, options=tuple(options.get("options") or ())
    )


@dataclass
class EnvironmentSettings:
    """The caller's settings that shape every job's environment spec.

    ``cache_dir`` (node-local, ``None``: ``~/.cache/idds-fat/envs`` on the node;
    a node's ``IDDS_FAT_ENV_CACHE_DIR`` wins), ``container_runtime`` and
    ``container_run_options`` (e.g. ``--runtime runc`` for podman on a
    host whose default OCI runtime fails).
    """

    cache_dir: str | None = None
    container_runtime: str | None = None
    container_run_options: Sequence[str] = field(default_factory=tuple)


def environment_spec(
    environment: Environment, store: ContentStore, settings: EnvironmentSettings
) -> dict[str, Any]:
    """Return the job spec's ``environment`` object for ``environment`` under ``settings``.

    Raises:
        ContextError: an archive cannot be read or packed.
    """
    spec = environment.node_spec(store)
    if settings.cache_dir:
        spec["cache_dir"] = str(settings.cache_dir)
    if isinstance(environment, Container):
        spec["runtime"] = environment.runtime or settings.container_runtime
        spec["options"] = [*settings.container_run_options, *spec["options"]]
    return spec


# --- tarballs: hashed once per file version, packed once per env ----------------------

_lock = threading.Lock()
_file_keys: dict[tuple[str, int, int], str] = {}
_packed: dict[str, Path] = {}


def put_file(store: ContentStore, path: Path) -> str:
    """Put the file at ``path`` into ``store`` (unless there); return its sha256 key.

    The key of a file is remembered by (path, size, mtime), so a big tarball
    is read and hashed once per process, not once per task.

    Raises:
        ContextError: the file cannot be read.
    """
    try:
        stat = path.stat()
        ident = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with _lock:
            key = _file_keys.get(ident)
        if key is not None and store.exists(key):
            return key
        data = path.read_bytes()
    except OSError as exc:
        raise ContextError(f"environment archive {path}: {exc}") from None
    key = store.put(data)
    with _lock:
        _file_keys[ident] = key
    return key


def conda_tarball(source: str | os.PathLike) -> Path:
    """Return a conda-pack tarball for ``source``: itself if it is one, else packed now.

    An env directory is packed with ``conda-pack --prefix``, a name with
    ``conda-pack --name``; the tarball is kept for the life of the process.

    Raises:
        ContextError: ``conda-pack`` is missing or fails.
    """
    text = str(source)
    path = Path(text).expanduser()
    if text.endswith(_TARBALL_SUFFIXES):
        if not path.is_file():
            raise ContextError(f"conda-pack tarball {path} does not exist")
        return path
    with _lock:
        if text in _packed and _packed[text].exists():
            return _packed[text]
    tool = shutil.which("conda-pack")
    if tool is None:
        raise ContextError(
            f"cannot pack conda env {text!r}: conda-pack is not installed "
            "(pip install conda-pack, or give a tarball made with it)"
        )
    out = Path(tempfile.mkdtemp(prefix="idds-fat-conda-")) / "env.tar.gz"
    where = ["--prefix", str(path)] if path.is_dir() else ["--name", text]
    done = subprocess.run(
        [tool, *where, "--output", str(out), "--quiet"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise ContextError(f"conda-pack {' '.join(where)} failed: {done.stderr.strip()[-2000:]}")
    with _lock:
        _packed[text] = out
    return out


def task_environment(
    environment: Environment | str | None,
    container_options: Mapping[str, Any] | None,
    default: Environment | str | None,
    default_container_options: Mapping[str, Any] | None,
    backend_runs_containers: bool,
) -> Environment:
    """Decide a task's environment: its own, else its iDDS container, else the workflow's.

    The iDDS ``container_options`` (task's, else workflow's) become a
    :class:`Container` unless the backend runs containers itself (PanDA).

    Raises:
        ConfigError: a malformed environment or container option.
    """
    if environment is not None:
        return as_environment(environment)
    if not backend_runs_containers:
        container = from_idds_container_options(container_options or default_container_options)
        if container is not None:
            return container
    return as_environment(default)


__all__ = [
    "Conda",
    "Container",
    "Current",
    "Environment",
    "EnvironmentSettings",
    "Venv",
    "as_environment",
    "caller_versions",
    "environment_spec",
    "from_idds_container_options",
    "task_environment",
]
