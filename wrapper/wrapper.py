#!/usr/bin/env python3
"""The idds-fat job wrapper: runs jobs of a task on any node.

Usage::

    python3 wrapper.py --spec LOCATION                 # one job (cold)
    python3 wrapper.py --jobs-file FILE --pack N       # a pack of jobs, one interpreter
    python3 wrapper.py --worker                        # warm: jobs sent on stdin

A pack (Slurm array element, PanDA job with several inputs) and a warm worker
run job after job in one interpreter: verified cache objects are kept, the
code context is extracted once, and each result is published as soon as its
job is done (see ``run_pack`` and ``serve_worker`` for their formats).

``LOCATION`` is a path or URL of the job spec, a JSON document in the content
cache whose name is its sha256 (the wrapper checks it). The spec names every
other object by sha256: the code context archive, the call payload and the
job's own arguments. The wrapper fetches and verifies them, extracts the archive
into a fresh directory (no path traversal, no links, a size limit), runs the
function there, and posts a signed result envelope to the result store.

Secrets never travel on the command line: the workflow's HMAC key and the
service token come from the environment variable ``IDDS_FAT_JOB_SECRETS`` (a
JSON object) or from the file named by ``IDDS_FAT_JOB_SECRETS_FILE``, and are
removed from the environment before the user's function runs.

Delivery: STOMP 1.2 to the workflow's queue (and its mirror) with a broker
receipt awaited, when the spec names brokers; else, or when that fails, POST
to the REST result store; both retried with backoff. A result larger than the
spec's ``result_inline_bytes`` is put into the cache and the channels carry a
signed reference to it.

Exit status: 0 when the result (a value or the function's exception) was
delivered; 3 when it could not be delivered within the spec's publish timeout;
2 when the job could not even report its failure. A result is never silently
lost: a non-zero exit tells the backend the job ended without one.

This file is shipped to the node alone. It imports only the standard library,
and cloudpickle when it runs a job. It is also the single definition of the
envelope format, which the SDK loads from here.
"""

from __future__ import annotations

# A cold job pays for every import, so modules a plain job does not need
# (shutil, tempfile, subprocess, zipfile, the HTTP stack, stomp.py) are imported
# where they are used (docs/performance.md, "Cold job").
import binascii
import getopt
import hashlib
import hmac
import io
import json
import os
import pickle
import stat
import sys
import time
import urllib.parse
from pathlib import Path

WRAPPER_VERSION = 1
ENVELOPE_MAGIC = b"IDDSFAT1"
_MAC_LEN = 32
_HEADER_LEN_BYTES = 4
SECRETS_ENV = "IDDS_FAT_JOB_SECRETS"
SECRETS_FILE_ENV = "IDDS_FAT_JOB_SECRETS_FILE"
EXIT_UNDELIVERED = 3
EXIT_UNREPORTED = 2


class WrapperError(Exception):
    """A failure of the wrapper itself, before or after the user's function."""


class IntegrityError(WrapperError):
    """Bytes did not match their sha256 or HMAC."""


class UnsafeArchiveError(IntegrityError):
    """An archive entry escapes the tree, is a link, or the archive expands too far."""


class DeliveryError(WrapperError):
    """The result could not be handed to the result store in time."""


# --- envelope: the signed container of every pickled object that travels -------------


def sha256_hex(data: bytes) -> str:
    """Return the hex sha256 of ``data``: the content key of the cache."""
    return hashlib.sha256(data).hexdigest()


def seal(header: dict, body: bytes, key: bytes) -> bytes:
    """Wrap ``body`` with a JSON ``header`` and an HMAC-SHA256 under ``key``.

    Layout: magic, header length (4 bytes, big-endian), header JSON (with the
    body's sha256 added), body, then the 32-byte MAC over everything before it.
    """
    header = dict(header, v=WRAPPER_VERSION, sha256=sha256_hex(body), size=len(body))
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    signed = ENVELOPE_MAGIC + len(head).to_bytes(_HEADER_LEN_BYTES, "big") + head + body
    return signed + hmac.new(key, signed, hashlib.sha256).digest()


def peek(data: bytes) -> tuple[dict, bytes]:
    """Split an envelope into header and body WITHOUT verifying it.

    For routing and indexing only (the service does this); never unpickle what
    this returns. Raises ValueError when ``data`` is not an envelope.
    """
    start = len(ENVELOPE_MAGIC) + _HEADER_LEN_BYTES
    if len(data) < start + _MAC_LEN or not data.startswith(ENVELOPE_MAGIC):
        raise ValueError("not an idds-fat envelope")
    head_len = int.from_bytes(data[len(ENVELOPE_MAGIC) : start], "big")
    if start + head_len + _MAC_LEN > len(data):
        raise ValueError("truncated idds-fat envelope")
    try:
        header = json.loads(data[start : start + head_len])
    except ValueError:
        raise ValueError("idds-fat envelope with an unreadable header") from None
    if not isinstance(header, dict):
        raise ValueError("idds-fat envelope with an unreadable header")
    return header, data[start + head_len : -_MAC_LEN]


def unseal(data: bytes, key: bytes) -> tuple[dict, bytes]:
    """Verify an envelope's HMAC and body sha256; return ``(header, body)``.

    Raises IntegrityError when the envelope is malformed, signed with another
    key, or its body does not match the sha256 in its header.
    """
    try:
        header, body = peek(data)
    except ValueError as exc:
        raise IntegrityError(str(exc)) from None
    expected = hmac.new(key, data[:-_MAC_LEN], hashlib.sha256).digest()
    if not hmac.compare_digest(expected, data[-_MAC_LEN:]):
        raise IntegrityError("envelope signature does not verify (forged or wrong key)")
    if header.get("v") != WRAPPER_VERSION:
        raise IntegrityError(f"envelope version {header.get('v')!r} is not {WRAPPER_VERSION}")
    if header.get("sha256") != sha256_hex(body):
        raise IntegrityError("envelope body does not match its sha256")
    return header, body


