"""The job's environment on the node: init_env, then current | venv | conda | container.

The spec's ``environment`` says where the function runs: ``current`` (this
interpreter), ``venv`` (built from requirements, or a venv-pack tarball),
``conda`` (a conda-pack tarball) or ``container`` (an image), optionally behind
an iDDS-style ``init_env`` shell prefix. ``enter_environment`` builds what is
needed (once per node, under a file lock, in a cache dir keyed by content
hash) and runs this wrapper again there with the same arguments; the secrets
follow on a new pipe (a container's stdin), never in an environment block or on
a command line.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from typing import TYPE_CHECKING

from .envelope import sha256_hex
from .errors import InterpreterMismatchError, JobEnvironmentError, WrapperError
from .extract import safe_untar
from .fetch import fetch_object
from .spec import SECRETS_ENV, SECRETS_FD_ENV, JobSpec, secrets_json, secrets_pipe

if TYPE_CHECKING:  # the functions that need pathlib load it: a cold job never does (~3 ms)
    from pathlib import Path

ENV_STAGE_ENV = "IDDS_FAT_ENV_STAGE"  # the stages this process already runs inside
ENV_CACHE_ENV = "IDDS_FAT_ENV_CACHE_DIR"  # the node's choice of cache dir wins
CONTAINER_RUNTIMES = ("apptainer", "singularity", "podman", "docker")
_READY = ".idds-fat-ready"
BUILD_LOG = "builds.log"  # one JSON line per environment built on this node


def own_file() -> str:
    """Return the wrapper file this process runs, to run it again (in an environment, a child).

    That is the built wrapper, one file; the ``idds_fat.node`` package has none.
    """
    if __package__:
        raise WrapperError("only the built wrapper can run itself again (idds_fat.wrapper_source)")
    return os.path.abspath(__file__)


def environment_label(env: dict) -> str:
    """Return how the job's environment is named in messages."""
    return str(env.get("label") or env.get("kind") or "current")


def env_cache_root(env: dict) -> Path:
    """Return the node-local directory where environments are built and kept."""
    from pathlib import Path

    chosen = os.environ.get(ENV_CACHE_ENV) or env.get("cache_dir")
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "idds-fat" / "envs"


def cached_build(root: Path, name: str, build, label: str) -> Path:
    """Return ``root/name``, built by ``build(path)`` unless a finished build is there.

    Several jobs starting together build once: the build runs under an exclusive
    ``fcntl.flock`` on ``root/name.lock``, and a marker file written last says the
    build finished (a build that died half-way is thrown away and redone). Each
    build appends a line to ``root/builds.log``. Raises what ``build`` raises.
    """
    import fcntl  # nodes are POSIX; only environments other than "current" need it
    import shutil

    final = root / name
    if (final / _READY).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / (name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / _READY).exists():  # another job built it while we waited
            return final
        if final.exists():
            shutil.rmtree(final)
        started = time.monotonic()
        print(f"idds-fat wrapper: building {label} in {final}", file=sys.stderr)
        try:
            build(final)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        seconds = round(time.monotonic() - started, 3)
        (final / _READY).write_text(json.dumps({"label": label, "seconds": seconds}))
        record = {"name": name, "label": label, "host": os.uname().nodename, "pid": os.getpid()}
        with open(root / BUILD_LOG, "a") as log:
            log.write(json.dumps(dict(record, seconds=seconds, at=time.time())) + "\n")
    return final


def _run_logged(command: list[str], log_path: Path, what: str, **options) -> None:
    """Run ``command`` with its output in ``log_path``; raise JobEnvironmentError naming it."""
    import subprocess

    with open(log_path, "ab") as log:
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **options
        )
    if done.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise JobEnvironmentError(
            f"{what} failed (exit {done.returncode}): {' '.join(command)}\n" + "\n".join(tail)
        )


def _has_modern_pip() -> bool:
    """True when this interpreter's pip can install into another one (``--python``, 22.3+)."""
    try:
        from importlib.metadata import version

        major, minor = (int(p) for p in version("pip").split(".")[:2])
    except Exception:
        return False
    return (major, minor) >= (22, 3)


def venv_key(env: dict) -> str:
    """Return the hash that names a requirements venv: requirements, pip options, Python."""
    identity = {
        "requirements": env.get("requirements") or [],
        "pip_options": env.get("pip_options") or [],
        "python": sys.version,
        "base": getattr(sys, "_base_executable", sys.executable),
    }
    return sha256_hex(json.dumps(identity, sort_keys=True).encode())


