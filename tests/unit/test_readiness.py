"""When a replica says it is ready (/readyz): it holds its partitions (router.status)."""

from __future__ import annotations

from typing import Any

import httpx

from router.destination import DestinationStatus
from router.membership import Ownership
from router.status import DestinationView, route_unready
from tests.unit import test_engine_status
from tests.unit.test_engine_status import Observed

T0, T1 = ("t", 0), ("t", 1)
GRACE = 10.0


def dest(
    cluster: str, assigned: tuple[tuple[str, int], ...], state: str = "active", **kw: Any
) -> DestinationView:
    status = DestinationStatus(
        route="r",
        cluster=cluster,
        group=f"g.r.{cluster}",
        state=state,
        assigned=assigned,
        paused=(),
        in_flight=0,
        buffered=0,
        error="",
    )
    return DestinationView(cluster=cluster, status=status, active=state == "active", **kw)


def owns(*tps: tuple[str, int], empty_for: float = 0.0) -> Ownership:
    return Ownership(settled=True, owned=frozenset(tps), empty_for=empty_for)


def test_not_ready_before_the_assignment() -> None:
    """A membership the group has not given an assignment yet is not ready."""
    held = Ownership(settled=False, owned=frozenset(), empty_for=0.0)

    assert route_unready("g.r", held, [dest("a", ())], GRACE) == (
        "waiting for its partition assignment in group g.r"
    )


def test_ready_when_every_destination_holds_every_owned_partition() -> None:
    """Owned partitions assigned to the primary and the standby: ready."""
    views = [dest("a", (T0, T1)), dest("b", (T0, T1), state="paused")]

    assert route_unready("g.r", owns(T0, T1), views, GRACE) == ""


def test_not_ready_while_a_destination_lacks_a_partition() -> None:
    """A grant the standby's thread has not taken yet: not ready, saying which and how many."""
    views = [dest("a", (T0, T1)), dest("b", (T0,), state="paused")]

    assert (
        route_unready("g.r", owns(T0, T1), views, GRACE) == "b holds 1 of its 2 partitions so far"
    )


def test_a_standby_that_never_had_a_command_counts_by_its_partitions() -> None:
    """A standby the policy never activated stays ``starting`` with its partitions paused:
    what counts is that it holds them."""
    views = [dest("a", (T0,)), dest("b", (T0,), state="starting")]

    assert route_unready("g.r", owns(T0), views, GRACE) == ""


def test_empty_assignment_counts_only_after_the_grace() -> None:
    """An empty assignment may be the first round of a cooperative rebalance: not ready until
    it has stood for the grace, then ready (another replica holds every partition)."""
    views = [dest("a", ()), dest("b", (), state="paused")]

    young = route_unready("g.r", owns(empty_for=GRACE - 0.1), views, GRACE)
    old = route_unready("g.r", owns(empty_for=GRACE), views, GRACE)

    assert young.startswith("its assignment in group g.r is empty so far")
    assert old == ""


def test_a_leaving_destination_does_not_count() -> None:
    """The old destination of a route being rebuilt (leaving) is not asked to hold anything."""
    views = [dest("a", (T0,)), dest("a", (), state="closed", leaving=True)]

    assert route_unready("g.r", owns(T0), views, GRACE) == ""


served = test_engine_status.served  # an HTTP server in front of a router the test sets


def test_readyz_says_why_it_is_not_ready(served: tuple[Observed, str]) -> None:
    """/readyz is 503 with the reason until the router is ready, then 200 ``ready``."""
    router, url = served
    router.why = "route r: waiting for its partition assignment in group g.r"

    resp = httpx.get(f"{url}/readyz")
    assert (resp.status_code, resp.text) == (
        503,
        "not ready: route r: waiting for its partition assignment in group g.r\n",
    )
    router.why = ""
    resp = httpx.get(f"{url}/readyz")
    assert (resp.status_code, resp.text) == (200, "ready\n")
