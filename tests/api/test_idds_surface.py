"""The iDDS surface (``idds.iworkflow``), used the way iDDS programs use it (issue 14).

Each test calls iDDS names with iDDS's arguments: ``Workflow(func=...)`` with
attributes set afterwards, ``prepare``/``submit``, ``MapResult.get_result(name=,
args=, key=, with_details=)``, the ``Work`` verbs, every ``@work``/``@workflow``
parameter, the default code context and ``init_env`` as a command prefix; the
last ones run a whole iDDS-style HPO program on ``local`` and on Slurm.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from idds_fat import (
    IgnoredParameterWarning,
    JobEnvironmentError,
    MapResult,
    Workflow,
    WorkflowStartedError,
    work,
    workflow,
)
from idds_fat.api import idds_compat
from idds_fat.workflow import idds_names


def idds_key(args):
    """iDDS's key of a job's arguments (idds.common.utils.get_unique_id_for_dict)."""
    return hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Every test sees the once-per-process warnings afresh."""
    monkeypatch.setattr(idds_names, "_warned", set())


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project directory, the current one, with a helper module beside the script."""
    directory = tmp_path / "project"
    directory.mkdir()
    (directory / "helper.py").write_text("def scale(x):\n    return 10 * x\n")
    monkeypatch.chdir(directory)
    return directory


@work(map_results=True)
def square(x, offset=0):
    return x * x + offset


@work
def fails(x):
    raise ValueError(f"bad {x}")


def test_workflow_func_prepare_submit_runs_the_body_and_returns_its_id(project):
    def body(a, b=0, c=0):
        return list(square(multi_jobs_kwargs_list=[{"x": a}, {"x": b}])) + [c]

    wf = Workflow(func=body, service="idds", args=(2,), kwargs={"b": 3}, pre_kwargs={"c": 7})
    wf.queue = "FUNCX_TEST"
    wf.cloud = "US"
    assert wf.name == "body"
    wf.prepare()
    workflow_id = wf.submit()
    assert workflow_id == wf.id == wf.request_id == wf.workload_id != ""
    assert wf.get_result() == [4, 9, 7]


def test_a_failing_body_raises_from_submit_instead_of_returning_none(project):
    def body():
        return fails(1)

    wf = Workflow(body, local=True)  # iDDS's positional func; the body runs here
    with pytest.raises(ValueError, match="bad 1"):
        wf.submit()
    with pytest.raises(ValueError, match="bad 1"):
        wf.get_result()


def test_attributes_set_before_start_take_effect_and_raise_once_started(project):
    @work
    def limits():
        import resource

        return os.environ.get("FROM_INIT_ENV"), resource.getrlimit(resource.RLIMIT_AS)[0]

    wf = Workflow(func=lambda: limits(), local_mode="cold")
    wf.init_env = "export FROM_INIT_ENV=yes;"
    wf.total_memory = 3000
    wf.core_count = 2
    wf.max_walltime = 600
    assert (wf.resources.memory_mb, wf.resources.cores, wf.resources.walltime) == (3000, 2, 600)
    wf.submit()
    assert wf.get_result() == ("yes", 3000 * 1024 * 1024)
    with pytest.raises(WorkflowStartedError, match="queue cannot change"):
        wf.queue = "late"
    with pytest.raises(WorkflowStartedError):
        wf.core_count = 4


def test_map_result_is_read_by_name_args_key_and_details_as_idds_reads_it(project):
    points = [{"x": 1}, {"x": 2, "offset": 1}]
    with Workflow():
        results = square(multi_jobs_kwargs_list=points)
        assert isinstance(results, MapResult)
        assert results.get_result(name=None, args=points[1]) == 5
        assert results.get_result(name="square", args=points[0]) == 1
        assert results.get_result(key=idds_key(points[1])) == 5
        value, details = results.get_result(args=points[0], with_details=True)
        assert (value, details["status"], details["error"]) == (1, True, None)
        assert results.get_all_results() == {idds_key(points[0]): 1, idds_key(points[1]): 5}
        maps = results.get_dict_results()
        assert maps["name_results"] == {
            f"square:{idds_key(p)}": v for p, v in zip(points, [1, 5], strict=True)
        }
        assert set(maps["details"]) == set(maps["results"])
        assert results.has_result(args=points[0]) and not results.has_result(args={"x": 9})
        with pytest.raises(KeyError):  # iDDS returns None
            results.get_result(args={"x": 9})


def test_a_failed_job_raises_where_idds_returns_none(project):
    @work(map_results=True)
    def maybe(x):
        if x:
            raise ValueError("odd")
        return x

    with Workflow():
        results = maybe.map([{"x": 0}, {"x": 1}]).wait()
        assert results.get_status() == "SubFinished" and results.is_subfinished()
        assert not results.has_result(args={"x": 1})
        with pytest.raises(ValueError, match="odd"):
            results.get_result(args={"x": 1})
        with pytest.raises(ValueError, match="odd"):
            results.get_result(args={"x": 1}, with_details=True)
        with pytest.raises(ValueError, match="odd"):
            results.get_all_results()


def test_a_returned_work_has_idds_work_verbs(project):
    @work(return_work=True, map_results=True)
    def double(x):
        return 2 * x

    with Workflow():
        one = double(3)
        assert one.get_results() == 6
        assert one.is_finished() and one.is_terminated() and not one.is_failed()
        assert one.get_status() == "Finished"
        many = double(multi_jobs_kwargs_list=[{"x": 1}, {"x": 2}])
        assert list(many.get_results()) == [2, 4]
        assert many.is_finished() and many.get_status() == "Finished"
        lost = fails.submit(1)
        lost.exception()
        assert lost.is_failed() and lost.is_terminated() and lost.get_status() == "Failed"


def test_a_map_result_can_be_built_by_hand_as_in_idds():
    results = MapResult()
    results.add_result(name="f", args={"x": 1}, result=10)
    results.set_result(name="f", args={"x": 2}, value=20)
    assert results.get_result(args={"x": 2}) == 20
    assert results.get_all_results() == {idds_key({"x": 1}): 10, idds_key({"x": 2}): 20}


def test_every_idds_work_parameter_is_accepted_and_the_unused_ones_warned_once():
    ignored = {
        "lazy": True,
        "no_wraps": True,
        "parent_workload_id": 1,
        "no_wait_parent": True,
        "input_datasets": ["d"],
        "output_file_name": "o",
        "output_dataset_name": "od",
        "log_dataset_name": "ld",
        "num_events": 10,
        "num_events_per_job": 2,
        "parent_transform_id": 3,
        "parent_internal_id": "p",
        "post_script": "echo done",
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            fn = work(enable_separate_log=True, job_key="k", pre_kwargs={}, **ignored)(len)
    assert fn([1, 2]) == 2
    named = sorted(str(w.message).split(" ")[0] for w in caught)
    assert named == sorted(ignored)
    assert all(w.category is IgnoredParameterWarning for w in caught)
    assert all(w.filename == __file__ for w in caught)  # they point at the decorator's line
    with pytest.raises(TypeError, match="unknown options: no_such"):
        work(no_such=1)(len)


def test_every_idds_workflow_parameter_is_accepted(project):
    @workflow(
        primary=True,
        distributed=True,
        pre_kwargs={"b": 2},
        no_wraps=True,
        source_dir_parent_level=1,
        enable_separate_log=True,
        clean_env="rm -rf tmp",
        use_func_dir=True,
        post_script="echo done",
        local=True,
    )
    def body(a, b=0):
        return square(multi_jobs_kwargs_list=[{"x": a}])[0] + b

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert body(3) == 11
    warned = {str(w.message).split(" ")[0] for w in caught}
    assert {"primary", "no_wraps", "clean_env", "post_script"} <= warned
    assert not warned & {"distributed", "enable_separate_log", "pre_kwargs", "use_func_dir"}


def test_a_workflow_keyword_at_call_time_or_in_work_chooses_the_workflow(project):
    wf = Workflow()
    try:
        assert square(3, workflow=wf) == 9  # no workflow is open: the keyword chose one
        pinned = work(workflow=wf)(lambda: os.getpid())
        assert pinned() != os.getpid()
        assert len(wf.tasks) == 2
    finally:
        wf.close()


def test_tuple_entries_are_positional_arguments_in_and_outside_a_workflow(project):
    @work(map_results=True, pre_kwargs={"sep": "-"})
    def join(a, b, sep="+"):
        return f"{a}{sep}{b}"

    entries = [("x", "y"), {"b": "z"}, ["p", "q"]]
    assert list(join("a", multi_jobs_kwargs_list=entries)) == ["x-y", "a-z", "p-q"]
    with Workflow():
        results = join("a", multi_jobs_kwargs_list=entries)
        assert list(results) == ["x-y", "a-z", "p-q"]
        assert results.get_result(args=("x", "y")) == "x-y"
        assert results.get_result(key=idds_key(["p", "q"])) == "p-q"
        assert results.get_result(args={"b": "z"}) == "a-z"


def test_distributed_false_runs_work_calls_in_the_body_process(project):
    @work
    def where():
        return os.getpid()

    wf = Workflow(func=lambda: where(), distributed=False, local=True)
    wf.submit()
    assert wf.get_result() == os.getpid()


def test_to_dict_store_load_runner_and_source_setup(project):
    def body():
        return 1

    wf = Workflow(func=body, queue="Q", core_count=3, vo="atlas")
    described = wf.to_dict()
    assert described["func"] == body.__qualname__
    assert (described["placement"]["queue"], described["resources"]["cores"]) == ("Q", 3)
    path = wf.store()
    assert path == project / "body.json"
    again = Workflow(func=body)
    again.load()
    assert (again.queue, again.core_count, again.vo) == ("Q", 3, "atlas")
    assert wf.setup_source_files() is None
    assert wf.get_runner() == "idds-fat status"
    wf.submit()
    assert wf.get_runner() == f"idds-fat status {wf.id}"


def test_the_default_code_context_is_the_current_directory_without_the_work_dir(
    project, monkeypatch
):
    monkeypatch.setenv("IDDS_FAT_WORK_DIR", str(project / "work"))

    @work
    def helped(x):
        import helper  # beside the script, shipped because it is in the current directory

        return helper.scale(x)

    wf = Workflow()
    assert wf.source_dir == project
    assert "/work/" in wf.exclude_source_files
    with wf:
        assert helped(4) == 40
    assert "work/" not in {name.split("/")[0] + "/" for name in _archive_names(wf)}


def _archive_names(wf):
    import io
    import zipfile

    data = wf.parts.cache.get(wf.parts.archive.sha256)
    return zipfile.ZipFile(io.BytesIO(data)).namelist()


def test_use_func_dir_and_parent_level_choose_the_code_context(tmp_path, monkeypatch):
    package = tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "mod.py").write_text("def body():\n    return 1\n")
    monkeypatch.syspath_prepend(str(package))
    import mod

    monkeypatch.chdir(tmp_path)
    assert Workflow(func=mod.body).source_dir == tmp_path
    assert Workflow(func=mod.body, use_func_dir=True).source_dir == package
    found = Workflow(func=mod.body, use_func_dir=True, source_dir_parent_level=1).source_dir
    assert found == package.parent
    assert Workflow(source_dir=False).source_dir is None


def test_from_the_home_directory_nothing_is_shipped_by_default_with_a_warning(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="not packed whole"):
        wf = Workflow()
    assert wf.source_dir is None
    assert Workflow(source_dir=tmp_path).source_dir == tmp_path  # asked for: packed


FAKE_RUNTIME = """#!/bin/sh
# A container runtime stand-in: "singularity exec IMAGE CMD...", marking what it wraps.
[ "$1" = exec ] || exit 64
export WRAPPED_IN="$2"
shift 2
exec "$@"
"""


def _fake_singularity(directory: Path) -> Path:
    runtime = directory / "bin" / "singularity"
    runtime.parent.mkdir()
    runtime.write_text(FAKE_RUNTIME)
    runtime.chmod(0o755)
    return runtime


def test_init_env_is_a_prefix_of_the_job_command_and_a_failing_one_fails_the_job(
    project, tmp_path, monkeypatch
):
    runtime = _fake_singularity(tmp_path)
    # Behind a container runtime the wrapper runs under the image's python3.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    @work(init_env=f"{runtime} exec idds_ml_al9.simg ")
    def inside():
        return os.environ.get("WRAPPED_IN"), "\n".join(os.environ.values())

    @work(init_env="/nonexistent/singularity exec image.simg ")
    def never():
        return "ran on the host"

    with Workflow() as wf:
        wrapped_in, environment = inside()
        assert wrapped_in == "idds_ml_al9.simg"
        assert wf.parts.key.hex() not in environment  # the secrets came on a pipe
        with pytest.raises(JobEnvironmentError) as raised:
            never()
    message = str(raised.value)
    assert "init_env" in message and "/nonexistent/singularity: No such file" in message


HPO_HELPER = '''
"""The helpers of an iDDS HPO script (optimize.py beside it, as in iDDS's tests)."""
import os


def evaluate(x, y):
    where = os.environ.get("WRAPPED_IN"), os.environ.get("SLURM_JOB_PARTITION")
    return -((x - 3) ** 2) - (y + 1) ** 2, where


def suggest(iteration, n):
    return [{"x": float(iteration + j + 1), "y": float(-j)} for j in range(n)]
'''

HPO_SCRIPT = '''
"""An iDDS HPO program; only its import lines were changed."""
import json
import os
import sys

from idds_fat import Workflow  # was: from idds.iworkflow.workflow import Workflow
from idds_fat import work  # was: from idds.iworkflow.work import work


@work(map_results=True)
def optimize_work(x, y):
    from optimize import evaluate

    return evaluate(x, y)


def optimize_workflow():
    from optimize import suggest

    best = None
    for iteration in range(2):
        points = suggest(iteration, 3)
        results = optimize_work(multi_jobs_kwargs_list=points)
        for p in points:
            score, where = results.get_result(name=None, args=p)
            if best is None or score > best[0]:
                best = (score, p, where)
    return best


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.realpath(__file__)))
    init_env = sys.argv[1] + " exec idds_ml_al9.simg "
    wf = Workflow(func=optimize_workflow, service="idds", init_env=init_env)
    wf.queue = sys.argv[2]
    wf.cloud = "US"
    wf.prepare()
    request_id = wf.submit()
    print(json.dumps({"id": request_id, "best": wf.get_result()}))
