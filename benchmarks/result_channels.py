"""Result-channel latency and throughput: STOMP (ActiveMQ) against REST (long polling).

Measures, in one run on this machine, for each of the two result channels:

* latency from "a job publishes its result" (just before the wrapper's
  ``deliver``) to "the caller's future callback fires", p50 and p99 over
  ``--latency-messages`` sequential publishes (publish one, wait for its
  callback, publish the next);
* the time one ``deliver`` call takes (p50; over STOMP it opens one connection
  per message and waits for the broker's receipt, as each job does);
* results per second when ``--messages`` results are published by ``--threads``
  publisher threads as fast as they can (messages / time from the first send
  to the last callback);

and prints them side by side with the ratios REST/STOMP. The real code paths
are used: a private ActiveMQ broker (``idds_fat.testing.ActiveMQBroker``), a
``Workflow`` with its embedded service and result collector, and the job
wrapper's own ``seal`` and ``deliver``. Futures are registered by hand under a
task id no real task uses, so no job processes are started.

Then, over STOMP only (issue 18, item 2):

* fan-in: ``--publishers`` processes (200), forked before anything else
  starts, each keeping one broker connection for all its results as a warm
  worker does (``keep_stomp_connections``), publish ``--fanin-messages``
  signed results in all into the one caller's subscription; results/s from
  the first send to the last future settled, every value checked, none lost;
* the hop: a result published on a kept connection (``publish_stomp``, both
  receipts awaited) until the caller's subscription receives it and until its
  future settles, against the broker's own round trip, a bare stomp.py send
  (persistent, with a receipt) to a queue that a bare subscriber (client
  acks, the same prefetch) receives; ``--hop-messages`` of each, one at a
  time and interleaved, p50/p95.

    .venv/bin/python benchmarks/result_channels.py [--messages 1000] \
        [--latency-messages 300] [--threads 4] [--publishers 200] \
        [--fanin-messages 10000] [--hop-messages 500] [--parts channels,fanin,hop]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

from idds_fat import Workflow
from idds_fat.node.deliver import (
    close_stomp_connections,
    deliver,
    keep_stomp_connections,
)
from idds_fat.node.envelope import seal
from idds_fat.node.spec import JobSpec
from idds_fat.results import AsyncResult
from idds_fat.testing import ActiveMQBroker

TASK = "bench"
USER, PASSWORD = "idds", "pw"
WARMUP = 10
WAIT_SECONDS = 60.0


@dataclass
class ChannelResult:
    """What one channel measured."""

    name: str
    latencies: list[float] = field(default_factory=list)
    publish_times: list[float] = field(default_factory=list)
    throughput_publish_times: list[float] = field(default_factory=list)
    rate: float = 0.0
    throughput_latencies: list[float] = field(default_factory=list)
    sent: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    delivered_by: dict[str, int] = field(default_factory=dict)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def result_envelope(workflow_id: str, job: int, key: bytes, value: Any) -> bytes:
    """Return the signed result of job ``job`` of the bench task, as a job seals it."""
    header = {
        "kind": "result",
        "workflow": workflow_id,
        "task": TASK,
        "job": job,
        "attempt": 0,
        "status": "ok",
    }
    return seal(header, cloudpickle.dumps(value), key)


_JOB_IDS = itertools.count()


class Publisher:
    """Publishes results into one workflow the way a job does, and times their arrival."""

    def __init__(self, wf: Workflow) -> None:
        self.wf = wf
        # Only what delivery reads is real: no job runs on this spec.
        self.spec = JobSpec(
            workflow=wf.id,
            task=TASK,
            job=0,
            cache=wf.parts.cache.location,  # type: ignore[union-attr]
            payload={},
            result_url=f"{wf.service_url}/results/{wf.id}",
            publish_timeout=30,
            stomp=wf.options.stomp_spec(wf.id),
            result_inline_bytes=1 << 20,
        )
        self.secrets: dict[str, Any] = {
            "key": wf.parts.key,
            "token": wf.parts.token,
            "broker_user": USER,
            "broker_password": PASSWORD,
        }
        self._jobs = _JOB_IDS  # shared: the collector drops a (task, job) it saw before
        self._lock = threading.Lock()
        self.sent = 0
        self.delivered_by: dict[str, int] = {}
        self.futures: dict[int, AsyncResult] = {}

    def register(self, count: int, on_done: Any = None) -> list[tuple[int, dict[str, float]]]:
        """Register ``count`` futures of new job ids; return each id with its timing slot.

        The slot's ``received`` is set by the future's callback, in the collector's
        thread; ``on_done(job)`` is called after that.
        """
        with self._lock:
            jobs = [next(self._jobs) for _ in range(count)]
        out = []
        for job in jobs:
            slot: dict[str, float] = {}
            future = AsyncResult(TASK, job)

            def done(_fut: AsyncResult, slot: dict[str, float] = slot, job: int = job) -> None:
                slot["received"] = time.perf_counter()
                if on_done is not None:
                    on_done(job)

            future.add_done_callback(done)
            self.futures[job] = future
            self.wf.tracker.add_task(TASK, "publish", [future])
            out.append((job, slot))
        return out

    def publish(self, job: int, slot: dict[str, float], value: Any = None) -> None:
        """Seal and deliver the result of ``job``; record send time and time in deliver."""
        envelope = result_envelope(
            self.wf.id, job, self.wf.parts.key, value if value is not None else job
        )
        slot["sent"] = time.perf_counter()
        channel = deliver(envelope, self.spec, self.secrets)
        slot["delivered"] = time.perf_counter()
        with self._lock:
            self.sent += 1
            self.delivered_by[channel] = self.delivered_by.get(channel, 0) + 1


def measure_latency(pub: Publisher, count: int) -> tuple[list[float], list[float]]:
    """Publish ``count`` results one at a time; return latencies and times in deliver (s)."""
    latencies, publish_times = [], []
    for _ in range(count):
        arrived = threading.Event()
        ((job, slot),) = pub.register(1, on_done=lambda _job, ev=arrived: ev.set())
        pub.publish(job, slot)
        if not arrived.wait(WAIT_SECONDS):
            raise RuntimeError(f"result {job} did not arrive within {WAIT_SECONDS:g} s")
        latencies.append(slot["received"] - slot["sent"])
        publish_times.append(slot["delivered"] - slot["sent"])
    return latencies, publish_times


def measure_throughput(
    pub: Publisher, count: int, threads: int
) -> tuple[float, list[float], list[float]]:
    """Publish ``count`` results from ``threads`` threads at once.

    Returns results/s (count / first send to last callback), the latencies and
    the times in deliver.
    """
    remaining = [count]
    lock = threading.Lock()
    all_done = threading.Event()

    def done(_job: int) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                all_done.set()

    slots = pub.register(count, on_done=done)
    queue = iter(slots)
    errors: list[BaseException] = []

    def worker() -> None:
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                return
            try:
                pub.publish(*item)
            except BaseException as exc:  # report after the run instead of hanging
                errors.append(exc)
                all_done.set()
                return

    workers = [threading.Thread(target=worker, name=f"publisher-{n}") for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} publishes failed; first: {errors[0]!r}")
    if not all_done.wait(WAIT_SECONDS):
        raise RuntimeError(f"{remaining[0]} of {count} results did not arrive")
    first = min(slot["sent"] for _, slot in slots)
    last = max(slot["received"] for _, slot in slots)
    latencies = [slot["received"] - slot["sent"] for _, slot in slots]
    publish_times = [slot["delivered"] - slot["sent"] for _, slot in slots]
    return count / (last - first), latencies, publish_times


def run_channel(name: str, wf: Workflow, args: argparse.Namespace) -> ChannelResult:
    """Warm up, then measure latency and throughput through one open workflow."""
    pub = Publisher(wf)
    result = ChannelResult(name)
    measure_latency(pub, WARMUP)  # connections, imports, JIT in the broker
    result.latencies, result.publish_times = measure_latency(pub, args.latency_messages)
    result.rate, result.throughput_latencies, result.throughput_publish_times = measure_throughput(
        pub, args.messages, args.threads
    )
    time.sleep(0.5)  # let any late duplicate land before reading the counters
    result.sent = pub.sent
    result.stats = dict(wf.stats)
    result.delivered_by = dict(pub.delivered_by)
    return result


# --------------------------------------------------------------- fan-in: many publishers


def _fanin_child(pipe: Any, go: Any) -> None:
    """One publisher process: keep one connection, publish its jobs' results when told.

    Gets ``(spec JSON, secrets, key, jobs)`` over ``pipe`` (never on a command
    line), delivers the first job's result to open its connection, says
    ``ready``, waits for ``go``, delivers the rest and sends back, per job,
    ``(job, sent, delivered, channel)`` (``perf_counter`` is the system's
    monotonic clock: comparable across processes).
    """
    try:
        spec_json, secrets, key, jobs = pipe.recv()
        spec = JobSpec.from_json(spec_json)
        keep_stomp_connections()
        first, *rest = jobs
        deliver(result_envelope(spec.workflow, first, key, first), spec, secrets)
        pipe.send("ready")
        go.wait()
        times = []
        for job in rest:
            envelope = result_envelope(spec.workflow, job, key, job)
            sent = time.perf_counter()
            channel = deliver(envelope, spec, secrets)
            times.append((job, sent, time.perf_counter(), channel))
        pipe.send(times)
    except BaseException as exc:  # the parent reports it
        pipe.send(f"publisher failed: {exc!r}")
    finally:
        close_stomp_connections()


class PublisherPool:
    """``count`` publisher processes, forked while this process has no other thread."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("fork")
        self.go = context.Event()
        self.pipes: list[Any] = []
        self.processes: list[Any] = []
        for n in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_fanin_child, args=(theirs, self.go), name=f"publisher-{n}", daemon=True
            )
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)

    def close(self) -> None:
        """Wait a little for the publishers to exit, then kill what is left."""
        for process in self.processes:
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join()


