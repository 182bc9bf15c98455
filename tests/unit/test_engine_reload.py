"""Topology reloads: routes move to new destinations off the control thread, never with two
consumers of one group at once. Fake destinations whose stop the test finishes; no servers.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from router.control import ControlLoop, RoutePlan
from router.errors import SourceError
from router.kafka import KafkaAdmin
from router.metrics import Metrics
from router.policy import StartFrom
from router.reload import Rebuilder, Reloader, plans_of
from router.topology import Topology, load_topology
from tests.unit.test_engine import DOWN, TOPOLOGY, UP, Clock, Factory, FakeLag, topology

# Route r with other batch settings: its destinations must be rebuilt.
CHANGED_R = TOPOLOGY.replace("handback_lag: 10}", "handback_lag: 10, batch: {max_points: 7}}")
# Route r's standby moves from b to c: group g.r.b goes, g.r.c comes, g.r.a stays.
R_TO_C = TOPOLOGY.replace("primary: a, standby: [b]", "primary: a, standby: [c]")
WITHOUT_S = TOPOLOGY.split("  - {name: s")[0]


class World:
    """A real control loop as the route table, a rebuilder, fake destinations."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.factory = Factory()
        self.views = {"a": UP, "b": UP, "c": UP}
        self.changes = 0
        self.loop = ControlLoop(
            views=lambda: self.views,
            lag=FakeLag(),
            build=self.factory,
            metrics=Metrics(CollectorRegistry()),
            clock=self.clock,
        )
        self.rebuilder = Rebuilder(
            self.loop,
            build=self.factory.route,
            on_change=self._changed,
            grace=10.0,
            clock=self.clock,
        )
        self.rebuilder.plan(plans_of(topology()))
        self.rebuilder.advance()
        self.loop.tick()

    def _changed(self) -> None:
        self.changes += 1

    def reload(self, text: str) -> list[str]:
        return self.rebuilder.plan(plans_of(topology(text)))

    def shown(self, route: str) -> dict[str, object]:
        for s in self.rebuilder.snapshots():
            if s.name == route:
                return {
                    "state": s.state,
                    "reason": s.reason,
                    "overdue": [w.overdue for w in s.waiting_for],
                    "leaving": [d.cluster for d in s.destinations if d.leaving],
                }
        return {}


def test_new_routes_start_at_once() -> None:
    """With no old consumer anywhere, every route of the first topology starts right away."""
    w = World()
    assert set(w.loop.plans()) == {"r", "s"}
    assert all(d.started for d in w.factory.built)
    assert w.loop.snapshots()["r"].active == ("a",)


def test_a_rebuilt_route_starts_only_after_its_old_consumers_left() -> None:
    """The new destinations of a changed route are built only once every old destination of
    its groups has left; until then the route is out of the control loop and says so."""
    w = World()
    old_a, old_b = w.factory.of("r", "a"), w.factory.of("r", "b")
    assert w.reload(CHANGED_R) == ["r"]
    assert ("request_stop", True) in old_a.calls and ("request_stop", True) in old_b.calls
    assert "r" not in w.loop.plans()
    w.rebuilder.advance()
    assert w.factory.of("r", "a") is old_a
    assert w.shown("r")["state"] == "rebuilding"
    old_a.left.set()
    w.rebuilder.advance()
    assert w.factory.of("r", "a") is old_a  # b's old consumer is still there
    old_b.left.set()
    w.rebuilder.advance()
    new_a = w.factory.of("r", "a")
    assert new_a is not old_a and new_a.started
    assert w.loop.plans()["r"].config.batch.max_points == 7
    assert w.shown("r") == {}
    w.loop.tick()
    assert new_a.calls == [("activate", StartFrom.OWN)]


def test_an_unchanged_route_is_left_alone() -> None:
    """A reload that does not change a route keeps its destinations running untouched."""
    w = World()
    s_dests = [d for d in w.factory.built if d.spec.route == "s"]
    w.reload(CHANGED_R)
    assert [d for d in w.factory.built if d.spec.route == "s"] == s_dests
    assert all(("request_stop", True) not in d.calls for d in s_dests)
    assert "s" in w.loop.plans()


def test_an_old_consumer_past_its_deadline_is_reported_and_still_waited_for() -> None:
    """An old destination that has not left within write deadline + grace is reported once
    (event and status), and its successor still does not start beside it."""
    w = World()
    old_a = w.factory.of("r", "a")
    w.reload(CHANGED_R)
    w.factory.of("r", "b").left.set()
    w.clock.now += 71.0
    with capture_logs() as logs:
        w.rebuilder.advance()
        w.rebuilder.advance()
    stuck = [e for e in logs if e["event"] == "route_rebuild_stuck"]
    assert len(stuck) == 1 and stuck[0]["group"] == "g.r.a"
    shown = w.shown("r")
    assert shown["overdue"] == [True]
    assert "has not left" in str(shown["reason"])
    assert w.factory.of("r", "a") is old_a
    w.clock.now += 600.0
    w.rebuilder.advance()
    assert w.factory.of("r", "a") is old_a
    old_a.left.set()
    w.rebuilder.advance()
    assert w.factory.of("r", "a") is not old_a


def test_other_routes_fail_over_while_a_rebuild_waits() -> None:
    """While route r waits for its old consumers, the control loop fails route s over."""
    w = World()
    w.reload(CHANGED_R)
    w.views = {"a": UP, "b": UP, "c": DOWN}
    w.loop.tick()
    assert w.loop.snapshots()["s"].active == ("b",)
    assert w.shown("r")["state"] == "rebuilding"