'''


def _run_hpo_program(directory: Path, runtime: Path, queue: str, env: dict[str, str]) -> dict:
    (directory / "optimize.py").write_text(textwrap.dedent(HPO_HELPER))
    script = directory / "hpo.py"
    script.write_text(textwrap.dedent(HPO_SCRIPT))
    done = subprocess.run(
        [sys.executable, str(script), str(runtime), queue],
        cwd="/",  # the script changes to its own directory, as iDDS's do
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _hpo_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


def test_an_idds_hpo_program_runs_unchanged_but_for_its_imports_on_local(tmp_path):
    runtime = _fake_singularity(tmp_path)
    directory = tmp_path / "hpo"
    directory.mkdir()
    outcome = _run_hpo_program(directory, runtime, "FUNCX_TEST", _hpo_env())
    assert outcome["id"].startswith("optimize_workflow-")
    assert outcome["best"] == [0.0, {"x": 3.0, "y": -1.0}, ["idds_ml_al9.simg", None]]


def test_an_idds_hpo_program_runs_unchanged_but_for_its_imports_on_slurm(slurm_env, tmp_path):
    runtime = _fake_singularity(tmp_path)
    directory = tmp_path / "hpo"
    directory.mkdir()
    env = _hpo_env(
        IDDS_FAT_BACKEND="slurm", IDDS_FAT_SLURM_POLL_MIN="0.3", IDDS_FAT_SLURM_POLL_MAX="1.0"
    )
    partition = slurm_env.partitions[1]  # not the default: wf.queue took effect
    outcome = _run_hpo_program(directory, runtime, partition, env)
    assert outcome["best"] == [0.0, {"x": 3.0, "y": -1.0}, ["idds_ml_al9.simg", partition]]


def test_positional_entries_check_each_entry_against_the_signature():
    from idds_fat.errors import SignatureError

    def two(a, b):
        return a + b

    with pytest.raises(SignatureError):
        idds_compat.positional_task(two, (), {}, [(1, 2, 3)])
