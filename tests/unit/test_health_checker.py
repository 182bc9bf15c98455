"""HealthChecker's timing without servers: the down_after window is ended on time by the
checker thread, a hung node is probed back to back, a short pause is ridden out.

The node is an httpx transport that answers /ping with 204, or, while "hung", holds the
request until it is resumed or the probe's timeout passes (then httpx's ReadTimeout, as a
real socket would give). Transport-level only: these tests claim nothing about delivery.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from structlog.testing import capture_logs

from health.checker import ClusterSpec, HealthChecker
from health.verdict import ClusterState, Verdict
from tests.support import wait_until

URL = "http://node-a:8086"


class HangingNode(httpx.BaseTransport):
    """A node that answers at once, or holds every request while hung."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._running = threading.Event()
        self._running.set()
        self._lock = threading.Lock()
        self.starts: list[float] = []
        self.answers: list[float] = []

    def hang(self) -> float:
        self._running.clear()
        return time.monotonic()

    def resume(self) -> float:
        self._running.set()
        return time.monotonic()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.starts.append(time.monotonic())
        if not self._running.wait(self.timeout):
            raise httpx.ReadTimeout("timed out", request=request)
        with self._lock:
            self.answers.append(time.monotonic())
        return httpx.Response(204)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Verdict, Verdict, float, str]] = []

    def __call__(self, old: Verdict, new: Verdict) -> None:
        self.calls.append((old, new, time.monotonic(), threading.current_thread().name))


@pytest.fixture
def made() -> Iterator[list[HealthChecker]]:
    checkers: list[HealthChecker] = []
    yield checkers
    for checker in checkers:
        checker.stop()


def start(
    made: list[HealthChecker],
    node: HangingNode,
    *,
    interval: float,
    down_after: float | None,
    fall: int,
) -> tuple[HealthChecker, Recorder]:
    checker = HealthChecker(
        {"a": ClusterSpec(api="v1", nodes=(URL,))},
        interval=interval,
        timeout=node.timeout,
        fall=fall,
        rise=2,
        down_after=down_after,
        transport=node,
    )
    made.append(checker)
    recorder = Recorder()
    checker.subscribe(recorder)
    checker.start()
    wait_until(lambda: len(node.answers) >= 2, timeout=5, what="two good probes")
    return checker, recorder


def test_hung_node_goes_down_when_its_window_ends(made: list[HealthChecker]) -> None:
    """A node that stops answering is DOWN down_after after its last good answer (not after
    fall timeouts), the transition comes on the checker thread, and node_state says why."""
    node = HangingNode(timeout=0.3)
    with capture_logs() as logs:
        checker, rec = start(made, node, interval=0.1, down_after=0.8, fall=10)
        hung_at = node.hang()
        wait_until(lambda: rec.calls, timeout=5, what="UP -> DOWN")

    old, new, at, thread = rec.calls[0]
    last_good = max(node.answers)
    assert (old.state, new.state) == (ClusterState.UP, ClusterState.DOWN)
    assert thread == "health-checker"
    assert 0.75 <= at - last_good <= 1.3, (at - last_good, at - hung_at)
    assert new.reason.startswith("0/1 nodes up (min_healthy 1); http://node-a:8086: ")
    assert "no good answer for 0.8s" in new.reason
    assert new.reason.endswith("no answer within 0.3s")
    node_events = [e for e in logs if e["event"] == "node_state"]
    assert [(e["from_state"], e["to_state"]) for e in node_events] == [("up", "down")]
    assert checker.healthy_nodes("a") == []


def test_hung_node_is_probed_back_to_back(made: list[HealthChecker]) -> None:
    """While a node hangs for longer than the interval, its next probe starts as soon as the
    last one timed out (not at the next multiple of the interval), so a node that resumes is
    seen at once."""
    node = HangingNode(timeout=0.4)
    start(made, node, interval=0.3, down_after=None, fall=100)
    hung_at = node.hang()
    wait_until(
        lambda: len([s for s in node.starts if s > hung_at]) >= 4,
        timeout=5,
        what="four probes of the hung node",
    )

    during = [s for s in node.starts if s > hung_at]
    gaps = [b - a for a, b in itertools.pairwise(during)][:3]
    assert all(0.39 <= gap < 0.55 for gap in gaps), gaps  # a round of 0.3 would give 0.6


def test_a_pause_shorter_than_the_window_changes_nothing(made: list[HealthChecker]) -> None:
    """A node paused for less than down_after minus an interval (one probe times out meanwhile)
    stays UP: no transition, no node_state event."""
    node = HangingNode(timeout=0.3)
    with capture_logs() as logs:
        checker, rec = start(made, node, interval=0.1, down_after=1.0, fall=10)
        hung_at = node.hang()
        wait_until(
            lambda: any(s > hung_at for s in node.starts) and time.monotonic() - hung_at >= 0.5,
            timeout=5,
            what="a probe during the pause",
        )
        resumed_at = node.resume()
        wait_until(
            lambda: len([a for a in node.answers if a > resumed_at + 0.05]) >= 5,
            timeout=5,
            what="good probes after the pause",
        )

    assert rec.calls == []
    assert [e for e in logs if e["event"] == "node_state"] == []
    assert checker.verdict("a").state is ClusterState.UP


def test_reported_write_timeouts_count_in_the_window(made: list[HealthChecker]) -> None:
    """A failed write (e.g. one that timed out) is a failed check: with the node's probes
    hanging without a timeout yet, a failed write opens the window and the node is DOWN
    when it ends."""
    node = HangingNode(timeout=30.0)  # probes never fail within the test: only writes do
    checker, rec = start(made, node, interval=0.1, down_after=0.6, fall=10)
    node.hang()
    last_good = max(node.answers)
    checker.report_write("a", URL, ok=False)
    wait_until(lambda: rec.calls, timeout=5, what="UP -> DOWN")

    at = rec.calls[0][2]
    assert 0.55 <= at - last_good <= 1.1
    assert rec.calls[0][1].reason.endswith("(1 check failed): write failed")
    node.resume()
