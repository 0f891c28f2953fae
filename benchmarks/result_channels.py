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

    .venv/bin/python benchmarks/result_channels.py [--messages 1000] \
        [--latency-messages 300] [--threads 4]
"""

from __future__ import annotations

import argparse
import itertools
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
from idds_fat.node.deliver import deliver
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
        self._jobs = itertools.count()
        self._lock = threading.Lock()
        self.sent = 0
        self.delivered_by: dict[str, int] = {}

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
            self.wf.tracker.add_task(TASK, "publish", [future])
            out.append((job, slot))
        return out

    def publish(self, job: int, slot: dict[str, float], value: Any = None) -> None:
        """Seal and deliver the result of ``job``; record send time and time in deliver."""
        header = {
            "kind": "result",
            "workflow": self.wf.id,
            "task": TASK,
            "job": job,
            "attempt": 0,
            "status": "ok",
        }
        envelope = seal(
            header, cloudpickle.dumps(value if value is not None else job), self.wf.parts.key
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


def run_stomp(base: Path, url: str, args: argparse.Namespace) -> ChannelResult:
    with Workflow(
        "bench-stomp",
        work_dir=base / "stomp",
        broker=url,
        broker_user=USER,
        broker_password=PASSWORD,
    ) as wf:
        deadline = time.monotonic() + 30.0
        while not (wf.parts.subscriber is not None and wf.parts.subscriber.up):
            if time.monotonic() > deadline:
                raise RuntimeError("the STOMP subscription did not come up within 30 s")
            time.sleep(0.02)
        return run_channel("STOMP", wf, args)


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
    args = parser.parse_args()

    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"cores: {os.cpu_count()}")
    if not ActiveMQBroker.available():
        sys.exit("ActiveMQ is not installed; cannot measure the STOMP channel")

    results: list[ChannelResult] = []
    with tempfile.TemporaryDirectory(prefix="idds-fat-bench-") as tmp:
        base = Path(tmp)
        began = time.perf_counter()
        broker = ActiveMQBroker(base / "broker", users={USER: PASSWORD})
        broker.start()
        try:
            print(f"broker: {broker.url} up in {time.perf_counter() - began:.1f} s")
            results.append(run_stomp(base, broker.url, args))
        finally:
            broker.stop()
        results.append(run_rest(base, args))
    if not report(results, args):
        sys.exit(1)


if __name__ == "__main__":
    main()
