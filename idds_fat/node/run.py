"""Running one job: fetch and verify its objects, extract its code, call, seal the outcome.

A warm worker or a pack passes its ``WarmState``, which keeps verified objects
and the extracted code context from one job to the next.
"""

from __future__ import annotations

import binascii
import os
import pickle
import sys
import time
from typing import TYPE_CHECKING

from .envelope import seal, unseal
from .environments import check_interpreter
from .errors import IntegrityError, WrapperError
from .extract import safe_extract
from .fetch import fetch_object, http_request, with_retries
from .spec import JobSpec

if TYPE_CHECKING:  # loaded by a code context or a warm worker; a plain cold job never
    from pathlib import Path

#: The persistent id of another job's result stored by reference, as the caller
#: pickles it into a dependent job's call: (this tag, cache key, task, job, attempt).
RESULT_REFERENCE = "idds-fat/result"
#: The persistent id of another job's result that may not exist yet when the call is
#: pickled (the job was submitted to wait for it: Slurm's afterok): (this tag, task,
#: job). The node reads it from the workflow's REST result store, any attempt.
RESULT_OF = "idds-fat/result-of"
#: Seconds one request to the result store waits for the input's result (long poll).
_RESULT_POLL_SECONDS = 10.0


def job_pickler():
    """Return cloudpickle when this interpreter has it; else pickle, enough to report why not."""
    try:
        import cloudpickle
    except ImportError:
        return pickle
    return cloudpickle


def _error_body(exc: BaseException, tb_text: str) -> dict:
    """Describe ``exc`` for the caller; include its pickle only if it round-trips."""
    cloudpickle = job_pickler()

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


def _hint_missing_module(exc: BaseException) -> None:
    """Tell the caller how to give a job a module it could not import.

    The exception keeps its type (``except ModuleNotFoundError`` still works on
    the caller): the hint is a note (3.11+) or, on 3.10, the end of its message.
    """
    if not isinstance(exc, ModuleNotFoundError):
        return
    hint = (
        f"idds-fat: module {exc.name!r} is not importable where the job ran "
        f"({sys.executable} on {os.uname().nodename}). Give the task an environment "
        "that has it (environment=Venv([...]), Conda(...) or Container(...) on @work or "
        "the workflow; docs/environments/), or ship your own code with source_dir=."
    )
    if hasattr(exc, "add_note"):
        exc.add_note(hint)
    else:  # pragma: no cover - exercised only on 3.10
        exc.msg = f"{exc.msg}\n{hint}"
        exc.args = (exc.msg, *exc.args[1:])


_OPENED_KEPT = 8  # a worker runs the jobs of a few tasks at a time


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
        # Envelopes already verified, by (cache key, HMAC key): the bytes of a cache
        # key never change, so checking them again per job proves nothing new.
        self._opened: dict[tuple[str, bytes], tuple[dict, bytes]] = {}
        self._context: tuple[str, Path] | None = None

    def remember(self, key: str, data: bytes) -> None:
        """Keep ``data`` unless it would take more than a quarter of the budget."""
        if len(data) > self.max_bytes // 4 or key in self.objects:
            return
        self.objects[key] = data
        self._size += len(data)
        while self._size > self.max_bytes:
            self._size -= len(self.objects.pop(next(iter(self.objects))))

    def opened(self, key: str, hmac_key: bytes, get) -> tuple[dict, bytes]:
        """Return the verified ``(header, body)`` of the envelope stored as ``key``,
        verifying it (``unseal``) on first use only: the call of a task, which every
        job of the task opens. Keeps the last few. Raises IntegrityError as ``unseal``.
        """
        found = self._opened.get((key, hmac_key))
        if found is None:
            found = unseal(get(key), hmac_key)
            if len(self._opened) >= _OPENED_KEPT:
                del self._opened[next(iter(self._opened))]
            self._opened[(key, hmac_key)] = found
        return found

    def context(self, archive: dict, get) -> Path:
        """Return the extracted dir of ``archive``, extracting it if it is not the current one."""
        import tempfile
        from pathlib import Path

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


