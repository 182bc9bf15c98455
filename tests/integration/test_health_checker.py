"""HealthChecker against real InfluxDB 1.6 servers, with Toxiproxy breaking the network."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from devstack.toxiproxy import Toxiproxy
from health.checker import ClusterSpec, HealthChecker
from health.verdict import ClusterState, Verdict
from tests.support import wait_until

pytestmark = pytest.mark.integration

UP, DOWN = ClusterState.UP, ClusterState.DOWN
INTERVAL = 0.2


class RecordingTransport(httpx.BaseTransport):
    """httpx's real transport, noting when each request to each node ended and whether it got
    an answer (tests count probes with it instead of sleeping)."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self._lock = threading.Lock()
        self._ends: dict[str, list[tuple[float, bool]]] = {}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        answered = False
        try:
            response = self._inner.handle_request(request)
            answered = True
            return response
        finally:
            with self._lock:
                key = f"{request.url.host}:{request.url.port}"
                self._ends.setdefault(key, []).append((time.monotonic(), answered))

    def close(self) -> None:
        self._inner.close()

    def ends(self, url: str) -> list[tuple[float, bool]]:
        """(monotonic end time, answered) of every request to the node at ``url``."""
        parsed = httpx.URL(url)
        with self._lock:
            return list(self._ends.get(f"{parsed.host}:{parsed.port}", []))

    def count(self, url: str, *, answered: bool | None = None, after: float = 0.0) -> int:
        return sum(1 for end, ok in self.ends(url) if end > after and answered in (None, ok))


@dataclass
class Harness:
    checker: HealthChecker
    transport: RecordingTransport
    calls: list[tuple[Verdict, Verdict]] = field(default_factory=list)
    call_times: list[float] = field(default_factory=list)
    call_threads: set[str] = field(default_factory=set)

    def on_transition(self, old: Verdict, new: Verdict) -> None:
        self.calls.append((old, new))
        self.call_times.append(time.monotonic())
        self.call_threads.add(threading.current_thread().name)

    def moves(self) -> list[tuple[str, ClusterState, ClusterState]]:
        return [(new.cluster, old.state, new.state) for old, new in self.calls]


MakeChecker = Callable[..., Harness]


@pytest.fixture
def make_checker() -> Iterator[MakeChecker]:
    """Build a subscribed HealthChecker on a RecordingTransport; every one is stopped after."""
    made: list[HealthChecker] = []

    def make(
        clusters: dict[str, ClusterSpec],
        *,
        fall: int = 3,
        rise: int = 3,
        interval: float = INTERVAL,
        timeout: float = 0.5,
        start: bool = True,
    ) -> Harness:
        transport = RecordingTransport()
        checker = HealthChecker(
            clusters,
            interval=interval,
            timeout=timeout,
            fall=fall,
            rise=rise,
            transport=transport,
        )
        made.append(checker)
        harness = Harness(checker, transport)
        checker.subscribe(harness.on_transition)
        if start:
            checker.start()
        return harness

    yield make
    for checker in made:
        checker.stop()


def v1(*nodes: str, min_healthy: int = 1) -> ClusterSpec:
    return ClusterSpec(api="v1", nodes=nodes, min_healthy=min_healthy)


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def test_healthy_cluster_stays_up(stack_env: dict[str, str], make_checker: MakeChecker) -> None:
    """A reachable InfluxDB keeps its cluster UP over many probes, with no transition."""
    url = stack_env["INFLUX_A_PROXY_URL"]
    h = make_checker({"a": v1(url)})

    wait_until(lambda: h.transport.count(url, answered=True) >= 8, timeout=10, what="8 probes")

    assert h.checker.verdict("a").state is UP
    assert h.checker.healthy_nodes("a") == [url]
    assert h.calls == []