# --- fetching from the content cache -------------------------------------------------


def _http(method: str, url: str, token: str | None, data: bytes | None, timeout: float) -> bytes:
    # Imported here: a job that touches no URL (a directory cache, its result
    # handed back in a file) never pays for the HTTP stack (~9 ms).
    import urllib.request

    request = urllib.request.Request(url, data=data, method=method)
    if token:
        request.add_header("Authorization", "Bearer " + token)
    if data is not None:
        request.add_header("Content-Type", "application/octet-stream")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _http_status(exc: BaseException | None) -> int | None:
    """The status of an HTTP error response, else None (no import if no HTTP was done)."""
    errors = sys.modules.get("urllib.error")
    if errors is not None and isinstance(exc, errors.HTTPError):
        return exc.code
    return None


def _transient(exc: BaseException) -> bool:
    status = _http_status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return isinstance(exc, (OSError, TimeoutError))  # URLError is an OSError


def _with_retries(action, deadline: float, what: str):
    """Run ``action`` until it succeeds, a permanent error, or ``deadline`` passes."""
    delay = 0.05
    while True:
        try:
            return action()
        except Exception as exc:
            if not _transient(exc) or time.monotonic() + delay > deadline:
                raise WrapperError(f"{what}: {exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def cache_object_location(cache: str, key: str) -> str:
    """Return where object ``key`` lives in ``cache`` (a directory, ``file://`` or HTTP URL)."""
    if cache.startswith(("http://", "https://")):
        return cache.rstrip("/") + "/" + key
    root = urllib.parse.unquote(cache[len("file://") :]) if cache.startswith("file://") else cache
    return str(Path(root) / key[:2] / key)


def public_url(location: str) -> str:
    """``location`` without its query string: a presigned URL's signature stays out of logs."""
    parts = urllib.parse.urlsplit(location)
    return urllib.parse.urlunsplit(parts._replace(query="")) if parts.query else location


def fetch(location: str, key: str | None, token: str | None, timeout: float = 300.0) -> bytes:
    """Read ``location`` (a path or HTTP URL); when ``key`` is given, check its sha256.

    Raises IntegrityError on a mismatch, WrapperError when it cannot be read (a
    refused presigned URL says it may have expired).
    """
    shown = public_url(location)
    if location.startswith(("http://", "https://")):
        deadline = time.monotonic() + timeout
        try:
            data = _with_retries(
                lambda: _http("GET", location, token, None, 60.0), deadline, "fetching " + shown
            )
        except WrapperError as exc:
            if _http_status(exc.__cause__) == 403 and shown != location:
                raise WrapperError(
                    f"fetching {shown}: HTTP 403: the presigned URL was refused; it may have "
                    "expired (raise the store's url_lifetime for long-queued jobs)"
                ) from None
            raise
    else:
        path = location[len("file://") :] if location.startswith("file://") else location
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise WrapperError(f"fetching {location}: {exc}") from None
    if key is not None and sha256_hex(data) != key:
        raise IntegrityError(f"{shown}: content does not match its sha256 {key}")
    return data


# --- safe extraction of the code context ----------------------------------------------


def safe_extract(data: bytes, dest: Path, max_bytes: int, max_files: int = 200_000) -> int:
    """Extract zip ``data`` into directory ``dest``; return the bytes written.

    Refuses absolute names, ``..`` components, links and device entries, more
    than ``max_files`` entries, and more than ``max_bytes`` of content (counted
    while decompressing, so a lying header does not help a zip bomb).

    Raises UnsafeArchiveError, leaving only what was written before the refusal.
    """
    import zipfile  # only jobs with a code context need it

    dest = Path(dest).resolve()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise UnsafeArchiveError(f"not a zip archive: {exc}") from None
    entries = archive.infolist()
    if len(entries) > max_files:
        raise UnsafeArchiveError(f"archive has {len(entries)} entries, more than {max_files}")
    written = 0
    for info in entries:
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise UnsafeArchiveError(f"archive entry {name!r} points outside the tree")
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(f"archive entry {name!r} is a link or special file")
        target = (dest / name).resolve()
        if target != dest and dest not in target.parents:
            raise UnsafeArchiveError(f"archive entry {name!r} points outside the tree")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as source, open(target, "xb") as sink:
            while True:
                chunk = source.read(1 << 20)
                if not chunk:
                    break
                written += len(chunk)
                if written > max_bytes:
                    raise UnsafeArchiveError(f"archive expands beyond {max_bytes} bytes")
                sink.write(chunk)
        os.chmod(target, 0o755 if mode & 0o111 else 0o644)
    return written


# --- the job's environment on the node -----------------------------------------------
#
# The spec's "environment" says where the function runs: "current" (this interpreter),
# "venv" (built from requirements, or a venv-pack tarball), "conda" (a conda-pack
# tarball) or "container" (an image), optionally behind an iDDS-style "init_env" shell
# prefix. enter_environment() builds what is needed (once per node, under a file lock,
# in a cache dir keyed by content hash) and re-executes this wrapper there with the
# same arguments; the secrets follow in the environment, never on a command line.

ENV_STAGE_ENV = "IDDS_FAT_ENV_STAGE"  # the stages this process already runs inside
ENV_CACHE_ENV = "IDDS_FAT_ENV_CACHE_DIR"  # the node's choice of cache dir wins
CONTAINER_RUNTIMES = ("apptainer", "singularity", "podman", "docker")
_ENV_FAILURE = "_environment_failure"  # spec key: a failure to report as a setup error
_READY = ".idds-fat-ready"
BUILD_LOG = "builds.log"  # one JSON line per environment built on this node


class JobEnvironmentError(WrapperError):
    """The job's environment could not be built or entered."""


class InterpreterMismatchError(JobEnvironmentError):
    """The job's Python or cloudpickle differs from the caller's."""


def environment_label(env: dict) -> str:
    """Return how the job's environment is named in messages."""
    return str(env.get("label") or env.get("kind") or "current")


def env_cache_root(env: dict) -> Path:
    """Return the node-local directory where environments are built and kept."""
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


def safe_untar(data: bytes, dest: Path) -> None:
    """Extract tar ``data`` (any compression) into ``dest``.

    Refuses absolute names, ``..`` components, device files and any member that
    would land outside ``dest`` (also through a symlink extracted before it).
    Symlinks themselves may point anywhere: a venv-pack tarball's ``bin/python``
    names the interpreter by absolute path. Raises UnsafeArchiveError.
    """
    import tarfile

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            members = tar.getmembers()
            for member in members:
                parts = member.name.replace("\\", "/").split("/")
                if member.name.startswith("/") or ".." in parts:
                    raise UnsafeArchiveError(f"tar member {member.name!r} points outside the tree")
                if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                    raise UnsafeArchiveError(f"tar member {member.name!r} is a special file")
                if member.islnk() and (member.linkname.startswith("/") or ".." in member.linkname):
                    raise UnsafeArchiveError(f"tar member {member.name!r} links outside the tree")
            if hasattr(tarfile, "tar_filter"):  # Python 3.12, and 3.8.17+/3.11.4+
                # It also refuses a member that would be written through a symlink.
                tar.extractall(dest, members, filter="tar")
                return
            root = dest.resolve()
            for member in members:
                target = (root / member.name).resolve()
                if target != root and root not in target.parents:
                    raise UnsafeArchiveError(f"tar member {member.name!r} lands outside the tree")
                tar.extract(member, dest)
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(f"environment archive refused: {exc}") from None


def _fetch_object(spec: dict, secrets: dict, key: str) -> bytes:
    """Fetch cache object ``key`` of this job (a presigned URL when the spec has one)."""
    urls = spec.get("urls") or {}
    if key in urls:
        return fetch(urls[key], key, None)
    return fetch(cache_object_location(spec["cache"], key), key, secrets["token"])


def unpack_environment(env: dict, spec: dict, secrets: dict) -> Path:
    """Unpack the job's venv-pack or conda-pack tarball once per node; return its directory.

    The tarball is fetched from the cache and checked against its sha256 (a
    corrupted archive raises IntegrityError and nothing is kept). A conda-pack
    environment's ``bin/conda-unpack`` runs once, with the environment's Python,
    to rewrite the prefixes.
    """
    key = env["archive"]["key"]
    kind = env["kind"] if env["kind"] == "conda" else "venv-pack"

    def build(target: Path) -> None:
        safe_untar(_fetch_object(spec, secrets, key), target)
        unpack_script = target / "bin" / "conda-unpack"
        if kind == "conda" and unpack_script.exists():
            log = target.parent / (target.name + ".build.log")
            python = target / "bin" / "python"
            _run_logged([str(python), str(unpack_script)], log, "conda-unpack", cwd=target)

    return cached_build(env_cache_root(env), f"{kind}-{key[:32]}", build, environment_label(env))


def environment_python(env: dict, spec: dict, secrets: dict) -> str:
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
    env: dict, spec: dict, spec_location: str, workdir: Path, stages: str
) -> list[str]:
    """Return the command running this wrapper inside the job's container image.

    The job's work dir (and a directory cache, so the spec and its objects can be
    read and large results stored) are bound at the same paths; the wrapper runs
    as a copy in the work dir with the same arguments. Secrets pass by name
    (``-e NAME``: the runtime reads the value from its own environment).
    """
    import shutil

    runtime = find_container_runtime(env.get("runtime"))
    flavour = Path(runtime).name
    wrapper_copy = workdir / ".idds-fat-wrapper.py"
    shutil.copyfile(__file__, wrapper_copy)
    binds = [str(workdir)]
    cache = spec.get("cache") or ""
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
    names = ["-e", SECRETS_ENV, "-e", f"{ENV_STAGE_ENV}={stages}"]
    where = ["-w", str(workdir)]
    return [runtime, "run", "--rm", *options, *bind_options, *where, *names, env["image"], *inner]


