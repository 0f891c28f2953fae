"""Job specs: built once, stored in the cache, read back by the key each job's request carries."""

from __future__ import annotations

import dataclasses

from idds_fat import Workflow
from idds_fat.workflow.specs import INLINE_KWARGS_BYTES


def add(x, y):
    return x + y


def test_a_jobs_spec_is_read_back_by_the_key_its_request_carries():
    with Workflow(progress=False) as wf:
        assert wf.map_kwargs(add, [{"x": 1}, {"x": 2}], y=10).results(timeout=60) == [11, 12]
        request = wf.tracker.request("t0001/1")
        spec = wf.specs.read(request)
        assert request.spec_location.endswith(request.spec_key)
        assert (spec.workflow, spec.task, spec.job) == (wf.id, "t0001", 1)
        assert (spec.attempt, spec.name) == (0, "add[1]")
        assert "inline" in spec.kwargs
        assert wf.specs.job_kwargs(spec) == {"x": 2}


def test_a_job_run_again_gets_its_own_spec_and_work_dir_and_large_arguments_go_by_key():
    blob = b"x" * (INLINE_KWARGS_BYTES + 1)
    with Workflow(progress=False) as wf:
        assert wf.map_kwargs(add, [{"x": blob}], y=b"!").results(timeout=60) == [blob + b"!"]
        request = wf.tracker.request("t0001/0")
        spec = wf.specs.read(request)
        assert "key" in spec.kwargs and wf.specs.job_kwargs(spec) == {"x": blob}
        again = wf.specs.again(request, 1)
        assert (again.job_id, again.name) == (request.job_id, f"{request.name}#1")
        assert again.workdir == request.workdir.with_name("0.1")
        assert again.spec_key != request.spec_key
        respec = wf.specs.read(again)
        assert (respec.attempt, spec.attempt) == (1, 0)
        assert respec.to_json() == dataclasses.replace(spec, attempt=1).to_json()
