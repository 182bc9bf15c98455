"""What the on-call view is made of, without servers: points/s, lag in seconds, the
per-partition table, why a route's active cluster is what it is, counters with 0 from the start,
the CLI's status exit code and table, and the drain command's helpers."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from router.commands import drain_key, topology_edit
from router.console import render_status, status_exit_code
from router.control import active_reason, partition_views
from router.destination import DestinationStatus
from router.lag import GroupLag, LagReader, RouteLag, Watch
from router.metrics import Metrics
from router.offsets import Marks, TopicPart
from router.policy import Action, Activate, ClusterView, Deactivate, RouteView, StartFrom
from router.status import (
    DestinationView,
    Rate,
    RouteSnapshot,
    counter_totals,
    destination_json,
    grand_totals,
    idle_expected,
)
from tests.unit.test_lag import Clock, FakeAdmin

T0: TopicPart = ("t", 0)
T1: TopicPart = ("t", 1)
ROUTE = RouteView("r", "failover", ("a", "b"))
UP = ClusterView(healthy=True)
DOWN = ClusterView(healthy=False, reason="no answer within 1s")

STATUS = DestinationStatus(
    route="r",
    cluster="b",
    group="g.r.b",
    state="paused",
    assigned=(T0, T1),
    paused=(T0, T1),
    in_flight=0,
    buffered=0,
    error="",
)


def snapshot(*dests: DestinationView) -> RouteSnapshot:
    return RouteSnapshot(
        name="r",
        mode="failover",
        topics=("t",),
        primary="a",
        state="running",
        reason="",
        since=0.0,
        active=("a",),
        destinations=dests,
    )


# --- points/s -----------------------------------------------------------------------------


def test_rate_is_unknown_until_a_second_is_covered() -> None:
    """The first samples give no rate: a rate over a few milliseconds would be noise."""
    rate = Rate()
    assert rate.update(0.0, 0) is None
    assert rate.update(0.5, 100) is None
    assert rate.update(1.0, 200) == 200.0


def test_rate_covers_the_last_ten_seconds_only() -> None:
    """Old samples leave the window: a burst long ago no longer counts."""
    rate = Rate(window=10.0)
    rate.update(0.0, 0)
    rate.update(1.0, 10_000)  # a burst
    for t in range(2, 30):
        got = rate.update(float(t), 10_000 + (t - 1) * 10)
    assert got is not None and abs(got - 10.0) < 1.5


def test_a_shrinking_total_starts_a_new_window() -> None:
    """A rebuilt destination counts from 0 again: no negative rate."""
    rate = Rate()
    rate.update(0.0, 500)
    rate.update(2.0, 1500)
    assert rate.update(3.0, 10) is None
    assert rate.update(4.5, 160) == 100.0


# --- lag in seconds -----------------------------------------------------------------------


def test_lag_seconds_is_the_age_of_the_oldest_uncommitted_message() -> None:
    """The oldest timestamp over the partitions with lag decides; none without lag."""
    g = GroupLag({T0: 5, T1: 9}, {T0: 3, T1: 0}, read_at=1.0, oldest={T0: 1000.0, T1: 900.0})
    assert g.seconds(now=1060.0) == 60.0  # T1 has no lag: its old timestamp does not count
    assert g.ages(1060.0) == {T0: 60.0, T1: 0.0}
    assert GroupLag({T0: 5}, {T0: 0}, 1.0).seconds(1060.0) == 0.0
    assert GroupLag({T0: 5}, {T0: 2}, 1.0).seconds(1060.0) is None  # lag, timestamp unknown


def peeking_reader(admin: FakeAdmin, clock: Clock, calls: list[dict[TopicPart, int]]) -> LagReader:
    def peek(wanted: Any, timeout: float) -> dict[TopicPart, float]:
        calls.append(dict(wanted))
        return {tp: 1000.0 + offset for tp, offset in wanted.items()}

    r = LagReader(admin, interval=2.0, read_timeout=3.0, clock=clock, peek=peek)
    r.watch([Watch("r", ("t",), (("a", "g.r.a"),))])
    return r


def test_the_lag_reader_reads_the_timestamp_at_the_committed_offset() -> None:
    """For each partition with lag, the message at the committed offset (the low watermark
    for a group that never committed) is the oldest unwritten one."""
    admin, clock = FakeAdmin(), Clock()
    calls: list[dict[TopicPart, int]] = []
    r = peeking_reader(admin, clock, calls)
    r.read_due()
    assert calls == [{T0: 90, T1: 10}]
    snap = r.latest("r")
    assert snap is not None
    assert snap.groups["a"].oldest == {T0: 1090.0, T1: 1010.0}
    assert snap.marks == admin.marks


def test_a_standing_commit_is_peeked_once() -> None:
    """While the committed offset stands (a stall, a paused group) its timestamp is reused;
    only a partition whose commit moved is read again."""
    admin, clock = FakeAdmin(), Clock()
    calls: list[dict[TopicPart, int]] = []
    r = peeking_reader(admin, clock, calls)
    r.read_due()
    admin.commits["g.r.a"][T0] = 95
    clock.now += 2.0
    r.read_due()
    assert calls == [{T0: 90, T1: 10}, {T0: 95}]
    snap = r.latest("r")
    assert snap is not None and snap.groups["a"].oldest == {T0: 1095.0, T1: 1010.0}


# --- the per-partition table --------------------------------------------------------------


def test_partition_views_join_the_reading_and_the_destination() -> None:
    """Committed and end come from the lag reading, paused and last write from the
    destination, stalled from the stall watch; a never-committed partition shows None."""
    snap = RouteLag((T0, T1), marks={T0: Marks(0, 100), T1: Marks(10, 50)})
    reading = GroupLag({T0: 90, T1: -1001}, {T0: 10, T1: 40}, 1.0, oldest={T0: 940.0})
    st = replace(STATUS, paused=(T1,), last_write={T0: 990.0})
    views = partition_views(snap, reading, st, (T0,), wall=1000.0)
    assert [(v.tp, v.committed, v.end, v.lag, v.paused, v.stalled) for v in views] == [
        (T0, 90, 100, 10, False, True),
        (T1, None, 50, 40, True, False),
    ]
    assert views[0].lag_seconds == 60.0 and views[0].last_write == 990.0
    assert views[1].lag_seconds is None


# --- the standby's lag --------------------------------------------------------------------


def test_an_inactive_standby_is_idle_as_expected() -> None:
    """A paused standby of a failover route is idle on purpose; an active one, the primary,
    or a standby in trouble is not."""
    r = snapshot()
    assert idle_expected(r, DestinationView("b", STATUS, active=False))
    assert idle_expected(r, DestinationView("b", replace(STATUS, state="starting"), active=False))
    assert not idle_expected(r, DestinationView("b", STATUS, active=True))
    assert not idle_expected(r, DestinationView("a", replace(STATUS, cluster="a"), active=False))
    assert not idle_expected(
        r, DestinationView("b", replace(STATUS, state="stopped"), active=False)
    )
    assert not idle_expected(replace(r, mode="mirror"), DestinationView("b", STATUS, active=False))


def test_destination_json_carries_rate_lag_seconds_and_totals() -> None:
    """The status JSON of a destination has its points/s, lag in seconds, its counters."""
    v = DestinationView("b", STATUS, active=False, lag=40, points_per_s=12.34, lag_seconds=75.26)
    doc = destination_json(v, snapshot(v), {"dead_letters": 3.0, "retention_lost": 7.0})
    assert doc["points_per_s"] == 12.3
    assert doc["lag_seconds"] == 75.3
    assert doc["idle_expected"] is True
    assert (doc["dead_letters"], doc["retention_lost"], doc["skipped"]) == (3, 7, 0)


# --- why the route's active cluster is what it is -----------------------------------------


def test_active_reason_of_a_failover() -> None:
    """A standby taking over says from what, with the cluster's own reason."""
    acts: list[Action] = [
        Deactivate("a", graceful=False, reason="a down: no answer within 1s"),
        Activate("b", StartFrom.TAKEOVER, "a down: no answer within 1s"),
    ]
    why = active_reason(ROUTE, frozenset({"a"}), {"b"}, acts, {"a": DOWN, "b": UP})
    assert why == "failed over to b: a down: no answer within 1s"


