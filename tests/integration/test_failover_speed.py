"""Failover speed with the default health settings, and an honest /readyz.

Black-box: real Kafka, real InfluxDB, the router as a process with a topology that leaves
``health:``, the clusters' write settings and the batch settings at their defaults. A hung
primary is the InfluxDB process itself SIGSTOPped (the kernel still accepts its connections,
nothing answers), reached through Toxiproxy as in every other test. Times are wall-clock:
the moment of the signal in the test, the router's JSON events (same host clock), and the
first point a poll of the standby finds. Figures are printed for ``pytest -s``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import stack
from devstack.toxiproxy import Toxiproxy
from router.engine import EMPTY_ASSIGNMENT_GRACE
from tests.integration.harness import RouterProc, Scenario, new_tag, wait_paused, write_yaml
from tests.integration.test_replicas import SteadyProducer
from tests.support import wait_until

pytestmark = pytest.mark.integration

ROUTE = "r"
RATE = 400  # points a second, one point per message
DOWN_WITHIN = 3.0  # the bounds, seconds after the hang began
STANDBY_WITHIN = 4.0


def at(event: dict[str, Any]) -> float:
    """The wall-clock time of a router event (its ISO ``timestamp``)."""
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


class Speed:
    """One test's world: a topic, routers with default settings, influx-a to freeze."""

    def __init__(self, env: dict[str, str], tmp: Path, partitions: int = 4) -> None:
        self.sc = Scenario(env, new_tag(), partitions=partitions)
        self.sc.create_topic()
        self.tmp = tmp
        self.routers: list[RouterProc] = []
        self.producers: list[SteadyProducer] = []
        self.frozen: list[int] = []

    def topology(self) -> dict[str, Any]:
        """influx-a primary, influx-b standby; health, write and batch settings at defaults."""
        doc = self.sc.topology()
        del doc["health"]
        for cluster in doc["clusters"].values():
            del cluster["write_timeout"], cluster["max_retries"]
        route = doc["routes"][0]
        del route["batch"]
        route["handback_lag"] = RATE  # one second of production (commits trail a little)
        return doc

    def router(self, name: str, doc: dict[str, Any] | None = None) -> RouterProc:
        """A router process, not started, with its own topology file (each ``topology()``
        has a free listen port of its own)."""
        doc = doc or self.topology()
        router = RouterProc(write_yaml(self.tmp / f"{name}.yaml", doc), self.tmp, name)
        self.routers.append(router)
        return router

    def produce(self) -> SteadyProducer:
        producer = SteadyProducer(self.sc, RATE).start()
        self.producers.append(producer)
        return producer

    def freeze(self, cluster: str) -> tuple[float, Callable[[], float]]:
        """SIGSTOP the InfluxDB process; returns when, and a function that SIGCONTs it and
        returns when."""
        pid = stack.pid_of(f"influx-{cluster}")
        assert pid is not None, f"influx-{cluster} is not running"
        self.frozen.append(pid)
        stopped = time.time()
        os.kill(pid, signal.SIGSTOP)

        def thaw() -> float:
            os.kill(pid, signal.SIGCONT)
            self.frozen.remove(pid)
            return time.time()

        return stopped, thaw

    def close(self) -> None:
        for pid in self.frozen:
            os.kill(pid, signal.SIGCONT)
        for producer in self.producers:
            producer.stop()
        for router in self.routers:
            if router.proc is not None and router.proc.poll() is None:
                router.stop()
        self.sc.close()


@pytest.fixture
def speed(stack_env: dict[str, str], toxiproxy: Toxiproxy, tmp_path: Path) -> Iterator[Speed]:
    w = Speed(stack_env, tmp_path)
    yield w
    w.close()


def first_point_time(sc: Scenario, cluster: str, timeout: float) -> float:
    """Poll the cluster every 50 ms; the wall-clock time its first point was seen."""
    return wait_until(
        lambda: time.time() if sc.count(cluster) > 0 else 0.0,
        timeout=timeout,
        interval=0.05,
        what=f"a first point in influx-{cluster}",
    )


def cluster_events(router: RouterProc, cluster: str, to_state: str) -> list[dict[str, Any]]:
    return [
        e
        for e in router.events("cluster_state")
        if e["cluster"] == cluster and e["to_state"] == to_state
    ]