def _get_object(spec: JobSpec, secrets: dict, key: str, warm: WarmState | None) -> bytes:
    """Fetch cache object ``key`` (verified by its sha256); a warm worker keeps it."""
    if warm is not None and key in warm.objects:
        return warm.objects[key]
    data = fetch_object(spec, secrets, key)
    if warm is not None:
        warm.remember(key, data)
    return data


def _context_dir(spec: JobSpec, get, workdir: str | Path, warm: WarmState | None) -> str | Path:
    """Extract the job's code context (once per archive in a warm worker); return its dir."""
    archive = spec.archive
    if not archive:
        return workdir
    if warm is not None:
        return warm.context(archive, get)
    import tempfile
    from pathlib import Path

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


def _input_value(header: dict, body: bytes, task: str, job: int) -> object:
    """The value of input ``task/job`` from its verified result; raise if it failed."""
    if header.get("status") == "ok":
        return pickle.loads(body)
    try:
        error = pickle.loads(body)  # verified: the workflow's own job sealed it
        cause = f"{error['type']}: {(str(error['message']).strip().splitlines() or [''])[0]}"
    except Exception:
        cause = str(header.get("status"))
    raise WrapperError(f"input {task}/{job} failed ({cause}): this job did not run")


def _result_of(spec: JobSpec, key: bytes, token: str | None, get, task: str, job: int):
    """Return the value of job ``task/job`` of this workflow, read from the REST result
    store (any attempt; a large one from the cache by its reference), its envelope
    verified with the workflow's key; wait for it up to the spec's publish timeout.

    Raises WrapperError when the input failed or its result did not come in time.
    """
    import base64
    import json
    import urllib.parse

    deadline = time.monotonic() + float(spec.publish_timeout)
    cursor = 0
    while True:
        wait = max(0.0, min(_RESULT_POLL_SECONDS, deadline - time.monotonic()))
        query = urllib.parse.urlencode({"since": cursor, "task": task, "job": job, "wait": wait})
        url = f"{spec.result_url}?{query}"
        page = json.loads(
            with_retries(
                lambda url=url, wait=wait: http_request("GET", url, token, None, wait + 30.0),
                deadline,
                f"reading the result of input {task}/{job}",
            )
        )
        failed = None
        for row in page.get("results", ()):
            try:
                header, body = unseal(base64.b64decode(row["envelope"]), key)
            except (IntegrityError, ValueError):
                continue  # not sealed with the workflow's key: the real one may follow
            named = (header.get("workflow"), header.get("task"), header.get("job"))
            if named != (spec.workflow, task, job):
                continue
            if header.get("kind") == "result-ref":
                if not header.get("ref"):
                    raise WrapperError(
                        f"input {task}/{job} is stored where this job cannot read it (S3)"
                    )
                header, body = unseal(get(header["ref"]), key)
                named = (header.get("workflow"), header.get("task"), header.get("job"))
                if named != (spec.workflow, task, job):
                    raise IntegrityError(f"the stored result of {task}/{job} names {named}")
            if header.get("kind") != "result":
                continue
            if header.get("status") == "ok":
                return _input_value(header, body, task, job)
            failed = (header, body)
        if failed is not None:
            _input_value(*failed, task, job)
        cursor = int(page.get("cursor", cursor))
        if time.monotonic() >= deadline:
            raise WrapperError(
                f"the result of input {task}/{job} was not in the result store after "
                f"{float(spec.publish_timeout):g} s (publish_timeout)"
            )


