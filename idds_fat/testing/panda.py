"""A private, throwaway PanDA server with JEDI on loopback.

For tests, benchmarks and users' CI: :class:`PandaServer` starts, under a base
directory, everything a PanDA site's central services are for one queue:

```
PostgreSQL 15 (private cluster, PanDA schema)  <-- the server's WSGI app, JEDI, the adder
front end 127.0.0.1:PORT (panda_assets/front_end.py), and with TLS on TLS_PORT
    /api/v1/..., /server/panda/...  -> pandaserver.server.panda.application
    /cache/<name>                   -> the server's cache_dir (uploads, the bash-c runner)
JEDI (panda_assets/jedi_master.py): task registered -> defined -> ready -> running, jobs
adder (panda_assets/adder.py): job reports -> jobs finished/failed -> task done/failed
token issuer 127.0.0.1:PORT2 (python -m http.server): discovery document and JWKS
    <-- the server's token check (pandaserver/srvcore/oidc_utils.py) fetches both
```

Users authenticate as at an OIDC site: :meth:`PandaServer.issue_token` signs ID tokens
(RS256, with the issuer's key, in this process) for the VO ``wlcg``; the backend sends
one as ``Authorization: Bearer``, the front end passes it through, and the server
checks it itself (``token_authType = oidc``): the signature against the issuer's JWKS,
the expiry, the audience (the client ID of ``auth/wlcg_auth_config.json``) and the
VO group, then names the caller after the token's ``name`` claim.

Or as at an X.509 site (``x509=True``, the default): at start the harness makes a CA
of its own (``grid_certificates.py``; :attr:`PandaServer.ca_dir` is what
``X509_CERT_DIR`` names) and a host certificate, and the front end also listens with
TLS on :attr:`PandaServer.tls_url`, requiring a client certificate that verifies
against that CA (grid proxies allowed) and exporting its subject DN as mod_ssl does
(``SSL_CLIENT_S_DN``); the server derives the user from the DN.
:meth:`PandaServer.issue_proxy` writes a user's proxy (0600, under ``base_dir``) for
``X509_USER_PROXY``, or one from another CA, which the handshake refuses.

Jobs are run by :class:`~idds_fat.testing.panda_pilot.PandaPilot`, a stand-in for
the pilot. The server is ``panda-server[postgres]`` (1.0.4) in a venv of its own,
installed by ``.ci/panda-install`` (``$IDDS_FAT_PANDA_VENV``, default
``/opt/idds-fat-panda/venv``); the schema is PanDAWMS/panda-database's
``schema/postgres``, found at ``$IDDS_FAT_PANDA_SCHEMA`` or in
``../shared/panda-live/panda-database`` beside the repository. PostgreSQL 15 with
pg_cron and pg_partman comes from Debian. :meth:`PandaServer.available` says
whether all of it is there.

What differs from a production PanDA: plain HTTP for the server's own daemons,
JEDI and the pilot (a request without a token there gets a production DN from the
front end, as a pilot's production proxy would through mod_gridsite; see
``panda_assets/front_end.py``), proxies without VOMS attributes, an issuer
that serves keys but no login flows (no device code, no refresh: tokens are minted
here), no Rucio (a DDM plugin that does nothing), no
CRIC (the queue is one row of ``schedconfig_json``), no message broker, and the
server's other daemons (only the adder runs).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from idds_fat.errors import IddsFatError
from idds_fat.testing.grid_certificates import TestCertificateAuthority
from idds_fat.testing.processes import LOG_TAIL_BYTES, Started, free_port, spawn_logged
from idds_fat.workdir import read_tail, write_private

if TYPE_CHECKING:
    from joserfc.jwk import RSAKey

    from idds_fat.backends.panda import PandaBackend
    from idds_fat.backends.panda.auth import PandaAuth

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: Where ``.ci/panda-install`` puts the server's venv, unless ``$IDDS_FAT_PANDA_VENV``.
DEFAULT_VENV = Path("/opt/idds-fat-panda/venv")
VENV_VAR = "IDDS_FAT_PANDA_VENV"
#: A PanDAWMS/panda-database checkout (the directory holding ``schema/postgres``).
SCHEMA_VAR = "IDDS_FAT_PANDA_SCHEMA"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_EXTENSIONS = Path("/usr/share/postgresql/15/extension")
ASSETS = Path(__file__).with_name("panda_assets")
#: The queue's name in ``schedconfig_json``; tasks name it as ``site``.
DEFAULT_QUEUE = "LOCAL_TEST"
#: The DN the front end gives callers without a token (JEDI, the server, the pilot):
#: listed in ``production_dns``, as a pilot's production proxy would be.
PRODUCTION_DN = "/DC=test/CN=idds-fat-panda-production"
#: The VO of the issuer's tokens, and the ``Origin`` the backend sends with them.
VO = "wlcg"
#: The OIDC client ID of PanDA at the issuer: the ``aud`` of the ID tokens.
CLIENT_ID = "idds-fat-panda"
#: The ``name`` claim of :meth:`PandaServer.issue_token`'s tokens, an ordinary user;
#: PanDA derives the user's DN (and task owner) from it.
USER_NAME = "idds-fat tester"
#: The common name of :meth:`PandaServer.issue_proxy`'s user; PanDA names the user
#: (and task owner) after the DN without its ``/DC=`` parts and proxy ``/CN=<number>``.
X509_USER_NAME = "idds-fat x509 tester"
#: Seconds an ID token of :attr:`PandaServer.auth` is valid (an IAM ID token's hour).
TOKEN_LIFETIME = 3600
START_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0

_DB_PASSWORD = "idds-fat-test"
_LOG_TAIL_LINES = 30
# Schema files in the order of panda-database's panda_db_init.sh.
_SCHEMA_COMPONENTS = ("PANDA", "PANDAMETA", "PANDAARCH", "PANDABIGMON", "DEFT", "PARTITION")
_SCHEMA_PARTS = (
    "",
    "_TABLE",
    "_VIEW",
    "_TYPE",
    "_SEQUENCE",
    "_FUNCTION",
    "_TRIGGER",
    "_SCHEDULER_JOBS",
    "_PROCEDURE",
)


class PandaServerError(IddsFatError):
    """The PanDA server could not be configured, started or stopped.

    The message names the log files and carries their last lines.
    """


def find_venv() -> Path | None:
    """Return the PanDA server's venv (``$IDDS_FAT_PANDA_VENV`` or the default) if it
    holds ``pandaserver``, else None."""
    venv = Path(os.environ.get(VENV_VAR) or DEFAULT_VENV)
    python = venv / "bin" / "python"
    if not python.exists() or not list(venv.glob("lib/python3*/site-packages/pandaserver")):
        return None
    return venv


def find_schema() -> Path | None:
    """Return the panda-database checkout: ``$IDDS_FAT_PANDA_SCHEMA``, else
    ``shared/panda-live/panda-database`` beside the repository (or the current
    directory); None if none has ``schema/postgres/sqls``."""
    candidates = []
    if os.environ.get(SCHEMA_VAR):
        candidates.append(Path(os.environ[SCHEMA_VAR]))
    else:
        repo = Path(__file__).resolve().parents[2]
        for root in (repo, Path.cwd()):
            candidates.append(root.parent / "shared" / "panda-live" / "panda-database")
    for candidate in candidates:
        if (candidate / "schema" / "postgres" / "sqls").is_dir():
            return candidate.resolve()
    return None


class PandaServer(Started):
    """A PanDA server, JEDI and the adder on a private PostgreSQL, with one queue.

    Args:
        base_dir: directory for the configs (``home/etc/panda``), logs (``log/``),
            the server's cache (``cache/``) and lock files (``run/``). The database
            lives in a directory of its own in ``/tmp`` when root (PostgreSQL runs
            as user ``postgres``, which must reach it), else under base_dir.
        queue: the PanDA queue tasks name as ``site``.
        jedi_cycle: seconds between the rounds of JEDI's agents (task feeder,
            refiner, job generator, post-processor, commands). Each round costs
            CPU; 2 s keeps a 2-core machine usable. The post-processor's cycle is
            fixed at 60 s upstream: ``panda_assets/jedi_master.py`` caps its sleeps.
        adder_grace: seconds a job report waits before the adder takes it.
        abort_rescue: seconds a killed task waits in ``aborting`` before JEDI looks
            again whether its jobs have ended (then ``toabort``, then ``aborted``).
            Fixed at 5 minutes upstream, where nothing else looks again once the
            jobs that were running at the kill end: ``panda_assets/jedi_master.py``
            shortens it.
        port: the front end's port (default: a free one, picked now).
        token_lifetime: seconds each token of :attr:`auth` and
            :meth:`backend_settings` is valid from when it is asked for.
        x509: also serve TLS on :attr:`tls_url` with a client certificate required,
            verified against a CA made at start (:attr:`ca_dir`,
            :meth:`issue_proxy`), as mod_ssl does at a site.

    Usable as a context manager: ``with PandaServer(tmp) as panda: ...``.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        queue: str = DEFAULT_QUEUE,
        jedi_cycle: int = 2,
        adder_grace: int = 0,
        abort_rescue: int = 4,
        port: int | None = None,
        token_lifetime: int = TOKEN_LIFETIME,
        x509: bool = True,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", queue):
            raise PandaServerError(f"not a queue name: {queue!r}")
        if jedi_cycle < 1 or adder_grace < 0 or abort_rescue < 1:
            raise PandaServerError(
                "jedi_cycle and abort_rescue must be >= 1 s and adder_grace >= 0 s"
            )
        self.base_dir = Path(base_dir).resolve()
        self.queue = queue
        self.jedi_cycle = jedi_cycle
        self.adder_grace = adder_grace
        self.abort_rescue = abort_rescue
        self.port = port if port is not None else free_port()
        self.db_port = free_port()
        self.log_dir = self.base_dir / "log"
        self.cache_dir = self.base_dir / "cache"
        self.home = self.base_dir / "home"
        self.issuer_port = free_port()
        self.token_lifetime = token_lifetime
        self.tls_port = free_port() if x509 else None
        self._ca: TestCertificateAuthority | None = None
        self._signing_key = _new_signing_key()
        self._processes = _Processes()
        self._db_dir: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self.started_in: float | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"PandaServer({self.api_url!r}, queue={self.queue!r}, {state})"

    # --- addresses and credentials ---------------------------------------------------

    @property
    def url(self) -> str:
        """The front end's base URL, ``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        """``/api/v1`` of the server (what the pilot and panda-client 1.6 call)."""
        return f"{self.url}/api/v1"

    @property
    def server_url(self) -> str:
        """The ``PANDA_URL_SSL``/``PANDACACHE_URL`` form, ``http://127.0.0.1:PORT/server/panda``."""
        return f"{self.url}/server/panda"

    @property
    def runner_url(self) -> str:
        """The payload runner tasks name as ``transPath`` (``bash -c`` of its arguments)."""
        return f"{self.url}/cache/bash-c"

    @property
    def tls_url(self) -> str:
        """The front end's TLS base URL, ``https://127.0.0.1:TLS_PORT``; its
        ``/server/panda`` is the ``PANDA_URL_SSL`` of X.509 callers.

        Raises:
            PandaServerError: the server was made with ``x509=False``.
        """
        if self.tls_port is None:
            raise PandaServerError("this PanDA server serves no TLS (x509=False)")
        return f"https://{HOST}:{self.tls_port}"

    @property
    def ca_dir(self) -> Path:
        """The directory of the test CA's certificate under its OpenSSL hash, as a
        site's ``/etc/grid-security/certificates``: ``X509_CERT_DIR`` for callers.

        Raises:
            PandaServerError: not started, or made with ``x509=False``.
        """
        if self._ca is None:
            raise PandaServerError("no test CA: the server is not started, or x509=False")
        return self._ca.ca_dir

    def issue_proxy(self, *, trusted: bool = True, lifetime: float = 12 * 3600) -> Path:
        """Write a grid proxy of the user :data:`X509_USER_NAME` (proxy certificate,
        its key, the user certificate; mode 0600, under ``base_dir``) and return its
        path, for ``X509_USER_PROXY``.

        Args:
            trusted: False signs the user certificate with a CA of its own, which the
                front end does not trust: the handshake refuses it.
            lifetime: seconds the proxy is valid.

        Raises:
            PandaServerError: not started, or made with ``x509=False``.
        """
        ca = self._ca
        if ca is None:
            raise PandaServerError("no test CA: the server is not started, or x509=False")
        name = f"proxy-{secrets.token_hex(4)}"
        if not trusted:
            ca = TestCertificateAuthority(self.base_dir / "x509" / name, name="untrusted CA")
        path, _ = ca.issue_proxy(name, X509_USER_NAME, lifetime=lifetime)
        return path

    @property
    def issuer_url(self) -> str:
        """The token issuer, ``http://127.0.0.1:PORT2``: its ``iss``, with the discovery
        document at ``/.well-known/openid-configuration`` and the JWKS at ``/jwks.json``."""
        return f"http://{HOST}:{self.issuer_port}"

    @property
    def auth(self) -> PandaAuth:
        """Credentials of an ordinary user (:data:`USER_NAME`, VO :data:`VO`) for
        :class:`~idds_fat.backends.panda.PandaClient`: a fresh ID token of the
        issuer, valid ``token_lifetime`` seconds. Never a production identity."""
        from idds_fat.backends.panda.auth import PandaAuth

        return PandaAuth("oidc", token=self.issue_token(), vo=VO)

    def issue_token(
        self,
        *,
        lifetime: float | None = None,
        audience: str = CLIENT_ID,
        trusted: bool = True,
    ) -> str:
        """Return an ID token of the issuer for :data:`USER_NAME`, as an OIDC provider
        (CERN's or WLCG's IAM) issues them: RS256, ``kid`` in the header, ``iss``,
        ``aud``, ``sub``, ``iat``, ``exp``, ``name``, ``preferred_username`` and
        ``wlcg.groups``.

        Args:
            lifetime: seconds from now until it expires (default ``token_lifetime``);
                negative for a token that has already expired.
            audience: its ``aud``; anything but :data:`CLIENT_ID` is a token for
                another service, which PanDA refuses.
            trusted: False signs it with a key the issuer does not publish, under the
                issuer's ``kid``: a forged token.
        """
        from joserfc import jwt

        now = int(time.time())
        expires = now + int(self.token_lifetime if lifetime is None else lifetime)
        claims = {
            "iss": self.issuer_url,
            "sub": "idds-fat-tester-0001",
            "aud": audience,
            "iat": min(now, expires - 60),
            "exp": expires,
            "name": USER_NAME,
            "preferred_username": USER_NAME.replace(" ", "-"),
            "wlcg.groups": [f"/{VO}"],
            "jti": secrets.token_hex(8),
        }
        key = self._signing_key if trusted else _new_signing_key()
        header = {"alg": "RS256", "typ": "JWT", "kid": _KEY_ID}
        return jwt.encode(header, claims, key)

    def backend_settings(self, *, x509: bool = False) -> dict[str, str]:
        """What :func:`backend_class` needs to reach this server, JSON-able, for a
        caller in another process: URLs and a fresh ID token of the user (pass it in
        the environment, never on a command line). With ``x509``, no token and the
        TLS URL: the backend then finds a proxy as panda-client does
        (``X509_USER_PROXY``, :meth:`issue_proxy`) and verifies the server against
        ``X509_CERT_DIR`` (:attr:`ca_dir`)."""
        if x509:
            return {"server_url": f"{self.tls_url}/server/panda", "runner_url": self.runner_url}
        return {
            "server_url": self.server_url,
            "runner_url": self.runner_url,
            "token": self.issue_token(),
        }

    @property
    def running(self) -> bool:
        """Whether every process was started and none has exited."""
        return self._processes.alive()

    @staticmethod
    def available() -> bool:
        """Return whether a server can be started here: the venv (``.ci/panda-install``),
        PostgreSQL 15 with pg_cron and pg_partman, and the schema."""
        return (
            find_venv() is not None
            and (PG_BIN / "postgres").exists()
            and (PG_EXTENSIONS / "pg_cron.control").exists()
            and (PG_EXTENSIONS / "pg_partman.control").exists()
            and find_schema() is not None
        )

    # --- start and stop ----------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start PostgreSQL (and load the schema and the queue), the front end, JEDI
        and the adder; return once the server answers ``system/is_alive``.

        A no-op when already running.

        Raises:
            PandaServerError: something is not installed, a process exited, or the
                server did not answer within ``timeout`` seconds; the message carries
                the tails of the logs.
        """
        if self.running:
            return
        self._processes.kill_all()
        venv, schema = find_venv(), find_schema()
        if venv is None or schema is None or not self.available():
            raise PandaServerError(
                "the PanDA server is not installed: run `bash .ci/install-services` as root "
                f"(venv at ${VENV_VAR} or {DEFAULT_VENV}, PostgreSQL 15 with pg_cron and "
                f"pg_partman), and give the panda-database schema (${SCHEMA_VAR})"
            )
        began = time.monotonic()
        deadline = began + timeout
        for path in (self.log_dir, self.cache_dir, self.base_dir / "run", self.home):
            path.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ASSETS / "bash-c", self.cache_dir / "bash-c")
        self._finalizer = weakref.finalize(self, self._processes.kill_all)
        try:
            if self.tls_port is not None:
                self._ca = TestCertificateAuthority(self.base_dir / "x509")
            self._start_database(schema, deadline)
            self._write_configs(venv)
            self._start_panda(venv, deadline)
        except BaseException:
            self._processes.kill_all()
            raise
        self.started_in = time.monotonic() - began
        logger.info("PanDA server up on %s in %.1f s", self.url, self.started_in)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the adder, JEDI and the front end (each whole process group), then
        PostgreSQL, and remove the database directory. A no-op when not started."""
        self._processes.terminate(timeout)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._db_dir is not None and self._db_dir.parent != self.base_dir:
            shutil.rmtree(self._db_dir, ignore_errors=True)
        if self._ca is not None:
            # The CA's, the host's and the proxies' keys go with the server.
            shutil.rmtree(self._ca.directory, ignore_errors=True)
            self._ca = None

    def task_owner(self, task_id: int) -> str | None:
        """Return the user PanDA recorded as the task's owner (``jedi_tasks.username``:
        what it derived from the caller's token or certificate DN, whatever
        ``userName`` the task asked for), or None for an unknown task.

        Raises:
            PandaServerError: the database did not answer.
        """
        if self._db_dir is None:
            raise PandaServerError("the PanDA server is not started")
        command = [str(PG_BIN / "psql"), "-h", str(self._db_dir), "-p", str(self.db_port)]
        command += ["-U", "postgres", "-d", "panda_db", "-At", "-v", f"task={int(task_id)}"]
        done = subprocess.run(
            command,
            input=b"SELECT username FROM doma_panda.jedi_tasks WHERE jeditaskid = :task",
            capture_output=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise PandaServerError(f"cannot read task {task_id}: {done.stderr.decode()[-500:]}")
        return done.stdout.decode().strip() or None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines of each log, each under a header naming it."""
        parts = []
        names = ("postgres.log", "schema.log", "issuer.log", "front_end.log")
        names += ("jedi.log", "adder.log")
        for name in names:
            tail = read_tail(self.log_dir / name, lines, LOG_TAIL_BYTES)
            if tail:
                parts.append(f"--- {self.log_dir / name}:\n{tail}")
        return "\n".join(parts)

    # --- the database --------------------------------------------------------------------

    def _start_database(self, schema: Path, deadline: float) -> None:
        as_root = os.geteuid() == 0
        if as_root:
            # PostgreSQL refuses to run as root; user postgres cannot enter a pytest
            # tmp dir (mode 0700, root's), so the cluster lives in /tmp.
            self._db_dir = Path(tempfile.mkdtemp(prefix="idds-fat-panda-db-", dir="/tmp"))
            owner = pwd.getpwnam("postgres")
            os.chown(self._db_dir, owner.pw_uid, owner.pw_gid)
            weakref.finalize(self, shutil.rmtree, self._db_dir, ignore_errors=True)
            user: dict[str, str] = {"user": "postgres", "group": owner.pw_name}
        else:
            self._db_dir = self.base_dir / "db"
            self._db_dir.mkdir(parents=True, exist_ok=True)
            user = {}
        data = self._db_dir / "data"
        log = self.log_dir / "postgres.log"
        with open(log, "ab") as out:
            done = subprocess.run(
                [str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
                + ["--no-sync", "-E", "UTF8"],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=max(1.0, deadline - time.monotonic()),
                **user,  # type: ignore[arg-type]
            )
        if done.returncode != 0:
            raise PandaServerError(f"initdb failed:\n{self.log_tail()}")
        settings = {
            "listen_addresses": f"'{HOST}'",
            "port": str(self.db_port),
            "unix_socket_directories": f"'{self._db_dir}'",
            "shared_preload_libraries": "'pg_cron, pg_partman_bgw'",
            "cron.database_name": "'postgres'",
            "pg_partman_bgw.dbname": "'panda_db'",
            "max_connections": "100",
            "shared_buffers": "64MB",
            # A throwaway database: durability only costs time.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        with open(data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        postgres = self._processes.launch(
            "postgres",
            [str(PG_BIN / "postgres"), "-D", str(data)],
            self._db_dir,
            log,
            stop_signal=signal.SIGINT,  # PostgreSQL's fast shutdown
            **user,
        )
        self._wait(lambda: self._psql("postgres", "-c", "select 1", check=False) == 0, deadline)
        if postgres.poll() is not None:
            raise PandaServerError(f"PostgreSQL exited while starting:\n{self.log_tail()}")
        self._load_schema(schema)

    def _psql(self, database: str, *args: str, check: bool = True, stdin: str | None = None) -> int:
        command = [str(PG_BIN / "psql"), "-h", str(self._db_dir), "-p", str(self.db_port)]
        command += ["-U", "postgres", "-d", database, "-q", *args]
        with open(self.log_dir / "schema.log", "ab") as out:
            done = subprocess.run(
                command,
                input=stdin.encode() if stdin is not None else None,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=300,
            )
        if check and done.returncode != 0:
            raise PandaServerError(f"psql {' '.join(args)} failed:\n{self.log_tail()}")
        return done.returncode

    def _load_schema(self, checkout: Path) -> None:
        sqls = checkout / "schema" / "postgres" / "sqls"
        strict = ("-v", "ON_ERROR_STOP=1")
        init = (sqls / "init_step.sql").read_text().replace("${PANDA_DB_PASSWORD}", _DB_PASSWORD)
        self._psql("postgres", *strict, stdin=init)
        for component in _SCHEMA_COMPONENTS:
            for part in _SCHEMA_PARTS:
                path = sqls / f"pg_{component}{part}.sql"
                if not path.is_file():
                    continue
                text = path.read_text()
                if component + part == "PANDA_SCHEDULER_JOBS":
                    # Upstream's jobs use worker_node_queue, which only a later patch
                    # (patches/0.0.31) creates: create it first.
                    text = _worker_node_queue(sqls) + text
                if component == "PARTITION":
                    # Debian 12 ships pg_partman 4.7 (p_type 'native'); the schema is
                    # written for pg_partman 5 (p_type 'range').
                    text = text.replace("p_type => 'range'", "p_type => 'native'")
                # Upstream's files are not error-free on a fresh database; like its
                # panda_db_init.sh, load on through errors (they go to schema.log).
                self._psql("panda_db", check=False, stdin=text)
        major, minor, patch = (checkout / "schema" / "postgres" / "version").read_text().split(".")
        self._psql(
            "panda_db",
            *strict,
            "-c",
            "INSERT INTO doma_panda.pandadb_version (component, major, minor, patch) "
            f"VALUES ('PanDA', {int(major)}, {int(minor)}, {int(patch)})",
        )
        self._psql("panda_db", *strict, "-f", str(sqls / "post_step_panda.sql"))
        self._psql("postgres", "-f", str(sqls / "post_step_cron.sql"), check=False)
        self._psql("postgres", *strict, "-f", str(ASSETS / "db_fixups.sql"))
        self._psql("panda_db", *strict, "-f", str(ASSETS / "db_fixups_panda.sql"))
        self._psql(
            "panda_db", *strict, "-v", f"queue={self.queue}", "-f", str(ASSETS / "queue.sql")
        )

    # --- the server, JEDI, the adder -----------------------------------------------------

    def _write_configs(self, venv: Path) -> None:
        etc = self.home / "etc" / "panda"
        (etc / "auth").mkdir(parents=True, exist_ok=True)
        templates = venv / "etc" / "panda"
        server = {
            "server": {
                "logdir": str(self.log_dir),
                "cache_dir": str(self.cache_dir),
                "home_dir_cwd": str(self.home),
                "dbhost": HOST,
                "dbport": str(self.db_port),
                "dbpasswd": _DB_PASSWORD,
                "auth_config": f"{etc / 'auth'}/",
                "pserveralias": HOST,
                # Without it the server assumes Oracle.
                "backend": "postgres",
                "pserverhost": HOST,
                "pserverhosthttp": HOST,
                "pserverport": str(self.port),
                "pserverporthttp": str(self.port),
                "production_dns": PRODUCTION_DN,
                # Bearer tokens are checked by the server itself, against the issuer.
                "token_authType": "oidc",
                "legacy_token_issuers": "",
                "token_cache_config": str(etc / "token_cache_config.json"),
                # Registering uploads calls the server back with the production role.
                "record_sandbox_info": "False",
                # The template's plugin paths are stale (their import errors are
                # swallowed) and cover VO "local" only: the no-DDM plugins for both.
                "adder_plugins": "wlcg|local:pandaserver.dataservice.adder_dummy_plugin:"
                "AdderDummyPlugin",
                "setupper_plugins": "wlcg|local:pandaserver.dataservice.setupper_dummy_plugin:"
                "SetupperDummyPlugin",
            }
        }
        cycle = str(self.jedi_cycle)
        jedi = {
            "db": {"dbhost": HOST, "dbpasswd": _DB_PASSWORD, "nWorkers": "2"},
            "ddm": {"modConfig": "wlcg:1:idds_fat_test_ddm:TestDDMClient"},
            "confeeder": {"nWorkers": "1", "loopCycle": cycle, "checkInterval": "1"},
            "taskrefine": {"nWorkers": "1", "loopCycle": cycle},
            "jobgen": {
                "nWorkers": "1",
                "loopCycle": cycle,
                "lockInterval": "1",
                "procConfig": "wlcg:any:1:",
            },
            "postprocessor": {"nWorkers": "1", "loopCycle": cycle},
            "tcommando": {"nWorkers": "1", "loopCycle": cycle},
            "watchdog": {
                "loopCycle": "60",
                "procConfig": "wlcg:any:1",
                "modConfig": "wlcg:any:pandajedi.jedidog.GenWatchDog:GenWatchDog",
            },
            "taskbroker": {"procConfig": "wlcg:managed:0"},
        }
        common = {"logger": {"logdir": str(self.log_dir)}}
        for name, overrides in (
            ("panda_server.cfg", server),
            ("panda_jedi.cfg", jedi),
            ("panda_common.cfg", common),
        ):
            text = (templates / f"{name}.rpmnew").read_text()
            (etc / name).write_text(override_ini(text, overrides))
        identities: dict[str, object] = {"anonymous_dn": PRODUCTION_DN}
        if self._ca is not None:
            host = self._ca.host_cert(HOST)
            identities["tls"] = {
                "port": self.tls_port,
                "cert": str(host.cert),
                "key": str(host.key),
                "ca_dir": str(self._ca.ca_dir),
            }
        write_private(self.base_dir / "run" / "identities.json", json.dumps(identities).encode())
        self._write_issuer(etc / "auth")

    def _write_issuer(self, auth_dir: Path) -> None:
        """The issuer's public documents, and PanDA's OIDC client config for the VO
        (one ``<vo>_auth_config.json`` per VO, as sites install them)."""
        from joserfc.jwk import KeySet

        issuer = self.base_dir / "issuer"
        (issuer / ".well-known").mkdir(parents=True, exist_ok=True)
        discovery = {
            "issuer": self.issuer_url,
            "jwks_uri": f"{self.issuer_url}/jwks.json",
            "id_token_signing_alg_values_supported": ["RS256"],
            "claims_supported": ["sub", "name", "preferred_username", "wlcg.groups"],
        }
        (issuer / ".well-known" / "openid-configuration").write_text(json.dumps(discovery))
        jwks = KeySet([self._signing_key]).as_dict(private=False)
        (issuer / "jwks.json").write_text(json.dumps(jwks))
        client = {
            "client_id": CLIENT_ID,
            "audience": CLIENT_ID,
            "oidc_config_url": f"{self.issuer_url}/.well-known/openid-configuration",
            "vo": VO,
            "jwt_profile": "wlcg",
        }
        (auth_dir / f"{VO}_auth_config.json").write_text(json.dumps(client))

    def _env(self, venv: Path, jedi: bool = False) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PANDA", "X509_", "OIDC_", "IDDS_FAT_", "PYTHON"))
        }
        env.update(
            {
                "PANDA_HOME": str(self.home),
                # pandaclient (imported by the server) resolves its cache host at
                # import time: keep every PanDA URL on loopback.
                "PANDA_BEHIND_REAL_LB": "1",
                "PANDA_URL": self.server_url,
                "PANDA_URL_SSL": self.server_url,
                "PANDACACHE_URL": self.server_url,
                "PANDA_API_URL": self.api_url,
                "PANDA_API_URL_SSL": self.api_url,
                "PANDA_LOCK_DIR": str(self.base_dir / "run"),
                "PANDA_NO_ROOT": "1",
            }
        )
        if jedi:
            # As upstream's sysconfig does: JEDI imports pandacommon's and pandaserver's
            # top-level modules by their short names; the DDM plugin is ours.
            site = next(venv.glob("lib/python3*/site-packages"))
            paths = [site / "pandacommon", site / "pandaserver", site, ASSETS / "jedi_plugins"]
            env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
        return env

    def _start_panda(self, venv: Path, deadline: float) -> None:
        python = str(venv / "bin" / "python")
        identities = str(self.base_dir / "run" / "identities.json")
        self._processes.launch(
            "token issuer",
            [python, "-m", "http.server", "--bind", HOST, str(self.issuer_port)],
            self.base_dir / "issuer",
            self.log_dir / "issuer.log",
            env=self._env(venv),
        )
        self._processes.launch(
            "front end",
            [python, str(ASSETS / "front_end.py"), str(self.port), identities],
            self.base_dir,
            self.log_dir / "front_end.log",
            env=self._env(venv),
        )
        self._wait(self._alive, deadline)
        if self.tls_port is not None:
            self._wait(self._tls_listens, deadline)
        self._wait(self._issuer_answers, deadline)
        self._processes.launch(
            "JEDI",
            [python, "-u", str(ASSETS / "jedi_master.py")]
            + [str(self.jedi_cycle), str(self.abort_rescue)],
            self.base_dir,
            self.log_dir / "jedi.log",
            env=self._env(venv, jedi=True),
        )
        self._processes.launch(
            "adder",
            [python, "-u", str(ASSETS / "adder.py"), str(self.adder_grace), "1"],
            self.base_dir,
            self.log_dir / "adder.log",
            env=self._env(venv),
        )
        if not self.running:
            raise PandaServerError(f"a PanDA process exited while starting:\n{self.log_tail()}")

    def _alive(self) -> bool:
        request = urllib.request.Request(
            f"{self.api_url}/system/is_alive", headers={"Accept": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return bool(json.loads(response.read()).get("success"))
        except (OSError, ValueError):
            return False

    def _tls_listens(self) -> bool:
        try:
            socket.create_connection((HOST, self.tls_port), timeout=2).close()
        except OSError:
            return False
        return True

    def _issuer_answers(self) -> bool:
        url = f"{self.issuer_url}/.well-known/openid-configuration"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return "jwks_uri" in json.loads(response.read())
        except (OSError, ValueError):
            return False

    def _wait(self, ready: Callable[[], bool], deadline: float) -> None:
        while not ready():
            dead = self._processes.exited()
            if dead:
                raise PandaServerError(
                    f"{dead} exited while the PanDA server started:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise PandaServerError(
                    f"the PanDA server on {self.url} was not ready in time:\n{self.log_tail()}"
                )
            time.sleep(0.1)


def backend_class(
    settings: dict[str, str],
    *,
    python: str | None = None,
    poll_min: float = 0.5,
    poll_max: float = 2.0,
    max_attempt: int = 1,
    panda_cache: bool = False,
) -> type[PandaBackend]:
    """Return a :class:`~idds_fat.backends.panda.PandaBackend` whose ``create`` runs
    on the server of ``settings`` (:meth:`PandaServer.backend_settings`): its URLs,
    the user's token (without one, the credentials panda-client would find, e.g.
    ``X509_USER_PROXY``), its ``bash-c`` runner, this interpreter on the node and
    fast polls; with ``panda_cache`` (or the workflow's setting of that name), code
    context and payloads go through the server's cache. Put it in
    ``idds_fat.backends.BACKENDS["panda"]``: ``Config`` has no settings for the
    server's URLs, the runner or the poll intervals."""
    import sys

    from idds_fat.backends.panda import PandaAuth, PandaBackend, PandaClient

    node_python = python or sys.executable

    class LivePandaBackend(PandaBackend):
        @classmethod
        def create(cls, config, setup):  # noqa: ANN001, ANN206 - Backend.create's contract
            placement = dict(setup.placement or {})
            if "token" in settings:
                auth = PandaAuth("oidc", token=settings["token"], vo=VO)
            else:  # as panda-client: PANDA_AUTH, else the proxy of X509_USER_PROXY
                auth = PandaAuth.from_env()
            client = PandaClient(settings["server_url"], auth, cache_url=settings["server_url"])
            backend = cls(
                on_exit=setup.on_exit,
                on_start=setup.on_start,
                wrapper_url=setup.wrapper_url,
                job_secrets=setup.secrets,
                client=client,
                queue=placement.get("queue"),
                trans_path=settings["runner_url"],
                python=node_python,
                max_attempt=max_attempt,
                poll_min=poll_min,
                poll_max=poll_max,
                panda_cache=panda_cache or config.panda_cache,
            )
            backend.check_credentials()  # as PandaBackend.create does
            return backend

    return LivePandaBackend


def override_ini(text: str, overrides: dict[str, dict[str, str]]) -> str:
    """Return the INI ``text`` with ``overrides`` ({section: {key: value}}) applied:
    a key already in its section is replaced in place, a new one is added at the
    section's start. Comments and order are kept."""
    out: list[str] = []
    section: str | None = None
    pending = {name: dict(values) for name, values in overrides.items()}
    for line in text.splitlines():
        header = re.match(r"^\[(\w+)\]", line)
        if header:
            section = header.group(1)
            out.append(line)
            # New keys first: a later duplicate of the same key would win otherwise.
            values = overrides.get(section, {})
            out.extend(
                f"{key} = {value}"
                for key, value in values.items()
                if not _has_key(text, section, key)
            )
            continue
        key = re.match(r"^([A-Za-z_][\w-]*)\s*=", line)
        if section in pending and key and key.group(1) in pending[section]:
            out.append(f"{key.group(1)} = {pending[section].pop(key.group(1))}")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def _has_key(text: str, section: str, key: str) -> bool:
    current = None
    for line in text.splitlines():
        header = re.match(r"^\[(\w+)\]", line)
        if header:
            current = header.group(1)
        elif current == section and re.match(rf"^{re.escape(key)}\s*=", line):
            return True
    return False


_KEY_ID = "idds-fat-test-issuer"


def _new_signing_key() -> RSAKey:
    try:
        from joserfc.jwk import RSAKey
    except ImportError:  # joserfc comes with the test extra
        raise PandaServerError(
            "the PanDA harness signs its tokens with joserfc: install idds-fat[test]"
        ) from None
    return RSAKey.generate_key(
        2048, parameters={"kid": _KEY_ID, "use": "sig", "alg": "RS256"}, private=True
    )


def _worker_node_queue(sqls: Path) -> str:
    patch = (sqls / "patches" / "0.0.31.patch.sql").read_text()
    found = re.search(
        r"CREATE TABLE IF NOT EXISTS doma_panda\.worker_node_queue .*?\);", patch, re.S
    )
    if found is None:
        raise PandaServerError("patches/0.0.31.patch.sql no longer creates worker_node_queue")
    return found.group(0) + "\nALTER TABLE doma_panda.worker_node_queue OWNER TO panda;\n"


class _Processes:
    """The processes of one server, in start order; held by the finalizer, so it must
    not reference the :class:`PandaServer`. Each runs in a session (process group)
    of its own, and stopping one signals its whole group: JEDI and the adder fork."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen[bytes], signal.Signals]] = []

    def launch(
        self,
        name: str,
        command: list[str],
        cwd: Path,
        log: Path,
        stop_signal: signal.Signals = signal.SIGTERM,
        **options: object,
    ) -> subprocess.Popen[bytes]:
        process = spawn_logged(command, cwd, log, f"starting {name}", **options)
        self.started.append((name, process, stop_signal))
        logger.debug("started PanDA %s, pid %d", name, process.pid)
        return process

    def alive(self) -> bool:
        # postgres, the token issuer, the front end, JEDI and the adder
        return len(self.started) == 5 and not self.exited()

    def exited(self) -> str | None:
        for name, process, _ in self.started:
            if process.poll() is not None:
                return f"{name} (pid {process.pid}, exit code {process.returncode})"
        return None

    def terminate(self, timeout: float, kill: bool = False) -> None:
        # Reverse start order: the adder and JEDI before the server, the database last.
        while self.started:
            name, process, stop_signal = self.started.pop()
            _stop_group(process, stop_signal, 0 if kill else timeout)

    def kill_all(self) -> None:
        self.terminate(0, kill=True)


def _stop_group(
    process: subprocess.Popen[bytes], stop_signal: signal.Signals, timeout: float
) -> None:
    """Signal the process group ``process`` leads; SIGKILL it after ``timeout`` s."""
    group = process.pid  # start_new_session: the process leads its own group
    try:
        os.killpg(group, stop_signal if timeout > 0 else signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout if timeout > 0 else 5.0)
    except subprocess.TimeoutExpired:
        logger.warning("pid %d ignored signal %s for %.0f s; killing", group, stop_signal, timeout)
    try:
        # Whatever of the group is left (forked workers), now or after the leader.
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if process.poll() is None:
        process.wait()