def build_venv(target: Path, requirements: list[str], pip_options: list[str]) -> None:
    """Create a virtual environment at ``target`` with this node's Python; pip-install into it.

    Raises JobEnvironmentError (with the tail of pip's output) when a step fails.
    """
    log = target.parent / (target.name + ".build.log")
    log.write_bytes(b"")
    python = target / "bin" / "python"
    # Installing with this interpreter's pip skips seeding pip into every venv (~2 s).
    fast = _has_modern_pip()
    venv_command = [sys.executable, "-m", "venv", *(["--without-pip"] if fast else []), str(target)]
    _run_logged(venv_command, log, "creating the venv")
    if not requirements:
        return
    req_file = target / "requirements.txt"
    req_file.write_text("\n".join(requirements) + "\n")
    pip = [str(python), "-m", "pip"]
    if fast:
        pip = [sys.executable, "-m", "pip", "--python", str(python)]
    install = [*pip, "install", "--disable-pip-version-check", "--no-input", *pip_options]
    _run_logged([*install, "-r", str(req_file)], log, "installing the venv's requirements")


def unpack_environment(env: dict, spec: JobSpec, secrets: dict) -> Path:
    """Unpack the job's venv-pack or conda-pack tarball once per node; return its directory.

    The tarball is fetched from the cache and checked against its sha256 (a
    corrupted archive raises IntegrityError and nothing is kept). A conda-pack
    environment's ``bin/conda-unpack`` runs once, with the environment's Python,
    to rewrite the prefixes.
    """
    key = env["archive"]["key"]
    kind = env["kind"] if env["kind"] == "conda" else "venv-pack"

    def build(target: Path) -> None:
        safe_untar(fetch_object(spec, secrets, key), target)
        unpack_script = target / "bin" / "conda-unpack"
        if kind == "conda" and unpack_script.exists():
            log = target.parent / (target.name + ".build.log")
            python = target / "bin" / "python"
            _run_logged([str(python), str(unpack_script)], log, "conda-unpack", cwd=target)

    return cached_build(env_cache_root(env), f"{kind}-{key[:32]}", build, environment_label(env))


def environment_python(env: dict, spec: JobSpec, secrets: dict) -> str:
    """Return the interpreter of a venv or conda environment, building it first if needed."""
    if env.get("archive"):
        home = unpack_environment(env, spec, secrets)
    else:
        requirements = list(env.get("requirements") or [])
        pip_options = list(env.get("pip_options") or [])
        home = cached_build(
            env_cache_root(env),
            "venv-" + venv_key(env)[:32],
            lambda target: build_venv(target, requirements, pip_options),
            environment_label(env),
        )
    python = home / "bin" / "python"
    if not python.exists():
        raise JobEnvironmentError(f"{environment_label(env)}: no bin/python in {home}")
    return str(python)


def find_container_runtime(named: str | None) -> str:
    """Return the path of the container runtime: ``named``, else the first one installed.

    Raises JobEnvironmentError when none (or not the named one) is on PATH.
    """
    import shutil

    for candidate in [named] if named else CONTAINER_RUNTIMES:
        found = shutil.which(candidate)
        if found:
            return found
    wanted = named or " / ".join(CONTAINER_RUNTIMES)
    raise JobEnvironmentError(f"no container runtime on this node: {wanted} not found on PATH")


def container_command(
    env: dict, spec: JobSpec, spec_location: str, workdir: str | Path, stages: str
) -> list[str]:
    """Return the command running this wrapper inside the job's container image.

    The job's work dir (and a directory cache, so the spec and its objects can be
    read and large results stored) are bound at the same paths; the wrapper runs
    as a copy in the work dir with the same arguments. Secrets pass on the
    container's stdin (``-i``; apptainer and singularity pass stdin on anyway),
    which the wrapper inside reads first (``IDDS_FAT_JOB_SECRETS_FD=0``): neither
    the runtime's environment nor the container's holds them.
    """
    import shutil
    import urllib.parse
    from pathlib import Path

    runtime = find_container_runtime(env.get("runtime"))
    flavour = Path(runtime).name
    workdir = Path(workdir)
    wrapper_copy = workdir / ".idds-fat-wrapper.py"
    shutil.copyfile(own_file(), wrapper_copy)
    binds = [str(workdir)]
    cache = spec.cache or ""
    if cache.startswith("file://"):
        cache = urllib.parse.unquote(cache[len("file://") :])
    if cache and not cache.startswith(("http://", "https://")):
        binds.append(str(Path(cache).resolve()))
    inner = [env.get("python") or "python3", str(wrapper_copy), "--spec", spec_location]
    options = [str(o) for o in env.get("options") or []]
    if flavour in ("apptainer", "singularity"):
        bind_options = [part for path in binds for part in ("--bind", path)]
        where = ["--pwd", str(workdir)]
        return [runtime, "exec", *options, *bind_options, *where, env["image"], *inner]
    bind_options = [part for path in binds for part in ("-v", f"{path}:{path}")]
    names = ["-i", "-e", f"{SECRETS_FD_ENV}=0", "-e", f"{ENV_STAGE_ENV}={stages}"]
    where = ["-w", str(workdir)]
    return [runtime, "run", "--rm", *options, *bind_options, *where, *names, env["image"], *inner]


