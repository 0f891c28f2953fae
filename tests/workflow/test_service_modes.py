"""The same calls through the HTTP cache and through a separately running service."""

from __future__ import annotations

import pytest

from idds_fat import ServiceAccessError, Workflow, work
from idds_fat.service import EmbeddedService


@work
def double(x):
    return 2 * x


def test_http_cache_serves_wrapper_objects_and_specs_with_a_token(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "data.txt").write_text("via http")
    read = work(lambda: open("data.txt").read())
    with Workflow(cache="service", source_dir=source) as wf:
        assert wf.parts.cache.location.startswith("http://127.0.0.1:")
        assert read() == "via http"
        assert double.map([{"x": i} for i in range(3)]).results(timeout=60) == [0, 2, 4]
    spec_lines = (wf.work_dir / "state.sqlite3").read_bytes()
    assert wf.parts.token.encode() not in spec_lines


def test_workflow_uses_a_running_service_given_by_url_and_token(tmp_path):
    with EmbeddedService(tmp_path / "service", token="s3cret-token") as service:
        with Workflow(service_url=service.url, token="s3cret-token") as wf:
            assert double(21) == 42
            assert wf.stats["received"] == 1
        # A wrong token fails the workflow as it opens (tests/api/test_call_site_errors.py).
        with pytest.raises(ServiceAccessError, match="answered HTTP 401"):
            Workflow(service_url=service.url, token="wrong").start()
