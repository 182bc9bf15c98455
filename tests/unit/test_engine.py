"""The control loop, with fake destinations that record calls and a fake lag source: no Kafka,
no InfluxDB, no threads unless a test says so. Also the fakes the reload tests share.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from router.control import ControlLoop, RoutePlan, RouteRuntime
from router.destination import DestinationSpec, DestinationStatus
from router.errors import SourceError
from router.lag import GroupLag, LagReader, RouteLag
from router.metrics import Metrics
from router.offsets import Marks, TopicPart
from router.policy import ClusterView, StartFrom
from router.topology import Topology, parse_topology

T0: TopicPart = ("t", 0)
T1: TopicPart = ("t", 1)
UP = ClusterView(healthy=True)
DOWN = ClusterView(healthy=False, reason="3/3 probes failed")
DRAINED = ClusterView(healthy=True, drained=True)

TOPOLOGY = """
datacenter: dc1
kafka: {bootstrap: "127.0.0.1:1", group_prefix: g}
clusters:
  a: {urls: ["http://127.0.0.1:1"], database: m}
  b: {urls: ["http://127.0.0.1:2"], database: m}
  c: {urls: ["http://127.0.0.1:3"], database: m}
routes:
  - {name: r, topics: [t], primary: a, standby: [b], handback_lag: 10}
  - {name: s, topics: [u], primary: c, standby: [b]}
"""


def topology(text: str = TOPOLOGY) -> Topology:
    return parse_topology(text)


def plan(name: str = "r", topo: Topology | None = None) -> RoutePlan:
    topo = topo or topology()
    return RoutePlan.of(topo.route(name), topo)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeDestination:
    """Records what the engine asks; the test decides when a handoff or a stop is done."""

    def __init__(self, spec: DestinationSpec) -> None:
        self.spec = spec
        self.crashed = ""
        self.started = False
        self.calls: list[tuple[str, object]] = []
        self.handoffs: list[threading.Event] = []
        self.left = threading.Event()
        self.status = DestinationStatus(
            route=spec.route,
            cluster=spec.cluster,
            group=spec.group,
            state="paused",
            assigned=(T0, T1),
            paused=(T0, T1),
            in_flight=0,
            buffered=0,
            error="",
            write_deadline=spec.write_deadline,
        )

    def start(self) -> None:
        self.started = True

    def activate(self, start: StartFrom) -> None:
        self.calls.append(("activate", start))

    def deactivate(self, graceful: bool, reason: str) -> threading.Event:
        self.calls.append(("deactivate", graceful))
        done = threading.Event()
        if not graceful:
            done.set()
        self.handoffs.append(done)
        return done

    def request_stop(self, graceful: bool = True) -> threading.Event:
        self.calls.append(("request_stop", graceful))
        return self.left

    def stop(self, timeout: float = 60.0, graceful: bool = True) -> None:
        self.calls.append(("stop", graceful))
        self.left.set()


class Factory:
    """A destination factory that keeps every destination it built."""

    def __init__(self, fail: bool = False) -> None:
        self.built: list[FakeDestination] = []
        self.fail = fail

    def __call__(self, plan: RoutePlan, cluster: str) -> FakeDestination:
        if self.fail:
            raise SourceError("cannot create the consumer")
        spec = DestinationSpec(
            route=plan.name,
            cluster=cluster,
            group=plan.groups[cluster],
            topics=plan.config.topics,
            peer_groups=tuple(plan.groups.values()),
            max_points=10,
            max_bytes=1024,
            linger=0.1,
            max_in_flight=1,
            write_deadline=60.0,
        )
        dest = FakeDestination(spec)
        self.built.append(dest)
        return dest

    def of(self, route: str, cluster: str) -> FakeDestination:
        """The newest destination built for (route, cluster)."""
        return [d for d in self.built if (d.spec.route, d.spec.cluster) == (route, cluster)][-1]

    def route(self, p: RoutePlan) -> RouteRuntime:
        dests = {c: self(p, c) for c in p.config.destinations}
        for d in dests.values():
            d.start()
        return RouteRuntime(p, dict(dests))


class FakeLag:
    """A lag source whose readings the test sets."""

    def __init__(self) -> None:
        self.readings: dict[str, RouteLag] = {}
        self.hurried: dict[str, tuple[str, ...]] = {}

    def latest(self, route: str) -> RouteLag | None:
        return self.readings.get(route)

    def hurry(self, route: str, clusters: Iterable[str]) -> None:
        self.hurried[route] = tuple(clusters)

    def set(self, route: str, at: float, error: str = "", **lag: int) -> None:
        """Each cluster's lag on T0 (committed offset 100), read at ``at``."""
        groups = {c: GroupLag({T0: 100, T1: 0}, {T0: n, T1: 0}, read_at=at) for c, n in lag.items()}
        self.readings[route] = RouteLag((T0, T1), groups, error)


