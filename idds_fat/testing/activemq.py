"""A private, throwaway ActiveMQ 5.x broker speaking STOMP on loopback.

For tests, benchmarks and users' CI: :class:`ActiveMQBroker` writes its own
configuration under a base directory, launches the broker's Java process directly
(not the ``/usr/bin/activemq`` wrapper, which insists on system paths and a user
switch), and returns once the STOMP port answers a ``CONNECT``. The port is chosen
once and kept, so ``stop()`` then ``start()`` brings the broker back on the same URL,
which is what fault-injection tests need.

Only the Debian/Ubuntu ``activemq`` package layout is supported
(``apt-get install activemq``); :meth:`ActiveMQBroker.available` says whether it
is installed.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from idds_fat.errors import IddsFatError
from idds_fat.testing.processes import ServerProcess
from idds_fat.testing.processes import free_port as _free_port
from idds_fat.testing.processes import port_in_use as _port_in_use

logger = logging.getLogger(__name__)

ACTIVEMQ_HOME = Path("/usr/share/activemq")
ACTIVEMQ_JAR = ACTIVEMQ_HOME / "bin" / "activemq.jar"
DEBIAN_CONFIG = Path("/etc/activemq/instances-available/main/activemq.xml")
HOST = "127.0.0.1"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

_BEANS_NS = "http://www.springframework.org/schema/beans"
_AMQ_NS = "http://activemq.apache.org/schema/core"
_XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"

# Used only when Debian's stock instance config is absent; same shape as Debian's.
_FALLBACK_CONFIG = f"""<beans xmlns="{_BEANS_NS}" xmlns:xsi="{_XSI_NS}"
  xsi:schemaLocation="{_BEANS_NS} http://www.springframework.org/schema/beans/spring-beans-2.0.xsd
  {_AMQ_NS} http://activemq.apache.org/schema/core/activemq-core.xsd">
  <bean class="org.springframework.beans.factory.config.PropertyPlaceholderConfigurer"/>
  <broker xmlns="{_AMQ_NS}" brokerName="localhost"/>