@dataclass
class FanInResult:
    """What the fan-in measured."""

    publishers: int
    messages: int
    rate: float
    latencies: list[float]
    publish_times: list[float]
    channels: dict[str, int]
    wrong_values: int
    lost: int
    received: int
    rejected: int


def measure_fanin(pub: Publisher, pool: PublisherPool, per_publisher: int) -> FanInResult:
    """Have every process of ``pool`` publish ``per_publisher`` results (after one to
    connect) into ``pub``'s workflow at once; check every value."""
    count = len(pool.pipes)
    total = count * (per_publisher + 1)
    arrived = threading.Semaphore(0)
    before = dict(pub.wf.stats)
    slots = pub.register(total, on_done=lambda _job: arrived.release())
    jobs = [job for job, _ in slots]
    spec_json = pub.spec.to_json()
    for n, pipe in enumerate(pool.pipes):
        mine = jobs[n * (per_publisher + 1) : (n + 1) * (per_publisher + 1)]
        pipe.send((spec_json, pub.secrets, pub.wf.parts.key, mine))
    for pipe in pool.pipes:
        answer = pipe.recv()
        if answer != "ready":
            raise RuntimeError(answer)
    for _ in range(count):  # the connecting results are in: every connection is open
        if not arrived.acquire(timeout=WAIT_SECONDS):
            raise RuntimeError("a publisher's first result did not arrive")
    pool.go.set()
    sent: dict[int, tuple[float, float]] = {}
    channels: dict[str, int] = {}
    for pipe in pool.pipes:
        answer = pipe.recv()
        if isinstance(answer, str):
            raise RuntimeError(answer)
        for job, start, delivered, channel in answer:
            sent[job] = (start, delivered)
            channels[channel] = channels.get(channel, 0) + 1
    deadline = time.monotonic() + WAIT_SECONDS
    for _ in range(len(sent)):
        if not arrived.acquire(timeout=max(0.0, deadline - time.monotonic())):
            break  # the missing ones are counted lost below
    by_job = dict(slots)
    settled = [job for job in sent if "received" in by_job[job]]
    lost = len(sent) - len(settled)
    wrong = sum(1 for job in settled if pub.futures[job].result() != job)
    wrong += sum(1 for job in jobs if job not in sent and pub.futures[job].result() != job)
    first = min(start for start, _ in sent.values())
    last = max(by_job[job]["received"] for job in settled)
    after = dict(pub.wf.stats)
    return FanInResult(
        publishers=count,
        messages=len(sent),
        rate=len(settled) / (last - first),
        latencies=[by_job[job]["received"] - sent[job][0] for job in settled],
        publish_times=[delivered - start for start, delivered in sent.values()],
        channels=channels,
        wrong_values=wrong,
        lost=lost,
        received=after.get("received", 0) - before.get("received", 0),
        rejected=after.get("rejected", 0) - before.get("rejected", 0),
    )