def rerun_environment(secrets_fd: int, stages: str, flavour: str = "") -> dict:
    """The environment of the wrapper run again: ours, the secrets' descriptor, the stages done.

    ``secrets_fd`` is the number under which the new process finds the pipe
    holding its secrets (``secrets_pipe``; 0 in a container, whose stdin it is).
    """
    child = dict(os.environ, **{SECRETS_FD_ENV: str(secrets_fd), ENV_STAGE_ENV: stages})
    child.pop(SECRETS_ENV, None)
    if flavour in ("apptainer", "singularity"):
        # Under --cleanenv these pass on only variables named with their prefix.
        prefix = flavour.upper() + "ENV_"
        child.update({prefix + SECRETS_FD_ENV: str(secrets_fd), prefix + ENV_STAGE_ENV: stages})
    return child


def exec_with_secrets_on_a_pipe(secrets: dict) -> None:
    """Run this wrapper again, same interpreter and command line, its secrets on a pipe.

    For secrets that came in the environment (``IDDS_FAT_JOB_SECRETS``): the
    environment block a process starts with stays readable in
    ``/proc/PID/environ`` whatever it removes later, so the user's code must run
    in a process started without them. Returns only if ``exec`` fails (raising
    OSError).
    """
    fd = secrets_pipe(secrets_json(secrets))
    env = dict(os.environ, **{SECRETS_FD_ENV: str(fd)})
    env.pop(SECRETS_ENV, None)
    sys.stdout.flush(), sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _run_container(command: list[str], child_env: dict, env: dict, secrets: bytes) -> int:
    """Run the containerised wrapper, ``secrets`` on its stdin; return its exit status.

    The runtime's own failures (exit 125-127: no image, no runtime, no python in
    the image) raise JobEnvironmentError with the runtime's message, so the
    caller gets a setup error instead of a lost job.
    """
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryFile() as err:
        done = subprocess.run(command, env=child_env, input=secrets, stderr=err)
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    sys.stderr.write(text)
    sys.stderr.flush()
    if done.returncode in (125, 126, 127) and "idds-fat wrapper" not in text:
        tail = "\n".join(text.splitlines()[-10:])
        raise JobEnvironmentError(
            f"container {environment_label(env)}: {Path(command[0]).name} exited "
            f"{done.returncode} before the job started:\n{tail}"
        )
    return done.returncode


def _prefix_runtime(init_env: str) -> str:
    """The container runtime an ``init_env`` prefix starts with (``""`` if none):
    the wrapper then runs inside it, under the image's ``python3``."""
    import shlex
    from pathlib import Path

    try:
        words = shlex.split(init_env)
    except ValueError:
        return ""
    for word in words:
        if "=" in word.split("/")[0]:  # VAR=value before the command
            continue
        name = Path(word).name
        return name if name in CONTAINER_RUNTIMES else ""
    return ""