def test_active_reason_of_the_start_the_replay_and_the_handback() -> None:
    """The route starting, the primary replaying beside the standby, the hand-back."""
    views = {"a": UP, "b": UP}
    start = [Activate("a", StartFrom.OWN, "a usable again")]
    assert active_reason(ROUTE, frozenset(), {"a"}, start, views) == "started on the primary a"
    back = [Activate("a", StartFrom.OWN, "a usable again")]
    assert active_reason(ROUTE, frozenset({"b"}), {"a", "b"}, back, views).startswith(
        "a back: replaying its backlog"
    )
    handback = [Deactivate("b", graceful=True, reason="a caught up (lag 3)")]
    assert (
        active_reason(ROUTE, frozenset({"a", "b"}), {"a"}, handback, views)
        == "handed back to a: a caught up (lag 3)"
    )


def test_active_reason_without_a_usable_cluster_names_each() -> None:
    """Nothing active: every unusable cluster with its reason."""
    acts = [Deactivate("b", graceful=False, reason="b down: refused")]
    why = active_reason(
        ROUTE, frozenset({"b"}), set(), acts, {"a": DOWN, "b": ClusterView(False, reason="refused")}
    )
    assert why == "no usable cluster (a: no answer within 1s; b: refused)"


# --- metrics from the first scrape --------------------------------------------------------


