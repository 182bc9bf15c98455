"""The control loop never waits on I/O: real Kafka, InfluxDB and Toxiproxy, the router as a
process.

- ``/api/status`` answers within 100 ms while the Kafka broker is frozen (SIGSTOP), and a
  failover is decided meanwhile;
- a route fails over on time while another route's reload waits for its old consumer, which is
  flushing to a slow cluster; the rebuilt route starts only after that consumer left its group,
  and no group's commit ever goes backwards.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from devstack import stack
from devstack.toxiproxy import Toxiproxy
from router.errors import SourceError
from router.kafka import KafkaAdmin
from router.offsets import TopicPart
from tests.integration.harness import RouterProc, Scenario, new_tag, write_yaml
from tests.support import wait_until

pytestmark = pytest.mark.integration

T = TypeVar("T")
FALL_WINDOW = 3 * 0.2  # health: fall 3 x interval 200 ms (Scenario.topology)


class World:
    def __init__(self, env: dict[str, str], tmp: Path, toxiproxy: Toxiproxy) -> None:
        self.env = env
        self.tmp = tmp
        self.toxiproxy = toxiproxy
        self.routers: list[RouterProc] = []
        self.scenarios: list[Scenario] = []
        self.frozen: int | None = None

    def scenario(self) -> Scenario:
        sc = Scenario(self.env, new_tag())
        sc.create_topic()
        self.scenarios.append(sc)
        return sc

    def start(self, doc: dict[str, Any]) -> RouterProc:
        path = write_yaml(self.tmp / "router.yaml", doc)
        router = RouterProc(path, self.tmp).start()
        self.routers.append(router)
        return router

    def freeze_kafka(self) -> None:
        pid = stack.pid_of("kafka")
        assert pid is not None
        self.frozen = pid
        os.kill(pid, signal.SIGSTOP)

    def thaw_kafka(self) -> None:
        if self.frozen is not None:
            os.kill(self.frozen, signal.SIGCONT)
            self.frozen = None

    def close(self) -> None:
        self.thaw_kafka()
        for router in self.routers:
            if router.proc is not None and router.proc.poll() is None:
                router.stop()
        for sc in self.scenarios:
            sc.close()


@pytest.fixture
def world(stack_env: dict[str, str], toxiproxy: Toxiproxy, tmp_path: Path) -> Iterator[World]:
    w = World(stack_env, tmp_path, toxiproxy)
    try:
        yield w
    finally:
        w.close()


def route_status(router: RouterProc, name: str) -> dict[str, Any]:
    for r in router.status()["routes"]:
        if r["name"] == name:
            return dict(r)
    raise AssertionError(f"no route {name} in the status")


def from_offsets(sc: Scenario, committed: dict[TopicPart, int], total: int) -> set[int]:
    """Messages 0..total-1 at or after ``committed`` (message i: partition i % P, offset i // P)."""
    p = sc.partitions
    return {i for i in range(total) if i // p >= max(committed[(sc.topic, i % p)], 0)}


def event_time(ev: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(ev["timestamp"]).replace("Z", "+00:00")).timestamp()


def read_kafka(read: Callable[[], T], what: str) -> T:
    """A read of the test's own Kafka client, tried again while it fails: a broker that
    resumed from SIGSTOP answers FENCED_LEADER_EPOCH or NOT_COORDINATOR for a while."""
    got: list[T] = []

    def attempt() -> bool:
        try:
            got.append(read())
        except SourceError:
            return False
        return True

    wait_until(attempt, timeout=30, what=what)
    return got[-1]


def committed_to_end(sc: Scenario, route: str, cluster: str) -> bool:
    return read_kafka(lambda: sc.committed(route, cluster) == sc.end_offsets(), "offsets")


def timed_get(client: httpx.Client, url: str) -> tuple[float, httpx.Response]:
    began = time.perf_counter()
    resp = client.get(url)
    return time.perf_counter() - began, resp


def test_status_answers_within_100ms_while_the_broker_is_frozen(world: World) -> None:
    """With the Kafka broker SIGSTOPped for longer than a lag read's deadline, every
    /api/status answers within 100 ms, /healthz stays green, and a cut primary still fails
    over within the health window; once Kafka is back, the standby holds every point from the
    primary's last commit on and the primary replays the rest."""
    sc = world.scenario()
    router = world.start(sc.topology(route="r"))
    sc.produce(0, 1000)
    sc.wait_count("a", 1000)
    sc.wait_committed_to_end("r", "a")
    status_url = f"{router.url}/api/status"
    with httpx.Client(timeout=10) as client:
        world.freeze_kafka()
        try:
            samples = []
            until = time.monotonic() + 7.0  # a lag read starts and waits out its 5 s deadline
            while time.monotonic() < until:
                elapsed, resp = timed_get(client, status_url)
                assert resp.status_code == 200
                samples.append(elapsed)
                time.sleep(0.2)
            assert max(samples) < 0.1, f"slowest /api/status {max(samples):.3f}s: {samples}"
            health = client.get(f"{router.url}/healthz")
            assert health.status_code == 200, health.text

            cut = time.time()
            world.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], False)
            wait_until(
                lambda: route_status(router, "r")["active"] == ["influx-b"],
                timeout=FALL_WINDOW + 5,
                what="the standby to take over while Kafka is frozen",
            )
            decided = time.time() - cut
            elapsed, resp = timed_get(client, status_url)
            assert elapsed < 0.1
            assert resp.json()["routes"][0]["active"] == ["influx-b"]
        finally:
            world.thaw_kafka()
    assert decided < FALL_WINDOW + 3.0
    failovers = router.events("failover")
    assert [(e["from_cluster"], e["to_cluster"]) for e in failovers] == [("influx-a", "influx-b")]

    sc.produce(1000, 1000)
    committed_a = read_kafka(lambda: sc.committed("r", "a"), "the primary's commits")
    expected_on_b = from_offsets(sc, committed_a, 2000)
    wait_until(
        lambda: expected_on_b <= sc.values("b"),
        timeout=90,
        what="the standby to hold every point from the primary's last commit on",
    )
    world.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], True)
    sc.wait_count("a", 2000, timeout=90)
    wait_until(
        lambda: committed_to_end(sc, "r", "a"),
        timeout=60,
        what="the primary's group to commit up to the end offsets",
    )
    assert sc.values("a") == set(range(2000))