class World:
    """A control loop over route r (a primary, b standby) with views the test edits."""

    def __init__(self, stall_after: float | None = None) -> None:
        self.clock = Clock()
        self.lag = FakeLag()
        self.factory = Factory()
        self.metrics = Metrics(CollectorRegistry())
        self.views: dict[str, ClusterView] | None = {"a": UP, "b": UP, "c": UP}
        self.loop = ControlLoop(
            views=lambda: self.views,
            lag=self.lag,
            build=self.factory,
            metrics=self.metrics,
            lag_max_age=6.0,
            clock=self.clock,
            stall_after=stall_after,
        )
        self.loop.attach(self.factory.route(plan("r")))

    def dest(self, cluster: str, route: str = "r") -> FakeDestination:
        return self.factory.of(route, cluster)

    def tick(self, seconds: float = 0.25) -> None:
        self.clock.now += seconds
        self.loop.tick()

    def active(self, route: str = "r") -> tuple[str, ...]:
        return self.loop.snapshots()[route].active

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


def failed_over(w: World) -> None:
    """Primary down, standby active; then the primary is back and replays next to it."""
    w.tick()
    w.views = {"a": DOWN, "b": UP, "c": UP}
    w.tick()
    w.views = {"a": UP, "b": UP, "c": UP}
    w.tick()
    assert w.active() == ("a", "b")


def test_steady_state_activates_the_primary_from_its_own_offsets() -> None:
    """With every cluster up, the first pass activates only the primary, from its own offsets."""
    w = World()
    w.tick()
    assert w.dest("a").calls == [("activate", StartFrom.OWN)]
    assert w.dest("b").calls == []
    assert w.active() == ("a",)


def test_a_down_primary_fails_over_without_any_lag_reading() -> None:
    """With no lag ever read (Kafka unreachable), a down primary is still paused and the standby
    takes over at once: health decisions never wait for Kafka."""
    w = World()
    w.tick()
    w.views = {"a": DOWN, "b": UP, "c": UP}
    with capture_logs() as logs:
        w.tick()
    assert w.dest("a").calls[-1] == ("deactivate", False)
    assert w.dest("b").calls == [("activate", StartFrom.TAKEOVER)]
    failover = [e for e in logs if e["event"] == "failover"]
    assert failover and failover[0]["from_cluster"] == "a" and failover[0]["to_cluster"] == "b"


def test_a_lag_read_error_does_not_skip_the_route() -> None:
    """A route whose lag reads fail is still decided on every pass."""
    w = World()
    w.tick()
    w.lag.set("r", at=w.clock.now, error="cannot list offsets: broker down")
    w.views = {"a": DOWN, "b": UP, "c": UP}
    w.tick()
    assert w.active() == ("b",)
    assert w.loop.snapshots()["r"].lag_error == "cannot list offsets: broker down"


def test_a_fresh_low_lag_hands_back_to_the_primary() -> None:
    """A replaying primary whose fresh lag is under handback_lag takes the stream back: the
    standby hands back gracefully."""
    w = World()
    failed_over(w)
    w.lag.set("r", at=w.clock.now + 0.1, a=5, b=0)
    with capture_logs() as logs:
        w.tick()
    assert w.dest("b").calls[-1] == ("deactivate", True)
    assert w.active() == ("a",)
    assert [e["event"] for e in logs if e["event"] == "handback"] == ["handback"]


def test_a_high_lag_keeps_the_standby() -> None:
    """A replaying primary whose lag is above handback_lag does not take the stream back yet."""
    w = World()
    failed_over(w)
    w.lag.set("r", at=w.clock.now + 0.1, a=11)
    w.tick()
    assert w.active() == ("a", "b")


