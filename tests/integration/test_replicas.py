"""Several router processes of one route, and a write path that fails in an unexpected way.

Black-box: real Kafka, real InfluxDB, real Toxiproxy, the router as a process; the tests look
only at what an operator can see (points in InfluxDB, committed offsets per group, /api/status,
the JSON events of the log). Figures (seconds to rebalance, to recover) are printed for ``-s``.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaException, Producer

from devstack.toxiproxy import Toxiproxy
from tests.integration.faulty_proxy import FaultyInfluxProxy
from tests.integration.harness import BASE_TS, RouterProc, Scenario, new_tag, write_yaml
from tests.support import wait_until

pytestmark = pytest.mark.integration

ROUTE = "r"
PARTITIONS = 6
SESSION_TIMEOUT = 10.0  # session.timeout.ms the router's consumers use (router/destination.py)


class Replicas:
    """One test's world: a 6-partition topic and the router processes started on it."""

    def __init__(self, env: dict[str, str], tmp: Path, toxiproxy: Toxiproxy) -> None:
        self.sc = Scenario(env, new_tag(), partitions=PARTITIONS)
        self.sc.create_topic()
        self.tmp = tmp
        self.toxiproxy = toxiproxy
        self.routers: list[RouterProc] = []
        self.closers: list[Callable[[], None]] = []

    def router(self, doc: dict[str, Any], name: str) -> RouterProc:
        """A router process (not started) with its own topology file and log."""
        router = RouterProc(write_yaml(self.tmp / f"{name}.yaml", doc), self.tmp, name)
        self.routers.append(router)
        return router

    def cut(self, cluster: str, cut: bool = True) -> None:
        self.toxiproxy.set_enabled(self.sc.env[f"INFLUX_{cluster.upper()}_PROXY_NAME"], not cut)

    def close(self) -> None:
        for closer in self.closers:
            closer()
        for router in self.routers:
            if router.proc is not None and router.proc.poll() is None:
                router.proc.kill()
                router.proc.wait(30)
        self.sc.close()


@pytest.fixture
def replicas(stack_env: dict[str, str], toxiproxy: Toxiproxy, tmp_path: Path) -> Iterator[Replicas]:
    w = Replicas(stack_env, tmp_path, toxiproxy)
    yield w
    w.close()


