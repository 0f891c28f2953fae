"""Mistakes caught before anything runs: calls that do not fit, a service that refuses."""

from __future__ import annotations

import functools
import importlib

import pytest

from idds_fat import ServiceAccessError, SignatureError, Workflow, work
from idds_fat.service import EmbeddedService
from idds_fat.testing.processes import free_port
from idds_fat.workflow.binding import check_call, check_elements

TOKEN = "s3cret-service-token"


@work
def add(a, b=0):
    return a + b


def _nothing_submitted(wf: Workflow) -> bool:
    return wf.tracker.futures() == [] and wf.stats["received"] == 0


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    # One workflow for the module: every call below must fail before it makes a job.
    work_dir = tmp_path_factory.mktemp("work")
    with Workflow(work_dir=work_dir, max_workers=1) as workflow:
        yield workflow
    assert _nothing_submitted(workflow)


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda: add(1, 2, 3), "too many positional arguments"),
        (lambda: add(1, z=2), "unexpected keyword argument 'z'"),
        (lambda: add(), "missing a required argument: 'a'"),
        (lambda: add.submit(1, 2, 3), "too many positional arguments"),
        (lambda: add.map([{"a": 1}, {"a": 2, "c": 2}]), r"kwargs list entry 1.*'c'"),
        (lambda: add(1, multi_jobs_kwargs_list=[{"b": 1}, {"z": 1}]), "entry 1.*'z'"),
    ],
    ids=["too-many", "unknown-keyword", "missing", "submit", "map-entry", "multi-jobs-entry"],
)
def test_a_work_call_that_does_not_fit_raises_type_error_at_the_call_site(wf, call, says):
    with pytest.raises(TypeError, match=says) as caught:
        call()
    assert isinstance(caught.value, SignatureError)
    assert "add(a, b=0)" in str(caught.value)  # the signature it was checked against
    assert _nothing_submitted(wf)


def test_workflow_verbs_check_the_call_before_submitting(wf):
    def mul(x, y):
        return x * y

    with pytest.raises(TypeError, match="too many positional"):
        wf.submit(mul, 1, 2, 3)
    with pytest.raises(TypeError, match=r"kwargs list entry 2.*'q'"):
        wf.map_kwargs(mul, [{"y": 1}, {"y": 2}, {"y": 3, "q": 3}], 5)
    with pytest.raises(TypeError, match="entry 0 is not a mapping"):
        wf.map_kwargs(mul, [[1, 2]])
    # Executor.map: zip gives every element the same length, so the first one fails.
    with pytest.raises(SignatureError, match=r"element 0\).*missing a required argument") as e:
        wf.map(mul, iter([1, 2]))
    assert e.value.argument == "element 0"
    assert _nothing_submitted(wf)


def test_what_binds_is_not_refused():
    class Later:  # stands for a future given as an argument: only the shape is checked
        pass

    def kw_only(a, *, b, **rest):
        return a

    check_call(add.fn, (Later(),), {"b": Later()})
    check_call(kw_only, (1,), {}, [{"b": 2}, {"b": 3, "extra": 4}])
    check_call(functools.partial(kw_only, b=1), (1,), {})
    check_call(add.fn, (1,), {"b": 1}, [{"b": 2}])  # an entry's key wins, as on the node
    check_call(len, ([],), {})
    check_call(max, (1, 2, 3), {"key": abs})  # no signature to read: not checked
    check_elements(add.fn, [(1,), (1, 2)])


def test_an_element_that_does_not_fit_executor_map_is_named():
    with pytest.raises(SignatureError) as caught:
        check_elements(add.fn, [(1,), (1, 2), (1, 2, 3), ()])
    assert caught.value.argument == "element 2" and caught.value.function == "add"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with EmbeddedService(tmp_path_factory.mktemp("service"), token=TOKEN) as running:
        yield running


@pytest.mark.parametrize("token", ["wrong-token", None], ids=["wrong", "missing"])
def test_a_service_that_refuses_the_token_fails_the_workflow_as_it_opens(service, token):
    wf = Workflow(service_url=service.url, token=token)
    with pytest.raises(ServiceAccessError) as caught:
        wf.start()
    error = caught.value
    assert (error.status, error.url) == (401, service.url)
    assert f"idds-fat service at {service.url} (service_url) answered HTTP 401" in str(error)
    assert ("refused" if token else "no token was given") in str(error)
    assert TOKEN not in str(error) and (token is None or token not in str(error))
    assert wf.work_dir is None  # it failed before its work dir was made


def test_an_unreachable_service_fails_the_workflow_as_it_opens_naming_it():
    url = f"http://user:pw@127.0.0.1:{free_port()}"
    with pytest.raises(
        ServiceAccessError, match=r"at http://127\.0\.0\.1:\d+ .*could not be reached"
    ):
        with Workflow(service_url=url, token=TOKEN):
            pytest.fail("the body must not run")  # pragma: no cover


def test_a_workflow_given_a_service_and_its_token_opens(service):
    with Workflow(service_url=service.url, token=TOKEN, max_workers=1) as wf:
        assert wf.service_url == service.url


def test_a_module_missing_on_the_node_keeps_its_type_and_hints_at_environment_and_source_dir(
    tmp_path, monkeypatch
):
    @work
    def needs_a_missing_module():
        import idds_fat_no_such_module  # noqa: F401

    # A module only this process can import (outside the current directory, so it
    # is pickled by reference): the job fails as it unpickles the call.
    (tmp_path / "only_here_module.py").write_text("def twice(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    only_here = importlib.import_module("only_here_module")
    assert only_here.twice(2) == 4

    with Workflow(max_workers=1) as wf:
        with pytest.raises(ModuleNotFoundError) as in_function:
            needs_a_missing_module()
        with pytest.raises(ModuleNotFoundError) as unpickling:
            wf.submit(only_here.twice, 2).result(timeout=60)
    for caught, module in (
        (in_function, "idds_fat_no_such_module"),
        (unpickling, "only_here_module"),
    ):
        error = caught.value
        assert error.name == module
        hint = "\n".join(getattr(error, "__notes__", [])) or str(error)
        assert f"module {module!r} is not importable where the job ran" in hint
        assert "environment=" in hint and "source_dir=" in hint
        assert "is not importable where the job ran" in error.remote_traceback
