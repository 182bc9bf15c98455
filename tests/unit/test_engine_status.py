"""What /healthz and /api/status say, from snapshots; and the router wired with fakes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from health.verdict import ClusterState, Subscriber, Verdict
from router.destination import DestinationStatus
from router.engine import Router
from router.http import StatusServer
from router.metrics import Metrics
from router.status import (
    DestinationView,
    LeaveView,
    RouteSnapshot,
    health_problems,
    health_warnings,
    one_line,
    ordered,
)
from tests.support import wait_until
from tests.unit.test_engine import T0, Factory, topology
from tests.unit.test_engine_reload import CHANGED_R

STATUS = DestinationStatus(
    route="r",
    cluster="a",
    group="g.r.a",
    state="active",
    assigned=(T0,),
    paused=(),
    in_flight=1,
    buffered=0,
    error="",
    oldest_unsettled=3.0,
    thread_alive=True,
    write_deadline=60.0,
)


def route(*dests: DestinationView, name: str = "r", state: str = "running") -> RouteSnapshot:
    return RouteSnapshot(
        name=name,
        mode="failover",
        topics=("t",),
        primary="a",
        state=state,
        reason="",
        since=0.0,
        active=("a",),
        destinations=dests,
    )


def problems(*routes: RouteSnapshot, **kw: Any) -> list[str]:
    args: dict[str, Any] = {"loop_alive": True, "tick_age": 0.2, "tick_timeout": 15.0, **kw}
    return health_problems(routes, **args)


def test_a_working_router_has_no_problem() -> None:
    """A ticking loop and destinations within their deadlines: healthy."""
    assert problems(route(DestinationView("a", STATUS, active=True))) == []


def test_an_old_unsettled_batch_is_a_problem() -> None:
    """A batch unsettled for longer than the write deadline fails /healthz, naming where."""
    st = replace(STATUS, oldest_unsettled=75.0)
    assert problems(route(DestinationView("a", st, active=True))) == [
        "r/a: oldest unsettled batch 75s old (write deadline 60s)"
    ]


def test_a_dead_consumer_thread_is_a_problem() -> None:
    """A consumer thread that ended and was not rebuilt fails /healthz."""
    st = replace(STATUS, thread_alive=False, error="boom")
    assert problems(route(DestinationView("a", st, active=False))) == [
        "r/a: consumer thread ended and was not rebuilt: boom"
    ]


def test_a_control_loop_that_stopped_ticking_is_a_problem() -> None:
    """A loop whose last pass is older than the tick timeout, or that ended, fails /healthz."""
    assert problems(tick_age=16.0) == ["control loop stopped ticking: last tick 16s ago"]
    assert problems(loop_alive=False) == ["control loop ended"]
    assert problems(tick_age=None) == []


def test_a_leaving_destination_is_not_a_problem() -> None:
    """An old destination of a route being rebuilt is the rebuild's business, not /healthz's."""
    st = replace(STATUS, thread_alive=False, oldest_unsettled=500.0)
    view = DestinationView("a", st, active=False, leaving=True)
    assert problems(route(view, state="rebuilding")) == []


def test_a_healthz_line_names_the_first_problem_and_counts_the_rest() -> None:
    """The /healthz body is one line."""
    assert one_line([]) == ""
    assert one_line(["x"]) == "x"
    assert one_line(["x", "y", "z"]) == "x (+2 more)"


def test_stalls_and_overdue_rebuilds_are_warnings() -> None:
    """A stalled destination and a rebuild waiting past its deadline are warnings."""
    stalled = DestinationView("a", STATUS, active=True, stalled=(T0,), stalled_for=80.0)
    waiting = replace(
        route(name="s", state="rebuilding"),
        waiting_for=(LeaveView("b", "g.s.b", waited=90.0, deadline=70.0),),
    )
    assert health_warnings([route(stalled), waiting]) == [
        "r/a: stalled on t[0] for 80s",
        "s: rebuild waits 90s for the old consumer of g.s.b to leave",
    ]


def test_routes_show_in_topology_order_with_the_rebuild_view_first() -> None:
    """A route being rebuilt shows its rebuild, not the control loop's last view of it; a
    route being removed comes last."""
    running = {"r": route(name="r"), "s": route(name="s")}
    moving = [route(name="r", state="rebuilding"), route(name="old", state="removing")]
    shown = ordered(topology(), running, moving)
    assert [(r.name, r.state) for r in shown] == [
        ("r", "rebuilding"),
        ("s", "running"),
        ("old", "removing"),
    ]


# --- HTTP -----------------------------------------------------------------------------------


class Observed:
    """What the HTTP server asks of the router, set by the test."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.problem = ""
        self.warnings: list[str] = []
        self.why = ""  # why it is not ready

    def readiness(self) -> str:
        return self.why

    def health(self) -> tuple[str, list[str]]:
        return self.problem, self.warnings

    def status(self) -> dict[str, Any]:
        return {}


@pytest.fixture
def served() -> Iterator[tuple[Observed, str]]:
    router = Observed()
    server = StatusServer("127.0.0.1:0", router)
    server.start()
    yield router, f"http://127.0.0.1:{server.port}"
    server.stop()


def test_healthz_answers_503_with_the_reason(served: tuple[Observed, str]) -> None:
    """/healthz is 503 with the one-line reason when there is a problem, else 200 ok with the
    warnings on the same line."""
    router, url = served
    assert httpx.get(f"{url}/healthz").text == "ok\n"
    router.warnings = ["r/a: stalled on t[0] for 80s"]
    assert httpx.get(f"{url}/healthz").text == "ok; r/a: stalled on t[0] for 80s\n"
    router.problem = "r/a: consumer thread ended and was not rebuilt"
    resp = httpx.get(f"{url}/healthz")
    assert resp.status_code == 503
    assert resp.text == "r/a: consumer thread ended and was not rebuilt\n"


# --- the router wired with fakes ------------------------------------------------------------


class Verdicts:
    """Every cluster up."""

    def verdict(self, cluster: str) -> Verdict:
        return Verdict(cluster, ClusterState.UP, 0.0, "healthy")

    def healthy_nodes(self, cluster: str) -> list[str]:
        return ["http://127.0.0.1:1"]

    def subscribe(self, callback: Subscriber) -> None:
        return

    def report_write(self, cluster: str, node: str, ok: bool) -> None:
        return


def test_the_router_runs_and_reloads_with_fake_destinations() -> None:
    """Wired with fake destinations and no Kafka: the routes start, the status answers at once
    and shows the destinations, and a reload rebuilds the changed route on the reload thread."""
    factory = Factory()
    router = Router(
        topology(),
        verdicts=Verdicts(),
        destinations=factory,
        tick=0.02,
        lag_interval=0.1,
        lag_timeout=0.1,
    )
    router.start()
    try:
        wait_until(lambda: router.last_tick > 0, timeout=5)
        began = time.monotonic()
        doc = router.status()
        assert time.monotonic() - began < 0.1
        assert [r["name"] for r in doc["routes"]] == ["r", "s"]
        assert doc["routes"][0]["destinations"][0]["cluster"] == "a"
        assert doc["healthy"] and router.health() == ("", [])
        old = factory.of("r", "a")
        router.apply(topology(CHANGED_R))
        wait_until(lambda: ("request_stop", True) in old.calls, timeout=5)
        for d in factory.built:
            if d.spec.route == "r":
                d.left.set()
        wait_until(lambda: factory.of("r", "a") is not old, timeout=5)
        wait_until(lambda: router.status()["routes"][0]["state"] == "running", timeout=5)
    finally:
        router.stop(timeout=1.0)
