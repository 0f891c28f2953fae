"""Shared fixtures: every test gets its own work dir and no user configuration."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, monkeypatch):
    """Point idds-fat at a fresh work dir and away from the user's config file."""
    for name in list(__import__("os").environ):
        if name.startswith("IDDS_FAT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("IDDS_FAT_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("IDDS_FAT_WORK_DIR", str(tmp_path / "work"))
    return tmp_path / "work"


# --- Markers (registered in pyproject.toml) -----------------------------------------

# A test that uses one of these fixtures (directly or through another fixture) needs
# that server: it gets the marker without writing it, so `-m "not broker"` and the
# like leave it out. The `panda` and `slow` markers are written on the tests.
SERVER_FIXTURE_MARKERS = {
    "activemq": "broker",
    "activemq_factory": "broker",
    "slurm_cluster": "slurm",
    "panda_server": "panda",
    "s3_server": "s3",
    "browser_page": "browser",
    "podman": "podman",
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for fixture, marker in SERVER_FIXTURE_MARKERS.items():
            if fixture in used:
                item.add_marker(marker)


# --- Real ActiveMQ brokers (idds_fat.testing.activemq) -----------------------------

ACTIVEMQ_USERS = {"idds": "fat-secret"}
_ACTIVEMQ_MISSING = (
    "ActiveMQ not installed: run `make services` (apt-get install activemq) to run broker tests"
)


def _require_activemq() -> None:
    """Skip the test when no broker can run here, but fail it under CI."""
    import os

    from idds_fat.testing import ActiveMQBroker

    if ActiveMQBroker.available():
        return
    # A broker test that silently skips in CI is a hole in the suite, not a pass.
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(
            "ActiveMQ not installed and CI is set: broker tests must not skip in CI; "
            "run `.ci/install-services` as root (apt-get install activemq) before the tests",
            pytrace=False,
        )
    pytest.skip(_ACTIVEMQ_MISSING)


@pytest.fixture(scope="session")
def activemq(tmp_path_factory):
    """One non-persistent broker shared by the session; login ``idds`` / ``fat-secret``.

    Tests must not stop it: use ``activemq_factory`` for brokers a test kills or
    restarts. Give each test its own destination names.
    """
    from idds_fat.testing import ActiveMQBroker

    _require_activemq()
    broker = ActiveMQBroker(tmp_path_factory.mktemp("activemq"), users=ACTIVEMQ_USERS)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def activemq_factory(tmp_path):
    """A callable ``make(persistent=False, users=ACTIVEMQ_USERS, **options)`` that
    starts a private broker (options: ``port``, ``heap_mb``); every broker it made
    is stopped at teardown, so tests may kill and restart them freely."""
    from idds_fat.testing import ActiveMQBroker

    _require_activemq()
    brokers: list[ActiveMQBroker] = []

    def make(
        persistent: bool = False,
        users: dict[str, str] | None = ACTIVEMQ_USERS,
        **options,
    ) -> ActiveMQBroker:
        broker = ActiveMQBroker(
            tmp_path / f"activemq-{len(brokers)}",
            persistent=persistent,
            users=users,
            **options,
        )
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    # Killing is enough: the data dirs are thrown away with tmp_path.
    for broker in brokers:
        broker.stop(kill=True)


# --- Real Slurm clusters (idds_fat.testing.slurm) ----------------------------------

_SLURM_MISSING = (
    "Slurm not installed: run `make services` (apt-get install slurm-wlm munge) to run Slurm tests"
)


def _require_service(available: bool, skip_reason: str, ci_failure: str) -> None:
    """Skip the test when a service cannot run here, but fail it under CI."""
    import os

    if available:
        return
    # Same rule as _require_activemq: a skip in CI is a hole in the suite, not a pass.
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(ci_failure, pytrace=False)
    pytest.skip(skip_reason)


def _require_slurm() -> None:
    """Skip Slurm tests without the packages (or without root), fail them under CI."""
    import os

    from idds_fat.testing import SlurmCluster

    _require_service(
        SlurmCluster.available(),
        _SLURM_MISSING,
        "Slurm not installed and CI is set: Slurm tests must not skip in CI; "
        "run `.ci/install-services` as root (apt-get install slurm-wlm munge) before the tests",
    )
    # slurmd runs the jobs as root: the packages alone are not enough.
    _require_service(
        os.geteuid() == 0,
        "Slurm tests need root (the private slurmd runs jobs as root)",
        "Slurm tests need root and CI is set: they must not skip in CI; run them as root",
    )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """One private single-node Slurm cluster shared by the session.

    Partitions ``debug`` (default) and ``other``; pass ``slurm_cluster.env`` to
    sbatch/squeue/scancel/scontrol. Tests must not stop it, and should wait for
    (or cancel) their own jobs so the node is free for the next test.
    """
    from idds_fat.testing import SlurmCluster

    _require_slurm()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):
    """Point sbatch/squeue/scancel (the slurm backend's commands) at the test cluster."""
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    return slurm_cluster


# --- A live PanDA server with JEDI (idds_fat.testing.panda) -------------------------


@pytest.fixture(scope="session")
def panda_server(tmp_path_factory):
    """One private PanDA server, JEDI and adder on a private PostgreSQL, shared by the
    session, with one queue (``panda_server.queue``).

    Nothing runs its jobs: start a :class:`~idds_fat.testing.PandaPilot` on it. Tests
    must not stop it. Skips when ``.ci/install-services`` has not installed it (or the
    schema is missing), fails under CI.
    """
    from idds_fat.testing import PandaServer

    _require_service(
        PandaServer.available(),
        "PanDA server not installed: run `bash .ci/install-services` as root to run the "
        "live PanDA tests",
        "PanDA server not installed and CI is set: the live PanDA tests must not skip in "
        "CI; run `.ci/install-services` as root, with the panda-database schema in "
        "../shared/panda-live/panda-database or $IDDS_FAT_PANDA_SCHEMA",
    )
    server = PandaServer(tmp_path_factory.mktemp("panda"))
    server.start()
    yield server
    server.stop()


# --- A real S3 service (idds_fat.testing.s3, moto) ---------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto S3 server on loopback shared by the session (in-memory state).

    Build clients with ``s3_server.client()`` (dummy credentials, no ``AWS_*`` or
    ``~/.aws`` needed) and buckets with ``s3_server.make_bucket(name)``; give each
    test its own bucket. Tests must not stop it.
    """
    from idds_fat.testing import S3Server

    _require_service(
        S3Server.available(),
        "moto not installed: pip install -e '.[test]' (moto[server]) to run S3 tests",
        "moto not installed and CI is set: S3 tests must not skip in CI; "
        "pip install -e '.[test]' (moto[server]) before the tests",
    )
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


# --- A real browser (Debian's chromium, driven by Playwright) ----------------------

CHROMIUM = "/usr/bin/chromium"
# Never Playwright's own browser download (no internet here): the system chromium,
# headless, with nothing that would phone home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _playwright_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("playwright") is not None


@pytest.fixture
def browser_page(tmp_path):
    """A Playwright page in a fresh headless chromium (its own user-data-dir, closed after).

    Skips when chromium or the playwright package is missing, fails under CI.
    """
    import os

    _require_service(
        os.access(CHROMIUM, os.X_OK) and _playwright_installed(),
        "chromium or playwright missing: apt-get install chromium; pip install -e '.[test]'",
        "chromium or playwright missing and CI is set: browser tests must not skip in CI; "
        "run `.ci/install-services` (chromium) and pip install -e '.[test]' (playwright)",
    )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            context.close()


# --- A real container runtime (podman + runc, idds_fat.testing.environments) --------


@pytest.fixture(scope="session")
def podman():
    """The path of podman, when podman and runc are installed (skip, or fail under CI)."""
    import shutil

    from idds_fat.testing.environments import podman_available

    _require_service(
        podman_available(),
        "podman or runc not installed: run `make services` (apt-get install podman runc) "
        "to run container tests",
        "podman or runc not installed and CI is set: container tests must not skip in CI; "
        "run `.ci/install-services` as root (apt-get install podman runc) before the tests",
    )
    return shutil.which("podman")