def test_every_labelled_series_exists_with_zero_once_a_route_is_built() -> None:
    """After init_route/init_cluster every labelled metric has a sample for each (route,
    cluster) (per topic for named topics only), every counter and gauge at 0."""
    m = Metrics()
    for c in ("a", "b"):
        m.init_cluster(c)
    m.init_route("r", ("a", "b"), ("t", "^re.*"))
    checked = 0
    for metric in vars(m).values():
        labels = getattr(metric, "_labelnames", ())
        if not labels:
            continue
        checked += 1
        [family] = metric.collect()
        samples = [s for s in family.samples if not s.name.endswith(("_created", "_bucket"))]
        if "route" not in labels:  # per cluster (or per outcome): one per known value
            assert samples, family.name
            continue
        for cluster in ("a", "b"):
            mine = [
                s for s in samples if s.labels["route"] == "r" and s.labels["cluster"] == cluster
            ]
            assert mine, f"{family.name} has no sample for r/{cluster}"
            if family.type in ("counter", "gauge") and family.name != "frouter_destination_state":
                assert all(s.value == 0 for s in mine), family.name
            assert {s.labels.get("topic") for s in mine} - {None} in (set(), {"t"}), family.name
    assert checked >= 20


def test_counter_totals_sum_over_topics_per_destination() -> None:
    """Per (route, cluster) totals add the per-topic series; grand totals add everything."""
    m = Metrics()
    m.dead_letters.labels(route="r", cluster="a", topic="t1").inc(2)
    m.dead_letters.labels(route="r", cluster="a", topic="t2").inc(3)
    m.retention_lost.labels(route="r", cluster="b", topic="t1").inc(7)
    totals = counter_totals({"dead_letters": m.dead_letters, "retention_lost": m.retention_lost})
    assert totals[("r", "a")] == {"dead_letters": 5.0}
    assert totals[("r", "b")] == {"retention_lost": 7.0}
    assert grand_totals(totals) == {"dead_letters": 5, "retention_lost": 7}