# ------------------------------------------------------- the hop against the broker's own


class BareRoundTrip:
    """The broker's own round trip: a bare stomp.py sender and subscriber on one queue."""

    QUEUE = "/queue/bench-bare-round-trip"

    def __init__(self, hosts: list[tuple[str, int]]) -> None:
        import stomp

        self._arrived = threading.Event()
        self.received_at = 0.0
        self._receipts: set[str] = set()
        self._receipt = threading.Condition()
        outer = self

        class Listener(stomp.ConnectionListener):
            def __init__(self, conn: Any) -> None:
                self.conn = conn

            def on_message(self, frame: Any) -> None:
                outer.received_at = time.perf_counter()
                self.conn.ack(frame.headers["ack"])  # after handling, as the caller does
                outer._arrived.set()

            def on_receipt(self, frame: Any) -> None:
                with outer._receipt:
                    outer._receipts.add(frame.headers.get("receipt-id", ""))
                    outer._receipt.notify_all()

        self.receiver = stomp.Connection12(hosts, heartbeats=(2000, 2000), auto_decode=False)
        self.receiver.set_listener("bare", Listener(self.receiver))
        self.receiver.connect(USER, PASSWORD, wait=True)
        self.receiver.subscribe(
            self.QUEUE,
            id="bare",
            ack="client-individual",
            headers={"activemq.prefetchSize": "1000"},
        )
        self.sender = stomp.Connection12(hosts, auto_decode=False)
        self.sender.set_listener("bare", Listener(self.sender))
        self.sender.connect(USER, PASSWORD, wait=True)
        self._count = itertools.count()

    def once(self, body: bytes) -> float:
        """Send ``body`` (persistent, with a receipt) and return the seconds until it arrived."""
        self._arrived.clear()
        receipt = f"bare-{next(self._count)}"
        start = time.perf_counter()
        self.sender.send(self.QUEUE, body=body, headers={"persistent": "true", "receipt": receipt})
        if not self._arrived.wait(WAIT_SECONDS):
            raise RuntimeError("a bare message did not arrive")
        took = self.received_at - start
        with self._receipt:
            if not self._receipt.wait_for(lambda: receipt in self._receipts, WAIT_SECONDS):
                raise RuntimeError("no receipt for a bare message")
            self._receipts.discard(receipt)
        return took

    def close(self) -> None:
        """Disconnect both connections."""
        for conn in (self.sender, self.receiver):
            conn.disconnect()