def wait_all_in_primary(w: Speed, router: RouterProc, total: int) -> None:
    """Every produced point is in influx-a and its group committed to the end."""
    w.sc.wait_count("a", total, timeout=90)
    w.sc.wait_committed_to_end(ROUTE, "a")
    assert w.sc.values("a") == set(range(total))


def test_hung_primary_is_down_within_3s_and_the_standby_writes_within_4s(speed: Speed) -> None:
    """With default settings, a SIGSTOPped primary is DOWN within 3 s and the standby's first
    point lands within 4 s of the stop; after SIGCONT the primary replays everything it missed
    and the standby hands back: nothing is lost."""
    sc = speed.sc
    router = speed.router("router").start()
    producer = speed.produce()
    wait_until(lambda: sc.count("a") >= RATE, timeout=30, what="steady writes to influx-a")
    assert sc.count("b") == 0

    stopped, thaw = speed.freeze("a")
    first_b = first_point_time(sc, "b", timeout=30)
    down = wait_until(
        lambda: cluster_events(router, "influx-a", "down"), timeout=10, what="influx-a DOWN"
    )[0]
    failover = wait_until(lambda: router.events("failover"), timeout=10, what="a failover")[0]
    thawed = thaw()

    wait_until(lambda: router.events("handback"), timeout=90, what="the hand-back")
    total = producer.stop()
    wait_all_in_primary(speed, router, total)
    wait_paused(router, ROUTE, "b", timeout=30)

    down_after, standby_after = at(down) - stopped, first_b - stopped
    print(
        f"\nhung primary: DOWN after {down_after:.2f}s, failover event after "
        f"{at(failover) - stopped:.2f}s, first standby point seen after {standby_after:.2f}s "
        f"(stopped for {thawed - stopped:.1f}s); reason: {down['reason']}"
    )
    assert down_after <= DOWN_WITHIN
    assert standby_after <= STANDBY_WITHIN
    assert "no good answer for 2.5s" in down["reason"]
    assert (failover["from_cluster"], failover["to_cluster"]) == ("influx-a", "influx-b")
    assert len(cluster_events(router, "influx-a", "down")) == 1  # no flapping
    assert router.stop() == 0


def test_one_second_pauses_cause_no_failover(speed: Speed) -> None:
    """1 s stops of the primary (a GC-like pause), 4 s apart: three under steady writes, two
    more once it is idle (only probes then: its last good answer can be a whole interval
    older). No DOWN, no failover, nothing in the standby, no failed batch, every point in the
    primary."""
    sc = speed.sc
    router = speed.router("router").start()
    producer = speed.produce()
    wait_until(lambda: sc.count("a") >= RATE, timeout=30, what="steady writes to influx-a")

    def pause() -> float:
        stopped, thaw = speed.freeze("a")
        threading.Event().wait(1.0)  # the pause itself
        took = thaw() - stopped
        threading.Event().wait(4.0)  # longer than down_after: a late DOWN would show
        return took

    busy = [pause() for _ in range(3)]
    total = producer.stop()
    wait_all_in_primary(speed, router, total)
    idle = [pause() for _ in range(2)]

    shown = ", ".join(f"{p:.2f}s" for p in busy + idle)
    print(f"\npauses of {shown} (3 under writes, 2 idle): no failover")
    assert all(p >= 1.0 for p in busy + idle)
    assert cluster_events(router, "influx-a", "down") == []
    assert [e for e in router.events("node_state") if e["to_state"] == "down"] == []
    assert router.events("failover") == []
    assert sc.count("b") == 0
    assert router.metric("frouter_failovers_total") == 0
    assert router.metric("frouter_batch_failures_total", cluster="influx-a") == 0
    assert router.stop() == 0


# --- /readyz ---------------------------------------------------------------------------------


def watch_readiness(router: RouterProc, until: float) -> list[tuple[float, int, str]]:
    """Start the router and poll its /readyz every 20 ms until the first 200 (or ``until``
    seconds): (wall time, status, body); 0 while nothing listens yet."""
    starter = threading.Thread(target=router.start, name=f"start-{router.log_path.stem}")
    starter.start()
    seen: list[tuple[float, int, str]] = []
    deadline = time.monotonic() + until
    with httpx.Client(timeout=1) as client:
        while time.monotonic() < deadline:
            try:
                resp = client.get(f"{router.url}/readyz")
                seen.append((time.time(), resp.status_code, resp.text))
                if resp.status_code == 200:
                    break
            except httpx.HTTPError:
                seen.append((time.time(), 0, ""))
            time.sleep(0.02)
    starter.join(60)
    return seen