def _secrets_environment(secrets: dict, stages: str, flavour: str = "") -> dict:
    """The environment of the re-executed wrapper: ours, plus the secrets and the stages done."""
    raw = json.dumps(
        {
            "hmac_key": secrets["key"].hex(),
            "token": secrets.get("token"),
            "broker_user": secrets.get("broker_user"),
            "broker_password": secrets.get("broker_password"),
        }
    )
    child = dict(os.environ, **{SECRETS_ENV: raw, ENV_STAGE_ENV: stages})
    if flavour in ("apptainer", "singularity"):
        # Under --cleanenv these pass on only variables named with their prefix.
        prefix = flavour.upper() + "ENV_"
        child.update({prefix + SECRETS_ENV: raw, prefix + ENV_STAGE_ENV: stages})
    return child


def _run_container(command: list[str], child_env: dict, env: dict) -> int:
    """Run the containerised wrapper; return its exit status.

    The runtime's own failures (exit 125-127: no image, no runtime, no python in
    the image) raise JobEnvironmentError with the runtime's message, so the
    caller gets a setup error instead of a lost job.
    """
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as err:
        done = subprocess.run(command, env=child_env, stdin=subprocess.DEVNULL, stderr=err)
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


def enter_environment(spec: dict, secrets: dict, spec_location: str, workdir: Path) -> int | None:
    """Put this job inside its environment; return None when this process should run it.

    Applies, in order, the spec's ``init_env`` (a shell prefix, as iDDS runs
    it; by bash, else ``/bin/sh``) and its environment, each by re-executing
    this wrapper with the same arguments (``os.execve`` for ``init_env``, venv
    and conda; a child process for a container, whose exit status is then
    returned for ``main`` to exit with). Stages already applied are named in
    ``IDDS_FAT_ENV_STAGE``. A failure is not raised: it is kept in the spec, and
    ``_run_function`` reports it as the job's setup error, so the caller sees why.
    """
    env = spec.get("environment") or {"kind": "current"}
    done = [s for s in os.environ.pop(ENV_STAGE_ENV, "").split(",") if s]
    argv = [str(Path(__file__).resolve()), "--spec", spec_location]
    try:
        if spec.get("init_env") and "init_env" not in done:
            import shutil

            stages = ",".join([*done, "init_env"])
            script = spec["init_env"] + '\np=$1; shift; exec "${IDDS_FAT_PYTHON:-$p}" "$@"'
            # bash when there is one: iDDS strings say "source", which dash lacks.
            shell = shutil.which("bash") or "/bin/sh"
            command = [shell, "-c", script, "idds-fat-init-env", sys.executable, *argv]
            sys.stdout.flush(), sys.stderr.flush()
            os.execve(shell, command, _secrets_environment(secrets, stages))
        kind = env.get("kind", "current")
        if kind == "current" or "environment" in done:
            return None
        stages = ",".join([*done, "environment"])
        if kind in ("venv", "conda"):
            python = environment_python(env, spec, secrets)
            sys.stdout.flush(), sys.stderr.flush()
            os.execve(python, [python, *argv], _secrets_environment(secrets, stages))
        if kind == "container":
            command = container_command(env, spec, spec_location, workdir, stages)
            flavour = Path(command[0]).name
            return _run_container(command, _secrets_environment(secrets, stages, flavour), env)
        raise JobEnvironmentError(f"unknown environment kind {kind!r}")
    except Exception as exc:
        print(f"idds-fat wrapper: entering {environment_label(env)} failed: {exc}", file=sys.stderr)
        spec[_ENV_FAILURE] = exc
        return None