def test_cut_cluster_goes_down_after_fall_and_up_after_rise(
    stack_env: dict[str, str], toxiproxy: Toxiproxy, make_checker: MakeChecker
) -> None:
    """A cut proxy takes the cluster DOWN after fall failures, once; restored, UP after rise."""
    url, proxy = stack_env["INFLUX_A_PROXY_URL"], stack_env["INFLUX_A_PROXY_NAME"]
    with capture_logs() as logs:
        h = make_checker({"a": v1(url)}, fall=3, rise=2)
        wait_until(lambda: h.transport.count(url, answered=True) >= 1, timeout=10, what="probe")

        cut_at = time.monotonic()
        toxiproxy.set_enabled(proxy, False)
        wait_until(lambda: h.calls, timeout=10, what="UP -> DOWN")

        failed = h.transport.count(url, answered=False, after=cut_at)
        assert 3 <= failed <= 4  # the fall-th failure did it (one more may have ended since)
        wait_until(lambda: h.transport.count(url, after=cut_at) >= 8, timeout=10, what="probes")
        assert h.moves() == [("a", UP, DOWN)]  # still once, though probes keep failing
        down = h.checker.verdict("a")
        assert down.reason.endswith("3/3 checks failed: connection refused")
        assert h.checker.healthy_nodes("a") == []

        restored_at = time.monotonic()
        toxiproxy.set_enabled(proxy, True)
        wait_until(lambda: len(h.calls) == 2, timeout=10, what="DOWN -> UP")

    assert h.transport.count(url, answered=True, after=restored_at) >= 2
    assert h.moves() == [("a", UP, DOWN), ("a", DOWN, UP)]
    assert h.calls[1][0] == down
    assert h.call_threads == {"health-checker"}
    assert [(e["from_state"], e["to_state"]) for e in events(logs, "cluster_state")] == [
        ("up", "down"),
        ("down", "up"),
    ]
    assert events(logs, "cluster_state")[0] == {
        "event": "cluster_state",
        "log_level": "warning",
        "cluster": "a",
        "from_state": "up",
        "to_state": "down",
        "reason": down.reason,
    }


def test_hung_cluster_goes_down_without_delaying_others(
    stack_env: dict[str, str], toxiproxy: Toxiproxy, make_checker: MakeChecker
) -> None:
    """A server that never answers goes DOWN, while another cluster's probes keep their pace."""
    url_a, url_b = stack_env["INFLUX_A_PROXY_URL"], stack_env["INFLUX_B_PROXY_URL"]
    h = make_checker({"a": v1(url_a), "b": v1(url_b)}, fall=2, timeout=1.0)
    wait_until(lambda: h.transport.count(url_a, answered=True) >= 1, timeout=10, what="probe")

    hung_at = time.monotonic()
    toxiproxy.add_toxic(stack_env["INFLUX_A_PROXY_NAME"], "timeout", {"timeout": 0})
    wait_until(lambda: h.calls, timeout=15, what="a UP -> DOWN")
    down_at = h.call_times[0]

    assert h.moves() == [("a", UP, DOWN)]
    assert h.checker.verdict("a").reason.endswith("2/2 checks failed: no answer within 1s")
    assert down_at - hung_at >= 2 * 1.0  # two probes, each waited the full timeout
    assert h.checker.verdict("b").state is UP
    ends_b = [end for end, ok in h.transport.ends(url_b) if ok and hung_at <= end <= down_at]
    gaps = [later - earlier for earlier, later in itertools.pairwise(ends_b)]
    assert len(ends_b) >= 8
    assert max(gaps) < 0.7, f"probes of b were delayed: {gaps}"  # interval 0.2, timeout 1.0


def test_two_node_cluster_stays_up_with_one_node_cut(
    stack_env: dict[str, str], toxiproxy: Toxiproxy, make_checker: MakeChecker
) -> None:
    """With min_healthy=1, cutting one of two nodes drops it from healthy_nodes only."""
    url_a, url_b = stack_env["INFLUX_A_PROXY_URL"], stack_env["INFLUX_B_PROXY_URL"]
    with capture_logs() as logs:
        h = make_checker({"ab": v1(url_a, url_b, min_healthy=1)}, fall=2)
        toxiproxy.set_enabled(stack_env["INFLUX_A_PROXY_NAME"], False)
        wait_until(lambda: h.checker.healthy_nodes("ab") == [url_b], timeout=10, what="a down")
        cut_probes = h.transport.count(url_a)
        wait_until(lambda: h.transport.count(url_a) >= cut_probes + 3, timeout=10, what="probes")

    assert h.checker.verdict("ab").state is UP
    assert h.calls == []
    node_events = events(logs, "node_state")
    assert [(e["node"], e["to_state"], e["log_level"]) for e in node_events] == [
        (url_a, "down", "info")
    ]
    assert node_events[0]["reason"] == "2/2 checks failed: connection refused"


def test_two_node_cluster_needing_both_goes_down_with_one_cut(
    stack_env: dict[str, str], toxiproxy: Toxiproxy, make_checker: MakeChecker
) -> None:
    """With min_healthy=2, cutting one of two nodes takes the cluster DOWN."""
    url_a, url_b = stack_env["INFLUX_A_PROXY_URL"], stack_env["INFLUX_B_PROXY_URL"]
    h = make_checker({"ab": v1(url_a, url_b, min_healthy=2)}, fall=2)

    toxiproxy.set_enabled(stack_env["INFLUX_B_PROXY_NAME"], False)
    wait_until(lambda: h.calls, timeout=10, what="ab UP -> DOWN")

    assert h.moves() == [("ab", UP, DOWN)]
    assert h.checker.verdict("ab").reason.startswith("1/2 nodes up (min_healthy 2); ")
    assert h.checker.healthy_nodes("ab") == [url_a]


