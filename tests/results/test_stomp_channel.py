"""STOMP first, REST fallback, against a real ActiveMQ: nothing lost, nothing doubled."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import threading

import cloudpickle

from idds_fat import Workflow, work
from idds_fat.serialize import seal
from idds_fat.service import EmbeddedService
from idds_fat.testing import wait_until

USER, PASSWORD = "idds", "fat-secret"


@work
def plus_one(x):
    return x + 1


def _broker_settings(running_broker, **extra):
    settings = {
        "broker": running_broker.url,
        "broker_user": USER,
        "broker_password": PASSWORD,
        "broker_timeout": 2.0,
        "result_grace_seconds": 2.0,
        "publish_timeout": 60.0,
    }
    settings.update(extra)
    return settings


def test_results_arrive_over_stomp_and_are_mirrored(activemq):
    with Workflow(**_broker_settings(activemq)) as wf:
        wait_until(lambda: wf.parts.subscriber.up, what="subscription")
        results = plus_one.map([{"x": i} for i in range(20)])
        assert results.results(timeout=60) == list(range(1, 21))
        mirror = wf.parts.service.app.state.mirror
        wait_until(lambda: mirror.stored == 20, what="mirror copies")
    assert wf.stats["received"] == 20
    assert wf.stats["stomp"] >= 1
    assert wf.stats["rejected"] == 0


def test_broker_killed_mid_map_every_result_arrives_once_via_rest(activemq_factory):
    broker = activemq_factory()
    n = 200
    with Workflow(**_broker_settings(broker)) as wf:
        wait_until(lambda: wf.parts.subscriber.up, what="subscription")
        results = plus_one.map([{"x": i} for i in range(n)])
        arrived = 0
        for _ in results.as_completed(timeout=300):
            arrived += 1
            if arrived == 40:
                broker.stop(kill=True)
        values = results.results()
    assert values == list(range(1, n + 1))
    stats = wf.stats
    assert stats["rest"] > 0, stats
    assert stats["stomp"] >= 1, stats  # results came over STOMP before the kill
    assert stats["rejected"] == 0
    # Each job's future was completed exactly once; extra copies were dropped as duplicates.
    assert all(f.done() and not f.exception() for f in results.futures)


def test_map_started_with_broker_down_moves_to_stomp_when_it_returns(activemq_factory, tmp_path):
    gate = tmp_path / "broker-back"

    @work
    def gated_plus_one(x):
        # Jobs after the first 20 wait until the caller's subscription is back.
        if x >= 20:
            wait_until(lambda: os.path.exists(gate), "the broker to be back", timeout=300)
        return x + 1

    broker = activemq_factory()
    broker.stop(kill=True)
    n = 120
    with Workflow(**_broker_settings(broker)) as wf:
        results = gated_plus_one.map([{"x": i} for i in range(n)])
        arrived = 0
        for _ in results.as_completed(timeout=300):
            arrived += 1
            if arrived == 20:
                assert not wf.parts.subscriber.up
                broker.start()
                wait_until(lambda: wf.parts.subscriber.up, what="subscription after the restart")
                gate.touch()
        values = results.results()
    assert values == list(range(1, n + 1))
    stats = wf.stats
    assert stats["rest"] >= 20 and stats["stomp"] > 0, stats
    assert stats["received"] == n and stats["rejected"] == 0


def test_forged_result_from_a_broker_user_is_rejected_and_the_real_one_wins(activemq):
    import stomp

    with Workflow(**_broker_settings(activemq)) as wf:
        wait_until(lambda: wf.parts.subscriber.up, what="subscription")
        forged = seal(
            {
                "kind": "result",
                "workflow": wf.id,
                "task": "t0001",
                "job": 0,
                "attempt": 0,
                "status": "ok",
            },
            cloudpickle.dumps("forged"),
            os.urandom(32),
        )
        conn = stomp.Connection12(activemq.host_and_ports, auto_decode=False)
        conn.connect(USER, PASSWORD, wait=True)
        receipt = threading.Event()
        conn.set_listener("r", type("L", (), {"on_receipt": lambda self, f: receipt.set()})())
        conn.send(wf.result_queue, forged, headers={"persistent": "true", "receipt": "forge"})
        assert receipt.wait(10)
        conn.disconnect()
        assert plus_one(41) == 42
        assert wf.stats["rejected"] == 1


def test_wrong_broker_password_falls_back_to_rest(activemq):
    with Workflow(**_broker_settings(activemq, broker_password="wrong")) as wf:
        assert plus_one(1) == 2
        assert not wf.parts.subscriber.up
    assert wf.stats["rest"] == 1 and wf.stats["stomp"] == 0


def test_failover_list_skips_a_dead_broker(activemq):
    dead = f"127.0.0.1:{_free_port()}"
    url = activemq.url.replace("stomp://", f"stomp://{dead},")
    with Workflow(**_broker_settings(activemq, broker=url)) as wf:
        wait_until(lambda: wf.parts.subscriber.up, what="subscription")
        assert plus_one.map([{"x": i} for i in range(5)]).results(timeout=60) == [1, 2, 3, 4, 5]
    assert wf.stats["stomp"] >= 1


def test_rest_store_restarting_mid_run_loses_nothing(tmp_path):
    port = _free_port()
    data = tmp_path / "service"
    service = EmbeddedService(data, token="tok", port=port).start()
    n = 60
    try:
        with Workflow(service_url=service.url, token="tok", publish_timeout=120) as wf:
            results = plus_one.map([{"x": i} for i in range(n)])
            arrived = 0
            for _ in results.as_completed(timeout=300):
                arrived += 1
                if arrived == 10:
                    service.stop()
                    service = EmbeddedService(data, token="tok", port=port).start()
            values = results.results()
    finally:
        service.stop()
    assert values == list(range(1, n + 1))
    assert wf.stats["received"] == n


def test_result_of_50_mb_travels_by_reference(activemq):
    @work
    def big():
        return bytes(range(256)) * (50 * 1024 * 1024 // 256)

    with Workflow(**_broker_settings(activemq)) as wf:
        wait_until(lambda: wf.parts.subscriber.up, what="subscription")
        value = big()
    assert len(value) == 50 * 1024 * 1024
    expected = hashlib.sha256(bytes(range(256)) * (50 * 1024 * 1024 // 256)).hexdigest()
    assert hashlib.sha256(value).hexdigest() == expected
    assert wf.stats["received"] == 1 and wf.stats["rejected"] == 0


def test_heartbeats_detect_a_frozen_broker_and_rest_takes_over(activemq_factory):
    import signal

    broker = activemq_factory()
    with Workflow(**_broker_settings(broker, broker_heartbeat_ms=500, broker_timeout=1.0)) as wf:
        wait_until(lambda: wf.parts.subscriber.up, what="subscription")
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: not wf.parts.subscriber.up, timeout=30, what="heart-beat timeout")
            assert plus_one(1) == 2
        finally:
            os.kill(broker.pid, signal.SIGCONT)
    assert wf.stats["rest"] >= 1


def test_stomp_is_not_imported_without_a_broker(tmp_path):
    script = tmp_path / "no_broker.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from idds_fat import Workflow, work

            @work
            def job_has_stomp():
                return "stomp" in sys.modules

            with Workflow() as wf:
                print(job_has_stomp(), "stomp" in sys.modules)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
