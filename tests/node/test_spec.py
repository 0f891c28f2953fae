"""The job spec is one typed, versioned record whose JSON is the bytes the caller writes today."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from idds_fat import Workflow, work
from idds_fat.node.envelope import WRAPPER_VERSION
from idds_fat.node.errors import WrapperError
from idds_fat.node.spec import JobSpec

# A spec as the workflow runtime builds it (docs/contracts.md, "Job spec").
RUNTIME_SPEC = {
    "version": WRAPPER_VERSION,
    "workflow": "hpo-20261121T235049-0a1b2c",
    "task": "t0003",
    "job": 7,
    "attempt": 0,
    "name": "objective[7]",
    "cache": "file:///home/u/.cache/idds-fat/cache",
    "archive": {"key": "a" * 64, "max_bytes": 104857600},
    "payload": {"key": "b" * 64},
    "kwargs": {"inline": "SURTRkFUMQ=="},
    "result_url": "http://127.0.0.1:8000/results/hpo",
    "stomp": {
        "brokers": [["host1", 61613]],
        "destination": "/queue/idds-fat.hpo",
        "mirror": "/queue/idds-fat.mirror.hpo",
        "mirror_ttl": 604800,
        "timeout": 10.0,
    },
    "result_inline_bytes": 1048576,
    "publish_timeout": 120.0,
    "environment": {"kind": "current", "label": "current"},
    "init_env": None,
}
ON_S3 = {
    "urls": {"b" * 64: "https://s3.example.org/bucket/bb?X-Amz-Signature=s"},
    "result_object": "results/hpo/t0003/7.0",
    "result_put_url": "https://s3.example.org/bucket/named/results?X-Amz-Signature=s",
}


@pytest.mark.parametrize("doc", [RUNTIME_SPEC, {**RUNTIME_SPEC, **ON_S3}], ids=["dir", "s3"])
def test_to_json_writes_the_very_bytes_of_the_runtimes_dict(doc):
    spec = JobSpec(**doc)
    assert spec.to_json() == json.dumps(doc, sort_keys=True).encode()
    assert JobSpec.from_json(spec.to_json()) == spec


@work
def one():
    return 1


def test_a_spec_the_runtime_wrote_reads_back_to_the_same_bytes():
    with Workflow() as wf:
        assert one() == 1
        cache = Path(wf.config.work_dir) / "cache"
    written = []
    for path in cache.glob("*/*"):
        try:
            doc = json.loads(path.read_bytes())
        except ValueError:
            continue
        if isinstance(doc, dict) and "payload" in doc:
            written.append(path.read_bytes())
    assert written
    for data in written:
        spec = JobSpec.from_json(data)
        assert spec.to_json() == data
        assert (spec.version, spec.job, spec.attempt) == (WRAPPER_VERSION, 0, 0)


def test_a_spec_of_another_version_is_refused_naming_both_versions():
    with pytest.raises(
        WrapperError, match=f"version 2; this wrapper reads version {WRAPPER_VERSION}"
    ):
        JobSpec.from_json(json.dumps({**RUNTIME_SPEC, "version": 2}))
    with pytest.raises(WrapperError, match="version None"):
        JobSpec.from_json(json.dumps({k: v for k, v in RUNTIME_SPEC.items() if k != "version"}))


def test_a_spec_lacking_a_required_key_is_refused_naming_it_and_unknown_keys_are_ignored():
    partial = {k: v for k, v in RUNTIME_SPEC.items() if k not in ("payload", "result_url")}
    with pytest.raises(WrapperError, match="lacks payload, result_url"):
        JobSpec.from_json(json.dumps(partial))
    later = JobSpec.from_json(json.dumps({**RUNTIME_SPEC, "added_later": 1}))
    assert later == JobSpec(**RUNTIME_SPEC)
    with pytest.raises(WrapperError, match="not JSON"):
        JobSpec.from_json(b"{")
    with pytest.raises(WrapperError, match="not a JSON object"):
        JobSpec.from_json(b"[1]")


def test_secrets_come_from_a_0600_file_and_every_secrets_variable_leaves_the_environment(
    tmp_path, monkeypatch
):
    from idds_fat.node.spec import SECRETS_ENV, SECRETS_FD_ENV, SECRETS_FILE_ENV, read_secrets
    from idds_fat.workdir import write_private

    path = tmp_path / "job-secrets.json"
    write_private(path, json.dumps({"hmac_key": "ef" * 32, "token": "from-the-file"}).encode())
    monkeypatch.setenv(SECRETS_FILE_ENV, str(path))
    monkeypatch.setenv(SECRETS_ENV, json.dumps({"hmac_key": "00" * 32, "token": "env"}))
    secrets = read_secrets()
    assert secrets["key"] == bytes.fromhex("ef" * 32) and secrets["token"] == "from-the-file"
    for name in (SECRETS_ENV, SECRETS_FD_ENV, SECRETS_FILE_ENV):
        assert name not in os.environ  # processes the job starts inherit none of them
    with pytest.raises(WrapperError, match=SECRETS_FD_ENV):
        read_secrets()  # nothing left to read


def test_secrets_too_large_to_wait_in_a_pipe_are_refused():
    import select

    from idds_fat.node.spec import secrets_pipe

    with pytest.raises(WrapperError, match=f"over {select.PIPE_BUF}"):
        secrets_pipe(b"x" * (select.PIPE_BUF + 1))
