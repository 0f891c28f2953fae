"""Jobs in each environment on the local backend: current, venv (requirements and venv-pack),
conda (conda-pack layout), container (podman), init_env, and the interpreter check.

A probe package (``fatprobe``) exists only in the wheelhouse built here, so a job
that imports it shows that it ran in its own environment. Nothing needs the
internet: pip runs with ``--no-index`` and the image is built from this
machine's Python.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import cloudpickle
import pytest

from idds_fat import (
    Conda,
    ConfigError,
    Container,
    ContextError,
    Current,
    IntegrityError,
    InterpreterMismatchError,
    JobEnvironmentError,
    Venv,
    Workflow,
    work,
)
from idds_fat.cache import DirectoryStore
from idds_fat.context.environment import (
    EnvironmentSettings,
    as_environment,
    environment_spec,
    task_environment,
)
from idds_fat.testing import environments as build

CALLER_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def probe():
    """What the environment offers: the probe's value, the interpreter, the secrets' absence."""
    import fatprobe

    return {
        "value": fatprobe.VALUE,
        "python": sys.executable,
        "secrets_visible": any(k.startswith("IDDS_FAT_JOB_SECRETS") for k in os.environ),
        "in_container": os.path.exists("/run/.containerenv"),
    }


def conda_prefix_file():
    """The text conda-unpack rewrote, and which interpreter runs the job."""
    prefix = Path(sys.executable).parent.parent
    return (prefix / "etc" / "prefix.txt").read_text().strip(), str(prefix)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    return build.make_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture(scope="module")
def venv_pack_tarball(tmp_path_factory, wheelhouse) -> Path:
    requirements = ["fatprobe", f"cloudpickle=={cloudpickle.__version__}"]
    return build.make_venv_pack(tmp_path_factory.mktemp("venv-pack"), wheelhouse, requirements)


@pytest.fixture(scope="module")
def conda_tarball(tmp_path_factory, wheelhouse) -> Path:
    requirements = ["fatprobe", f"cloudpickle=={cloudpickle.__version__}"]
    return build.make_conda_layout(tmp_path_factory.mktemp("conda"), wheelhouse, requirements)


@pytest.fixture(scope="module")
def python_image(podman) -> str:
    site_packages = {"fatprobe/__init__.py": b'VALUE = "only in the job\'s environment"\n'}
    site_packages.update(build.cloudpickle_files())
    return build.build_python_image(site_packages, podman)


def _builds(env_cache: Path) -> list[dict]:
    log = env_cache / "builds.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --- current ---------------------------------------------------------------------------


def test_current_environment_lacks_the_probe_that_only_job_environments_have():
    with Workflow(environment=Current()):
        with pytest.raises(ModuleNotFoundError, match="fatprobe"):
            work(probe)()


# --- venv --------------------------------------------------------------------------------


def test_venv_from_requirements_builds_once_for_jobs_starting_together_then_reuses(
    tmp_path, wheelhouse
):
    env_cache = tmp_path / "envs"
    venv = Venv(["fatprobe"], pip_options=build.offline_pip_options(wheelhouse))
    job = work(environment=venv)(probe)
    with Workflow(env_cache_dir=env_cache, max_workers=2):
        together = job.map([{}, {}]).results()  # two jobs, two workers, one environment
        assert len(_builds(env_cache)) == 1
        later = job()
    assert len(_builds(env_cache)) == 1  # the later job reused the cached venv
    for result in [*together, later]:
        assert result["value"] == "only in the job's environment"
        assert result["python"].startswith(str(env_cache / "venv-"))
        assert not result["secrets_visible"]
    assert len({r["python"] for r in [*together, later]}) == 1


def test_venv_from_a_venv_pack_tarball_is_unpacked_once(tmp_path, venv_pack_tarball):
    env_cache = tmp_path / "envs"
    packed = Venv(packed=venv_pack_tarball)
    with Workflow(env_cache_dir=env_cache, environment=packed, max_workers=2):
        together = work(probe).map([{}, {}]).results()
        later = work(probe)()
    results = [*together, later]
    assert {r["value"] for r in results} == {"only in the job's environment"}
    assert len({r["python"] for r in results}) == 1
    assert later["python"].startswith(str(env_cache / "venv-pack-"))
    assert [b["label"] for b in _builds(env_cache)] == ["venv-pack packed-venv.tar.gz"]


def test_interpreter_mismatch_fails_the_job_naming_both_versions_and_the_environment(
    tmp_path, wheelhouse
):
    venv = Venv(
        ["fatprobe", "cloudpickle==2.0.0"], pip_options=build.offline_pip_options(wheelhouse)
    )
    with Workflow(env_cache_dir=tmp_path / "envs"):
        with pytest.raises(InterpreterMismatchError) as caught:
            work(environment=venv)(probe)()
    message = str(caught.value)
    assert f"Python {CALLER_PYTHON} with cloudpickle {cloudpickle.__version__}" in message
    assert f"Python {CALLER_PYTHON} with cloudpickle 2.0.0" in message
    assert "venv [fatprobe, cloudpickle==2.0.0]" in message


def test_a_venv_without_cloudpickle_fails_the_check_instead_of_crashing(tmp_path, wheelhouse):
    venv = Venv(
        ["fatprobe"], pip_options=build.offline_pip_options(wheelhouse), pin_cloudpickle=False
    )
    with Workflow(env_cache_dir=tmp_path / "envs"):
        with pytest.raises(InterpreterMismatchError, match=r"cloudpickle \(not installed\)"):
            work(environment=venv)(probe)()


def test_a_failing_venv_build_is_a_setup_error_with_pips_message(tmp_path, wheelhouse):
    venv = Venv(["no-such-package-xyz"], pip_options=build.offline_pip_options(wheelhouse))
    with Workflow(env_cache_dir=tmp_path / "envs"):
        with pytest.raises(JobEnvironmentError, match="no-such-package-xyz") as caught:
            work(environment=venv)(probe)()
    assert "installing the venv's requirements failed" in str(caught.value)
    assert not list((tmp_path / "envs").glob("venv-*/.idds-fat-ready"))


# --- conda -------------------------------------------------------------------------------


def test_conda_pack_layout_is_unpacked_once_and_conda_unpack_fixes_its_prefix(
    tmp_path, conda_tarball
):
    env_cache = tmp_path / "envs"
    job = work(environment=Conda(conda_tarball))
    with Workflow(env_cache_dir=env_cache, max_workers=2):
        together = job(probe).map([{}, {}]).results()
        rewritten, prefix = job(conda_prefix_file)()
    assert {r["value"] for r in together} == {"only in the job's environment"}
    assert prefix.startswith(str(env_cache / "conda-"))
    assert rewritten == prefix  # bin/conda-unpack ran, where the env was unpacked
    assert [b["label"] for b in _builds(env_cache)] == ["conda conda-env.tar.gz"]


@pytest.mark.parametrize("kind", ["venv-pack", "conda"])
def test_corrupted_environment_archive_is_rejected_by_its_hash(
    tmp_path, kind, venv_pack_tarball, conda_tarball
):
    tarball = venv_pack_tarball if kind == "venv-pack" else conda_tarball
    environment = Venv(packed=tarball) if kind == "venv-pack" else Conda(tarball)
    env_cache = tmp_path / "envs"
    with Workflow(env_cache_dir=env_cache) as wf:
        # The cache already "has" the archive, but its bytes were damaged on the way.
        key = __import__("hashlib").sha256(tarball.read_bytes()).hexdigest()
        damaged = bytearray(tarball.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        stored = wf.config.work_dir / "cache" / key[:2] / key
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_bytes(bytes(damaged))
        with pytest.raises(IntegrityError, match=f"does not match its sha256 {key}"):
            work(environment=environment)(probe)()
    assert _builds(env_cache) == []
    assert not list(env_cache.glob("*/.idds-fat-ready"))


# --- init_env ----------------------------------------------------------------------------


def read_init_env_variable():
    return os.environ.get("FAT_FROM_INIT_ENV"), "IDDS_FAT_JOB_SECRETS" in os.environ


def test_init_env_runs_as_a_shell_prefix_before_the_job():
    with Workflow():
        value, secrets_visible = work(init_env="export FAT_FROM_INIT_ENV=set-by-init-env;")(
            read_init_env_variable
        )()
    assert value == "set-by-init-env"
    assert not secrets_visible


# --- container ---------------------------------------------------------------------------


def test_container_job_runs_in_a_local_podman_image(podman, python_image):
    options = build.PODMAN_TEST_OPTIONS
    with Workflow(container_runtime="podman", container_run_options=options):
        results = work(environment=Container(python_image))(probe).map([{}, {}]).results()
    for result in results:
        assert result["value"] == "only in the job's environment"
        assert result["in_container"]
        assert not result["secrets_visible"]


def test_missing_container_image_is_a_setup_error_naming_the_runtime(podman):
    options = build.PODMAN_TEST_OPTIONS
    image = "localhost/idds-fat-no-such-image:0"
    with Workflow(container_run_options=options):
        with pytest.raises(JobEnvironmentError, match="podman exited 125 before the job started"):
            work(environment=Container(image, runtime="podman"))(probe)()


def test_idds_container_options_run_the_job_in_that_image(podman, python_image):
    options = build.PODMAN_TEST_OPTIONS
    idds = {"container_image": python_image, "container_type": "podman"}
    with Workflow(container_run_options=options):
        assert work(container_options=idds)(probe)()["in_container"]


# --- the specs on the caller's side ------------------------------------------------------


def test_string_forms_name_the_environments():
    assert as_environment(None) == Current()
    assert as_environment("current") == Current()
    assert as_environment("venv:numpy==1.26, scipy") == Venv(("numpy==1.26", "scipy"))
    assert as_environment("venv:/x/env.tar.gz") == Venv(packed="/x/env.tar.gz")
    assert as_environment("conda:analysis") == Conda("analysis")
    assert as_environment("container:docker://python:3.11") == Container("docker://python:3.11")
    for bad in ("venv:", "conda", "vm:x", "container:"):
        with pytest.raises(ConfigError):
            as_environment(bad)
    with pytest.raises(ConfigError, match="not both"):
        Venv(["x"], packed="env.tar.gz")
    with pytest.raises(ConfigError, match="unknown container runtime"):
        Container("img", runtime="lxc")


def test_task_environment_prefers_its_own_then_idds_container_options_then_the_default():
    idds = {"container_image": "img:1"}
    assert task_environment("venv:a", idds, None, None, False) == Venv(("a",))
    assert task_environment(None, idds, "conda:x", None, False) == Container("img:1")
    assert task_environment(None, None, "conda:x", idds, False) == Container("img:1")
    # A backend that runs containers itself (PanDA) gets the options, not a Container.
    assert task_environment(None, idds, "conda:x", None, True) == Conda("x")
    assert task_environment(None, None, None, None, False) == Current()


def test_venv_spec_pins_the_callers_cloudpickle_and_settings_reach_the_container(tmp_path):
    store = DirectoryStore(tmp_path / "cache")
    settings = EnvironmentSettings(str(tmp_path / "envs"), "podman", ("--runtime", "runc"))
    venv = environment_spec(Venv(["numpy"]), store, settings)
    assert venv["requirements"] == ["numpy", f"cloudpickle=={cloudpickle.__version__}"]
    assert venv["cache_dir"] == str(tmp_path / "envs")
    own = environment_spec(Venv(["cloudpickle>=3", "numpy"]), store, settings)
    assert own["requirements"] == ["cloudpickle>=3", "numpy"]
    container = environment_spec(Container("img", options=["--network", "host"]), store, settings)
    assert container["runtime"] == "podman"
    assert container["options"] == ["--runtime", "runc", "--network", "host"]


def test_requirements_file_lines_join_the_requirements(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# pinned for the cluster\nnumpy==1.26.4\n\n  scipy>=1.11  \n")
    venv = Venv(["pandas"], requirements_file=requirements)
    assert venv.all_requirements() == [
        "pandas",
        "numpy==1.26.4",
        "scipy>=1.11",
        f"cloudpickle=={cloudpickle.__version__}",
    ]
    with pytest.raises(ContextError, match="requirements file"):
        Venv(requirements_file=tmp_path / "missing.txt").all_requirements()


def test_a_named_conda_env_without_conda_pack_is_a_clear_error(tmp_path, monkeypatch):
    import idds_fat.context.environment as environment_module

    monkeypatch.setattr(environment_module.shutil, "which", lambda name: None)
    store = DirectoryStore(tmp_path / "cache")
    with pytest.raises(ContextError, match="conda-pack is not installed"):
        environment_spec(Conda("analysis"), store, EnvironmentSettings())