def test_a_stale_lag_reading_never_hands_back() -> None:
    """A low lag read longer ago than lag_max_age is not believed: the standby stays."""
    w = World()
    failed_over(w)
    w.lag.set("r", at=w.clock.now + 0.1, a=0)
    w.tick(7.0)
    assert w.active() == ("a", "b")
    assert w.dest("b").calls[-1] == ("activate", StartFrom.TAKEOVER)


def test_a_reading_from_before_the_primary_resumed_never_hands_back() -> None:
    """A lag read before the primary was activated again says nothing about its replay."""
    w = World()
    failed_over(w)
    w.lag.set("r", at=w.clock.now - 0.1, a=0)
    w.tick()
    assert w.active() == ("a", "b")


def test_the_replaying_primary_is_read_fast_until_the_hand_back() -> None:
    """While the primary replays next to the standby its group's lag is hurried; not after."""
    w = World()
    failed_over(w)
    assert w.lag.hurried == {"r": ("a",)}
    w.lag.set("r", at=w.clock.now + 0.1, a=0)
    w.tick()
    assert w.lag.hurried == {"r": ()}


def test_the_next_cluster_starts_after_a_graceful_handoff_is_done() -> None:
    """A drained primary flushes first: the standby is activated once the flush is done."""
    w = World()
    w.tick()
    w.views = {"a": DRAINED, "b": UP, "c": UP}
    w.tick()
    assert w.dest("a").calls[-1] == ("deactivate", True)
    w.tick()
    assert w.dest("b").calls == []
    assert w.loop.snapshots()["r"].handoff == ("a",)
    w.dest("a").handoffs[-1].set()
    w.tick()
    assert w.dest("b").calls == [("activate", StartFrom.TAKEOVER)]


def test_a_handoff_past_its_deadline_lets_the_next_cluster_start() -> None:
    """A graceful deactivation not done within the write deadline is given up (and logged)."""
    w = World()
    w.tick()
    w.views = {"a": DRAINED, "b": UP, "c": UP}
    w.tick()
    with capture_logs() as logs:
        w.tick(61.0)
    assert w.dest("b").calls == [("activate", StartFrom.TAKEOVER)]
    assert any(e["event"] == "handoff_timeout" for e in logs)


def test_a_crashed_destination_is_rebuilt_and_activated_again() -> None:
    """A destination whose thread ended is replaced by a new, started one that the policy
    activates again."""
    w = World()
    w.tick()
    old = w.dest("a")
    old.crashed = "boom"
    old.left.set()
    w.tick()
    new = w.dest("a")
    assert new is not old and new.started
    assert new.calls == [("activate", StartFrom.OWN)]


def test_a_crashed_destination_is_rebuilt_only_once_it_left_its_group() -> None:
    """While the crashed destination's consumer is still closing, no successor starts."""
    w = World()
    w.tick()
    old = w.dest("a")
    old.crashed = "boom"
    w.tick()
    w.tick()
    assert w.dest("a") is old
    assert ("request_stop", False) in old.calls
    old.left.set()
    w.tick()
    assert w.dest("a") is not old


def test_a_failed_rebuild_is_tried_again_next_pass() -> None:
    """When the new destination cannot be built, the route keeps its crashed one and the pass
    goes on; the next pass tries again."""
    w = World()
    w.tick()
    w.dest("a").crashed = "boom"
    w.dest("a").left.set()
    w.factory.fail = True
    with capture_logs() as logs:
        w.tick()
    assert any(e["event"] == "destination_rebuild_failed" for e in logs)
    w.factory.fail = False
    w.tick()
    assert w.dest("a").started


def test_no_decision_while_the_views_are_not_ready() -> None:
    """While discovery has not answered (views None), nothing is activated, but the route's
    snapshot is published."""
    w = World()
    w.views = None
    w.tick()
    assert w.dest("a").calls == []
    assert w.active() == ()