def _loader(spec: JobSpec, key: bytes, get, token: str | None = None):
    """Return ``loads(data)`` that also resolves the results of other jobs the call names:
    by reference (a cache key: fetched, its sha256 checked) or by name (``RESULT_OF``:
    read from the REST result store); each envelope is verified with the workflow's key
    and its header checked, once per job."""
    import io

    inputs: dict = {}

    def stored_result(pid):
        if isinstance(pid, tuple) and len(pid) == 3 and pid[0] == RESULT_OF:
            _, task, job = pid
            if pid not in inputs:
                inputs[pid] = _result_of(spec, key, token, get, task, job)
            return inputs[pid]
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == RESULT_REFERENCE):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, ref, task, job, attempt = pid
        if ref not in inputs:
            header, body = unseal(get(ref), key)
            named = (header.get("workflow"), header.get("task"), header.get("job"))
            if (
                header.get("kind") != "result"
                or header.get("status") != "ok"
                or named != (spec.workflow, task, job)
                or header.get("attempt") != attempt
            ):
                raise IntegrityError(f"input {ref} is not the value of job {task}/{job}")
            inputs[ref] = pickle.loads(body)
        return inputs[ref]

    # cloudpickle's loads is pickle's: the plain Unpickler reads its pickles.
    return lambda data: _CallUnpickler(io.BytesIO(data), stored_result).load()


class _CallUnpickler(pickle.Unpickler):
    """An Unpickler that hands persistent ids to ``resolve`` (one class for all jobs:
    making a class is ~15 us, a warm job's whole budget is a few hundred)."""

    def __init__(self, file, resolve) -> None:
        super().__init__(file)
        self._resolve = resolve

    def persistent_load(self, pid):
        return self._resolve(pid)


def _run_function(
    spec: JobSpec,
    secrets: dict,
    workdir: str | Path,
    warm: WarmState | None,
    setup_failure: Exception | None,
) -> tuple[str, object]:
    """Fetch, verify, extract and run; return ``(status, value_or_error_body)``."""
    cloudpickle = job_pickler()

    key = secrets["key"]

    def get(key_: str) -> bytes:
        return _get_object(spec, secrets, key_, warm)

    try:
        if setup_failure is not None:
            raise setup_failure
        context_dir = _context_dir(spec, get, workdir, warm)
        payload_key = spec.payload["key"]
        if warm is not None:
            header, payload = warm.opened(payload_key, key, get)
        else:
            header, payload = unseal(get(payload_key), key)
        sources = header.get("sources")
        check_interpreter(header, spec, cloudpickle)
        loads = _loader(spec, key, get, secrets["token"])
        fn, args, kwargs = loads(payload)
        job_kwargs = spec.kwargs
        if job_kwargs:
            raw = (
                binascii.a2b_base64(job_kwargs["inline"])
                if "inline" in job_kwargs
                else get(job_kwargs["key"])
            )
            _, body = unseal(raw, key)
            kwargs = {**kwargs, **loads(body)}
    except Exception as exc:
        import traceback  # only failures need it: a job that works never pays the import

        _hint_missing_module(exc)  # unpickling the call needed a module the node lacks
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
        _hint_missing_module(exc)
        text = "".join(traceback.format_exception(type(exc), exc, tb.tb_next if tb else None))
        return "error", _error_body(exc, text)
    finally:
        os.chdir(workdir)
    return "ok", value


def run_job(
    spec: JobSpec,
    secrets: dict,
    workdir: str | Path,
    warm: WarmState | None = None,
    setup_failure: Exception | None = None,
) -> bytes:
    """Run the job that ``spec`` describes; return its sealed result envelope.

    ``warm`` is what a warm worker keeps between jobs; ``setup_failure`` (the
    environment could not be entered) is reported as the job's setup error.
    """
    cloudpickle = job_pickler()

    started = time.time()
    status, outcome = _run_function(spec, secrets, workdir, warm, setup_failure)
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
        "workflow": spec.workflow,
        "task": spec.task,
        "job": spec.job,
        "attempt": spec.attempt,
        "status": status,
        "host": os.uname().nodename,
        "pid": os.getpid(),
        "started": started,
        "finished": time.time(),
    }
    return seal(header, body, secrets["key"])