def raise_environment_failure(spec: dict) -> None:
    """Re-raise the failure ``enter_environment`` recorded for this job, if any."""
    failure = spec.get(_ENV_FAILURE)
    if failure is not None:
        raise failure


def check_interpreter(header: dict, spec: dict, pickler) -> None:
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
    env = spec.get("environment") or {}
    raise InterpreterMismatchError(
        f"the job's interpreter does not match the caller's: the caller has Python "
        f"{caller_python} with cloudpickle {caller_cloudpickle}, the job has Python {python} "
        f"with cloudpickle {cloudpickle_version or '(not installed)'} ({sys.executable}) in "
        f"environment {environment_label(env)}; give the environment Python {caller_python} "
        f"and cloudpickle=={caller_cloudpickle}"
    )


def _pickler():
    """cloudpickle when this interpreter has it; else pickle, enough to report why not."""
    try:
        import cloudpickle
    except ImportError:
        return pickle
    return cloudpickle


# --- running the job -------------------------------------------------------------------


def read_secrets() -> dict:
    """Take the job's secrets out of the environment (or the file it names)."""
    raw = os.environ.pop(SECRETS_ENV, None)
    path = os.environ.pop(SECRETS_FILE_ENV, None)
    if raw is None and path:
        raw = Path(path).read_text()
    if raw is None:
        raise WrapperError(f"no job secrets: set {SECRETS_ENV} or {SECRETS_FILE_ENV}")
    secrets = json.loads(raw)
    return {
        "key": bytes.fromhex(secrets["hmac_key"]),
        "token": secrets.get("token"),
        "broker_user": secrets.get("broker_user"),
        "broker_password": secrets.get("broker_password"),
    }


def _error_body(exc: BaseException, tb_text: str) -> dict:
    """Describe ``exc`` for the caller; include its pickle only if it round-trips."""
    cloudpickle = _pickler()

    pickled = None
    try:
        candidate = cloudpickle.dumps(exc)
        pickle.loads(candidate)
        pickled = candidate
    except Exception:
        pass
    return {
        "type": type(exc).__qualname__,
        "module": type(exc).__module__,
        "message": str(exc),
        "traceback": tb_text,
        "pickled": pickled,
    }


def _get_object(spec: dict, secrets: dict, key: str) -> bytes:
    """Fetch cache object ``key`` (verified by its sha256); a warm worker keeps it."""
    if _warm is not None and key in _warm.objects:
        return _warm.objects[key]
    data = _fetch_object(spec, secrets, key)
    if _warm is not None:
        _warm.remember(key, data)
    return data


def _context_dir(spec: dict, get, workdir: Path) -> Path:
    """Extract the job's code context (once per archive in a warm worker); return its dir."""
    archive = spec.get("archive")
    if not archive:
        return workdir
    if _warm is not None:
        return _warm.context(archive, get)
    import tempfile

    context_dir = Path(tempfile.mkdtemp(prefix="context-", dir=workdir))
    safe_extract(get(archive["key"]), context_dir, int(archive["max_bytes"]))
    return context_dir