</beans>
"""

# Debian's ActiveMQ logs through log4j 1.2 (slf4j-log4j12), not log4j2: without this
# file on its classpath it logs nothing. Broker logs go to stdout, which start()
# redirects into one log file under base_dir.
_LOG4J_PROPERTIES = """\
log4j.rootLogger=INFO, stdout
log4j.logger.org.springframework=WARN
log4j.logger.org.apache.xbean=WARN
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=%d{HH:mm:ss,SSS} %-5p %m [%c{1}]%n
"""

# The module flags ActiveMQ 5.17 needs on Java 17, as in Debian's launcher.
_JVM_MODULE_FLAGS = (
    "--add-reads=java.xml=java.logging",
    "--add-opens=java.base/java.security=ALL-UNNAMED",
    "--add-opens=java.base/java.net=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.naming/javax.naming.spi=ALL-UNNAMED",
    "--add-opens=java.rmi/sun.rmi.transport.tcp=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED",
)


class BrokerError(IddsFatError):
    """The broker could not be configured, started or stopped.

    The message names the broker's log file and carries its last lines.
    """


class ActiveMQBroker(ServerProcess):
    """One ActiveMQ broker process with a STOMP connector on ``127.0.0.1``.

    Args:
        base_dir: directory for the generated config (``conf/``), data (``data/``,
            KahaDB when persistent), ``tmp/`` and the log file ``activemq.log``.
        port: STOMP port; a free one is picked now when omitted, and kept for
            every later ``start()``.
        persistent: keep queued persistent messages (STOMP header
            ``persistent:true``) in KahaDB across restarts; otherwise the broker
            holds messages in memory only.
        users: ``{login: passcode}``; when given, only these credentials may
            connect (all users may use every destination). When omitted any
            login is accepted.
        heap_mb: maximum Java heap in MiB.
        stomp_options: extra query options for the STOMP connector URI, e.g.
            ``{"wireFormat.maxDataLength": "1048576"}`` (body limit, default
            100 MiB) or ``{"wireFormat.maxFrameSize": "..."}`` (default unlimited).
            Wire-format options need the ``wireFormat.`` prefix.

    Usable as a context manager: ``with ActiveMQBroker(tmp) as broker: ...``.
    """

    _error = BrokerError
    _label = "ActiveMQ"

    def __init__(
        self,
        base_dir: Path,
        port: int | None = None,
        persistent: bool = False,
        users: dict[str, str] | None = None,
        heap_mb: int = 256,
        *,
        stomp_options: Mapping[str, str] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.port = port if port is not None else _free_port()
        self.persistent = persistent
        self.users = dict(users) if users is not None else None
        self.heap_mb = heap_mb
        self.stomp_options = dict(stomp_options or {})
        self.log_path = self.base_dir / "activemq.log"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"ActiveMQBroker({self.url!r}, persistent={self.persistent}, {state})"

    @property
    def url(self) -> str:
        """The STOMP URL, ``"stomp://127.0.0.1:PORT"``; the same across restarts."""
        return f"stomp://{HOST}:{self.port}"

    @property
    def _where(self) -> str:
        return self.url

    @property
    def host_and_ports(self) -> list[tuple[str, int]]:
        """``[("127.0.0.1", PORT)]``, the form stomp.py's ``Connection12`` takes."""
        return [(HOST, self.port)]

    @property
    def pid(self) -> int | None:
        """The Java process id while running, else ``None``."""
        return self._process.pid if self.running and self._process else None

    @staticmethod
    def available() -> bool:
        """Return whether a broker can be started here: ``java`` on PATH and the
        Debian ``activemq`` package's ``activemq.jar`` installed."""
        return shutil.which("java") is not None and ACTIVEMQ_JAR.is_file()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Write the config, launch the broker and wait until STOMP answers.

        A no-op when already running. Returns once a STOMP ``CONNECT`` on the
        port gets a reply (~0.7 s on our machines).

        Raises:
            BrokerError: ActiveMQ is not installed, the process exited, or the
                port did not answer within ``timeout`` seconds; the message
                carries the tail of the broker's log.
        """
        if self.running:
            return
        if self._process is not None:
            # The broker died on its own since the last start: reap it first.
            self._terminate(kill=True)
        if not self.available():
            raise BrokerError(
                f"ActiveMQ is not installed: need `java` on PATH and {ACTIVEMQ_JAR} "
                "(apt-get install activemq)"
            )
        if _port_in_use(self.port):
            # Whatever listens there would answer the readiness probe in our place.
            raise BrokerError(
                f"cannot start ActiveMQ on {self.url}: another process listens on port {self.port}"
            )
        config = self.write_config()
        for sub in ("data", "tmp"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        command = self._command(config)
        began = time.monotonic()
        process = self._launch(command, self.base_dir, f"starting broker on {self.url}")
        logger.debug("started ActiveMQ pid %d for %s", process.pid, self.url)
        try:
            self._wait_until_ready(self._stomp_answers, began, timeout, " STOMP")
        except BaseException:
            self._terminate(kill=True)
            raise
        logger.info(
            "ActiveMQ up on %s in %.2f s (pid %d)", self.url, time.monotonic() - began, process.pid
        )

    def stop(self, kill: bool = False, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the broker and wait until its process is gone.

        Args:
            kill: ``True`` sends SIGKILL (a crash: nothing is flushed, clients
                see the connection drop); ``False`` sends SIGTERM and lets the
                broker shut down cleanly.
            timeout: seconds to wait for a graceful stop before falling back to
                SIGKILL.

        A no-op when not running.
        """
        if self._process is None:
            return
        began = time.monotonic()
        self._terminate(kill=kill, timeout=timeout)
        logger.info(
            "ActiveMQ on %s %s in %.2f s",
            self.url,
            "killed" if kill else "stopped",
            time.monotonic() - began,
        )

    def write_config(self) -> Path:
        """Write ``conf/activemq.xml`` and ``conf/log4j.properties`` under base_dir.

        Returns:
            The path of ``activemq.xml``.
        """
        conf_dir = self.base_dir / "conf"
        conf_dir.mkdir(parents=True, exist_ok=True)
        template = (
            DEBIAN_CONFIG.read_text(encoding="utf-8")
            if DEBIAN_CONFIG.is_file()
            else _FALLBACK_CONFIG
        )
        xml = render_config(
            template,
            self.port,
            persistent=self.persistent,
            users=self.users,
            stomp_options=self.stomp_options,
        )
        path = conf_dir / "activemq.xml"
        path.write_text(xml, encoding="utf-8")
        (conf_dir / "log4j.properties").write_text(_LOG4J_PROPERTIES, encoding="utf-8")
        return path

    def _command(self, config: Path) -> list[str]:
        java = shutil.which("java") or "java"
        conf = self.base_dir / "conf"
        return [
            java,
            f"-Xms{min(64, self.heap_mb)}m",
            f"-Xmx{self.heap_mb}m",
            "-Djava.awt.headless=true",
            f"-Djava.io.tmpdir={self.base_dir / 'tmp'}",
            *_JVM_MODULE_FLAGS,
            f"-Dactivemq.classpath={conf}",
            f"-Dactivemq.home={ACTIVEMQ_HOME}",
            f"-Dactivemq.base={self.base_dir}",
            f"-Dactivemq.conf={conf}",
            f"-Dactivemq.data={self.base_dir / 'data'}",
            "-jar",
            str(ACTIVEMQ_JAR),
            "start",
            f"xbean:file:{config}",
        ]

    def _stomp_answers(self, seconds: float) -> bool:
        login = next(iter(self.users.items())) if self.users else None
        reply = _stomp_probe(self.port, login, timeout=seconds)
        if reply == "ERROR":
            # STOMP is up but refused the probe's login: the broker is usable,
            # the credentials in `users` are what is wrong.
            logger.warning("ActiveMQ on %s refused the readiness login", self.url)
        return reply in ("CONNECTED", "ERROR")


