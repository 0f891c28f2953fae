"""A task's spec template: each job's spec spliced from it is, byte for byte, the one
``JobSpec.to_json`` writes (its sha256 is the cache key the wrapper checks), and tasks
whose specs hold per-job URLs take the slow way."""

from __future__ import annotations

import base64
import dataclasses
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

from idds_fat.backends import Resources
from idds_fat.cache import DirectoryStore, content_key
from idds_fat.node.spec import JobSpec
from idds_fat.serialize import open_envelope, seal
from idds_fat.workflow import specs as specs_module
from idds_fat.workflow.options import WorkflowOptions
from idds_fat.workflow.parts import WorkflowParts
from idds_fat.workflow.specs import INLINE_KWARGS_BYTES, JobSpecs, node_location

KEY = b"k" * 32
NAMES = [
    "triv",
    'say "hi"',
    "back\\slash",
    "naïve – ünïcode",
    "emoji 🚀 and \u2028 line separator",
    "tab\tnew\nline\x00nul\x1f",
    "Outer.<locals>.inner",
    "\0idds-fat:job\0",  # a template marker's text, in the name it replaces: harmless
]


def _specs(tmp_path: Path, *, broker: bool, archive: bool = False, init_env=None, cache=None):
    options = {"broker": "stomp://127.0.0.1:61613,other:61614"} if broker else {}
    if init_env is not None:
        options["init_env"] = init_env
    opts = WorkflowOptions.resolve(
        resources={}, options=options, source_dir=False, config=None, backend="local"
    )
    parts = WorkflowParts(opts, attach=None)  # type: ignore[arg-type]
    parts.workflow_id = "workflow-20261201T000000-abcdef"
    parts.work_dir = tmp_path / "workflows" / parts.workflow_id
    parts.key = KEY
    parts.service_url = "http://127.0.0.1:8765"
    parts.cache = cache or DirectoryStore(tmp_path / "cache")
    if archive:
        parts.archive = SimpleNamespace(sha256="ab" * 32)  # type: ignore[assignment]
    return JobSpecs(opts, parts)


def _bodies(n: int, large: set[int] = frozenset()) -> list[bytes | None]:
    bodies: list[bytes | None] = []
    for i in range(n):
        value = b"x" * (INLINE_KWARGS_BYTES + 10) if i in large else (i, 'ü"\\')
        bodies.append(pickle.dumps({"args": value}))
    return bodies


def _slow_bytes(specs: JobSpecs, task: tuple, index: int, kwargs) -> bytes:
    """The spec as the one place that builds specs writes it (no URLs to add here)."""
    task_id, task_name, payload_key, environment, init_env = task
    spec = specs.job_spec(task_id, index, task_name, payload_key, kwargs, environment, init_env)
    return spec.to_json()


def _count_to_json(monkeypatch) -> list[int]:
    calls = [0]
    original = JobSpec.to_json

    def counted(self):
        calls[0] += 1
        return original(self)

    monkeypatch.setattr(JobSpec, "to_json", counted)
    return calls


def _build_task(specs: JobSpecs, task: tuple, bodies: list[bytes | None]):
    task_id, task_name, payload_key, environment, init_env = task
    return [
        specs.build(task_id, i, task_name, payload_key, body, environment, init_env, Resources())
        for i, body in enumerate(bodies)
    ]


def _check_equal_to_slow_path(specs: JobSpecs, task: tuple, requests, bodies) -> None:
    for index, (request, body) in enumerate(zip(requests, bodies, strict=True)):
        text = request.spec_json
        spec = JobSpec.from_json(text)
        assert text.encode("ascii") == _slow_bytes(specs, task, index, spec.kwargs)
        assert request.spec_key == content_key(text.encode("ascii"))
        assert request.spec_location == node_location(specs._parts.cache, request.spec_key)
        assert request.workdir == specs._parts.work_dir / "jobs" / task[0] / str(index)
        assert request.name == f"{specs._parts.workflow_id}/{task[0]}/{task[1]}[{index}]"
        if body is None:
            assert spec.kwargs is None
            continue
        header = {"kind": "kwargs", "task": task[0], "job": index}
        if "inline" in spec.kwargs:
            sealed = base64.b64decode(spec.kwargs["inline"])
        else:
            sealed = specs._parts.cache.get(spec.kwargs["key"])
        # The same envelope seal() makes, so it verifies under the workflow's key.
        assert sealed == seal(header, body, KEY)
        assert open_envelope(sealed, KEY)[1] == body


@pytest.mark.parametrize("broker", [False, True], ids=["no-stomp", "stomp"])
@pytest.mark.parametrize("name", NAMES)
def test_a_spliced_spec_is_the_slow_paths_bytes_for_any_task_name(
    tmp_path, monkeypatch, name, broker
):
    specs = _specs(tmp_path, broker=broker)
    task = ("t0001", name, "cd" * 32, {"kind": "current", "label": "current"}, None)
    bodies = _bodies(6, large={3})
    to_json = _count_to_json(monkeypatch)
    requests = _build_task(specs, task, bodies)
    built = to_json[0]
    _check_equal_to_slow_path(specs, task, requests, bodies)
    assert (JobSpec.from_json(requests[0].spec_json).stomp is not None) == broker
    assert built == 2  # the first job's spec and the template: none per job after


def test_a_task_whose_values_hold_a_template_marker_is_built_the_slow_way(tmp_path, monkeypatch):
    specs = _specs(tmp_path, broker=False)
    marker = specs_module._MARKS[0]
    task = ("t0001", "fn", "cd" * 32, {"kind": "current", "label": marker}, marker)
    bodies = _bodies(4)
    to_json = _count_to_json(monkeypatch)
    requests = _build_task(specs, task, bodies)
    assert to_json[0] == len(bodies) + 1  # every job, and the template given up
    _check_equal_to_slow_path(specs, task, requests, bodies)