def test_a_standing_commit_with_lag_is_reported_as_a_stall() -> None:
    """An active destination with lag whose commit does not move for longer than stall_after
    is stalled: event, metric and snapshot; once it moves again, unstalled."""
    w = World(stall_after=5.0)
    w.tick()
    w.lag.set("r", at=w.clock.now, a=7)
    w.tick()
    w.lag.set("r", at=w.clock.now + 6.0, a=9)
    with capture_logs() as logs:
        w.tick(6.5)
    stalled = [e for e in logs if e["event"] == "destination_stalled"]
    assert stalled and stalled[0]["cluster"] == "a" and stalled[0]["partitions"] == "t[0]"
    view = w.loop.snapshots()["r"].destinations[0]
    assert view.stalled == (T0,)
    assert w.sample("frouter_destination_stalled", route="r", cluster="a") == 1
    moved = GroupLag({T0: 105, T1: 0}, {T0: 4, T1: 0}, read_at=w.clock.now + 1)
    w.lag.readings["r"] = RouteLag((T0, T1), {"a": moved})
    with capture_logs() as logs:
        w.tick(1.5)
    assert [e["event"] for e in logs] == ["destination_unstalled"]
    assert w.sample("frouter_destination_stalled", route="r", cluster="a") == 0


def test_a_paused_standby_with_lag_is_not_stalled() -> None:
    """A standby that does not serve has lag by design: never a stall."""
    w = World(stall_after=5.0)
    w.tick()
    w.lag.set("r", at=w.clock.now, a=0, b=500)
    w.tick()
    w.lag.set("r", at=w.clock.now + 60.0, a=0, b=900)
    w.tick(61.0)
    assert w.loop.snapshots()["r"].destinations[1].stalled == ()


def test_destination_gauges_follow_the_status_every_pass() -> None:
    """Each pass sets the oldest-unsettled gauge and one state series to 1, the others to 0."""
    w = World()
    w.dest("a").status = replace(w.dest("a").status, state="backoff", oldest_unsettled=12.5)
    w.tick()
    assert w.sample("frouter_oldest_unsettled_batch_seconds", route="r", cluster="a") == 12.5
    labels = {"route": "r", "cluster": "a"}
    assert w.sample("frouter_destination_state", **labels, state="backoff") == 1
    assert w.sample("frouter_destination_state", **labels, state="active") == 0


def test_a_detached_route_is_no_longer_run_nor_shown() -> None:
    """After detach the loop never touches the route again, and its snapshot and series go."""
    w = World()
    w.tick()
    rt = w.loop.detach("r")
    assert rt is not None
    calls = list(w.dest("a").calls)
    w.views = {"a": DOWN, "b": UP, "c": UP}
    w.tick()
    assert w.dest("a").calls == calls
    assert "r" not in w.loop.snapshots()
    assert w.sample("frouter_oldest_unsettled_batch_seconds", route="r", cluster="a") is None


class HangingAdmin:
    """Every Kafka read blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def _hang(self) -> None:
        self.entered.set()
        self.release.wait(10)
        raise SourceError("timed out")

    def partitions(self, topics: Iterable[str], *, timeout: float | None = None) -> list[TopicPart]:
        self._hang()
        return []

    def watermarks(
        self, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, Marks]:
        self._hang()
        return {}

    def committed(
        self, group: str, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, int]:
        self._hang()
        return {}


@pytest.fixture
def hanging() -> Iterable[HangingAdmin]:
    admin = HangingAdmin()
    yield admin
    admin.release.set()


def test_a_failover_is_decided_while_every_kafka_read_hangs(hanging: HangingAdmin) -> None:
    """With the real lag reader stuck in Kafka on its own thread, the control loop still
    fails over within one pass, and its snapshots are there."""
    reader = LagReader(hanging, interval=0.05, fast_interval=0.01)
    factory = Factory()
    views = {"a": UP, "b": UP}
    loop = ControlLoop(
        views=lambda: views,
        lag=reader,
        build=factory,
        metrics=Metrics(CollectorRegistry()),
    )
    p = plan("r")
    reader.watch([p.watch()])
    loop.attach(factory.route(p))
    reader.start()
    try:
        assert hanging.entered.wait(5)
        loop.tick()
        views["a"] = DOWN
        began = time.monotonic()
        loop.tick()
        assert time.monotonic() - began < 0.1
        assert loop.snapshots()["r"].active == ("b",)
    finally:
        hanging.release.set()
        reader.stop()
