"""The service's broker mirror keeps a REST copy of every result sent over STOMP."""

from __future__ import annotations

import requests

from idds_fat import Workflow, work
from idds_fat.service import EmbeddedService
from idds_fat.testing import wait_until

USER, PASSWORD = "idds", "fat-secret"


@work
def square(x):
    return x * x


def test_standalone_service_mirrors_every_workflow_through_a_wildcard(activemq, tmp_path):
    mirror = {
        "brokers": activemq.host_and_ports,
        "destination": "/queue/idds-fat.mirror.>",
        "user": USER,
        "password": PASSWORD,
    }
    with EmbeddedService(tmp_path / "service", token="tok", mirror=mirror) as service:
        mirrored = service.app.state.mirror
        wait_until(lambda: mirrored.up, "the mirror to subscribe", timeout=30)
        settings = dict(service_url=service.url, token="tok", broker=activemq.url)
        settings.update(broker_user=USER, broker_password=PASSWORD)
        with Workflow(**settings) as wf:
            wait_until(lambda: wf.parts.subscriber.up, "the caller to subscribe", timeout=30)
            assert square.map([{"x": i} for i in range(10)]).results(timeout=60) == [
                i * i for i in range(10)
            ]
        assert wf.stats["received"] == 10 and wf.stats["stomp"] >= 1
        wait_until(lambda: mirrored.stored >= 10, "the mirror to store 10 results", timeout=30)
        stored = requests.get(
            f"{service.url}/results/{wf.id}",
            headers={"Authorization": "Bearer tok"},
            timeout=10,
        ).json()["results"]
    assert len(stored) == 10
    assert mirrored.dropped == 0