def install_sources(sources: dict | None) -> None:
    """Give linecache the caller's source of the code pickled by value.

    The call's header maps each file name to its text (the caller's module, the
    ``__main__`` script, a notebook cell), so a traceback shows the user's lines
    even where no such file exists. An entry with no mtime is never evicted.
    """
    import linecache

    for name, text in (sources or {}).items():
        linecache.cache[name] = (len(text), None, text.splitlines(keepends=True), name)


def _run_function(spec: dict, secrets: dict, workdir: Path) -> tuple[str, object]:
    """Fetch, verify, extract and run; return ``(status, value_or_error_body)``."""
    cloudpickle = _pickler()

    key = secrets["key"]

    def get(key_: str) -> bytes:
        return _get_object(spec, secrets, key_)

    try:
        raise_environment_failure(spec)
        context_dir = _context_dir(spec, get, workdir)
        header, payload = unseal(get(spec["payload"]["key"]), key)
        sources = header.get("sources")
        check_interpreter(header, spec, cloudpickle)
        fn, args, kwargs = cloudpickle.loads(payload)
        job_kwargs = spec.get("kwargs")
        if job_kwargs:
            raw = (
                binascii.a2b_base64(job_kwargs["inline"])
                if "inline" in job_kwargs
                else get(job_kwargs["key"])
            )
            _, body = unseal(raw, key)
            kwargs = {**kwargs, **cloudpickle.loads(body)}
    except Exception as exc:
        import traceback  # only failures need it: a job that works never pays the import

        text = traceback.format_exc()
        print(f"idds-fat wrapper: job setup failed:\n{text}", file=sys.stderr)
        return "setup_error", _error_body(exc, text)

    if str(context_dir) not in sys.path:
        sys.path.insert(0, str(context_dir))
    os.chdir(context_dir)
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: B036 - SystemExit in user code is a result too
        tb = exc.__traceback__
        # Drop the wrapper's own frame: the user wants to see their function.
        import traceback

        # Only now: a job that works never pays for linecache's imports.
        install_sources(sources)
        text = "".join(traceback.format_exception(type(exc), exc, tb.tb_next if tb else None))
        return "error", _error_body(exc, text)
    finally:
        os.chdir(workdir)
    return "ok", value


def run_job(spec: dict, secrets: dict, workdir: Path) -> bytes:
    """Run the job that ``spec`` describes; return its sealed result envelope."""
    cloudpickle = _pickler()

    started = time.time()
    status, outcome = _run_function(spec, secrets, workdir)
    if status == "ok":
        try:
            body = cloudpickle.dumps(outcome)
        except Exception as exc:
            status = "error"
            failure = TypeError(f"the function's return value could not be pickled: {exc}")
            import traceback

            body = cloudpickle.dumps(_error_body(failure, traceback.format_exc()))
    else:
        body = cloudpickle.dumps(outcome)
    header = {
        "kind": "result",
        "workflow": spec["workflow"],
        "task": spec["task"],
        "job": spec["job"],
        "attempt": spec.get("attempt", 0),
        "status": status,
        "host": os.uname().nodename,
        "pid": os.getpid(),
        "started": started,
        "finished": time.time(),
    }
    return seal(header, body, secrets["key"])


def put_object(cache: str, data: bytes, token: str | None, deadline: float) -> str:
    """Store ``data`` in ``cache`` under its sha256 (skipped if present); return the key."""
    import tempfile

    key = sha256_hex(data)
    if cache.startswith(("http://", "https://")):
        url = cache_object_location(cache, key)
        _with_retries(lambda: _http("PUT", url, token, data, 60.0), deadline, "storing " + url)
        return key
    path = Path(cache_object_location(cache, key))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    return key


def by_reference(envelope: bytes, spec: dict, secrets: dict, deadline: float) -> bytes:
    """Put a large result envelope into the cache; return the small signed message naming it."""
    header, _ = peek(envelope)
    ref = {k: header[k] for k in ("workflow", "task", "job", "attempt", "status")}
    ref.update(kind="result-ref", ref_size=len(envelope), ref_sha256=sha256_hex(envelope))
    put_url = spec.get("result_put_url")
    if put_url:  # a presigned PUT for this job's result object (S3)
        shown = public_url(put_url)
        _with_retries(
            lambda: _http("PUT", put_url, None, envelope, 300.0), deadline, "storing " + shown
        )
        ref["ref_name"] = spec["result_object"]
    else:
        ref["ref"] = put_object(spec["cache"], envelope, secrets["token"], deadline)
    return seal(ref, b"", secrets["key"])


class StompEvents:
    """A stomp.py listener (duck-typed) recording connection state, receipts and errors.

    The caller's subscription (``idds_fat.results.stomp``) builds on it too.
    """

    def __init__(self) -> None:
        import threading

        self.changed = threading.Condition()
        self.connected = False
        self.closed = False
        self.error = ""
        self.receipts: set[str] = set()

    def _note(self, **changes) -> None:
        with self.changed:
            for name, value in changes.items():
                setattr(self, name, value)
            self.changed.notify_all()

    def on_connected(self, frame) -> None:
        self._note(connected=True)

    def on_disconnected(self) -> None:
        self._note(closed=True)

    def on_heartbeat_timeout(self) -> None:
        self._note(closed=True)

    def on_error(self, frame) -> None:
        body = frame.body
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        self._note(error=frame.headers.get("message") or str(body)[:200])

    def on_receipt(self, frame) -> None:
        with self.changed:
            self.receipts.add(frame.headers.get("receipt-id", ""))
            self.changed.notify_all()

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        with self.changed:
            ok = self.changed.wait_for(lambda: predicate() or self.error or self.closed, timeout)
            if self.error:
                raise WrapperError(f"broker refused {what}: {self.error}")
            if not ok or not predicate():
                raise WrapperError(f"no {what} from the broker within {timeout:g} s")


