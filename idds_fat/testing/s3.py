"""A private, throwaway S3 service (moto) on loopback.

For tests, benchmarks and users' CI: :class:`S3Server` runs ``moto_server`` (the
one installed next to the running interpreter, from ``pip install "moto[server]"``)
as a subprocess on ``127.0.0.1`` and returns once it answers HTTP. Its state lives
in memory only: buckets and objects vanish with the process.

moto accepts any credentials; :meth:`S3Server.client` uses the dummy pair
``testing`` / ``testing`` in ``us-east-1``. moto does not check the expiry (nor
the signature) of presigned URLs, so tests of expired URLs cannot rely on it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from idds_fat.errors import IddsFatError
from idds_fat.testing.processes import ServerProcess
from idds_fat.testing.processes import free_port as _free_port
from idds_fat.testing.processes import port_in_use as _port_in_use

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"

START_TIMEOUT = 20.0


class S3ServerError(IddsFatError):
    """The moto server could not be started; the message carries its log's last lines."""


class S3Server(ServerProcess):
    """One ``moto_server`` process serving S3 on ``http://127.0.0.1:PORT``.

    Args:
        base_dir: directory for the server's log ``moto.log``; a temporary
            directory (removed by ``stop()``) when omitted.
        port: the port; a free one is picked now when omitted, and kept for every
            later ``start()``.

    Usable as a context manager: ``with S3Server() as server: ...``. A server
    object that is collected, or still running at interpreter exit, kills its
    process.
    """

    _error = S3ServerError
    _label = "moto"

    def __init__(self, base_dir: Path | None = None, port: int | None = None) -> None:
        self._own_dir = base_dir is None
        self.base_dir = (
            Path(tempfile.mkdtemp(prefix="idds-fat-moto-"))
            if base_dir is None
            else Path(base_dir).resolve()
        )
        self.port = port if port is not None else _free_port()
        self.log_path = self.base_dir / "moto.log"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"S3Server({self.endpoint_url!r}, {state})"

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint, ``"http://127.0.0.1:PORT"``; the same across restarts."""
        return f"http://{HOST}:{self.port}"

    @property
    def _where(self) -> str:
        return self.endpoint_url

    @staticmethod
    def available() -> bool:
        """Return whether a server can be started here: moto importable and its
        ``moto_server`` script installed next to the running interpreter."""
        return importlib.util.find_spec("moto") is not None and _moto_server_path().is_file()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Launch ``moto_server`` and wait until it answers HTTP.

        A no-op when already running.

        Raises:
            S3ServerError: moto is not installed, the port is taken, the process
                exited, or it did not answer within ``timeout`` seconds; the
                message carries the tail of its log.
        """
        if self.running:
            return
        if self._process is not None:
            self._terminate()  # it died on its own since the last start: reap it
        if not self.available():
            raise S3ServerError(
                f"moto is not installed for {sys.executable}: pip install 'moto[server]'"
            )
        if _port_in_use(self.port):
            # Whatever listens there would answer the readiness probe in our place.
            raise S3ServerError(
                f"cannot start moto on {self.endpoint_url}: port {self.port} is in use"
            )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        command = [str(_moto_server_path()), "-H", HOST, "-p", str(self.port)]
        began = time.monotonic()
        process = self._launch(command, self.base_dir, f"starting moto on {self.endpoint_url}")
        try:
            self._wait_until_ready(
                lambda seconds: _answers(self.endpoint_url + "/moto-api/", seconds), began, timeout
            )
        except BaseException:
            self._terminate()
            raise
        logger.info(
            "moto S3 up on %s in %.2f s (pid %d)",
            self.endpoint_url,
            time.monotonic() - began,
            process.pid,
        )

    def stop(self) -> None:
        """Stop the server, wait until its process is gone, and remove the
        temporary directory if the server made one. A no-op when not running."""
        self._terminate()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def client(self) -> Any:
        """Return a boto3 S3 client for this server with the dummy credentials
        (``testing`` / ``testing``, ``us-east-1``), whatever the caller's
        credentials, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` and ``~/.aws`` say."""
        import boto3
        import botocore.session
        from botocore.config import Config

        # Neither the caller's AWS_PROFILE nor ~/.aws may leak into tests (a
        # default addressing style or retry mode there would change behaviour).
        core = botocore.session.Session(session_vars={"profile": (None, None, None, None)})
        core.set_config_variable("config_file", os.devnull)
        core.set_config_variable("credentials_file", os.devnull)
        session = boto3.session.Session(
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            botocore_session=core,
        )
        return session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            config=Config(signature_version="s3v4", retries={"mode": "standard"}),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 lower-case letters, digits, ``-``, ``.``);
        return its name. Raises botocore's ClientError if S3 refuses it."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()
        return name


def _moto_server_path() -> Path:
    # The script of the interpreter's own environment, not whatever PATH finds.
    return Path(sys.executable).parent / "moto_server"


def _answers(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