@dataclass
class HopResult:
    """The hop over the broker, ours and bare, in seconds."""

    bare: list[float] = field(default_factory=list)
    to_receive: list[float] = field(default_factory=list)
    to_settled: list[float] = field(default_factory=list)
    publish: list[float] = field(default_factory=list)


def measure_hop(pub: Publisher, hosts: list[tuple[str, int]], count: int) -> HopResult:
    """Time ``count`` results on a kept connection, one at a time, interleaved with bare
    round trips of a message of the same size."""
    subscriber = pub.wf.parts.subscriber
    assert subscriber is not None
    handle = subscriber.on_message
    received = [0.0]

    def timed(body: bytes) -> None:
        received[0] = time.perf_counter()  # the caller's receive, before it verifies
        handle(body)

    subscriber.on_message = timed
    bare = BareRoundTrip(hosts)
    keep_stomp_connections()  # as a warm worker: one connection for all its results
    result = HopResult()
    try:
        for n in range(WARMUP + count):
            arrived = threading.Event()
            ((job, slot),) = pub.register(1, on_done=lambda _job, ev=arrived: ev.set())
            envelope = result_envelope(pub.wf.id, job, pub.wf.parts.key, job)
            start = time.perf_counter()
            if deliver(envelope, pub.spec, pub.secrets) != "stomp":
                raise RuntimeError("a result went over REST: the broker did not take it")
            delivered = time.perf_counter()
            if not arrived.wait(WAIT_SECONDS):
                raise RuntimeError(f"result {job} did not arrive")
            took_bare = bare.once(envelope)
            if n < WARMUP:
                continue
            result.bare.append(took_bare)
            result.to_receive.append(received[0] - start)
            result.to_settled.append(slot["received"] - start)
            result.publish.append(delivered - start)
    finally:
        close_stomp_connections()
        bare.close()
        subscriber.on_message = handle
    return result