def publish_stomp(message: bytes, stomp_spec: dict, secrets: dict) -> None:
    """Send ``message`` as a persistent STOMP 1.2 message to the workflow's queue and mirror.

    Returns only after the broker sent a receipt for both sends. Raises
    WrapperError (or a stomp.py exception) when it did not.
    """
    import stomp  # only jobs of workflows with a broker need stomp.py

    timeout = float(stomp_spec.get("timeout", 10.0))
    conn = stomp.Connection12(
        host_and_ports=[tuple(b) for b in stomp_spec["brokers"]],
        reconnect_attempts_max=1,
        reconnect_sleep_initial=0.0,  # one pass over the brokers; deliver() does the retrying
        reconnect_sleep_increase=0.0,
        reconnect_sleep_jitter=0.0,
        timeout=timeout,
        auto_decode=False,
    )
    events = StompEvents()
    conn.set_listener("idds-fat", events)
    try:
        conn.connect(secrets.get("broker_user"), secrets.get("broker_password"), wait=False)
        events.wait_for(lambda: events.connected, timeout, "connection")
        sends = [(stomp_spec["destination"], {})]
        if stomp_spec.get("mirror"):
            expires = int((time.time() + float(stomp_spec.get("mirror_ttl", 86400))) * 1000)
            sends.append((stomp_spec["mirror"], {"expires": str(expires)}))
        wanted = set()
        for destination, extra in sends:
            receipt = f"r-{os.getpid()}-{len(wanted)}-{time.monotonic_ns()}"
            wanted.add(receipt)
            headers = {"persistent": "true", "receipt": receipt, **extra}
            conn.send(destination, body=message, headers=headers)
        events.wait_for(lambda: wanted <= events.receipts, timeout, "receipt")
    finally:
        try:
            conn.disconnect()
        except Exception:
            pass


def deliver(envelope: bytes, spec: dict, secrets: dict) -> str:
    """Hand the result to a channel: STOMP first (when configured), then REST; return which.

    Large envelopes (over the spec's ``result_inline_bytes``) go into the cache
    and the channels carry a signed reference. Both channels are retried with
    backoff until the spec's ``publish_timeout``; raises DeliveryError when
    neither took the result.
    """
    deadline = time.monotonic() + float(spec["publish_timeout"])
    errors: list[str] = []
    message = envelope
    try:
        if len(envelope) > int(spec.get("result_inline_bytes") or len(envelope)):
            message = by_reference(envelope, spec, secrets, deadline)
    except WrapperError as exc:
        errors.append(f"cache: {exc}")
    channels = []
    if spec.get("stomp"):
        channels.append(("stomp", lambda: publish_stomp(message, spec["stomp"], secrets)))
    url, token = spec["result_url"], secrets["token"]
    channels.append(("rest", lambda: _http("POST", url, token, message, 30.0)))
    delay = 0.05
    while channels:
        for name, send in list(channels):
            try:
                send()
                return name
            except Exception as exc:
                errors.append(f"{name}: {exc}")
                print(f"idds-fat wrapper: {name} delivery failed: {exc}", file=sys.stderr)
                if name == "rest" and not _transient(exc):  # e.g. 401: retrying cannot help
                    channels.remove((name, send))
        if not channels or time.monotonic() + delay > deadline:
            raise DeliveryError("result not delivered; " + "; ".join(errors[-4:]))
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
    raise DeliveryError("result not delivered; " + "; ".join(errors[-4:]))


def _load_spec(location: str, token: str | None) -> dict:
    name = public_url(location).rstrip("/").rsplit("/", 1)[-1]
    key = name if len(name) == 64 and all(c in "0123456789abcdef" for c in name) else None
    presigned = public_url(location) != location
    return json.loads(fetch(location, key, None if presigned else token))


def reply_message(envelope: bytes, spec: dict, secrets: dict) -> bytes:
    """The message that hands a result straight to the caller: the envelope, or a
    reference to it in the cache when it is larger than ``result_inline_bytes``.

    Raises WrapperError when a large result cannot be put into the cache.
    """
    if len(envelope) <= int(spec.get("result_inline_bytes") or len(envelope)):
        return envelope
    deadline = time.monotonic() + float(spec["publish_timeout"])
    return by_reference(envelope, spec, secrets, deadline)


def _reply_in_file(envelope: bytes, spec: dict, secrets: dict, reply_file: str) -> bool:
    """Leave the result for the caller in ``reply_file``; False if the caller is gone.

    The caller that started this job is its parent; once it has died the job
    has been handed to another parent, and the result goes the usual way.
    Whatever is left in the file, an attach that finds the job ended reads it.
    """
    if os.getppid() != _STARTED_BY:
        return False
    message = reply_message(envelope, spec, secrets)
    tmp = f"{reply_file}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(message)
    os.replace(tmp, reply_file)
    return True


_STARTED_BY = os.getppid()


