"""InfluxSink against a real InfluxDB 1.6 (and Toxiproxy in front of it) from the local stack."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import httpx
import pytest

from devstack.toxiproxy import Toxiproxy
from router.errors import SinkMisconfigured, SinkTimeout, SinkUnavailable
from router.sink import InfluxSink, InfluxTarget, Rejected
from tests.support import influx_count, influx_query

pytestmark = pytest.mark.integration


class CountingTransport(httpx.HTTPTransport):
    """The real HTTP transport, counting the requests that went through it."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        return super().handle_request(request)


@dataclass
class Results:
    calls: list[tuple[str, bool]] = field(default_factory=list)

    def __call__(self, node: str, ok: bool) -> None:
        self.calls.append((node, ok))


MakeSink = Callable[..., InfluxSink]


@pytest.fixture
def make_sink(stack_env: dict[str, str]) -> Iterator[MakeSink]:
    """Build sinks for cluster influx-a (database metrics); closes them after the test."""
    sinks: list[InfluxSink] = []

    def make(
        nodes: Sequence[str],
        *,
        transport: httpx.BaseTransport | None = None,
        on_node_result: Callable[[str, bool], None] | None = None,
        **target: object,
    ) -> InfluxSink:
        fields: dict[str, object] = {
            "cluster": "influx-a",
            "api": "v1",
            "database": stack_env["INFLUX_DATABASE"],
        }
        fields.update(target)
        sink = InfluxSink(
            InfluxTarget(**fields),  # type: ignore[arg-type]
            lambda: nodes,
            on_node_result=on_node_result,
            transport=transport,
        )
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


def unique_measurement() -> str:
    return f"sink_{uuid.uuid4().hex[:10]}"


def test_points_are_counted_back_exactly(
    stack_env: dict[str, str], make_sink: MakeSink, gzip_on: bool
) -> None:
    """Every point of 1000 lines in 250 payloads is stored, with or without gzip."""
    url, db, m = stack_env["INFLUX_A_URL"], stack_env["INFLUX_DATABASE"], unique_measurement()
    payloads = [
        "".join(f"{m},host=h{p % 7} value={p * 4 + i} {p * 4 + i + 1}\n" for i in range(4)).encode()
        for p in range(250)
    ]
    assert make_sink([url], compression="gzip" if gzip_on else "none").write(payloads) == []
    assert influx_count(url, db, m) == 1000


