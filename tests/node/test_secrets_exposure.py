"""The job's secrets (HMAC key, service token) are in no job process's environment.

``/proc/PID/environ`` shows the environment block a process was started with;
removing a variable from ``os.environ`` later does not change it. So each test
runs a job that reads its own block (and its parent's, when the parent is a
wrapper process: a warm worker, or the wrapper that started a container), on
every path a job takes: local cold, local warm, a warm worker's child (a job
with its own environment), ``init_env`` and venv re-executions, a podman
container, a Slurm array and the legacy ``IDDS_FAT_JOB_SECRETS`` hook. Each job
also delivers its result, signed with the key it was given: the secrets still
reach the wrapper. The PanDA bootstrap is tested with the job command's other
tests, in ``tests/backends/test_panda_backend.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from idds_fat import Container, Venv, Workflow, work
from idds_fat.node.spec import SECRETS_ENV
from idds_fat.testing import environments as build
from idds_fat.wrapper_source import wrapper_file


def environment_blocks() -> dict:
    """This process's environment block and its parent's, as ``/proc`` shows them."""
    import os

    def block(pid: int | str) -> bytes:
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                return handle.read()
        except OSError:  # not ours to read (slurmstepd, a container's init)
            return b""

    return {"own": block("self"), "parent": block(os.getppid()), "pid": os.getpid()}


def _secrets_of(wf: Workflow) -> list[bytes]:
    key, token = wf.parts.key, wf.parts.token
    assert key and token  # an embedded service always has a token
    return [key.hex().encode(), token.encode(), b"IDDS_FAT_JOB_SECRETS="]


def _assert_no_secret_in(blocks: dict, secrets: list[bytes]) -> None:
    assert blocks["own"], "the job could not read its own environment block"
    for name in ("own", "parent"):
        for secret in secrets:
            assert secret not in blocks[name], f"a secret is in the {name} environment block"


@pytest.mark.parametrize("mode", ["cold", "warm"])
def test_a_local_job_has_no_secret_in_its_environment_block(mode, monkeypatch) -> None:
    # A secret setting of the caller's own must not reach jobs by inheritance either.
    monkeypatch.setenv("IDDS_FAT_BROKER_PASSWORD", "caller-broker-password")
    with Workflow(local_mode=mode, max_workers=1) as wf:
        blocks = work(environment_blocks)()
        secrets = [*_secrets_of(wf), b"caller-broker-password"]
    _assert_no_secret_in(blocks, secrets)


def test_init_env_run_by_a_warm_worker_leaves_no_secret_in_the_job_or_the_worker() -> None:
    # A job with an init_env runs as the warm worker's child, re-executed by a shell.
    with Workflow(local_mode="warm", max_workers=1) as wf:
        blocks = work(init_env="export FAT_INIT=1;")(environment_blocks)()
        secrets = _secrets_of(wf)
    assert b"FAT_INIT=1" in blocks["own"]  # the job really ran behind the init_env
    _assert_no_secret_in(blocks, secrets)


def test_a_venv_job_re_executed_by_the_wrapper_has_no_secret_in_its_environment(
    tmp_path,
) -> None:
    wheelhouse = build.make_wheelhouse(tmp_path / "wheels")
    venv = Venv(["fatprobe"], pip_options=build.offline_pip_options(wheelhouse))
    with Workflow(env_cache_dir=tmp_path / "envs", local_mode="cold") as wf:
        blocks = work(environment=venv)(environment_blocks)()
        secrets = _secrets_of(wf)
    assert str(tmp_path / "envs").encode() in blocks["own"]  # its IDDS_FAT_ENV_CACHE_DIR
    _assert_no_secret_in(blocks, secrets)


def test_a_container_job_has_no_secret_in_its_environment(podman) -> None:
    site_packages = dict(build.cloudpickle_files())
    image = build.build_python_image(site_packages, podman)
    options = build.PODMAN_TEST_OPTIONS
    with Workflow(container_runtime="podman", container_run_options=options) as wf:
        blocks = work(environment=Container(image))(environment_blocks)()
        secrets = _secrets_of(wf)
    assert b"container=podman" in blocks["own"]  # it really ran in the container
    _assert_no_secret_in(blocks, secrets)


def test_a_slurm_job_has_no_secret_in_its_environment_and_the_file_goes_at_close(
    slurm_cluster, monkeypatch
) -> None:
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    # A token in the caller's own settings must not reach jobs by inheritance either.
    monkeypatch.setenv("IDDS_FAT_BROKER_PASSWORD", "caller-broker-password")
    settings = {"backend": "slurm", "slurm_poll_min": 0.3, "slurm_poll_max": 1.0}
    with Workflow(**settings) as wf:
        blocks = work(environment_blocks)()
        secrets = [*_secrets_of(wf), b"caller-broker-password"]
        secrets_file = wf.work_dir / "job-secrets.json"
        assert secrets_file.stat().st_mode & 0o777 == 0o600
    _assert_no_secret_in(blocks, secrets)
    assert not secrets_file.exists()  # the workflow closed: no job needs it any more


def test_secrets_given_in_the_environment_are_gone_from_the_worker_that_runs_jobs(
    tmp_path,
) -> None:
    # The site hook: IDDS_FAT_JOB_SECRETS set by whoever starts the wrapper. The wrapper
    # runs itself again with the secrets on a pipe, so jobs never see that block.
    secret = {"hmac_key": "ab" * 32, "token": "site-token-not-for-jobs"}
    env = dict(os.environ, **{SECRETS_ENV: json.dumps(secret)})
    worker = subprocess.Popen(
        [sys.executable, str(wrapper_file(tmp_path)), "--worker"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # A job whose spec is missing: the answer shows the worker is past its start.
        command = {"spec": str(tmp_path / ("0" * 64)), "workdir": str(tmp_path / "job")}
        worker.stdin.write(json.dumps(command) + "\n")
        worker.stdin.flush()
        assert json.loads(worker.stdout.readline()) == {"exit": 2}
        block = Path(f"/proc/{worker.pid}/environ").read_bytes()
        assert secret["hmac_key"].encode() not in block
        assert secret["token"].encode() not in block
    finally:
        worker.stdin.close()
        assert worker.wait(timeout=60) == 0
        worker.stderr.close()
        worker.stdout.close()


def test_secrets_read_from_a_pipe_are_read_once_and_the_descriptor_closed(tmp_path) -> None:
    from idds_fat.node.spec import SECRETS_FD_ENV, read_secrets, secrets_pipe

    fd = secrets_pipe(json.dumps({"hmac_key": "cd" * 32, "token": "t"}).encode())
    os.environ[SECRETS_FD_ENV] = str(fd)
    try:
        secrets = read_secrets()
    finally:
        os.environ.pop(SECRETS_FD_ENV, None)
    assert secrets["key"] == bytes.fromhex("cd" * 32) and secrets["token"] == "t"
    assert SECRETS_FD_ENV not in os.environ
    with pytest.raises(OSError):  # closed: nothing else in the process can read it again
        os.fstat(fd)
