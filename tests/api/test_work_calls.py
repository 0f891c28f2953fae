"""@work inside and outside a workflow: the shapes calls return, and what travels."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from idds_fat import AsyncResult, MapResult, Workflow, work, workflow
from idds_fat.testing import wait_until


@work
def add(a, b=0):
    """Add two numbers (a plain module-level function)."""
    return a + b


@work(map_results=True)
def scaled(factor, **point):
    return {key: factor * value for key, value in point.items()}


@work
def identity(value):
    return value


def test_outside_a_workflow_a_work_function_runs_in_process():
    assert add(2, b=3) == 5
    assert add.__doc__.startswith("Add two numbers")
    results = scaled(2, multi_jobs_kwargs_list=[{"x": 1}, {"x": 2}])
    assert isinstance(results, MapResult)
    assert results.get_result(args={"x": 2}) == {"x": 4}
    assert add.submit(1, 1).result() == 2
    assert list(add.map([{"b": 1}, {"b": 2}], 10)) == [11, 12]


def test_single_call_in_a_workflow_runs_as_a_job_in_another_process():
    @work
    def where():
        return os.getpid()

    with Workflow() as wf:
        pid = where()
        assert wf.stats["received"] == 1
    assert pid != os.getpid()


def test_closure_and_lambda_travel_by_value():
    offset = 41

    @work
    def closure(x):
        return x + offset

    square = work(lambda x: x * x)
    with Workflow():
        assert closure(1) == 42
        assert square(7) == 49


@pytest.mark.parametrize("value", [0, 0.0, None, False, "", [], {}])
def test_falsy_results_arrive_as_themselves(value):
    with Workflow():
        result = identity(value)
    assert result == value and type(result) is type(value)


def test_numpy_array_round_trips():
    with Workflow():
        result = identity(np.arange(12.0).reshape(3, 4))
    np.testing.assert_array_equal(result, np.arange(12.0).reshape(3, 4))


def test_map_results_keyed_by_kwargs_and_ordered_by_input_not_arrival(tmp_path):
    # Job i waits until job i+1 has finished, so results arrive in reverse order.
    @work(map_results=True)
    def chained(marker_dir, i, last):
        marker = Path(marker_dir)
        if i != last:
            wait_until((marker / f"done-{i + 1}").exists, f"job {i + 1} to finish")
        finished = time.time()
        (marker / f"done-{i}").touch()
        return {"i": i, "finished": finished}

    points = [{"i": i, "last": 3} for i in range(4)]
    with Workflow(max_workers=4):
        results = chained(str(tmp_path), multi_jobs_kwargs_list=points)
        arrival = [f.kwargs["i"] for f in results.as_completed()]
    assert [r["i"] for r in results] == [0, 1, 2, 3]
    assert [results.get_result(args=p)["i"] for p in points] == [0, 1, 2, 3]
    assert [results[i]["i"] for i in range(4)] == [0, 1, 2, 3]
    assert [k["i"] for k, _ in results.items()] == [0, 1, 2, 3]
    finished = [r["finished"] for r in results]
    assert finished == sorted(finished, reverse=True)
    assert sorted(arrival) == [0, 1, 2, 3]


def test_map_without_map_results_returns_a_list_in_input_order():
    with Workflow():
        values = add(100, multi_jobs_kwargs_list=[{"b": i} for i in range(5)])
    assert values == [100, 101, 102, 103, 104]


def test_common_arguments_and_kwargs_list_combine():
    with Workflow():
        results = scaled(3, multi_jobs_kwargs_list=[{"x": 1, "y": 2}, {"x": 5}])
    assert results.get_result(args={"x": 1, "y": 2}) == {"x": 3, "y": 6}
    assert results.get_result(args={"x": 5}) == {"x": 15}
    with pytest.raises(KeyError):
        results.get_result(args={"x": 99})


def test_submit_returns_a_real_future_usable_with_concurrent_futures_and_asyncio():
    with Workflow():
        futures = [add.submit(i, b=1) for i in range(3)]
        assert all(isinstance(f, concurrent.futures.Future) for f in futures)
        done = {f.result() for f in concurrent.futures.as_completed(futures, timeout=60)}
        assert done == {1, 2, 3}
        concurrent.futures.wait(futures, timeout=60)

        async def gather():
            wrapped = await asyncio.wrap_future(add.submit(5, b=5))
            direct = await add.submit(6, b=6)
            mapped = await add.map([{"b": 1}, {"b": 2}], 0)
            return wrapped, direct, list(mapped)

        assert asyncio.run(gather()) == (10, 12, [1, 2])


def test_map_returns_at_once_and_collects_later():
    with Workflow():
        results = add.map([{"b": i} for i in range(4)], 1)
        assert isinstance(results, MapResult) and len(results) == 4
        assert results.results(timeout=60) == [1, 2, 3, 4]
        assert results.done() and not results.failed()


def test_return_work_gives_futures_instead_of_blocking():
    lazy = work(return_work=True)(lambda x: x + 1)
    with Workflow():
        future = lazy(1)
        assert isinstance(future, AsyncResult)
        assert future.result(timeout=60) == 2


def test_workflow_decorator_runs_body_and_returns_its_value():
    @workflow(name="decorated", max_workers=2)
    def body(n):
        return add(n, multi_jobs_kwargs_list=[{"b": 1}, {"b": 2}])

    assert body(10) == [11, 12]


def test_return_workflow_gives_an_unstarted_workflow_to_run_later():
    @workflow(return_workflow=True)
    def body():
        return add(1, b=1)

    wf = body()
    assert isinstance(wf, Workflow) and not wf.id
    assert wf.run() == 2


def test_function_defined_in_main_runs_remotely(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(
        textwrap.dedent(
            """
            import os
            from idds_fat import work, workflow

            @work(map_results=True)
            def objective(base, **point):
                return base + point["x"] ** 2, os.getpid()

            @workflow(source_dir=os.path.dirname(os.path.abspath(__file__)))
            def optimize():
                results = objective(1, multi_jobs_kwargs_list=[{"x": x} for x in range(3)])
                return [results.get_result(args={"x": x}) for x in range(3)]

            values = optimize()
            assert all(pid != os.getpid() for _, pid in values), values
            print([v for v, _ in values])
            """
        )
    )
    env = dict(os.environ)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1, 2, 5]"


def test_user_module_under_source_dir_is_pickled_by_value(tmp_path, monkeypatch):
    package = tmp_path / "proj"
    package.mkdir()
    (package / "usermod_byvalue.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(package))
    import usermod_byvalue

    # The archive is excluded entirely, so only pickling by value can carry the module.
    with Workflow(source_dir=package, exclude_source_files=["*.py"]):
        assert work(usermod_byvalue.triple)(5) == 15