def run_stomp(
    base: Path,
    broker: ActiveMQBroker,
    args: argparse.Namespace,
    pool: PublisherPool | None,
) -> tuple[ChannelResult | None, FanInResult | None, HopResult | None]:
    """Open a workflow on ``broker``; measure the parts asked for through it."""
    with Workflow(
        "bench-stomp",
        work_dir=base / "stomp",
        broker=broker.url,
        broker_user=USER,
        broker_password=PASSWORD,
    ) as wf:
        deadline = time.monotonic() + 30.0
        while not (wf.parts.subscriber is not None and wf.parts.subscriber.up):
            if time.monotonic() > deadline:
                raise RuntimeError("the STOMP subscription did not come up within 30 s")
            time.sleep(0.02)
        channel = run_channel("STOMP", wf, args) if "channels" in args.parts else None
        hop = fanin = None
        if "hop" in args.parts:
            print("hop ...", file=sys.stderr, flush=True)
            hop = measure_hop(Publisher(wf), broker.host_and_ports, args.hop_messages)
        if pool is not None:
            print(f"fan-in from {len(pool.pipes)} publishers ...", file=sys.stderr, flush=True)
            per = max(1, args.fanin_messages // len(pool.pipes))
            fanin = measure_fanin(Publisher(wf), pool, per)
        return channel, fanin, hop


def stomp_report(fanin: FanInResult | None, hop: HopResult | None) -> bool:
    """Print the fan-in and hop figures; return whether the checks passed."""
    ms = 1000.0
    ok = True
    if hop is not None:
        q = _quantile
        print(
            f"\nhop over the broker, {len(hop.bare)} messages one at a time (ms): "
            f"{'p50':>7} {'p95':>7}"
        )
        rows = [
            ("bare stomp.py send -> receive", hop.bare),
            ("result publish -> caller receives", hop.to_receive),
            ("result publish -> future settled", hop.to_settled),
            ("deliver() returns (receipts)", hop.publish),
        ]
        for name, values in rows:
            print(f"  {name:<44} {q(values, 0.5) * ms:>7.3f} {q(values, 0.95) * ms:>7.3f}")
        for name, values in rows[1:3]:
            extra50 = (q(values, 0.5) - q(hop.bare, 0.5)) * ms
            extra95 = (q(values, 0.95) - q(hop.bare, 0.95)) * ms
            verdict = "met" if extra50 <= 0.5 else "missed"
            print(
                f"  {name}: {extra50:+.3f} ms at p50, {extra95:+.3f} ms at p95 "
                f"over the bare round trip (goal: within 0.5 ms: {verdict} at p50)"
            )
    if fanin is not None:
        print(
            f"\nfan-in: {fanin.publishers} publisher processes, one kept connection each, "
            f"{fanin.messages} results: {fanin.rate:.0f} results/s received and verified; "
            f"latency p50 {_quantile(fanin.latencies, 0.5) * ms:.1f} ms, "
            f"p95 {_quantile(fanin.latencies, 0.95) * ms:.1f} ms; deliver() p50 "
            f"{_quantile(fanin.publish_times, 0.5) * ms:.1f} ms; channels {fanin.channels}; "
            f"lost {fanin.lost}, wrong values {fanin.wrong_values}, "
            f"collector received {fanin.received} (with {fanin.publishers} to connect), "
            f"rejected {fanin.rejected}"
        )
        expected = fanin.messages + fanin.publishers
        if fanin.lost or fanin.wrong_values or fanin.rejected or fanin.received != expected:
            ok = False
            print(f"  !! fan-in: expected 0 lost, 0 wrong, 0 rejected, {expected} received")
    return ok


def run_rest(base: Path, args: argparse.Namespace) -> ChannelResult:
    with Workflow("bench-rest", work_dir=base / "rest") as wf:
        if wf.options.stomp_spec(wf.id) is not None:
            raise RuntimeError("the REST workflow has a broker configured (IDDS_FAT_BROKER?)")
        return run_channel("REST", wf, args)


def report(results: list[ChannelResult], args: argparse.Namespace) -> bool:
    """Print the table, ratios and sanity checks; return whether the checks passed."""
    ms = 1000.0
    print()
    print(
        f"latency: {args.latency_messages} sequential publishes; throughput: "
        f"{args.messages} messages from {args.threads} threads"
    )
    header = f"{'channel':<8} {'p50 ms':>9} {'p99 ms':>9} {'publish p50 ms':>15} {'results/s':>10}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.name:<8} {_quantile(r.latencies, 0.5) * ms:>9.2f} "
            f"{_quantile(r.latencies, 0.99) * ms:>9.2f} "
            f"{_quantile(r.publish_times, 0.5) * ms:>15.2f} {r.rate:>10.1f}"
        )
    by = {r.name: r for r in results}
    if "STOMP" in by and "REST" in by:
        s, r = by["STOMP"], by["REST"]

        def ratio(a: float, b: float) -> str:
            return f"{a / b:.2f}x" if b else "n/a"

        s_pub = _quantile(s.publish_times, 0.5)
        print(
            "REST/STOMP: "
            f"p50 {ratio(_quantile(r.latencies, 0.5), _quantile(s.latencies, 0.5))}, "
            f"p99 {ratio(_quantile(r.latencies, 0.99), _quantile(s.latencies, 0.99))}, "
            f"publish p50 {ratio(_quantile(r.publish_times, 0.5), s_pub)}, "
            f"results/s {ratio(r.rate, s.rate)}"
        )
    print()
    ok = True
    for r in results:
        tp50 = _quantile(r.throughput_latencies, 0.5) * ms
        tpub = _quantile(r.throughput_publish_times, 0.5) * ms
        print(
            f"{r.name}: under load latency p50 {tp50:.2f} ms, publish p50 {tpub:.2f} ms; "
            f"sent {r.sent} (delivered via {r.delivered_by}); stats {r.stats}"
        )
        # A duplicate is not an error: the collector's REST long poll that was open
        # before STOMP came up returns the service's mirror copy of the first result,
        # and the collector drops it.
        if r.stats.get("received") != r.sent or r.stats.get("rejected"):
            ok = False
            print(f"  !! {r.name}: expected received == {r.sent} and 0 rejected")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="throughput messages")
    parser.add_argument("--latency-messages", type=int, default=300, help="sequential messages")
    parser.add_argument("--threads", type=int, default=4, help="publisher threads")
    parser.add_argument("--publishers", type=int, default=200, help="fan-in processes")
    parser.add_argument("--fanin-messages", type=int, default=10000, help="fan-in results")
    parser.add_argument("--hop-messages", type=int, default=500, help="hop messages of each")
    parser.add_argument(
        "--parts",
        default="channels,fanin,hop",
        help="comma-separated: channels (STOMP vs REST), fanin, hop",
    )
    args = parser.parse_args()
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}

    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"cores: {os.cpu_count()}, load average {[round(x, 2) for x in os.getloadavg()]}")
    if not ActiveMQBroker.available():
        sys.exit("ActiveMQ is not installed; cannot measure the STOMP channel")

    # Forked first, while this process runs no other thread (a fork copies no threads
    # but every lock they held).
    pool = PublisherPool(args.publishers) if "fanin" in args.parts else None
    results: list[ChannelResult] = []
    try:
        with tempfile.TemporaryDirectory(prefix="idds-fat-bench-") as tmp:
            base = Path(tmp)
            began = time.perf_counter()
            broker = ActiveMQBroker(base / "broker", users={USER: PASSWORD})
            broker.start()
            try:
                print(f"broker: {broker.url} up in {time.perf_counter() - began:.1f} s")
                channel, fanin, hop = run_stomp(base, broker, args, pool)
            finally:
                broker.stop()
            if channel is not None:
                results.append(channel)
                results.append(run_rest(base, args))
    finally:
        if pool is not None:
            pool.close()
    ok = report(results, args) if results else True
    ok = stomp_report(fanin, hop) and ok
    print(f"load average at end: {[round(x, 2) for x in os.getloadavg()]}")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
