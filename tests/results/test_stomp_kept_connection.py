"""A warm worker keeps one STOMP connection for all its jobs (issue 18, item 2)."""

from __future__ import annotations

import os
import sys

from idds_fat import Workflow, work


@work
def broker_sockets(port):
    """Return the TCP connections this process holds open to the broker's port now
    (the sockets among its descriptors that /proc/self/net/tcp* list as
    established), and how many results it has delivered over each channel."""
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
    # The worker runs the wrapper, imported as the module wrapper_HASH.
    (wrapper,) = [m for name, m in sys.modules.items() if name.startswith("wrapper_")]
    return sorted(found), dict(wrapper.delivered_over)


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
    sockets = [s for s, _ in seen]
    assert sockets[0] == []  # nothing delivered yet
    assert len(sockets[1]) == 1  # the first result's connection, still open
    assert sockets[1] == sockets[2] == sockets[3]  # and the same one for every later result
    # Job k runs after the worker delivered the k results before it: every one over
    # STOMP. (Which channel brought a result to the caller first is a race: the
    # service's broker mirror puts a copy of each into the REST store.)
    assert [tally for _, tally in seen] == [{"stomp": k, "rest": 0} for k in range(4)]
    assert wf.stats["received"] == 4 and wf.stats["stomp"] + wf.stats["rest"] == 4