def run_one(location: str, secrets: dict, workdir: Path, reply_file: str | None = None) -> int:
    """Run the job whose spec is at ``location`` in ``workdir``; return its exit status.

    With ``reply_file``, the result is left in that file for the caller that
    started this process (while it lives) instead of being delivered.
    """
    try:
        spec = _load_spec(location, secrets["token"])
    except Exception as exc:
        print(f"idds-fat wrapper: cannot start job: {exc}", file=sys.stderr)
        return EXIT_UNREPORTED
    status = enter_environment(spec, secrets, location, workdir)
    if status is not None:  # the job ran in a container, which delivered its result
        return status
    envelope = run_job(spec, secrets, workdir)
    try:
        if reply_file:
            try:
                if _reply_in_file(envelope, spec, secrets, reply_file):
                    return 0
            except (WrapperError, OSError) as exc:
                print(f"idds-fat wrapper: no reply file ({exc}); delivering", file=sys.stderr)
        deliver(envelope, spec, secrets)
    except DeliveryError as exc:
        print(f"idds-fat wrapper: {exc}", file=sys.stderr)
        return EXIT_UNDELIVERED
    finally:
        for leftover in workdir.glob("context-*"):
            import shutil

            shutil.rmtree(leftover, ignore_errors=True)
    return 0


# --- warm workers: many jobs, one interpreter -------------------------------------------


class WarmState:
    """What a warm worker keeps between jobs: verified cache objects and one code context.

    Objects are content-addressed and checked against their sha256 when first
    fetched, so reusing them is safe; they are kept up to ``max_bytes`` in
    total, oldest dropped first. The code context of the last archive stays
    extracted (and on ``sys.path``) until a job needs another one; files a job
    writes into it are seen by the later jobs of this worker.
    """

    def __init__(self, root: Path, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.objects: dict[str, bytes] = {}  # insertion order is age
        self._size = 0
        self._context: tuple[str, Path] | None = None

    def remember(self, key: str, data: bytes) -> None:
        """Keep ``data`` unless it would take more than a quarter of the budget."""
        if len(data) > self.max_bytes // 4 or key in self.objects:
            return
        self.objects[key] = data
        self._size += len(data)
        while self._size > self.max_bytes:
            self._size -= len(self.objects.pop(next(iter(self.objects))))

    def context(self, archive: dict, get) -> Path:
        """Return the extracted dir of ``archive``, extracting it if it is not the current one."""
        import tempfile

        if self._context is not None and self._context[0] == archive["key"]:
            return self._context[1]
        self.leave_context()
        path = Path(tempfile.mkdtemp(prefix="context-", dir=self.root))
        safe_extract(get(archive["key"]), path, int(archive["max_bytes"]))
        self._context = (archive["key"], path)
        return path

    def leave_context(self) -> None:
        """Forget the current code context: its modules, its ``sys.path`` entry, its files."""
        import shutil

        if self._context is None:
            return
        path = str(self._context[1])
        # Another archive may hold modules of the same names: they must load afresh.
        for name, module in list(sys.modules.items()):
            if (getattr(module, "__file__", None) or "").startswith(path + os.sep):
                del sys.modules[name]
        while path in sys.path:
            sys.path.remove(path)
        shutil.rmtree(path, ignore_errors=True)
        self._context = None


_warm: WarmState | None = None


def _needs_own_process(spec: dict) -> bool:
    """Whether a job must run in an interpreter of its own (another environment)."""
    environment = spec.get("environment") or {"kind": "current"}
    return environment.get("kind", "current") != "current" or bool(spec.get("init_env"))


def _run_in_child(location: str, secrets: dict, workdir: Path) -> int:
    """Run one job cold, as a child process, handing it the secrets in its environment."""
    import subprocess

    argv = [sys.executable, os.path.abspath(__file__), "--spec", location]
    return subprocess.call(argv, cwd=workdir, env=_secrets_environment(secrets, ""))


def _run_warm_job(
    location: str, secrets: dict, workdir: Path, reply: bool
) -> tuple[int, bytes | None, dict | None]:
    """Run one job in this worker; return ``(exit status, message, spec)``.

    With ``reply``, the result is not delivered: the message that carries it
    (the envelope, or a reference to it in the cache when large) is returned
    for the caller, who is at the other end of this worker's pipe.
    """
    try:
        spec = _load_spec(location, secrets["token"])
    except Exception as exc:
        print(f"idds-fat wrapper: cannot start job: {exc}", file=sys.stderr)
        return EXIT_UNREPORTED, None, None
    if _needs_own_process(spec):
        return _run_in_child(location, secrets, workdir), None, None
    envelope = run_job(spec, secrets, workdir)
    try:
        if reply:
            return 0, reply_message(envelope, spec, secrets), spec
        deliver(envelope, spec, secrets)
    except WrapperError as exc:
        print(f"idds-fat wrapper: {exc}", file=sys.stderr)
        return EXIT_UNDELIVERED, None, None
    return 0, None, None


def _point_output_at(stdout_fd: int, stderr_fd: int) -> None:
    # At the descriptor level, so that child processes and C code write there too.
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)


def _run_command(
    command: dict, secrets: dict, idle: tuple[int, int]
) -> tuple[int, bytes | None, dict | None]:
    """Run one job of a warm session in its work dir, its output in that dir's files."""
    workdir = Path(command["workdir"])
    home = Path.cwd()
    workdir.mkdir(parents=True, exist_ok=True)
    with (
        open(workdir / "stdout.txt", "ab") as out,
        open(workdir / "stderr.txt", "ab") as err,
    ):
        _point_output_at(out.fileno(), err.fileno())
    try:
        os.chdir(workdir)
        return _run_warm_job(command["spec"], secrets, workdir, bool(command.get("reply")))
    except Exception:  # a bug of ours must not end the session silently
        import traceback

        traceback.print_exc()
        return EXIT_UNREPORTED, None, None
    finally:
        os.chdir(home)
        _point_output_at(*idle)


