"""Workflows on an s3:// cache (a real moto server on loopback): presigned URLs, by reference."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from idds_fat import IntegrityError, Workflow, work, workflow
from idds_fat.node.errors import WrapperError
from idds_fat.node.fetch import fetch
from idds_fat.wrapper_source import wrapper_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MB = 1024 * 1024


@pytest.fixture
def s3_cache(s3_server, monkeypatch):
    """An ``s3://`` cache location in a fresh bucket; boto3 configured by the environment."""
    bucket = s3_server.make_bucket(f"cache-{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    return f"s3://{bucket}/idds-fat"


def _count_uploads(store) -> list[str]:
    """Record the key of every object upload the store's client makes."""
    seen: list[str] = []

    def record(params, **_):
        seen.append(params["Key"])

    for operation in ("PutObject", "CreateMultipartUpload"):
        store.client.meta.events.register(f"before-parameter-build.s3.{operation}", record)
    return seen


def test_jobs_read_context_and_payload_through_presigned_urls(s3_cache, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "data.txt").write_text("from s3")
    read = work(lambda suffix: open("data.txt").read() + suffix)
    with Workflow(cache=s3_cache, source_dir=source) as wf:
        assert wf.parts.cache.location == s3_cache
        assert read.map([{"suffix": "!"}, {"suffix": "?"}]).results(timeout=60) == [
            "from s3!",
            "from s3?",
        ]


def test_the_wrapper_needs_no_credentials_on_the_node(s3_cache):
    with Workflow(cache=s3_cache) as wf:
        future = work(lambda: 41 + 1).submit()
        assert future.result(timeout=60) == 42
        spec_url = wf.tracker.request("t0001/0").spec_location
        assert "X-Amz-Signature" in spec_url or "Signature" in spec_url
        # Run the same job again by hand with an environment holding no AWS anything.
        secrets = {"hmac_key": wf.parts.key.hex(), "token": wf.parts.token}
        env = {"PATH": os.environ["PATH"], "IDDS_FAT_JOB_SECRETS": json.dumps(secrets)}
        done = subprocess.run(
            [sys.executable, str(wrapper_file(wf.work_dir)), "--spec", spec_url],
            env=env,
            cwd=wf.work_dir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        wf.parts.collector.drain()  # the wrapper exited after the store took its result
        assert wf.stats["duplicates"] >= 1 and wf.stats["received"] == 1


def test_a_200_mb_argument_shared_by_20_jobs_is_put_once(s3_cache):
    shared = os.urandom(200 * MB)
    digest = hashlib.sha256(shared).hexdigest()

    @work(map_results=True)
    def check(blob, i):
        import hashlib

        return i, hashlib.sha256(blob).hexdigest()

    with Workflow(cache=s3_cache, max_argument_bytes=300 * MB) as wf:
        uploads = _count_uploads(wf.parts.cache)
        results = check(shared, multi_jobs_kwargs_list=[{"i": i} for i in range(20)])
        assert [results[i] for i in range(20)] == [(i, digest) for i in range(20)]
    big = [k for k in uploads if "/named/" not in k]
    sizes = {
        k: wf.parts.cache.client.head_object(Bucket=s3_cache.split("/")[2], Key=k)["ContentLength"]
        for k in big
    }
    assert sum(1 for size in sizes.values() if size > 100 * MB) == 1  # the payload, once


def test_a_100_mb_result_travels_by_reference_and_is_fetched_lazily(s3_cache):
    @work
    def big():
        return bytes(range(256)) * (100 * MB // 256)

    with Workflow(cache=s3_cache) as wf:
        future = big.submit()
        value = future.result(timeout=120)
        store = wf.parts.cache
    assert len(value) == 100 * MB
    assert (
        hashlib.sha256(value).digest()
        == hashlib.sha256(bytes(range(256)) * (100 * MB // 256)).digest()
    )
    names = [o["Key"] for o in store.client.list_objects_v2(Bucket=store.bucket)["Contents"]]
    assert any("/named/results/" in name for name in names)


def test_a_tampered_large_result_is_refused_when_used(s3_cache):
    @work
    def big():
        return b"x" * (2 * MB)

    with Workflow(cache=s3_cache) as wf:
        future = big.submit()
        future.exception(timeout=60)  # done, without touching the value yet
        store = wf.parts.cache
        (name,) = [
            o["Key"]
            for o in store.client.list_objects_v2(Bucket=store.bucket)["Contents"]
            if "/named/results/" in o["Key"]
        ]
        store.client.put_object(Bucket=store.bucket, Key=name, Body=b"not the result")
        with pytest.raises(IntegrityError, match="does not match its sha256"):
            future.result()


def test_hpo_example_runs_with_an_s3_cache(s3_cache):
    spec = importlib.util.spec_from_file_location("hpo_bayes_on_s3", EXAMPLES / "hpo_bayes.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    run = workflow(source_dir=EXAMPLES, cache=s3_cache)(example.optimize)
    best = run(1, 4, 1)
    assert 0.5 < best["score"] <= 1.0


def test_an_expired_presigned_url_is_a_clear_error_naming_it(tmp_path):
    class Expired(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(403)
            self.end_headers()
            self.wfile.write(b"<Error><Code>AccessDenied</Code>Request has expired</Error>")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Expired)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/bucket/ab/{'ab' * 32}?X-Amz-Signature=s3cr3t"
        with pytest.raises(WrapperError) as info:
            fetch(url, "ab" * 32, None, timeout=1)
    finally:
        server.shutdown()
    message = str(info.value)
    assert "may have expired" in message and f"/bucket/ab/{'ab' * 32}" in message
    assert "s3cr3t" not in message