class SteadyProducer:
    """Produces ``rate`` messages a second, in 0.1 s ticks, until stopped.

    Message i is one point with value i, at partition i % P (offset i // P), exactly as
    ``Scenario.produce`` writes them, so ``Scenario.values`` tells which ones arrived.
    """

    def __init__(self, sc: Scenario, rate: int) -> None:
        self.sc = sc
        self.rate = rate
        self.produced = 0
        self.started = self.ended = 0.0
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-producer", daemon=True)

    def start(self) -> SteadyProducer:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        sc = self.sc
        producer = Producer({"bootstrap.servers": sc.bootstrap, "linger.ms": 5})
        per_tick = max(1, self.rate // 10)
        try:
            next_tick = time.monotonic()
            while not self._stop.is_set():
                for i in range(self.produced, self.produced + per_tick):
                    line = f"{sc.measurement},src=it value={i}i {BASE_TS + i}"
                    producer.produce(sc.topic, line.encode(), partition=i % sc.partitions)
                self.produced += per_tick
                producer.poll(0)
                next_tick += 0.1
                self._stop.wait(max(0.0, next_tick - time.monotonic()))  # pacing only
            if producer.flush(30) != 0:
                raise RuntimeError("messages left unsent after 30 s")
        except (KafkaException, BufferError, RuntimeError) as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> int:
        """Stop, flush, and return how many messages were produced (values 0..N-1)."""
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "producer did not stop"
        assert self.error is None, f"producer failed: {self.error!r}"
        self.ended = time.monotonic()
        return self.produced


def terminate(router: RouterProc, bound: float = 20.0) -> tuple[int, float]:
    """SIGTERM the router; return its exit code and the seconds it took (fails past bound)."""
    assert router.proc is not None
    started = time.monotonic()
    router.proc.send_signal(signal.SIGTERM)
    try:
        code = router.proc.wait(bound)
    except subprocess.TimeoutExpired:
        router.proc.kill()
        router.proc.wait(10)
        raise AssertionError(
            f"{router.log_path.name}: still running {bound}s after SIGTERM: {router.tail()}"
        ) from None
    return code, time.monotonic() - started


def dest(router: RouterProc, cluster: str) -> dict[str, Any]:
    return router.destination(ROUTE, cluster)


def spread(routers: list[RouterProc], cluster: str, *, active: bool) -> bool:
    """The cluster's partitions are split over every router, all live (or all paused)."""
    ds = [dest(r, cluster) for r in routers]
    if sum(d["assigned"] for d in ds) != PARTITIONS or any(d["assigned"] == 0 for d in ds):
        return False
    if active:
        return all(d["active"] and d["state"] == "active" and d["paused"] == 0 for d in ds)
    return all(not d["active"] and d["paused"] == d["assigned"] for d in ds)


def owns_all(router: RouterProc, cluster: str) -> bool:
    d = dest(router, cluster)
    return bool(d["assigned"] == PARTITIONS and d["paused"] == 0 and d["state"] == "active")


def stop_and_time_takeover(
    leaving: RouterProc, other: RouterProc, bound: float
) -> tuple[float, float]:
    """SIGTERM ``leaving``; seconds until it exited 0 and until ``other`` owned every partition
    of the primary, both within ``bound``."""
    assert leaving.proc is not None
    proc = leaving.proc
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    marks: dict[str, float] = {}

    def progress() -> bool:
        now = time.monotonic()
        if "exit" not in marks and proc.poll() is not None:
            marks["exit"] = now - sent
        if "takeover" not in marks and owns_all(other, "a"):
            marks["takeover"] = now - sent
        return len(marks) == 2

    try:
        wait_until(progress, timeout=bound, interval=0.1, what="exit and takeover")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {marks}\n{leaving.tail()}") from None
    assert proc.returncode == 0, leaving.tail()
    return marks["exit"], marks["takeover"]


def diagnose(rep: Replicas, routers: list[RouterProc], cluster: str, total: int) -> str:
    """What an operator would look at when points are missing: status, offsets, the gap."""
    sc = rep.sc
    missing = set(range(total)) - sc.values(cluster)
    by_partition: dict[int, int] = {}
    for i in missing:
        by_partition[i % sc.partitions] = by_partition.get(i % sc.partitions, 0) + 1
    committed = sc.committed(ROUTE, cluster)
    ends = sc.end_offsets()
    lines = [
        f"influx-{cluster}: {len(missing)} of {total} points missing, "
        f"by partition {dict(sorted(by_partition.items()))}",
        "committed vs end: "
        + ", ".join(f"p{p}={committed[tp]}/{ends[tp]}" for tp in sc.tps() for p in [tp[1]]),
    ]
    for r in routers:
        if r.proc is not None and r.proc.poll() is None:
            d = dest(r, cluster)
            keys = ("active", "state", "assigned", "paused", "in_flight", "lag", "error")
            lines.append(f"{r.log_path.stem} {cluster}: " + str({k: d.get(k) for k in keys}))
    return "\n".join(lines)


# --- 1. a replica dies while the standby is active on both ----------------------------------


@pytest.mark.parametrize("cut_when", ["cut-while-running", "cut-before-start"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_standby_keeps_every_point_when_a_replica_dies(
    replicas: Replicas, sig: signal.Signals, cut_when: str
) -> None:
    """With the primary down and the standby active on two routers, one router dies mid-stream:
    the standby still receives every point within the session timeout + 10 s, the survivor
    reads all 6 partitions, and the primary gets everything once it is back."""
    rep, sc = replicas, replicas.sc
    r1 = rep.router(sc.topology(), "r1")
    r2 = rep.router(sc.topology(), "r2")
    if cut_when == "cut-before-start":
        rep.cut("a")
    r1.start()
    # r1 holds all 6 partitions alone first (paused for the standby when the primary is up);
    # r2, the router that dies, joins after it.
    wait_until(lambda: dest(r1, "b")["assigned"] == PARTITIONS, timeout=30, what="r1 owns all")
    r2.start()
    if cut_when == "cut-while-running":
        wait_until(lambda: spread([r1, r2], "a", active=True), timeout=60, what="a on both")
        wait_until(lambda: spread([r1, r2], "b", active=False), timeout=30, what="b paused")
        rep.cut("a")
    t_cut = time.monotonic()
    wait_until(
        lambda: spread([r1, r2], "b", active=True),
        timeout=60,
        what="the standby active on both routers with partitions of its own",
    )
    print(f"\n[{cut_when}] standby active on both {time.monotonic() - t_cut:.1f}s after the cut")

    producer = SteadyProducer(sc, rate=2500).start()
    wait_until(lambda: producer.produced >= 20_000, timeout=30, what="8 s of production")
    t_kill = time.monotonic()
    if sig is signal.SIGKILL:
        r2.kill(signal.SIGKILL)
    else:
        code, seconds = terminate(r2)
        print(f"[{cut_when}] r2 exited {code} {seconds:.1f}s after SIGTERM")
        assert code == 0
    wait_until(
        lambda: owns_all(r1, "b"), timeout=SESSION_TIMEOUT + 20, what="r1's standby owns all 6"
    )
    print(f"[{cut_when}] r1's standby owns all 6: {time.monotonic() - t_kill:.1f}s after the kill")
    wait_until(lambda: producer.produced >= 60_000, timeout=60, what="~24 s of production")
    total = producer.stop()

    expected = set(range(total))
    deadline = producer.ended + SESSION_TIMEOUT + 10
    try:
        wait_until(
            lambda: sc.values("b") == expected,
            timeout=max(1.0, deadline - time.monotonic()),
            what=f"influx-b to hold all {total} points",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnose(rep, [r1], 'b', total)}") from None
    print(
        f"[{cut_when}] influx-b holds all {total} points "
        f"{time.monotonic() - producer.ended:.1f}s after production ended"
    )
    d = dest(r1, "b")
    assert (d["assigned"], d["paused"], d["state"]) == (PARTITIONS, 0, "active")
    sc.wait_committed_to_end(ROUTE, "b", timeout=15)  # the primary is still cut here

    rep.cut("a", False)
    t_back = time.monotonic()
    sc.wait_count("a", total, timeout=120)
    sc.wait_committed_to_end(ROUTE, "a", timeout=30)
    assert sc.values("a") == expected
    print(f"[{cut_when}] influx-a replayed all {total} in {time.monotonic() - t_back:.1f}s")


# --- 2. rolling restart while the primary is slow -------------------------------------------


@pytest.mark.parametrize(
    ("latency_ms", "write_timeout", "rate"),
    [(800, "1s", 1000), (5000, "8s", 200)],
    ids=["800ms-of-1s", "5s-of-8s"],
)
def test_rolling_restart_with_a_slow_primary_rebalances_in_seconds(
    replicas: Replicas, latency_ms: int, write_timeout: str, rate: int
) -> None:
    """Restarting two routers one after the other while every answer of the primary is slow
    (but within its write timeout): each SIGTERM exits 0 within 20 s, the other router owns
    every partition within 15 s, and the primary gets every point without a failover."""
    rep, sc = replicas, replicas.sc
    # slow, not down: the probes wait as long as a write may (Scenario's 500 ms would not)
    health = {"interval": "1s", "timeout": write_timeout, "fall": 3, "rise": 3}
    routers = []
    for name in ("r1", "r2"):
        doc = sc.topology()
        doc["health"] = health
        doc["clusters"]["influx-a"]["write_timeout"] = write_timeout
        routers.append(rep.router(doc, name))
    for r in routers:
        r.start()
    wait_until(lambda: spread(routers, "a", active=True), timeout=60, what="a on both")
    rep.toxiproxy.add_toxic(sc.env["INFLUX_A_PROXY_NAME"], "latency", {"latency": latency_ms})
    producer = SteadyProducer(sc, rate=rate).start()
    wait_until(lambda: sc.count("a") > 0, timeout=30, what="first slow writes")

    for leaving, other in ((routers[0], routers[1]), (routers[1], routers[0])):
        name = leaving.log_path.stem
        exit_s, takeover_s = stop_and_time_takeover(leaving, other, bound=20)
        figure = f"{name}: exit 0 after {exit_s:.1f}s, the other owns all {takeover_s:.1f}s"
        print(f"\n{figure}")
        assert takeover_s < 15, figure

        restarted = time.monotonic()
        leaving.start()
        wait_until(lambda: spread(routers, "a", active=True), timeout=30, what="a on both again")
        print(f"{name}: back, partitions spread again {time.monotonic() - restarted:.1f}s")
    total = producer.stop()

    t_end = time.monotonic()
    sc.wait_count("a", total, timeout=90)
    sc.wait_committed_to_end(ROUTE, "a", timeout=30)
    assert sc.values("a") == set(range(total))
    print(f"influx-a holds all {total} points {time.monotonic() - t_end:.1f}s after production")
    assert not [e for r in routers for e in r.events("failover")], "a slow primary failed over"
    for r in routers:
        code, seconds = terminate(r)
        print(f"{r.log_path.stem}: final SIGTERM exit {code} after {seconds:.1f}s")
        assert code == 0


# --- 3. a write that raises an exception the sink does not sort -----------------------------


def test_unexpected_write_exception_is_retried_not_a_stall(replicas: Replicas) -> None:
    """The first write answer is a 200 that claims gzip but is not (httpx.DecodingError, no
    transport error, escapes the sink): the router logs a failed batch with an `internal:`
    reason, writes it again, and every point lands with commits at the end offsets."""
    rep, sc = replicas, replicas.sc
    proxy = FaultyInfluxProxy(sc.url("a")).start()
    rep.closers.append(proxy.close)
    doc = sc.topology()
    doc["clusters"]["influx-a"]["urls"] = [proxy.url]
    router = rep.router(doc, "router").start()
    sc.produce(0, 2000)
    try:
        wait_until(lambda: sc.values("a") == set(range(2000)), timeout=30, what="all 2000 in a")
        sc.wait_committed_to_end(ROUTE, "a", timeout=20)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\nbroken answers: {proxy.broken}\n{diagnose(rep, [router], 'a', 2000)}"
        ) from None
    assert len(proxy.broken) == 1
    failed = router.events("batch_failed")
    assert any(str(e.get("reason", "")).startswith("internal:") for e in failed), failed
    assert router.events("failover") == []  # one odd answer is not a cluster outage