def test_only_the_groups_a_route_keeps_are_waited_for() -> None:
    """A route whose standby changes waits for the old consumer of the group it keeps, not for
    the one of a group it no longer has."""
    w = World()
    old_a, old_b = w.factory.of("r", "a"), w.factory.of("r", "b")
    w.reload(R_TO_C)
    old_a.left.set()
    w.rebuilder.advance()
    assert not old_b.left.is_set()
    assert w.loop.plans()["r"].groups == {"a": "g.r.a", "c": "g.r.c"}
    assert w.factory.of("r", "c").started


def test_a_removed_route_shows_until_its_consumers_left() -> None:
    """A route removed from the topology shows as removing until its old destinations left."""
    w = World()
    w.reload(WITHOUT_S)
    assert w.shown("s")["state"] == "removing"
    assert w.shown("s")["leaving"] == ["c", "b"]
    for d in w.factory.built:
        if d.spec.route == "s":
            d.left.set()
    with capture_logs() as logs:
        w.rebuilder.advance()
    assert w.shown("s") == {}
    assert any(e["event"] == "route_state" and e["to_state"] == "removed" for e in logs)
    assert set(w.loop.plans()) == {"r"}


def test_a_second_reload_during_a_rebuild_starts_the_latest_plan_once() -> None:
    """Two reloads while the old consumers leave: the route starts once, with the latest plan."""
    w = World()
    w.reload(CHANGED_R)
    latest = TOPOLOGY.replace("handback_lag: 10}", "handback_lag: 10, batch: {max_points: 9}}")
    w.reload(latest)
    built = len(w.factory.built)
    for d in w.factory.built:
        d.left.set()
    w.rebuilder.advance()
    assert len(w.factory.built) == built + 2
    assert w.loop.plans()["r"].config.batch.max_points == 9


def test_a_route_that_cannot_be_built_is_tried_again_later() -> None:
    """A build that fails (say, a consumer handle cannot be created) is retried after a pause."""
    w = World()
    w.reload(CHANGED_R)
    for d in w.factory.built:
        d.left.set()
    w.factory.fail = True
    with capture_logs() as logs:
        w.rebuilder.advance()
    assert any(e["event"] == "route_build_failed" for e in logs)
    w.factory.fail = False
    w.rebuilder.advance()
    assert "r" not in w.loop.plans()
    w.clock.now += 6.0
    w.rebuilder.advance()
    assert "r" in w.loop.plans()


def test_the_groups_in_use_follow_the_rebuild() -> None:
    """Groups of routes waiting and of old destinations leaving stay in use until they are done;
    every change is reported."""
    w = World()
    before = w.changes
    w.reload(R_TO_C)
    assert w.rebuilder.groups() == {"g.r.a", "g.r.b", "g.r.c"}
    for d in w.factory.built:
        d.left.set()
    w.rebuilder.advance()
    assert w.rebuilder.groups() == frozenset()
    assert w.changes >= before + 2


# --- the offset readers of groups gone ------------------------------------------------------


def test_retain_closes_the_offset_readers_of_groups_gone() -> None:
    """KafkaAdmin.retain closes the reader handles of every group not named, and a group read
    again later gets a new one."""
    admin = KafkaAdmin({"bootstrap.servers": "127.0.0.1:1"}, timeout=0.05)
    try:
        for group in ("g.r.a", "g.r.b"):
            with contextlib.suppress(SourceError):  # no broker: the read fails, the handle stays
                admin.committed(group, [("t", 0)])
        assert admin.reader_groups == {"g.r.a", "g.r.b"}
        assert admin.retain(["g.r.a"]) == ["g.r.b"]
        assert admin.reader_groups == {"g.r.a"}
    finally:
        admin.close()
    assert admin.reader_groups == frozenset()


# --- the watched file -----------------------------------------------------------------------


class Applied:
    def __init__(self) -> None:
        self.topologies: list[Topology] = []

    def __call__(self, topology: Topology) -> None:
        self.topologies.append(topology)


def test_an_invalid_file_is_refused_and_a_valid_one_applied(tmp_path: Path) -> None:
    """An invalid edit is reported (error, metric) and not applied; the next valid one is."""
    path = tmp_path / "topology.yaml"
    path.write_text(TOPOLOGY)
    applied = Applied()
    metrics = Metrics(CollectorRegistry())
    table = ControlLoop(views=dict, lag=FakeLag(), build=Factory(), metrics=metrics)
    reloader = Reloader(
        path=path,
        load=load_topology,
        apply=applied,
        rebuilder=Rebuilder(table, build=Factory().route),
        metrics=metrics,
    )
    reloader.run_once()
    assert applied.topologies == []
    path.write_text(TOPOLOGY.replace("primary: a", "primary: nowhere"))
    reloader.run_once()
    assert "nowhere" in reloader.error
    assert applied.topologies == []
    sample = metrics.registry.get_sample_value
    assert sample("frouter_topology_reloads_total", {"outcome": "rejected"}) == 1
    path.write_text(CHANGED_R)
    reloader.run_once()
    assert reloader.error == ""
    assert [t.route("r").batch.max_points for t in applied.topologies] == [7]


def test_a_plan_knows_what_its_destinations_are_built_from() -> None:
    """A drain flag does not change a route's fingerprint; a cluster's write timeout does."""
    base = RoutePlan.of(topology().route("r"), topology())
    drained = topology(TOPOLOGY.replace("database: m}\n  b:", "database: m, drain: true}\n  b:"))
    assert drained.clusters["a"].drain
    assert RoutePlan.of(drained.route("r"), drained).fingerprint == base.fingerprint
    slower = topology(
        TOPOLOGY.replace("database: m}\n  b:", "database: m, write_timeout: 9s}\n  b:")
    )
    assert RoutePlan.of(slower.route("r"), slower).fingerprint != base.fingerprint
