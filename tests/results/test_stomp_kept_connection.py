"""A warm worker keeps one STOMP connection for all its jobs (issue 18, item 2)."""

from __future__ import annotations

import os

from idds_fat import Workflow, work


@work
def broker_sockets(port):
    # The TCP connections this process holds open to the broker's port now: the
    # sockets among its descriptors that /proc/self/net/tcp* list as established.
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                    found.add(fields[9])
    return sorted(found)


def test_a_warm_worker_delivers_every_result_over_one_broker_connection(activemq):
    port = int(activemq.url.rsplit(":", 1)[1])
    settings = {
        "broker": activemq.url,
        "broker_user": "idds",
        "broker_password": "fat-secret",
        "local_direct_results": False,  # results go over the broker, not the pipe
    }
    with Workflow(max_workers=1, progress=False, **settings) as wf:
        seen = [broker_sockets(port) for _ in range(4)]  # one after the other
    assert seen[0] == []  # nothing delivered yet
    assert len(seen[1]) == 1  # the first result's connection, still open
    assert seen[1] == seen[2] == seen[3]  # and the same one for every later result
    assert wf.stats["stomp"] == 4 and wf.stats["rest"] == 0
