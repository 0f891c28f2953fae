"""Jobs run one file built from idds_fat.node: current, deterministic, and alone on a node."""

from __future__ import annotations

import ast
import base64
import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cloudpickle
import pytest

from idds_fat import Workflow, work
from idds_fat.node.envelope import seal, sha256_hex, unseal
from idds_fat.node.spec import SECRETS_ENV, JobSpec
from idds_fat.wrapper_source import (
    NODE_DIR,
    build_wrapper,
    launch_command,
    wrapper_bytes,
    wrapper_file,
)

KEY = b"k" * 32


@work
def answer():
    return 42


def test_jobs_run_the_wrapper_built_from_the_current_node_sources():
    built = build_wrapper()
    assert wrapper_bytes() == built
    for path in sorted(NODE_DIR.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                assert f"\n{kind} {node.name}".encode() in built, f"{path.name}: {node.name}"
    # No code context: run from the checkout, the default would ship idds_fat/wrapper_source.py.
    with Workflow(source_dir=False) as wf:
        assert answer() == 42
        shipped = list(Path(wf.config.work_dir).rglob("wrapper_*.py"))
        cached = Path(wf.config.work_dir) / "cache" / sha256_hex(built)[:2] / sha256_hex(built)
        assert cached.read_bytes() == built
    assert shipped and all(path.read_bytes() == built for path in shipped)


def test_the_build_is_deterministic_and_follows_every_source_change(tmp_path):
    copy = tmp_path / "node"
    shutil.copytree(NODE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert build_wrapper(copy) == build_wrapper() == build_wrapper()
    with open(copy / "run.py", "a") as handle:
        handle.write("\n\ndef added_for_the_test():\n    return 1\n")
    changed = build_wrapper(copy)
    assert changed != build_wrapper()
    assert b"def added_for_the_test():" in changed


@pytest.mark.parametrize(
    ("module", "added", "refusal"),
    [
        (
            "run.py",
            "def seal():\n    pass\n",
            "run.py defines seal, as does idds_fat/node/envelope.py",
        ),
        ("run.py", "from .envelope import seal as close\n", "import names of node modules as"),
        (
            "run.py",
            "def late():\n    from .envelope import seal\n",
            "import node modules' names at",
        ),
        ("run.py", "from .envelope import no_such_name\n", r"imports \['no_such_name'\]"),
        ("errors.py", "from .main import main\n", "circular imports"),
    ],
)
def test_the_build_refuses_node_modules_that_cannot_share_one_namespace(
    tmp_path, module, added, refusal
):
    copy = tmp_path / "node"
    shutil.copytree(NODE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / module, "a") as handle:
        handle.write("\n\n" + added)
    with pytest.raises(ValueError, match=refusal):
        build_wrapper(copy)


def _put(cache: Path, data: bytes) -> str:
    key = sha256_hex(data)
    (cache / key[:2]).mkdir(parents=True, exist_ok=True)
    (cache / key[:2] / key).write_bytes(data)
    return key


def test_the_built_wrapper_runs_a_job_alone_under_python_isolated(tmp_path):
    """No site-packages, no idds_fat: only the wrapper file and a copy of cloudpickle."""
    lib, cache, job_dir = tmp_path / "lib", tmp_path / "cache", tmp_path / "job"
    shutil.copytree(
        Path(cloudpickle.__file__).parent,
        lib / "cloudpickle",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    job_dir.mkdir()

    def report(greeting):  # pickled by value: a local function
        import pathlib
        import sys

        return greeting + pathlib.Path("data.txt").read_text(), sorted(sys.modules)

    context = io.BytesIO()
    with zipfile.ZipFile(context, "w") as archive:
        archive.writestr("data.txt", "from the context")
    call = seal(
        {"kind": "call", "workflow": "w", "task": "t1"}, cloudpickle.dumps((report, (), {})), KEY
    )
    kwargs = seal(
        {"kind": "kwargs", "task": "t1", "job": 0}, cloudpickle.dumps({"greeting": "hi "}), KEY
    )
    spec = JobSpec(
        workflow="w",
        task="t1",
        job=0,
        cache=str(cache),
        archive={"key": _put(cache, context.getvalue()), "max_bytes": 1 << 20},
        payload={"key": _put(cache, call)},
        kwargs={"inline": base64.b64encode(kwargs).decode()},
        result_url="http://127.0.0.1:9/results/w",  # the discard port: the reply file is used
        publish_timeout=1.0,
    )
    spec_path = cache / "specs" / sha256_hex(spec.to_json())
    spec_path.parent.mkdir()
    spec_path.write_bytes(spec.to_json())
    python, option, code = launch_command(sys.executable, wrapper_file(tmp_path))
    done = subprocess.run(
        [python, "-I", "-S", option, f"import sys; sys.path.insert(0, {str(lib)!r}); {code}"]
        + ["--spec", str(spec_path), "--reply-file", str(job_dir / "result.reply")],
        cwd=job_dir,
        env={"PATH": "/usr/bin:/bin", SECRETS_ENV: json.dumps({"hmac_key": KEY.hex()})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    header, body = unseal((job_dir / "result.reply").read_bytes(), KEY)
    assert header["status"] == "ok", cloudpickle.loads(body)
    text, modules = cloudpickle.loads(body)
    assert text == "hi from the context"
    wrapper_name = wrapper_file(tmp_path).stem
    foreign = [
        m
        for m in modules
        if m.split(".")[0] not in sys.stdlib_module_names
        and m.split(".")[0] not in ("cloudpickle", wrapper_name, "__main__")
    ]
    assert not foreign, foreign
