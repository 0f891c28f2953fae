"""Record what a live PanDA server answers to the calls the panda backend makes.

Run from the repository root (needs the harness: ``.ci/install-services``)::

    .venv/bin/python tests/backends/panda_recordings/record.py

It starts a throwaway :class:`~idds_fat.testing.PandaServer` and a
:class:`~idds_fat.testing.PandaPilot`, makes each call of the backend once in the
situation the fast tests replay (right after submit, while running, once done,
with an expired or a forged token, ...), and writes ``exchanges.json`` beside
this file: for each exchange, the request (method, operation, body) and the reply
(HTTP status, content type, body). ``tests/backends/test_panda_backend.py`` builds
its ``responses`` replies from that file; the task IDs and names it holds are the
recorded ones, which the tests replace by their own.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
import time
import zlib
from functools import partial
from pathlib import Path
from typing import Any

import requests

from idds_fat.backends.base import JobRequest, Resources
from idds_fat.backends.panda import PandaBackend, PandaClient
from idds_fat.testing import PandaPilot, PandaServer, wait_until

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "exchanges.json"
SECRET_NAME = "IDDS_FAT_RECORDING"


class Recorder:
    """Sends requests as the backend's client does and keeps each exchange."""

    def __init__(self, server: PandaServer) -> None:
        self.api = server.api_url
        self.headers = {"Accept": "application/json", **server.auth.headers()}
        self.exchanges: dict[str, dict[str, Any]] = {}

    def status(self, task_id: int) -> str | None:
        """The task's status, not recorded."""
        reply = requests.get(
            f"{self.api}/task/get_status",
            params={"task_id": task_id},
            headers=self.headers,
            timeout=60,
        )
        return reply.json().get("data")

    def __call__(self, name: str, method: str, operation: str, **kwargs: Any) -> Any:
        headers = dict(self.headers, **kwargs.pop("headers", {}))
        response = requests.request(
            method, f"{self.api}/{operation}", headers=headers, timeout=60, **kwargs
        )
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        sent = kwargs.get("json", kwargs.get("params"))
        if "files" in kwargs:
            sent = {"multipart": sorted(kwargs["files"])}
        self.exchanges[name] = {
            "request": {"method": method, "operation": operation, "body": sent},
            "reply": {
                "status": response.status_code,
                "content_type": response.headers.get("Content-Type", ""),
                "body": body,
            },
        }
        print(f"{name}: HTTP {response.status_code} {str(body)[:160]}", flush=True)
        return body


def task_parameters(server: PandaServer, command: str, count: int) -> dict[str, Any]:
    """The backend's own task parameters for ``count`` jobs, with ``command`` as the
    job command (the real one would need an idds-fat service)."""
    backend = PandaBackend(
        on_exit=lambda job, outcome: None,
        wrapper_url=f"http://node-cache.invalid/cache/{'a' * 64}",
        job_secrets={"hmac_key": "00" * 32, "token": "recording"},
        client=PandaClient(server.server_url, server.auth),
        queue=server.queue,
        trans_path=server.runner_url,
        max_attempt=1,
        secret_name=SECRET_NAME,
    )
    jobs = [
        JobRequest(
            job_id=f"t0001/{i}",
            name=f"recording/t0001/f[{i}]",
            spec_location=f"http://node-cache.invalid/cache/{i:064x}",
            workdir=Path("/nonexistent") / str(i),
            resources=Resources(cores=1, memory_mb=1000, walltime=600),
        )
        for i in range(count)
    ]
    params = backend.task_parameters(jobs)
    params["jobParameters"] = [{"type": "constant", "value": f"{command} # ${{IN/L}}"}]
    return params