class CommitWatcher:
    """Samples a group's committed offsets on its own thread; records any that went back."""

    def __init__(self, bootstrap: str, group: str, tps: list[TopicPart]) -> None:
        self._admin = KafkaAdmin({"bootstrap.servers": bootstrap}, timeout=5.0)
        self._group = group
        self._tps = tps
        self.highest: dict[TopicPart, int] = {}
        self.backwards: list[tuple[TopicPart, int, int]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                now = self._admin.committed(self._group, self._tps)
            except SourceError:  # a sample missed is not a result
                continue
            self.samples += 1
            for tp, offset in now.items():
                before = self.highest.get(tp, -1)
                if offset < before:
                    self.backwards.append((tp, before, offset))
                self.highest[tp] = max(before, offset)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._admin.close()


class Producer:
    """Produces to a scenario's topic in small chunks until stopped; counts what it sent."""

    def __init__(self, sc: Scenario, start: int) -> None:
        self.sc = sc
        self.next = start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sc.produce(self.next, 40)
            self.next += 40

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(30)
        return self.next


def test_a_route_fails_over_on_time_while_another_routes_reload_waits(world: World) -> None:
    """Route r2 is rebuilt by a topology edit while its cluster answers writes after 10 s: its
    old consumer flushes that long, and r2 shows "rebuilding" meanwhile. Route r1's primary is
    cut during that wait and r1 fails over within the health window. r2's new consumer starts
    only after the old one left the group, r2's commits never go backwards, and in the end
    every point of both routes is stored."""
    sc1, sc2 = world.scenario(), world.scenario()
    doc = sc1.topology(route="r1")
    doc["health"]["timeout"] = "30s"  # probes of the slow cluster pass: it stays UP, and slow
    doc["clusters"]["influx-c"]["write_timeout"] = "30s"
    doc["routes"].append(
        {
            "name": "r2",
            "topics": [sc2.topic],
            "mode": "mirror",
            "clusters": ["influx-c"],
            "batch": {"max_points": 100, "linger": "50ms", "max_in_flight": 2},
        }
    )
    router = world.start(doc)
    r2_group = sc1.group("r2", "c")
    watcher = CommitWatcher(sc1.bootstrap, r2_group, sc2.tps())
    try:
        sc1.produce(0, 500)
        sc2.produce(0, 500)
        sc1.wait_count("a", 500)
        sc2.wait_count("c", 500)
        producer = Producer(sc2, 500)
        world.toxiproxy.add_toxic(sc1.env["INFLUX_C_PROXY_NAME"], "latency", {"latency": 10000})
        wait_until(
            lambda: router.destination("r2", "c")["oldest_unsettled"] >= 1.0,
            timeout=10,
            what="a write to the slow cluster waiting for its answer",
        )
        doc["routes"][1]["batch"]["max_points"] = 200  # r2's destinations must be rebuilt
        write_yaml(router.topology, doc)
        wait_until(
            lambda: route_status(router, "r2")["state"] == "rebuilding",
            timeout=10,
            what="r2 rebuilding",
        )

        cut = time.time()
        world.toxiproxy.set_enabled(sc1.env["INFLUX_A_PROXY_NAME"], False)
        wait_until(
            lambda: route_status(router, "r1")["active"] == ["influx-b"],
            timeout=FALL_WINDOW + 5,
            what="r1 to fail over to its standby",
        )
        r2 = route_status(router, "r2")
        assert r2["state"] == "rebuilding", r2
        assert [w["group"] for w in r2["waiting_for"]] == [r2_group]
        failover = router.events("failover")[0]
        assert failover["route"] == "r1" and failover["to_cluster"] == "influx-b"
        assert event_time(failover) - cut < FALL_WINDOW + 3.0

        sc1.produce(500, 500)
        expected_on_b = from_offsets(sc1, sc1.committed("r1", "a"), 1000)
        wait_until(
            lambda: expected_on_b <= sc1.values("b"),
            timeout=60,
            what="r1's standby to hold every point from the primary's last commit on",
        )

        total2 = producer.stop()
        world.toxiproxy.remove_all_toxics(sc1.env["INFLUX_C_PROXY_NAME"])
        wait_until(
            lambda: route_status(router, "r2")["state"] == "running",
            timeout=60,
            what="r2 running again",
        )
        sc2.wait_count("c", total2, timeout=90)
        wait_until(
            lambda: sc1.admin().committed(r2_group, sc2.tps()) == sc2.end_offsets(),
            timeout=60,
            what="r2's group to commit up to the end offsets",
        )
        world.toxiproxy.set_enabled(sc1.env["INFLUX_A_PROXY_NAME"], True)
        sc1.wait_count("a", 1000, timeout=90)
        sc1.wait_committed_to_end("r1", "a")
    finally:
        watcher.close()

    names = [
        (e["event"], e.get("route"), e.get("group"), e.get("to_state"))
        for e in router.events()
        if e.get("event") in ("destination_left", "route_state")
    ]
    rebuilding = names.index(("route_state", "r2", None, "rebuilding"))
    left = names.index(("destination_left", "r2", r2_group, None), rebuilding)
    running = names.index(("route_state", "r2", None, "running"), rebuilding)
    assert left < running, names
    assert watcher.samples > 10
    assert watcher.backwards == []
    assert sc2.values("c") == set(range(total2))