def test_failed_writes_take_cluster_down_and_notify_on_checker_thread(
    stack_env: dict[str, str], make_checker: MakeChecker
) -> None:
    """fall failed writes take a cluster DOWN at once; the subscriber hears it on the checker
    thread, not on the thread that reported the writes."""
    url = stack_env["INFLUX_C_PROXY_URL"]
    h = make_checker({"c": v1(url)}, fall=3, rise=2, interval=60.0)  # one probe round only
    wait_until(lambda: h.transport.count(url) >= 1, timeout=10, what="first probe")

    for _ in range(3):
        h.checker.report_write("c", url, ok=False)

    assert h.checker.verdict("c").state is DOWN  # at once, before any callback
    assert h.checker.verdict("c").reason.endswith("3/3 checks failed: write failed")
    wait_until(lambda: h.calls, timeout=5, what="UP -> DOWN callback")
    for _ in range(2):
        h.checker.report_write("c", url, ok=True)
    wait_until(lambda: len(h.calls) == 2, timeout=5, what="DOWN -> UP callback")

    assert h.moves() == [("c", UP, DOWN), ("c", DOWN, UP)]
    assert h.call_threads == {"health-checker"}
    h.checker.report_write("gone", url, ok=False)  # unknown cluster: ignored
    h.checker.report_write("c", "http://127.0.0.1:1", ok=False)  # unknown node: ignored
    assert h.checker.verdict("c").state is UP


def test_update_keeps_state_adds_and_removes_clusters(
    stack_env: dict[str, str], toxiproxy: Toxiproxy, make_checker: MakeChecker
) -> None:
    """A topology reload keeps a DOWN cluster DOWN, probes a new cluster, forgets a removed one."""
    url_a, url_b = stack_env["INFLUX_A_PROXY_URL"], stack_env["INFLUX_B_PROXY_URL"]
    h = make_checker({"a": v1(url_a)}, fall=2)
    toxiproxy.set_enabled(stack_env["INFLUX_A_PROXY_NAME"], False)
    wait_until(lambda: h.calls, timeout=10, what="a UP -> DOWN")
    down = h.checker.verdict("a")

    h.checker.update({"a": v1(url_a), "b": v1(url_b)})
    wait_until(lambda: h.transport.count(url_b, answered=True) >= 3, timeout=10, what="b probes")

    assert h.checker.verdict("a") == down
    assert h.checker.verdict("b").state is UP
    h.checker.update({"b": v1(url_b)})
    with pytest.raises(KeyError):
        h.checker.verdict("a")
    assert h.moves() == [("a", UP, DOWN)]


def test_v2_probe_of_a_v1_server_fails(
    stack_env: dict[str, str], make_checker: MakeChecker
) -> None:
    """A cluster declared v2 whose server has no /health (InfluxDB 1.6) goes DOWN, saying so."""
    url = stack_env["INFLUX_A_URL"]
    h = make_checker({"a": ClusterSpec(api="v2", nodes=(url,))}, fall=2, start=False)

    h.checker.probe_once()
    h.checker.probe_once()

    assert h.moves() == [("a", UP, DOWN)]
    assert h.checker.verdict("a").reason.endswith("2/2 checks failed: /health answered HTTP 404")


class _Influx2Health(BaseHTTPRequestHandler):
    """Answers GET /health like InfluxDB 2 with the status in ``server.health_status``."""

    def do_GET(self) -> None:
        status = getattr(self.server, "health_status", "pass")
        body = json.dumps({"name": "influxdb", "status": status, "checks": []}).encode()
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def influx2_health() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Influx2Health)
    thread = threading.Thread(target=server.serve_forever, name="influx2-health", daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_v2_health_status_decides(
    influx2_health: ThreadingHTTPServer, make_checker: MakeChecker
) -> None:
    """A v2 node is healthy only while /health says "pass" (the stack has only InfluxDB 1.x, so
    a stdlib server gives InfluxDB 2's answer)."""
    host, port = influx2_health.server_address[:2]
    url = f"http://{host!s}:{port}"
    h = make_checker({"v2": ClusterSpec(api="v2", nodes=(url,))}, fall=1, rise=1, start=False)

    h.checker.probe_once()
    assert h.calls == []
    influx2_health.health_status = "fail"  # type: ignore[attr-defined]
    h.checker.probe_once()
    influx2_health.health_status = "pass"  # type: ignore[attr-defined]
    h.checker.probe_once()

    assert h.moves() == [("v2", UP, DOWN), ("v2", DOWN, UP)]
    assert h.calls[0][1].reason.endswith("1/1 checks failed: /health status 'fail'")
    assert h.call_threads == {threading.current_thread().name}  # probe_once without start()