@pytest.fixture(params=[True, False], ids=["gzip", "plain"])
def gzip_on(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_influxdb_16_partial_write_answer_format(stack_env: dict[str, str]) -> None:
    """InfluxDB 1.6 names each unparsable line as the sink's parser expects (pins the format)."""
    url, db, m = stack_env["INFLUX_A_URL"], stack_env["INFLUX_DATABASE"], unique_measurement()

    def post(body: str) -> httpx.Response:
        return httpx.post(f"{url}/write", params={"db": db}, content=body, timeout=5)

    some_bad = post(f"{m} value=1 1\n  {m} value= 2\n{m} value=3 3\n{m} nofield 4\n")
    assert some_bad.status_code == 400
    assert some_bad.json() == {
        "error": f"partial write: unable to parse '{m} value= 2': missing field value\n"
        f"unable to parse '{m} nofield 4': invalid field format dropped=0"
    }
    all_bad = post(f"{m} value= 1\n{m}\n")
    assert all_bad.json() == {
        "error": f"unable to parse '{m} value= 1': missing field value\n"
        f"unable to parse '{m}': missing fields"
    }
    conflict = post(f'{m} value="text" 5\n{m} value=6 6\n')
    assert conflict.json() == {
        "error": 'partial write: field type conflict: input field "value" on measurement '
        f'"{m}" is type string, already exists as type float dropped=1'
    }
    assert influx_count(url, db, m) == 3


def test_one_percent_malformed_lines_are_rejected_and_the_rest_stored(
    stack_env: dict[str, str], make_sink: MakeSink
) -> None:
    """With 1% malformed lines, every valid point is stored and each bad line is Rejected
    with its payload index, from a single request (the server's answer names them all)."""
    url, db, m = stack_env["INFLUX_A_URL"], stack_env["INFLUX_DATABASE"], unique_measurement()
    kinds = [
        (f"{m} value= {{t}}", "missing field value"),
        (f"{m} valuex {{t}}", "invalid field format"),
        (f"{m} value=1 {{t}}x", "bad timestamp"),
        (f"{m},host value=1 {{t}}", "missing tag value"),
    ]
    payloads: list[bytes] = []
    expected: list[Rejected] = []
    for p in range(1000):  # 1000 payloads of 2 lines: 2000 lines, 20 of them malformed
        lines = [f"{m},host=h{p % 5} value={p}.5 {p * 2 + i + 1}" for i in range(2)]
        if p % 50 == 7:
            template, why = kinds[(p // 50) % len(kinds)]
            lines[1] = template.format(t=p * 2 + 2)
            expected.append(Rejected(p, lines[1].encode(), f"unable to parse '{lines[1]}': {why}"))
        payloads.append(("\n".join(lines) + ("\n" if p % 2 else "")).encode())
    transport = CountingTransport()
    rejected = make_sink([url], transport=transport).write(payloads)
    assert rejected == expected
    assert len(rejected) == 20
    assert transport.requests == 1
    assert influx_count(url, db, m) == 2000 - 20


def test_type_conflicts_are_found_by_bisection(
    stack_env: dict[str, str], make_sink: MakeSink
) -> None:
    """Lines dropped for a field type conflict are bisected out, and so is an unparsable line
    that InfluxDB 1.6 does not even mention when a type conflict is in the same batch."""
    url, db, m = stack_env["INFLUX_A_URL"], stack_env["INFLUX_DATABASE"], unique_measurement()
    httpx.post(f"{url}/write", params={"db": db}, content=f"{m} value=0 1\n", timeout=5)
    payloads = [f"{m},n=n{i} value={i} {i + 10}".encode() for i in range(64)]
    for i in (3, 40, 41):
        payloads[i] = f'{m},n=n{i} value="text" {i + 10}'.encode()
    payloads[20] = f"{m},n=n20 value= 30".encode()
    rejected = make_sink([url]).write(payloads)
    assert [(r.index, r.line) for r in rejected] == [(i, payloads[i]) for i in (3, 20, 40, 41)]
    assert rejected[1].reason == f"unable to parse '{payloads[20].decode()}': missing field value"
    assert all(r.reason.startswith("field type conflict: ") for r in rejected if r.index != 20)
    assert influx_count(url, db, m) == 1 + 64 - 4


def test_unbalanced_quote_that_swallows_next_payloads_is_isolated(
    stack_env: dict[str, str], make_sink: MakeSink
) -> None:
    """A line with an open quote (which InfluxDB reads on into the next lines) is the only
    line rejected; the lines it swallowed are written."""
    url, db, m = stack_env["INFLUX_A_URL"], stack_env["INFLUX_DATABASE"], unique_measurement()
    payloads = [f"{m} value={i} {i + 1}".encode() for i in range(8)]
    payloads[2] = f'{m} value=2,s="open 3'.encode()
    rejected = make_sink([url]).write(payloads)
    assert [(r.index, r.line) for r in rejected] == [(2, payloads[2])]
    assert "unbalanced quotes" in rejected[0].reason
    assert influx_count(url, db, m) == 7


def test_microsecond_precision_is_stored_as_microseconds(
    stack_env: dict[str, str], make_sink: MakeSink
) -> None:
    """precision="us" lands at the right time (InfluxDB 1.x reads "us" as ns: we send "u")."""
    url, db, m = stack_env["INFLUX_A_URL"], stack_env["INFLUX_DATABASE"], unique_measurement()
    assert make_sink([url], precision="us").write([f"{m} value=1 1700000000000001".encode()]) == []
    assert influx_query(url, db, f'SELECT "value" FROM "{m}"') == [
        ["2023-11-14T22:13:20.000001Z", 1]
    ]


def test_unknown_database_is_misconfiguration(
    stack_env: dict[str, str], make_sink: MakeSink
) -> None:
    """Writing to a database that does not exist raises SinkMisconfigured at once."""
    url = stack_env["INFLUX_A_URL"]
    transport = CountingTransport()
    sink = make_sink([url], database=f"nosuch_{uuid.uuid4().hex[:6]}", transport=transport)
    with pytest.raises(SinkMisconfigured, match="database not found") as caught:
        sink.write([b"sink_nodb value=1 1"])
    assert (caught.value.cluster, caught.value.node) == ("influx-a", url)
    assert transport.requests == 1


def test_unknown_retention_policy_is_misconfiguration(
    stack_env: dict[str, str], make_sink: MakeSink
) -> None:
    """InfluxDB 1.6 answers 500 for an unknown retention policy; that is not retried."""
    transport = CountingTransport()
    sink = make_sink([stack_env["INFLUX_A_URL"]], retention_policy="nosuch", transport=transport)
    with pytest.raises(SinkMisconfigured, match="retention policy not found"):
        sink.write([b"sink_norp value=1 1"])
    assert transport.requests == 1


def test_cut_proxy_raises_unavailable_after_retries(
    stack_env: dict[str, str], make_sink: MakeSink, toxiproxy: Toxiproxy
) -> None:
    """Through a cut Toxiproxy proxy every attempt is refused: each one is reported as a node
    failure and the write raises SinkUnavailable naming the cluster and node."""
    proxy = stack_env["INFLUX_A_PROXY_URL"]
    toxiproxy.set_enabled(stack_env["INFLUX_A_PROXY_NAME"], False)
    results = Results()
    sink = make_sink([proxy], on_node_result=results, max_retries=2)
    with pytest.raises(SinkUnavailable) as caught:
        sink.write([b"sink_cut value=1 1"])
    assert type(caught.value) is SinkUnavailable
    assert (caught.value.cluster, caught.value.node) == ("influx-a", proxy)
    assert results.calls == [(proxy, False)] * 3


def test_cut_node_fails_over_to_the_next_node(
    stack_env: dict[str, str], make_sink: MakeSink, toxiproxy: Toxiproxy
) -> None:
    """With the proxy node cut, the retry goes to the next node and the point is stored."""
    url, db, m = stack_env["INFLUX_A_URL"], stack_env["INFLUX_DATABASE"], unique_measurement()
    proxy = stack_env["INFLUX_A_PROXY_URL"]
    toxiproxy.set_enabled(stack_env["INFLUX_A_PROXY_NAME"], False)
    results = Results()
    assert make_sink([proxy, url], on_node_result=results).write([f"{m} value=1 1".encode()]) == []
    assert results.calls == [(proxy, False), (url, True)]
    assert influx_count(url, db, m) == 1


def test_timeout_toxic_raises_sink_timeout_within_the_retry_budget(
    stack_env: dict[str, str], make_sink: MakeSink, toxiproxy: Toxiproxy
) -> None:
    """When the node never answers, the write raises SinkTimeout after about
    (max_retries + 1) * timeout (plus the short backoff sleeps), not later."""
    proxy = stack_env["INFLUX_A_PROXY_URL"]
    toxiproxy.add_toxic(stack_env["INFLUX_A_PROXY_NAME"], "timeout", {"timeout": 0})
    results = Results()
    sink = make_sink([proxy], on_node_result=results, timeout=0.5, max_retries=2)
    started = time.monotonic()
    with pytest.raises(SinkTimeout) as caught:
        sink.write([b"sink_timeout value=1 1"])
    elapsed = time.monotonic() - started
    budget = (2 + 1) * 0.5
    assert budget * 0.9 <= elapsed < budget + 0.3 + 1.0  # backoff sleeps total <= 0.3s
    assert caught.value.node == proxy
    assert results.calls == [(proxy, False)] * 3
