"""A refused cluster is probed again on a capped back-off, and at once when its secrets change;
an accepted probe makes it usable again. A fake clock and a scripted probe: no InfluxDB."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from router.destination import Destination
from router.engine import Router
from router.errors import SinkMisconfigured, SinkUnavailable
from router.metrics import Metrics
from router.policy import StartFrom
from router.reprobe import CAP, FIRST, FLAP_WINDOW, JITTER, Reprober, probe_delay
from tests.support import wait_until
from tests.unit.fakes import misconfigured
from tests.unit.test_destination import P0, SPEC, make_rig
from tests.unit.test_engine import Factory, topology
from tests.unit.test_engine_status import Verdicts


@pytest.mark.parametrize(
    ("attempt", "seconds"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 30.0), (7, 30.0), (100, 30.0)],
)
def test_the_schedule_doubles_from_one_second_up_to_the_cap(attempt: int, seconds: float) -> None:
    """Without jitter: 1, 2, 4, 8, 16, then 30 s for ever."""
    assert probe_delay(attempt, 0.0) == seconds


def test_jitter_only_shortens_a_delay() -> None:
    """Jitter takes up to JITTER off, never adds: no wait is ever longer than CAP."""
    assert probe_delay(1, 0.999) == pytest.approx(FIRST * (1 - JITTER), rel=1e-3)
    assert max(probe_delay(n, r / 10) for n in range(1, 50) for r in range(10)) == CAP


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Cluster:
    """A probe target: refuses until ``fixed``; records every probe."""

    def __init__(self) -> None:
        self.fixed = False
        self.down = False
        self.probes: list[float] = []
        self.version: object = "v1"

    def probe(self, clock: Clock) -> None:
        self.probes.append(clock.now)
        if self.down:
            raise SinkUnavailable("influx-a: no healthy node to write to")
        if not self.fixed:
            raise SinkMisconfigured("influx-a: HTTP 401: authorization failed")


def reprober(cluster: Cluster, clock: Clock, recovered: list[str]) -> Reprober:
    return Reprober(
        probe=lambda name: cluster.probe(clock),
        on_recovered=recovered.append,
        version=lambda name: cluster.version,
        clock=clock,
        rand=lambda: 0.0,
    )


def advance_to(r: Reprober, clock: Clock, until: float, step: float = 0.5) -> None:
    while clock.now < until:
        clock.now += step
        r.run_once()


def test_a_refused_cluster_is_probed_on_the_capped_schedule() -> None:
    """Probes 1, 3, 7, 15, 31, 61, 91 s after the refusal while it stays refused."""
    clock, cluster, recovered = Clock(), Cluster(), list[str]()
    r = reprober(cluster, clock, recovered)
    r.add("influx-a", "HTTP 401")
    advance_to(r, clock, 100.0 + 95)
    assert [round(t - 100.0, 1) for t in cluster.probes] == [1, 3, 7, 15, 31, 61, 91]
    assert recovered == []


def test_an_accepted_probe_recovers_the_cluster_once() -> None:
    """Once the server accepts, on_recovered is called once and probing stops."""
    clock, cluster, recovered = Clock(), Cluster(), list[str]()
    r = reprober(cluster, clock, recovered)
    r.add("influx-a", "HTTP 401")
    advance_to(r, clock, 102.0)
    cluster.fixed = True
    with capture_logs() as events:
        advance_to(r, clock, 130.0)
    assert recovered == ["influx-a"]
    assert len(cluster.probes) == 2
    assert r.watched() == {}
    assert [e["event"] for e in events] == ["reprobe_accepted"]


def test_a_changed_secret_is_probed_at_once() -> None:
    """Late in the back-off, a new secret version makes the next pass probe."""
    clock, cluster, recovered = Clock(), Cluster(), list[str]()
    r = reprober(cluster, clock, recovered)
    r.add("influx-a", "HTTP 401")
    advance_to(r, clock, 140.0)  # probes at 1, 3, 7, 15, 31 s; the next one at 61 s
    probes = len(cluster.probes)
    cluster.fixed, cluster.version = True, "v2"
    clock.now += 0.5
    r.run_once()
    assert len(cluster.probes) == probes + 1
    assert recovered == ["influx-a"]


def test_an_unreachable_cluster_is_probed_again_later() -> None:
    """No node answered: not recovered, probed again on the same schedule."""
    clock, cluster, recovered = Clock(), Cluster(), list[str]()
    cluster.down = True
    r = reprober(cluster, clock, recovered)
    r.add("influx-a", "HTTP 401")
    with capture_logs() as events:
        advance_to(r, clock, 104.0)
    assert recovered == []
    assert [e["outcome"] for e in events if e["event"] == "reprobe_failed"] == ["unavailable"] * 2


def test_a_second_refusal_keeps_the_schedule() -> None:
    """More 401s from other destinations of the cluster do not restart the back-off."""
    clock, cluster, recovered = Clock(), Cluster(), list[str]()
    r = reprober(cluster, clock, recovered)
    r.add("influx-a", "HTTP 401")
    advance_to(r, clock, 104.0)
    r.add("influx-a", "HTTP 401 again")
    assert r.watched()["influx-a"] == pytest.approx(3.0)


def test_a_cluster_refused_again_soon_after_recovering_goes_on_backing_off() -> None:
    """Accepted by a probe but refused by writes again at once: the next probe waits where the
    back-off was (no probe-activate-refuse loop every second); much later it starts afresh."""
    clock, cluster, recovered = Clock(), Cluster(), list[str]()
    r = reprober(cluster, clock, recovered)
    r.add("influx-a", "HTTP 401")
    advance_to(r, clock, 108.0)  # probes at 1, 3, 7 s
    cluster.fixed = True
    advance_to(r, clock, 116.0)  # accepted at 15 s: the fourth probe
    assert recovered == ["influx-a"]
    r.add("influx-a", "HTTP 401 again")
    assert r.watched()["influx-a"] == pytest.approx(16.0)
    advance_to(r, clock, 140.0)  # accepted again at 132 s
    assert recovered == ["influx-a", "influx-a"]
    clock.now += FLAP_WINDOW
    r.add("influx-a", "HTTP 401 much later")
    assert r.watched()["influx-a"] == pytest.approx(FIRST)


def test_a_discarded_cluster_is_not_probed() -> None:
    """A cluster whose entry changed in the topology is no longer probed."""
    clock, cluster, recovered = Clock(), Cluster(), list[str]()
    r = reprober(cluster, clock, recovered)
    r.add("influx-a", "HTTP 401")
    r.discard("influx-a")
    advance_to(r, clock, 140.0)
    assert cluster.probes == []


def test_the_thread_probes_and_recovers() -> None:
    """Started, the reprober probes on its own thread and reports the recovery."""
    done = threading.Event()
    r = Reprober(probe=lambda name: None, on_recovered=lambda name: done.set(), poll=0.01)
    r.start()
    try:
        r.add("influx-a", "HTTP 401")
        wait_until(done.is_set, timeout=5, what="recovery reported")
    finally:
        r.stop()


# --- a stopped destination resumes when the engine activates it again ------------------------


def test_a_stopped_destination_resumes_when_activated_again() -> None:
    """After a 401 the destination is stopped; deactivated then activated (the cluster
    accepted a probe), it resumes from its commits, writes everything and clears its error."""

    rig = make_rig()
    rig.source.rebalance([P0])
    rig.dest.start()
    try:
        rig.sink.faults.append(misconfigured())
        rig.lines(5)
        rig.dest.activate(StartFrom.OWN)
        wait_until(lambda: rig.state() == "stopped", timeout=10, what="stopped")
        assert rig.counter("frouter_destination_misconfigured") == 1
        assert rig.dest.status.error
        assert rig.dest.deactivate(False, "influx-b down: 401").wait(5)
        assert rig.state() == "stopped"
        rig.lines(5, start=5)
        rig.dest.activate(StartFrom.OWN)
        wait_until(lambda: rig.committed_to_end(P0), timeout=10, what="commit to end")
        assert rig.state() == "active"
        assert rig.dest.status.error == ""
        assert rig.counter("frouter_destination_misconfigured") == 0
        values = {int(x.split(b"=")[1].split(b"i")[0]) for x in rig.sink.lines}
        assert values == set(range(10))
        assert rig.kafka.committed(SPEC.group)[P0] == 10
    finally:
        rig.dest.stop(timeout=10)


def test_a_new_destination_starts_with_the_misconfigured_gauge_at_zero() -> None:
    """A destination rebuilt after a topology fix does not inherit the old gauge value."""

    rig = make_rig()
    rig.metrics.sink_misconfigured.labels(route="r", cluster="b").set(1)
    Destination(
        rig.dest.spec,
        sink=rig.sink,
        admin=rig.admin,
        dead_letters=rig.dlq,
        metrics=rig.metrics,
        source=rig.source,
    )
    assert rig.counter("frouter_destination_misconfigured") == 0


# --- the router: a refused cluster is unusable until a probe is accepted -----------------------


def test_the_router_marks_a_refused_cluster_until_it_recovers() -> None:
    """A 401 makes the cluster unusable and watched by the reprober; an accepted probe makes
    it usable again, sets frouter_destination_misconfigured to 0 and logs sink_recovered."""
    router = Router(
        topology(),
        verdicts=Verdicts(),
        destinations=Factory(),
        metrics=Metrics(CollectorRegistry()),
    )
    try:
        router.metrics.sink_misconfigured.labels(route="r", cluster="a").set(1)
        router._on_misconfigured("a", "influx-a: HTTP 401: authorization failed")
        views = router.cluster_views()
        assert views is not None and not views["a"].healthy
        assert "401" in views["a"].reason
        assert "a" in router._reprober.watched()
        with capture_logs() as events:
            router._on_recovered("a")
        views = router.cluster_views()
        assert views is not None and views["a"].healthy
        sample = router.metrics.registry.get_sample_value(
            "frouter_destination_misconfigured", {"route": "r", "cluster": "a"}
        )
        assert sample == 0
        assert [e["event"] for e in events] == ["sink_recovered"]
        assert "401" in events[0]["was"]
    finally:
        router.stop(timeout=1.0)
