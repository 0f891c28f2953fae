"""One warm worker, many jobs (node/worker.py ``serve_worker``): what it keeps between
jobs (one snapshot of process state, its spool) and what it answers.

The jobs run in a real ``wrapper --worker`` (``idds_fat.testing.bare_worker``, an
all-zero HMAC key), fed by this test over its pipe: calls sealed and stored in a
directory cache here, specs sent inline, results read back from the answers.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import signal
import sys

import cloudpickle
import pytest

from idds_fat.node import worker
from idds_fat.node.envelope import seal, sha256_hex, unseal
from idds_fat.node.errors import IntegrityError, WrapperError
from idds_fat.node.fetch import fetch
from idds_fat.node.spec import JobSpec
from idds_fat.testing.bare_worker import start_bare_worker

KEY = bytes(32)  # the bare worker's


class BareWorkerJobs:
    """Runs functions as jobs of one bare warm worker, one after another."""

    def __init__(self, directory) -> None:
        self.cache = directory / "cache"
        self.jobs = directory / "jobs"
        self.jobs.mkdir()
        self.spool = directory / "spool"
        self.spool.mkdir()
        self.proc = start_bare_worker(directory)
        self.count = 0

    def run(self, fn, *args, workdir: str | None = None):
        """Run ``fn(*args)`` in the worker; return its value (raise if it failed)."""
        payload = seal({"kind": "call"}, cloudpickle.dumps((fn, args, {})), KEY)
        key = sha256_hex(payload)
        (self.cache / key[:2]).mkdir(parents=True, exist_ok=True)
        (self.cache / key[:2] / key).write_bytes(payload)
        self.count += 1
        spec = JobSpec(
            workflow="w",
            task="t",
            job=self.count,
            cache=str(self.cache),
            payload={"key": key},
            result_url="http://127.0.0.1:9/unused",  # results come back on the pipe
            publish_timeout=1.0,
            result_inline_bytes=1 << 20,
        ).to_json()
        command = {
            "spec": str(self.cache / "unused"),
            "workdir": workdir or str(self.jobs / str(self.count)),
            "reply": True,
            "spool": str(self.spool),
            "spec_json": spec.decode(),
            "spec_key": sha256_hex(spec),
        }
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        assert answer["exit"] == 0, answer
        self.proc.stdin.write('{"ack": true}\n')
        self.proc.stdin.flush()
        header, body = unseal(base64.b64decode(answer["result"]), KEY)
        value = cloudpickle.loads(body)
        if header["status"] != "ok":
            raise AssertionError(value["traceback"])
        return value

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        status = self.proc.wait(timeout=60)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return status


@pytest.fixture
def jobs(tmp_path):
    runner = BareWorkerJobs(tmp_path)
    yield runner
    assert runner.close() == 0


def _functions():
    # Made here, not at module level: local functions travel by value, and the worker
    # cannot import this test module.
    def look():
        import os
        import resource
        import signal
        import sys

        umask = os.umask(0o022)
        os.umask(umask)
        return {
            "pid": os.getpid(),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
            "umask": umask,
            "environ": {k: v for k, v in os.environ.items() if k.startswith("MEDDLED")},
            "handlers": [
                signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
            ],
            "path": list(sys.path),
            "recursion": sys.getrecursionlimit(),
            "cwd": os.getcwd(),
        }

    def meddle(n):
        import os
        import resource
        import signal
        import sys

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64 * n, hard))
        os.umask(0o077 if n == 1 else 0o007)
        os.environ[f"MEDDLED_{n}"] = "yes"
        signal.signal(signal.SIGUSR1 if n == 1 else signal.SIGUSR2, signal.SIG_IGN)
        sys.path.append(f"/meddled/{n}")
        sys.setrecursionlimit(500 + n)
        os.chdir("/")
        return os.getpid()

    def spool_names(spool):
        with open(os.path.join(spool, "job"), "rb") as handle:
            return handle.read().decode()

    return look, meddle, spool_names


def test_one_warm_worker_puts_back_what_each_job_changed_job_after_job(jobs):
    look, meddle, _ = _functions()
    first = jobs.run(look)
    assert first["environ"] == {} and "/meddled/1" not in first["path"]
    assert first["pid"] != os.getpid()
    for n in (1, 2, 1, 2):
        assert jobs.run(meddle, n) == first["pid"]
        # The worker's one snapshot, put back after each job: every job sees the same.
        assert jobs.run(look) == first


def test_the_spool_names_the_running_job_whatever_the_length_of_the_last_name(jobs, tmp_path):
    _, _, spool_names = _functions()
    base = str(tmp_path / "jobs")
    for workdir in (f"{base}/a-long-name", f"{base}/b", f"{base}/c", f"{base}/a-longer-name"):
        assert jobs.run(spool_names, str(jobs.spool), workdir=workdir) == workdir


def test_a_snapshot_put_back_equals_a_new_snapshot_each_time():
    state = worker.ProcessState.capture()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    original = signal.getsignal(signal.SIGUSR1)
    try:
        for n in range(3):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 100 + n), hard))
            os.environ[f"IDDS_FAT_TEST_{n}"] = "x"
            signal.signal(signal.SIGUSR1, signal.SIG_IGN if n % 2 else lambda *a: None)
            sys.path.append(f"/nowhere/{n}")
            assert state.restore() == []
            again = worker.ProcessState.capture()
            assert again.limits == state.limits and again.environ == state.environ
            assert again.handlers == state.handlers and again.path == state.path
            assert again.umask == state.umask
    finally:
        signal.signal(signal.SIGUSR1, original)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_memory_limit_is_lifted_without_a_word_and_other_limits_with_one(capsys):
    state = worker.ProcessState.capture()
    assert worker.limit_memory(4096)
    assert state.restore(memory_limited=True) == []
    assert resource.getrlimit(resource.RLIMIT_AS) == state.limits["RLIMIT_AS"]
    assert "RLIMIT_AS" not in capsys.readouterr().err
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 100), hard))
    assert state.restore() == []
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (soft, hard)
    assert "changed RLIMIT_NOFILE; set back" in capsys.readouterr().err


@pytest.mark.parametrize("size", [0, 805, (1 << 20) + 3, (3 << 20) + 1])
def test_an_object_read_from_a_path_is_whole_and_checked(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "object"
    path.write_bytes(data)
    assert fetch(str(path), sha256_hex(data), None) == data
    assert fetch("file://" + str(path), None, None) == data
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        fetch(str(path), sha256_hex(data + b"!"), None)
    with pytest.raises(WrapperError, match="fetching"):
        fetch(str(tmp_path / "missing"), None, None)


def test_a_task_call_is_verified_once_per_worker_and_a_forged_one_every_time(tmp_path) -> None:
    from idds_fat.node.run import WarmState

    warm = WarmState(tmp_path)
    good = seal({"kind": "call"}, b"the call", KEY)
    forged = good[:-1] + bytes([good[-1] ^ 1])
    fetched: list[str] = []

    def get(key: str) -> bytes:
        fetched.append(key)
        return {"good": good, "forged": forged}[key]

    first = warm.opened("good", KEY, get)
    assert first == unseal(good, KEY)
    assert warm.opened("good", KEY, get) is first  # the second job reuses the check
    assert fetched == ["good"]
    with pytest.raises(IntegrityError):
        warm.opened("good", bytes([1]) * 32, get)  # under another key: checked again
    for _ in range(2):
        with pytest.raises(IntegrityError):
            warm.opened("forged", KEY, get)  # a failure is never kept
    assert fetched == ["good", "good", "forged", "forged"]