def record(base: Path) -> dict[str, dict[str, Any]]:
    """Start a server and a pilot under ``base``, make every exchange, return them."""
    with (
        PandaServer(base / "panda") as server,
        PandaPilot(
            server.api_url, server.queue, base / "pilot", slots=2, poll=0.5, heartbeat=2.0
        ) as pilot,
    ):
        call = Recorder(server)
        call("voms_attributes", "GET", "system/get_voms_attributes")
        call(
            "set_user_secrets",
            "POST",
            "creds/set_user_secrets",
            json={"key": SECRET_NAME, "value": json.dumps({"token": "recording"})},
        )
        submitted = call(
            "submit",
            "POST",
            "task/submit",
            json={"task_parameters": task_parameters(server, "true", 3), "parent_tid": None},
        )
        task_id = submitted["data"]
        # The seconds before JEDI registers the task.
        call("status_not_found", "GET", "task/get_status", params={"task_id": task_id})
        call(
            "kill_not_registered",
            "POST",
            "task/kill",
            json={"task_id": task_id, "broadcast": False},
        )
        status = partial(call.status, task_id)
        wait_until(
            lambda: status() not in (None, "registered", "defined", "ready"),
            "the task to run",
            timeout=180,
        )
        call("status_running", "GET", "task/get_status", params={"task_id": task_id})
        wait_until(lambda: status() == "done", "the task to be done", timeout=180)
        call("status_done", "GET", "task/get_status", params={"task_id": task_id})
        call(
            "details_done",
            "GET",
            "task/get_details",
            params={"task_id": task_id, "include_parameters": "false", "include_status": "true"},
        )
        call(
            "details_with_parameters",
            "GET",
            "task/get_details",
            params={"task_id": task_id, "include_parameters": "true", "include_status": "true"},
        )
        call("kill_done", "POST", "task/kill", json={"task_id": task_id, "broadcast": False})

        failing = call(
            "submit_failing",
            "POST",
            "task/submit",
            json={"task_parameters": task_parameters(server, "exit 3", 2), "parent_tid": None},
        )["data"]
        wait_until(
            lambda: call.status(failing) in ("failed", "finished"),
            "the failing task to end",
            timeout=240,
        )
        call("status_failed", "GET", "task/get_status", params={"task_id": failing})
        call(
            "details_failed",
            "GET",
            "task/get_details",
            params={"task_id": failing, "include_parameters": "false", "include_status": "true"},
        )

        running = call(
            "submit_to_kill",
            "POST",
            "task/submit",
            json={"task_parameters": task_parameters(server, "sleep 600", 1), "parent_tid": None},
        )["data"]
        wait_until(lambda: running in pilot.running.values(), "the job to run", timeout=180)
        call("kill_running", "POST", "task/kill", json={"task_id": running, "broadcast": False})

        data = gzip.compress(b"recorded " * 64, mtime=0)
        crc = int.from_bytes(data[-8:-4], "little")
        name = "sources.idds-fat-recording.tar.gz"
        call(
            "validate_missing",
            "POST",
            "file_server/validate_cache_file",
            json={"file_size": len(data), "checksum": crc},
        )
        call(
            "upload",
            "POST",
            "file_server/upload_cache_file",
            files={"file": (name, data, "application/octet-stream")},
        )
        call(
            "upload_again",
            "POST",
            "file_server/upload_cache_file",
            files={"file": (name, data, "application/octet-stream")},
        )
        call(
            "validate_found",
            "POST",
            "file_server/validate_cache_file",
            json={"file_size": len(data), "checksum": crc},
        )
        # The server checks tokens itself, against the harness's issuer.
        for name, token in (
            ("expired_token", server.issue_token(lifetime=-60)),
            ("forged_token", server.issue_token(trusted=False)),
        ):
            call(
                name,
                "GET",
                "system/get_voms_attributes",
                headers={"Authorization": f"Bearer {token}"},
            )
        call("delete_secret", "POST", "creds/set_user_secrets", json={"key": SECRET_NAME})
        assert zlib.crc32(gzip.decompress(data)) == crc
    return call.exchanges


def main() -> int:
    """Record and write ``exchanges.json``; print a line per exchange."""
    if not PandaServer.available():
        print("the PanDA server is not installed: run `bash .ci/install-services`", file=sys.stderr)
        return 2
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="panda-recording-") as base:
        exchanges = record(Path(base))
    OUTPUT.write_text(json.dumps(exchanges, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUTPUT} ({len(exchanges)} exchanges) in {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