def run_behind_prefix(init_env: str, secrets: dict, argv: list[str], stages: str) -> int:
    """Run this wrapper again as the command ``init_env`` prefixes, as iDDS does;
    return its exit status.

    The shell (bash when there is one: iDDS strings say ``source``) runs
    ``INIT_ENV PYTHON WRAPPER --spec SPEC``, so ``"singularity exec image.simg "``
    wraps the wrapper and ``"source setup.sh; "`` runs before it. PYTHON is this
    interpreter, or ``python3`` behind a container runtime (whose image has its
    own), or ``$IDDS_FAT_PYTHON`` when the prefix sets it. The secrets follow on a
    pipe the prefix passes on (``singularity exec`` keeps open descriptors).

    Raises:
        JobEnvironmentError: the wrapper never started behind the prefix (its
            secrets were never read): the prefix failed; the message quotes the
            tail of its stderr.
    """
    import shutil
    import subprocess
    import tempfile

    flavour = _prefix_runtime(init_env)
    python = "python3" if flavour else sys.executable
    if flavour:  # the wrapper file must be where the container sees it: the job's dir
        shutil.copyfile(argv[0], ".idds-fat-wrapper.py")
        argv = [os.path.abspath(".idds-fat-wrapper.py"), *argv[1:]]
    script = "p=$1; shift; " + init_env.rstrip("\n") + ' "${IDDS_FAT_PYTHON:-$p}" "$@"'
    shell = shutil.which("bash") or "/bin/sh"
    fd = secrets_pipe(secrets_json(secrets))
    try:
        with tempfile.TemporaryFile() as err:
            sys.stdout.flush(), sys.stderr.flush()
            done = subprocess.run(
                [shell, "-c", script, "idds-fat-init-env", python, *argv],
                env=rerun_environment(fd, stages, flavour),
                pass_fds=(fd,),
                stderr=err,
            )
            err.seek(0)
            text = err.read().decode("utf-8", "replace")
        sys.stderr.write(text)
        sys.stderr.flush()
        os.set_blocking(fd, False)
        try:
            unread = os.read(fd, 1)
        except BlockingIOError:  # pragma: no cover - the pipe's writer is closed
            unread = b""
    finally:
        os.close(fd)
    if unread:
        tail = "\n".join(text.splitlines()[-10:])
        raise JobEnvironmentError(
            f"init_env {init_env.strip()!r} failed (exit {done.returncode}) before the job "
            f"started:\n{tail}"
        )
    return done.returncode


def enter_environment(
    spec: JobSpec, secrets: dict, spec_location: str, workdir: str | Path
) -> int | None:
    """Put this job inside its environment; return None when this process should run it.

    Applies, in order, the spec's ``init_env`` (the prefix of the wrapper's
    command, as iDDS runs it: ``run_behind_prefix``) and its environment, each
    by running this wrapper again with the same arguments (``os.execve`` for
    venv and conda; a child process behind ``init_env`` and in a container,
    whose exit status is then returned for ``main`` to exit with), the secrets
    on a new pipe. Stages
    already applied are named in ``IDDS_FAT_ENV_STAGE``. A failure is printed
    and raised; ``run_one`` reports it as the job's setup error, so the caller
    sees why.
    """
    env = spec.environment or {"kind": "current"}
    done = [s for s in os.environ.pop(ENV_STAGE_ENV, "").split(",") if s]
    argv = [own_file(), "--spec", spec_location]
    try:
        if spec.init_env and "init_env" not in done:
            stages = ",".join([*done, "init_env"])
            return run_behind_prefix(spec.init_env, secrets, argv, stages)
        kind = env.get("kind", "current")
        if kind == "current" or "environment" in done:
            return None
        stages = ",".join([*done, "environment"])
        if kind in ("venv", "conda"):
            python = environment_python(env, spec, secrets)
            sys.stdout.flush(), sys.stderr.flush()
            fd = secrets_pipe(secrets_json(secrets))
            os.execve(python, [python, *argv], rerun_environment(fd, stages))
        if kind == "container":
            from pathlib import Path

            command = container_command(env, spec, spec_location, workdir, stages)
            flavour = Path(command[0]).name
            child_env = rerun_environment(0, stages, flavour)
            return _run_container(command, child_env, env, secrets_json(secrets))
        raise JobEnvironmentError(f"unknown environment kind {kind!r}")
    except Exception as exc:
        print(f"idds-fat wrapper: entering {environment_label(env)} failed: {exc}", file=sys.stderr)
        raise


def check_interpreter(header: dict, spec: JobSpec, pickler) -> None:
    """Compare this interpreter with the caller's (from the payload header) before unpickling.

    Raises InterpreterMismatchError naming both Python (major.minor) and
    cloudpickle versions and the environment when they differ. Payloads from
    callers that recorded no versions are not checked.
    """
    caller_python, caller_cloudpickle = header.get("python"), header.get("cloudpickle")
    if caller_python is None:
        return
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    cloudpickle_version = getattr(pickler, "__version__", None) if pickler is not pickle else None
    if python == caller_python and cloudpickle_version == caller_cloudpickle:
        return
    env = spec.environment or {}
    raise InterpreterMismatchError(
        f"the job's interpreter does not match the caller's: the caller has Python "
        f"{caller_python} with cloudpickle {caller_cloudpickle}, the job has Python {python} "
        f"with cloudpickle {cloudpickle_version or '(not installed)'} ({sys.executable}) in "
        f"environment {environment_label(env)}; give the environment Python {caller_python} "
        f"and cloudpickle=={caller_cloudpickle}"
    )