@pytest.mark.parametrize(
    "environment",
    [
        {"kind": "current", "label": "current"},
        {"kind": "venv", "label": 'venv ü "x"', "archive": {"key": "ef" * 32}, "n": [1, 2.5]},
        {"kind": "container", "image": "docker://x/y:1", "options": {"b": None, "a": True}},
    ],
    ids=["current", "venv", "container"],
)
@pytest.mark.parametrize("init_env", [None, 'source "/opt/setup ü.sh" && \\\n echo'])
@pytest.mark.parametrize("workflow_init_env", [None, "module load x"])
def test_a_spliced_spec_is_the_slow_paths_bytes_for_environments_and_init_env(
    tmp_path, monkeypatch, environment, init_env, workflow_init_env
):
    specs = _specs(tmp_path, broker=True, archive=True, init_env=workflow_init_env)
    task = ("t0042", "fn", "cd" * 32, environment, init_env)
    bodies = [None, None, None] if init_env else _bodies(4)
    to_json = _count_to_json(monkeypatch)
    requests = _build_task(specs, task, bodies)
    assert to_json[0] == 2
    _check_equal_to_slow_path(specs, task, requests, bodies)
    spec = JobSpec.from_json(requests[1].spec_json)
    assert spec.init_env == (init_env or workflow_init_env)
    assert spec.archive == {"key": "ab" * 32, "max_bytes": specs._options.config.max_context_bytes}


def test_jobs_of_interleaved_tasks_and_a_changed_environment_keep_their_own_bytes(
    tmp_path, monkeypatch
):
    specs = _specs(tmp_path, broker=False)
    env_a = {"kind": "current", "label": "a"}
    task_a = ("t0001", "a", "cd" * 32, env_a, None)
    task_b = ("t0002", "b", "ef" * 32, {"kind": "current", "label": "b"}, "echo b")
    bodies = _bodies(5)
    done = {"t0001": [], "t0002": []}
    for i, body in enumerate(bodies):
        for task in (task_a, task_b):
            task_id, name, payload_key, environment, init_env = task
            request = specs.build(
                task_id, i, name, payload_key, body, environment, init_env, Resources()
            )
            done[task_id].append(request)
    _check_equal_to_slow_path(specs, task_a, done["t0001"], bodies)
    _check_equal_to_slow_path(specs, task_b, done["t0002"], bodies)
    # The same task built again with its environment changed in place: not the
    # template of the old one (it holds a copy).
    env_a["label"] = "changed"
    again = _build_task(specs, task_a, bodies)
    assert JobSpec.from_json(again[2].spec_json).environment["label"] == "changed"
    _check_equal_to_slow_path(specs, task_a, again, bodies)


class _PresigningStore(DirectoryStore):
    """A directory store that hands out presigned URLs, as S3 does."""

    def presigned_get(self, key: str) -> str:
        return f"https://s3.example/{key}?sig=get"

    def presigned_put(self, name: str) -> str:
        return f"https://s3.example/{name}?sig=put"


def test_specs_with_presigned_urls_are_built_the_slow_way_per_job(tmp_path, monkeypatch):
    cache = _PresigningStore(tmp_path / "cache")
    specs = _specs(tmp_path, broker=False, cache=cache)
    task = ("t0001", "fn", "cd" * 32, {"kind": "current", "label": "current"}, None)
    bodies = _bodies(4)
    to_json = _count_to_json(monkeypatch)
    requests = _build_task(specs, task, bodies)
    assert to_json[0] == len(bodies)
    for index, request in enumerate(requests):
        spec = JobSpec.from_json(request.spec_json)
        assert spec.result_object == f"results/{spec.workflow}/t0001/{index}.0"
        assert spec.result_put_url.endswith("?sig=put")
        assert request.spec_location == f"https://s3.example/{request.spec_key}?sig=get"
        reference = specs.job_spec("t0001", index, "fn", "cd" * 32, spec.kwargs, task[3], None)
        assert request.spec_json.encode() == specs._sealed(reference)


def test_specs_with_the_backends_urls_are_built_the_slow_way_per_job(tmp_path, monkeypatch):
    specs = _specs(tmp_path, broker=False)
    specs._parts.backend = SimpleNamespace(  # type: ignore[assignment]
        node_urls=lambda keys, read: {key: f"https://panda.example/{key}" for key in keys}
    )
    task = ("t0001", "fn", "cd" * 32, {"kind": "current", "label": "current"}, None)
    bodies = _bodies(4)
    to_json = _count_to_json(monkeypatch)
    requests = _build_task(specs, task, bodies)
    assert to_json[0] >= len(bodies)
    for index, request in enumerate(requests):
        spec = JobSpec.from_json(request.spec_json)
        assert spec.urls == {"cd" * 32: f"https://panda.example/{'cd' * 32}"}
        reference = specs.job_spec("t0001", index, "fn", "cd" * 32, spec.kwargs, task[3], None)
        assert request.spec_json.encode() == specs._sealed(reference)


def test_a_job_run_again_still_gets_its_spec_read_back_after_a_templated_build(tmp_path):
    specs = _specs(tmp_path, broker=True)
    task = ("t0001", "fn", "cd" * 32, {"kind": "current", "label": "current"}, None)
    bodies = _bodies(3)
    requests = _build_task(specs, task, bodies)
    specs.write(requests)
    spec = specs.read(requests[2])
    assert specs.job_kwargs(spec) == pickle.loads(bodies[2])
    again = specs.again(requests[2], 1)
    respec = specs.read(again)
    assert respec.to_json() == dataclasses.replace(spec, attempt=1).to_json()