class _WarmSession:
    """Makes this process a warm worker for a ``with`` block (objects and context kept).

    Its files live in a new directory under ``parent`` (default: the system's
    temporary directory), removed when the block ends.
    """

    def __init__(self, parent: Path | None = None) -> None:
        self.parent = parent

    def __enter__(self) -> _WarmSession:
        import tempfile

        global _warm
        self.root = Path(tempfile.mkdtemp(prefix="idds-fat-worker-", dir=self.parent))
        _warm = WarmState(self.root)
        return self

    def __exit__(self, *exc_info) -> None:
        import shutil

        global _warm
        if _warm is not None:
            _warm.leave_context()
        _warm = None
        shutil.rmtree(self.root, ignore_errors=True)


def serve_worker(secrets: dict) -> int:
    """Run jobs one after another as the caller sends them; return 0 when it stops sending.

    Protocol, one JSON object per line: the caller writes
    ``{"spec": LOCATION, "workdir": DIR, "reply": BOOL}`` to stdin; the worker
    runs the job in ``DIR`` (its stdout and stderr in ``DIR/stdout.txt`` and
    ``DIR/stderr.txt``) and answers ``{"exit": STATUS}`` on its original stdout.
    Without ``reply`` it delivers the result as a cold job would; with it, the
    answer also carries the signed result message, base64-encoded, as
    ``"result"`` (the caller verifies it like any other). If that answer cannot
    be written (the caller died), the result is delivered the usual way. End
    of input ends the worker, after the job it is running.
    """
    control = os.fdopen(os.dup(1), "w", buffering=1)
    stderr = os.dup(2)
    idle = (stderr, stderr)  # between jobs everything goes to our stderr
    _point_output_at(*idle)
    sys.stdin = open(os.devnull)  # jobs must not read the control channel
    commands = os.fdopen(os.dup(0), "r")
    os.dup2(sys.stdin.fileno(), 0)
    # The caller starts each worker in a directory of its own, which it removes
    # should it have to kill the worker: nothing is left behind in /tmp.
    with _WarmSession(Path.cwd()):
        for line in commands:
            status, message, spec = _run_command(json.loads(line), secrets, idle)
            answer = {"exit": status}
            if message is not None:
                answer["result"] = binascii.b2a_base64(message, newline=False).decode()
            try:
                control.write(json.dumps(answer) + "\n")
            except OSError:  # the caller is gone: its result must still get out
                if message is not None and spec is not None:
                    try:
                        deliver(message, spec, secrets)
                    except DeliveryError as exc:
                        print(f"idds-fat wrapper: {exc}", file=sys.stderr)
                break
    return 0


def read_pack(jobs_file: str, pack: str) -> list[dict]:
    """Return the jobs of pack ``pack`` in a jobs file, in order.

    A jobs file has one line per job, ``PACK<TAB>WORKDIR<TAB>SPEC``; relative
    work dirs are relative to the current directory.
    """
    jobs = []
    with open(jobs_file, encoding="utf-8") as handle:
        for line in handle:
            fields = line.rstrip("\n").split("\t")
            if len(fields) == 3 and fields[0] == pack:
                jobs.append({"workdir": os.path.abspath(fields[1]), "spec": fields[2]})
    return jobs


def run_pack(jobs: list[dict], secrets: dict) -> int:
    """Run several jobs in this one process, each delivering its result as soon as it is done.

    Each job's exit status goes to ``exit_status`` in its work dir (so a batch
    system that sees one process still learns how each job ended); returns 0
    when all of them delivered, else the first non-zero status.
    """
    if not jobs:
        return 0
    idle = (os.dup(1), os.dup(2))
    worst = 0
    # The pack's files (its extracted code context) go in its first job's dir:
    # killed by the batch system, it leaves them there, not in the node's /tmp.
    first = Path(jobs[0]["workdir"])
    first.mkdir(parents=True, exist_ok=True)
    with _WarmSession(first):
        for command in jobs:
            status, _, _ = _run_command(command, secrets, idle)
            Path(command["workdir"], "exit_status").write_text(f"{status}\n")
            worst = worst or status
    return worst


USAGE = """usage: wrapper.py --spec LOCATION [--reply-file PATH]
       wrapper.py --jobs-file FILE --pack N
       wrapper.py --worker"""


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status.

    Options are read with ``getopt``, which costs a job far less to import
    than ``argparse`` (~5 ms, a tenth of a cold job's own time).
    """
    try:
        pairs, rest = getopt.getopt(
            sys.argv[1:] if argv is None else argv,
            "",
            ["spec=", "reply-file=", "worker", "jobs-file=", "pack="],
        )
        options = dict(pairs)
        modes = [m for m in ("--spec", "--worker", "--jobs-file") if m in options]
        if rest or len(modes) != 1 or (("--jobs-file" in options) != ("--pack" in options)):
            raise getopt.GetoptError("give one of --spec, --worker, --jobs-file (with --pack)")
    except getopt.GetoptError as exc:
        print(f"{USAGE}\nidds-fat wrapper: {exc}", file=sys.stderr)
        return EXIT_UNREPORTED
    try:
        secrets = read_secrets()
        jobs = (
            read_pack(options["--jobs-file"], options["--pack"]) if modes == ["--jobs-file"] else []
        )
    except Exception as exc:
        print(f"idds-fat wrapper: cannot start job: {exc}", file=sys.stderr)
        return EXIT_UNREPORTED
    if "--worker" in options:
        return serve_worker(secrets)
    if "--jobs-file" in options:
        return run_pack(jobs, secrets)
    return run_one(options["--spec"], secrets, Path.cwd(), options.get("--reply-file"))


if __name__ == "__main__":
    sys.exit(main())