def assigned(router: RouterProc) -> dict[str, int]:
    """Partitions assigned to each destination of the route on this replica."""
    route = next(r for r in router.status()["routes"] if r["name"] == ROUTE)
    return {d["cluster"]: int(d["assigned"]) for d in route["destinations"]}


def test_restarted_replica_is_ready_only_once_it_holds_its_partitions(speed: Speed) -> None:
    """Two replicas of one route; the second restarts: its /readyz answers 503 with the reason
    until its membership owns its share and both its destinations are assigned it, then 200;
    at that moment its status shows the partitions assigned."""
    sc = speed.sc
    producer = speed.produce()
    r1 = speed.router("r1", speed.topology()).start()
    r2 = speed.router("r2", speed.topology()).start()
    wait_until(
        lambda: assigned(r1) == {"influx-a": 2, "influx-b": 2} == assigned(r2),
        timeout=30,
        what="2 partitions on each replica",
    )
    assert r2.stop() == 0
    wait_until(
        lambda: assigned(r1) == {"influx-a": 4, "influx-b": 4}, timeout=30, what="r1 holds all"
    )

    r2 = speed.router("r2-again", speed.topology())
    started = time.time()
    seen = watch_readiness(r2, until=45)
    ready_at, code, _ = seen[-1]
    held_at_ready = assigned(r2)

    before = seen[:-1]
    owned = [at(e) for e in r2.events("partitions_owned") if int(e["owned"]) > 0]
    dest_assigned = {
        e["cluster"]: at(e)
        for e in r2.events("partitions_assigned")
        if int(e["partitions"]) == 2  # its share, once each destination took it
    }
    print(
        f"\nrestarted replica: HTTP up after {next(t for t, c, _ in seen if c) - started:.2f}s, "
        f"partitions owned after {owned[0] - started if owned else float('nan'):.2f}s, ready "
        f"after {ready_at - started:.2f}s; {len([c for _, c, _ in before if c == 503])} "
        f"answers 503 before, e.g. {next((b.strip() for _, c, b in before if c == 503), '')!r}"
    )
    assert code == 200
    assert held_at_ready == {"influx-a": 2, "influx-b": 2}
    assert any(c == 503 for _, c, _ in before)
    assert all(c in (0, 503) and (c == 0 or b.startswith("not ready: ")) for _, c, b in before)
    assert owned and owned[0] <= ready_at
    assert set(dest_assigned) == {"influx-a", "influx-b"}
    assert max(dest_assigned.values()) <= ready_at
    total = producer.stop()
    sc.wait_count("a", total, timeout=90)
    assert sc.values("a") == set(range(total))


def test_replica_without_partitions_is_ready_once_its_empty_assignment_stands(
    stack_env: dict[str, str], toxiproxy: Toxiproxy, tmp_path: Path
) -> None:
    """One partition, two replicas: the second gets an empty assignment and is ready once it
    has stood for the grace (it could have been the first round of a cooperative rebalance),
    holding nothing, while the first keeps the partition."""
    w = Speed(stack_env, tmp_path, partitions=1)
    try:
        r1 = w.router("r1", w.topology()).start()
        r2 = w.router("r2", w.topology())
        started = time.time()
        seen = watch_readiness(r2, until=45)
        ready_at, code, _ = seen[-1]

        empty = [e for e in r2.events("partitions_owned") if int(e["owned"]) == 0]
        print(
            f"\nreplica without partitions: empty assignment after {at(empty[0]) - started:.2f}s,"
            f" ready after {ready_at - started:.2f}s"
        )
        assert code == 200
        assert assigned(r2) == {"influx-a": 0, "influx-b": 0}
        assert assigned(r1) == {"influx-a": 1, "influx-b": 1}
        assert ready_at - at(empty[0]) >= EMPTY_ASSIGNMENT_GRACE - 0.5
        assert any("is empty so far" in body for _, _, body in seen)
    finally:
        w.close()