def render_config(
    template: str,
    port: int,
    persistent: bool = False,
    users: Mapping[str, str] | None = None,
    stomp_options: Mapping[str, str] | None = None,
) -> str:
    """Turn a stock ActiveMQ ``activemq.xml`` into a private single-STOMP config.

    Sets ``useJmx="false"``, ``dataDirectory="${activemq.data}"`` and
    ``persistent``; replaces the persistence adapter (KahaDB under
    ``${activemq.data}/kahadb`` when persistent, none otherwise), every transport
    connector (only ``stomp://127.0.0.1:PORT?STOMP_OPTIONS`` remains) and the plugins (a
    ``simpleAuthenticationPlugin`` with ``users`` when given).

    Returns:
        The new XML document as text.

    Raises:
        BrokerError: the template has no ``<broker>`` element.
    """
    ET.register_namespace("", _BEANS_NS)
    ET.register_namespace("amq", _AMQ_NS)
    ET.register_namespace("xsi", _XSI_NS)
    root = ET.fromstring(template)
    broker = root.find(f"{{{_AMQ_NS}}}broker")
    if broker is None:
        raise BrokerError("ActiveMQ config template has no <broker> element")

    broker.set("useJmx", "false")
    broker.set("dataDirectory", "${activemq.data}")
    broker.set("persistent", "true" if persistent else "false")
    # A test broker needs no web console, JMX or scheduler from the stock file.
    broker.set("schedulerSupport", "false")
    for tag in ("persistenceAdapter", "transportConnectors", "plugins", "managementContext"):
        for element in broker.findall(f"{{{_AMQ_NS}}}{tag}"):
            broker.remove(element)

    def child(parent: ET.Element, tag: str, **attrib: str) -> ET.Element:
        return ET.SubElement(parent, f"{{{_AMQ_NS}}}{tag}", attrib)

    if users:
        plugins = child(broker, "plugins")
        auth = child(plugins, "simpleAuthenticationPlugin", anonymousAccessAllowed="false")
        entries = child(auth, "users")
        for login, passcode in users.items():
            child(
                entries,
                "authenticationUser",
                username=login,
                password=passcode,
                groups="users,admins",
            )
    if persistent:
        adapter = child(broker, "persistenceAdapter")
        child(adapter, "kahaDB", directory="${activemq.data}/kahadb")
    connectors = child(broker, "transportConnectors")
    uri = f"stomp://{HOST}:{port}"
    if stomp_options:
        uri += "?" + urllib.parse.urlencode(stomp_options, safe=".")
    child(connectors, "transportConnector", name="stomp", uri=uri)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _stomp_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n").replace(":", "\\c")


def _stomp_probe(port: int, login: tuple[str, str] | None, timeout: float) -> str | None:
    """Send one STOMP CONNECT; return the reply's command, or None if no answer."""
    frame = "CONNECT\naccept-version:1.2\nhost:localhost\n"
    if login is not None:
        frame += f"login:{_stomp_escape(login[0])}\npasscode:{_stomp_escape(login[1])}\n"
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(frame.encode() + b"\n\x00")
            reply = b""
            while b"\n" not in reply:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                reply += chunk
            command = reply.split(b"\n", 1)[0].strip().decode("ascii", "replace")
            if command == "CONNECTED":
                # Be polite so the broker logs no "transport failed" warning.
                sock.sendall(b"DISCONNECT\n\n\x00")
            return command
    except OSError:
        return None