# --- the status command -------------------------------------------------------------------


def status_doc(**route: Any) -> dict[str, Any]:
    return {
        "datacenter": "dc1",
        "problems": [],
        "warnings": [],
        "totals": {"dead_letters": 1},
        "clusters": {
            "a": {"state": "down", "reason": "refused", "drain": False, "misconfigured": False},
            "b": {"state": "up", "reason": "healthy", "drain": False, "misconfigured": False},
        },
        "routes": [
            {
                "name": "r",
                "mode": "failover",
                "primary": "a",
                "state": "running",
                "active": ["b"],
                "active_since": 1000.0,
                "active_reason": "failed over to b: a down: refused",
                "has_usable_cluster": True,
                "destinations": [
                    {"cluster": "a", "state": "paused", "lag": 10, "lag_seconds": 4.0},
                    {"cluster": "b", "state": "active", "active": True, "lag": 0},
                ],
                **route,
            }
        ],
    }


def test_status_exits_0_when_every_route_has_a_usable_cluster() -> None:
    """One route without a usable cluster makes the exit code 1."""
    assert status_exit_code(status_doc()) == 0
    assert status_exit_code(status_doc(has_usable_cluster=False)) == 1


def test_a_rebuilding_route_is_judged_by_its_clusters_states() -> None:
    """A route being rebuilt has no control-loop view: its clusters' states decide."""
    doc = status_doc(state="rebuilding", has_usable_cluster=False)
    assert status_exit_code(doc) == 0
    doc["clusters"]["b"]["drain"] = True
    assert status_exit_code(doc) == 1


def test_render_status_shows_the_route_its_reason_and_the_problem() -> None:
    """The table names the active cluster and why, and says UNHEALTHY with the reason."""
    out = io.StringIO()
    render_status(status_doc(has_usable_cluster=False), Console(file=out, width=200), now=1060.0)
    text = out.getvalue()
    assert "failed over to b: a down: refused" in text
    assert "UNHEALTHY" in text and "route r: no usable cluster" in text
    assert "1 min ago" in text


# --- drain / undrain ----------------------------------------------------------------------


def test_drain_key_is_the_one_the_routers_watch() -> None:
    """{prefix}/{dc}/drain/{cluster}, as health.shared reads it."""
    assert drain_key("/failover-router/", "dc1", "influx-a") == "failover-router/dc1/drain/influx-a"


def test_without_consul_drain_prints_the_edit_with_its_line(tmp_path: Path) -> None:
    """The printed edit names the file, the cluster's line and the value to set."""
    f = tmp_path / "t.yaml"
    f.write_text("datacenter: dc1\nclusters:\n  influx-a:\n    urls: []\n")
    text = topology_edit(str(f), "influx-a", drain=True)
    assert f"edit {f}: under clusters.influx-a (line 3)" in text
    assert "drain: true" in text and "nothing was changed" in text


def test_a_message_that_never_comes_is_not_asked_for_again_at_the_same_offset() -> None:
    """A partition whose message the peek could not read (only transaction markers left)
    stays unknown, without a fetch per read, until its commit moves."""
    admin, clock = FakeAdmin(), Clock()
    calls: list[dict[TopicPart, int]] = []

    def peek(wanted: Any, timeout: float) -> dict[TopicPart, float]:
        calls.append(dict(wanted))
        assert timeout <= 1.0
        return {tp: 1000.0 for tp in wanted if tp != T1}

    r = LagReader(admin, interval=2.0, read_timeout=3.0, clock=clock, peek=peek)
    r.watch([Watch("r", ("t",), (("a", "g.r.a"),))])
    r.read_due()
    clock.now += 2.0
    r.read_due()
    assert calls == [{T0: 90, T1: 10}]
    snap = r.latest("r")
    assert snap is not None and snap.groups["a"].oldest == {T0: 1000.0}
    assert snap.groups["a"].seconds(1060.0) == 60.0
