"""The ActiveMQ test broker itself, against a real broker: delivery, auth, crashes."""

from __future__ import annotations

import os
import queue
import signal
import threading
import uuid
import xml.etree.ElementTree as ET

import pytest

from idds_fat.testing import ActiveMQBroker, BrokerError

stomp = pytest.importorskip("stomp")

WAIT = 10.0  # generous upper bound for a loopback round trip; never a sleep


class Recorder(stomp.ConnectionListener):
    """Collects what a connection sees, for tests to wait on."""

    def __init__(self) -> None:
        self.messages: queue.Queue = queue.Queue()
        self.receipts: queue.Queue = queue.Queue()
        self.errors: queue.Queue = queue.Queue()
        self.disconnected = threading.Event()

    def on_message(self, frame) -> None:
        self.messages.put(frame)

    def on_receipt(self, frame) -> None:
        self.receipts.put(frame.headers["receipt-id"])

    def on_error(self, frame) -> None:
        self.errors.put(frame)

    def on_disconnected(self) -> None:
        self.disconnected.set()


def connect(broker: ActiveMQBroker, passcode: str | None = None):
    """A connected stomp.py 1.2 client with raw (bytes) bodies, and its recorder.

    Logs in as the broker's first user, with ``passcode`` instead of theirs if given.
    """
    login, password = next(iter(broker.users.items()))
    conn = stomp.Connection12(
        broker.host_and_ports, auto_decode=False, reconnect_attempts_max=1, timeout=WAIT
    )
    recorder = Recorder()
    conn.set_listener("recorder", recorder)
    conn.connect(login, password if passcode is None else passcode, wait=True)
    return conn, recorder


def send_confirmed(conn, recorder: Recorder, destination: str, body: bytes, **headers) -> None:
    """SEND with a receipt and wait for it: the broker has taken the message."""
    receipt = uuid.uuid4().hex
    conn.send(destination, body, headers={"receipt": receipt, **headers})
    assert recorder.receipts.get(timeout=WAIT) == receipt


def queue_name() -> str:
    return f"/queue/test.{uuid.uuid4().hex}"


def disconnect(conn) -> None:
    if conn.is_connected():
        conn.disconnect()


def test_binary_body_with_nul_bytes_arrives_intact(activemq):
    body = bytes(range(256)) * 64 + b"\x00\x00tail\x00"
    destination = queue_name()
    conn, recorder = connect(activemq)
    try:
        conn.subscribe(destination, id="1", ack="auto")
        send_confirmed(conn, recorder, destination, body, **{"content-length": str(len(body))})
        frame = recorder.messages.get(timeout=WAIT)
    finally:
        disconnect(conn)
    assert frame.body == body
    assert int(frame.headers["content-length"]) == len(body)


def test_wrong_password_is_refused(activemq):
    with pytest.raises(stomp.exception.ConnectFailedException):
        connect(activemq, passcode="not-the-secret")


def test_right_password_is_accepted(activemq):
    conn, _ = connect(activemq)
    try:
        assert conn.is_connected()
    finally:
        disconnect(conn)


def test_config_exposes_only_stomp_on_loopback(activemq):
    ns = {"amq": "http://activemq.apache.org/schema/core"}
    root = ET.parse(activemq.base_dir / "conf" / "activemq.xml").getroot()
    uris = [c.get("uri") for c in root.iterfind(".//amq:transportConnector", ns)]
    assert uris == [activemq.url]
    assert activemq.url.startswith("stomp://127.0.0.1:")
    assert activemq.host_and_ports == [("127.0.0.1", activemq.port)]


def test_kill_disconnects_connected_client(activemq_factory):
    broker = activemq_factory()
    conn, recorder = connect(broker)
    broker.stop(kill=True)
    assert recorder.disconnected.wait(WAIT)
    assert not broker.running


def test_restart_comes_back_on_same_url(activemq_factory):
    broker = activemq_factory()
    url = broker.url
    broker.stop(kill=True)
    broker.start()
    assert broker.running
    assert broker.url == url
    conn, _ = connect(broker)
    try:
        assert conn.is_connected()
    finally:
        disconnect(conn)


def test_graceful_stop_then_start(activemq_factory):
    broker = activemq_factory()
    broker.stop()
    assert not broker.running
    broker.start()
    assert broker.running


def test_persistent_message_survives_broker_kill(activemq_factory):
    broker = activemq_factory(persistent=True)
    destination = queue_name()
    conn, recorder = connect(broker)
    # STOMP messages are non-persistent unless the SEND says persistent:true.
    send_confirmed(conn, recorder, destination, b"survivor\x00", persistent="true")
    broker.stop(kill=True)
    assert recorder.disconnected.wait(WAIT)

    broker.start()
    conn, recorder = connect(broker)
    try:
        conn.subscribe(destination, id="1", ack="auto")
        frame = recorder.messages.get(timeout=WAIT)
    finally:
        disconnect(conn)
    assert frame.body == b"survivor\x00"


def test_non_persistent_broker_loses_queued_message_on_kill(activemq_factory):
    broker = activemq_factory(persistent=False)
    destination = queue_name()
    conn, recorder = connect(broker)
    send_confirmed(conn, recorder, destination, b"lost", persistent="true")
    broker.stop(kill=True)
    assert recorder.disconnected.wait(WAIT)

    broker.start()
    conn, recorder = connect(broker)
    try:
        conn.subscribe(destination, id="1", ack="auto")
        # A queue is FIFO: had "lost" survived, it would arrive before the marker.
        send_confirmed(conn, recorder, destination, b"marker")
        frame = recorder.messages.get(timeout=WAIT)
    finally:
        disconnect(conn)
    assert frame.body == b"marker"
    assert recorder.messages.empty()


def test_body_over_max_data_length_is_refused_with_error(activemq_factory):
    broker = activemq_factory(stomp_options={"wireFormat.maxDataLength": "1000"})
    conn, recorder = connect(broker)
    destination = queue_name()
    send_confirmed(conn, recorder, destination, b"x" * 1000)
    conn.send(destination, b"x" * 1001)
    error = recorder.errors.get(timeout=WAIT)
    assert "maximum data length" in error.headers["message"]
    # ActiveMQ drops the connection after a frame it cannot parse.
    assert recorder.disconnected.wait(WAIT)


def test_broker_that_died_on_its_own_can_be_started_again(activemq_factory):
    broker = activemq_factory()
    os.kill(broker.pid, signal.SIGKILL)  # behind the helper's back
    broker._process.wait(timeout=WAIT)
    assert not broker.running
    broker.start()
    assert broker.running


def test_start_refuses_a_port_someone_else_listens_on(tmp_path, activemq):
    clash = ActiveMQBroker(tmp_path / "clash", port=activemq.port)
    with pytest.raises(BrokerError, match="another process listens"):
        clash.start()
    assert not clash.running


def test_start_failure_carries_log_tail(activemq_factory):
    # The JVM refuses a 1 MiB heap and exits at once: the error must show why.
    with pytest.raises(BrokerError) as raised:
        activemq_factory(heap_mb=1)
    message = str(raised.value)
    assert "exited with code" in message
    assert "activemq.log" in message
    assert "heap" in message.lower()
