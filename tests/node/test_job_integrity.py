"""End to end: tampered objects stop the job with a clear error, forged results are dropped."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import requests

from idds_fat import IntegrityError, JobLostError, Workflow, work
from idds_fat.serialize import seal


@work
def read_data_file():
    return Path("data.txt").read_text()


def _cached(wf: Workflow, key: str) -> Path:
    return Path(wf.config.work_dir) / "cache" / key[:2] / key


def test_job_runs_inside_its_extracted_code_context(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "data.txt").write_text("context content")
    with Workflow(source_dir=source):
        assert read_data_file() == "context content"


def test_tampered_archive_fails_the_job_with_integrity_error(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "data.txt").write_text("genuine")
    with Workflow(source_dir=source) as wf:
        archive = _cached(wf, wf.parts.archive.sha256)
        tampered = bytearray(archive.read_bytes())
        tampered[len(tampered) // 2] ^= 0xFF
        archive.write_bytes(bytes(tampered))
        with pytest.raises(IntegrityError, match="does not match its sha256"):
            read_data_file()


def test_forged_result_is_rejected_counted_and_the_real_one_still_arrives():
    @work
    def honest(x):
        return x * 2

    with Workflow() as wf:
        forged = seal(
            {
                "kind": "result",
                "workflow": wf.id,
                "task": "t0001",
                "job": 0,
                "attempt": 0,
                "status": "ok",
            },
            __import__("cloudpickle").dumps("forged value"),
            os.urandom(32),
        )
        response = requests.post(
            f"{wf.service_url}/results/{wf.id}",
            data=forged,
            headers={"Authorization": f"Bearer {wf.parts.token}"},
            timeout=10,
        )
        assert response.status_code == 201
        assert honest(21) == 42
        assert wf.stats["rejected"] == 1


def test_results_delivered_twice_reach_the_user_once():
    @work
    def once():
        return "value"

    with Workflow() as wf:
        future = once.submit()
        assert future.result(timeout=60) == "value"
        # Replay the stored envelope as a second delivery (e.g. REST after STOMP).
        stored = requests.get(
            f"{wf.service_url}/results/{wf.id}",
            headers={"Authorization": f"Bearer {wf.parts.token}"},
            timeout=10,
        ).json()["results"][0]["envelope"]
        envelope = base64.b64decode(stored)
        wf.parts.collector.accept(envelope)
        assert wf.stats == {
            "received": 1,
            "duplicates": 1,
            "rejected": 0,
            "stomp": 0,
            "rest": 0,
            "local": 1,  # straight from the warm worker; the store's copy is no duplicate
        }


def test_job_whose_result_cannot_be_delivered_is_lost_not_silent(tmp_path, monkeypatch):
    @work
    def fine():
        return 1

    # The job itself delivers (not a warm worker's pipe): that delivery must fail.
    with Workflow(publish_timeout=0.5, local_direct_results=False) as wf:
        wf.service_url = "http://127.0.0.1:9"  # the discard port: nobody listens
        with pytest.raises(JobLostError, match="could not be delivered") as info:
            fine()
    assert info.value.exit_status == 3
    assert "result not delivered" in info.value.stderr_tail


def test_wrapper_refuses_a_spec_whose_content_does_not_match_its_name(tmp_path):
    import subprocess
    import sys

    from idds_fat.wrapper_source import wrapper_file

    spec = tmp_path / ("0" * 64)
    spec.write_text(json.dumps({"workflow": "w"}))
    env = dict(os.environ, IDDS_FAT_JOB_SECRETS=json.dumps({"hmac_key": "ab" * 32}))
    done = subprocess.run(
        [sys.executable, str(wrapper_file(tmp_path)), "--spec", str(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2
    assert "does not match its sha256" in done.stderr
    assert "ab" * 32 not in done.stderr


@pytest.mark.parametrize(
    "argv",
    [[], ["--spec", "s", "--worker"], ["--jobs-file", "f"], ["--pack", "0"], ["--nope"], ["x"]],
)
def test_wrapper_refuses_a_bad_command_line_with_its_usage(argv, capsys):
    from idds_fat.node.errors import EXIT_UNREPORTED
    from idds_fat.node.main import main

    assert main(argv) == EXIT_UNREPORTED
    assert capsys.readouterr().err.startswith("usage: wrapper.py --spec LOCATION")
