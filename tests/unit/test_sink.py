"""InfluxSink sorts every InfluxDB answer; httpx.MockTransport plays the server (no delivery
is claimed here: tests/integration/test_sink_influx.py writes to a real InfluxDB 1.6)."""

from __future__ import annotations

import gzip
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import httpx
import pytest
from structlog.testing import capture_logs

from router.errors import SinkMisconfigured, SinkTimeout, SinkUnavailable
from router.sink import (
    TOO_LARGE_REASON,
    InfluxSink,
    InfluxTarget,
    Rejected,
    default_backoff,
    split_lines,
)

NODES = ["http://a:8086", "http://b:8086", "http://c:8086"]
V1 = InfluxTarget(cluster="influx-a", api="v1", database="metrics")
Handler = Callable[[httpx.Request], httpx.Response]


def body_of(request: httpx.Request) -> bytes:
    raw = request.content
    return gzip.decompress(raw) if request.headers.get("content-encoding") == "gzip" else raw


@dataclass
class FakeInflux:
    """A tiny InfluxDB 1.x: lines with BAD do not parse, lines with CONFLICT are dropped.

    Answers in InfluxDB 1.6's exact words (pinned by the integration tests); ``max_body``
    answers 413 to larger (uncompressed) bodies; ``truncate`` cuts the named lines short.
    """

    max_body: int | None = None
    truncate: bool = False
    stored: list[bytes] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = body_of(request)
        if self.max_body is not None and len(body) > self.max_body:
            return httpx.Response(413, json={"error": "Request Entity Too Large"})
        failed: list[str] = []
        points: list[bytes] = []
        for raw in split_lines(body):
            line = raw.lstrip(b" \t")
            if not line or line.startswith(b"#"):
                continue
            if b"BAD" in line:
                shown = line[:8] if self.truncate else line
                failed.append(f"unable to parse '{shown.decode()}': invalid field format")
            else:
                points.append(line)
        if failed and not points:
            return httpx.Response(400, json={"error": "\n".join(failed)})
        conflicts = [p for p in points if b"CONFLICT" in p]
        self.stored.extend(p for p in points if b"CONFLICT" not in p)
        if conflicts:
            why = 'field type conflict: input field "value" on measurement "m" is type string'
            return httpx.Response(
                400, json={"error": f"partial write: {why} dropped={len(conflicts)}"}
            )
        if failed:
            message = "partial write: " + "\n".join(failed) + " dropped=0"
            return httpx.Response(400, json={"error": message})
        return httpx.Response(204)


@dataclass
class Script:
    """Answers requests in order from a list (the last answer repeats); records each one."""

    answers: list[httpx.Response | Exception]
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests) - 1, len(self.answers) - 1)]
        if isinstance(answer, Exception):
            raise answer
        return answer

    @property
    def hosts(self) -> list[str]:
        return [r.url.host for r in self.requests]


@dataclass
class Results:
    calls: list[tuple[str, bool]] = field(default_factory=list)

    def __call__(self, node: str, ok: bool) -> None:
        self.calls.append((node, ok))


@pytest.fixture
def make_sink() -> Iterator[Callable[..., InfluxSink]]:
    """Build sinks over a MockTransport with no backoff sleeps; closes them all afterwards."""
    sinks: list[InfluxSink] = []

    def make(
        handler: Handler,
        *,
        target: InfluxTarget = V1,
        nodes: Sequence[str] = NODES[:1],
        on_node_result: Callable[[str, bool], None] | None = None,
        backoff: Callable[[int], float] = lambda attempt: 0.0,
        sleep: Callable[[float], None] = lambda seconds: None,
    ) -> InfluxSink:
        sink = InfluxSink(
            target,
            lambda: nodes,
            on_node_result=on_node_result,
            transport=httpx.MockTransport(handler),
            backoff=backoff,
            sleep=sleep,
        )
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


def target(**changes: object) -> InfluxTarget:
    fields: dict[str, object] = {"cluster": "influx-a", "api": "v1", "database": "metrics"}
    fields.update(changes)
    return InfluxTarget(**fields)  # type: ignore[arg-type]


# --- success and request shape -------------------------------------------------------------


def test_204_returns_no_rejections(make_sink: Callable[..., InfluxSink]) -> None:
    """A 204 answer means every line was written and nothing is rejected."""
    script = Script([httpx.Response(204)])
    assert make_sink(script).write([b"m value=1 1"]) == []
    assert len(script.requests) == 1


def test_200_is_success_too(make_sink: Callable[..., InfluxSink]) -> None:
    """A 200 answer (some proxies and 2.x say so) counts as success."""
    assert make_sink(Script([httpx.Response(200)])).write([b"m value=1 1"]) == []


def test_no_payload_sends_no_request(make_sink: Callable[..., InfluxSink]) -> None:
    """An empty batch (or only empty payloads) costs no request."""
    script = Script([httpx.Response(204)])
    assert make_sink(script).write([b"", b""]) == []
    assert script.requests == []


def test_payloads_are_joined_with_a_newline_between_them(
    make_sink: Callable[..., InfluxSink],
) -> None:
    """Payloads with and without a trailing newline are joined without merging two lines (a
    payload ending in a newline leaves a blank line, which InfluxDB skips)."""
    script = Script([httpx.Response(204)])
    make_sink(script).write([b"m value=1 1", b"m value=2 2\n", b"m value=3 3\nm value=4 4"])
    body = body_of(script.requests[0])
    assert body == b"m value=1 1\nm value=2 2\n\nm value=3 3\nm value=4 4\n"
    assert [line for line in body.split(b"\n") if line] == [
        b"m value=1 1",
        b"m value=2 2",
        b"m value=3 3",
        b"m value=4 4",
    ]


def test_body_is_gzipped_with_header(make_sink: Callable[..., InfluxSink]) -> None:
    """With gzip on, the body is gzip data and the request says Content-Encoding: gzip."""
    script = Script([httpx.Response(204)])
    make_sink(script, target=target(compression="gzip", compression_level=6)).write(
        [b"m value=1 1"]
    )
    request = script.requests[0]
    assert request.headers["content-encoding"] == "gzip"
    assert gzip.decompress(request.content) == b"m value=1 1\n"


def test_gzip_off_sends_plain_body(make_sink: Callable[..., InfluxSink]) -> None:
    """With gzip off (the default), the body is the joined line protocol and has no
    Content-Encoding."""
    script = Script([httpx.Response(204)])
    make_sink(script).write([b"m value=1 1"])
    request = script.requests[0]
    assert "content-encoding" not in request.headers
    assert request.content == b"m value=1 1\n"


def test_v1_url_carries_db_rp_and_1x_precision(make_sink: Callable[..., InfluxSink]) -> None:
    """v1 posts to /write?db=&rp=&precision= with 1.x's precision letter (us -> u)."""
    script = Script([httpx.Response(204)])
    sink = make_sink(script, target=target(retention_policy="week", precision="us"))
    sink.write([b"m value=1 1"])
    url = script.requests[0].url
    assert (url.scheme, url.host, url.port, url.path) == ("http", "a", 8086, "/write")
    assert dict(url.params) == {"db": "metrics", "rp": "week", "precision": "u"}


def test_v1_basic_auth_header(make_sink: Callable[..., InfluxSink]) -> None:
    """v1 credentials go in an Authorization: Basic header, not in the URL."""
    script = Script([httpx.Response(204)])
    make_sink(script, target=target(username="bob", password="s3cret")).write([b"m v=1 1"])
    request = script.requests[0]
    assert request.headers["authorization"] == httpx.BasicAuth("bob", "s3cret")._auth_header
    assert "s3cret" not in str(request.url)


def test_v2_url_and_token_header(make_sink: Callable[..., InfluxSink]) -> None:
    """v2 posts to /api/v2/write?org=&bucket=&precision= with Authorization: Token."""
    script = Script([httpx.Response(204)])
    v2 = InfluxTarget(
        cluster="influx-c", api="v2", org="o", bucket="b", precision="ms", token="tok-123"
    )
    make_sink(script, target=v2).write([b"m value=1 1"])
    request = script.requests[0]
    assert request.url.path == "/api/v2/write"
    assert dict(request.url.params) == {"org": "o", "bucket": "b", "precision": "ms"}
    assert request.headers["authorization"] == "Token tok-123"


def test_node_url_trailing_slash_is_tolerated(make_sink: Callable[..., InfluxSink]) -> None:
    """A node URL ending in a slash still posts to /write, not //write."""
    script = Script([httpx.Response(204)])
    make_sink(script, nodes=["http://a:8086/"]).write([b"m value=1 1"])
    assert script.requests[0].url.path == "/write"


def test_target_requires_database_for_v1() -> None:
    """A v1 target without a database is a programming error caught at construction."""
    with pytest.raises(ValueError, match="database"):
        InfluxTarget(cluster="x", api="v1")


# --- nodes, retries, health signals --------------------------------------------------------


def test_writes_go_round_robin_over_nodes(make_sink: Callable[..., InfluxSink]) -> None:
    """Consecutive writes go to the healthy nodes in turn."""
    script = Script([httpx.Response(204)])
    sink = make_sink(script, nodes=NODES)
    for _ in range(6):
        sink.write([b"m value=1 1"])
    assert script.hosts == ["a", "b", "c", "a", "b", "c"]


def test_5xx_is_retried_on_the_next_node(make_sink: Callable[..., InfluxSink]) -> None:
    """A 503 from one node marks it failed and the write succeeds on the next node."""
    script = Script([httpx.Response(503), httpx.Response(204)])
    results = Results()
    assert make_sink(script, nodes=NODES, on_node_result=results).write([b"m value=1 1"]) == []
    assert script.hosts == ["a", "b"]
    assert results.calls == [("http://a:8086", False), ("http://b:8086", True)]


def test_persistent_5xx_raises_unavailable_after_max_retries(
    make_sink: Callable[..., InfluxSink],
) -> None:
    """After max_retries retries with backoff sleeps, SinkUnavailable names cluster and node."""
    script = Script([httpx.Response(500, json={"error": "engine: closed"})])
    sleeps: list[float] = []
    results = Results()
    sink = make_sink(
        script,
        nodes=NODES,
        on_node_result=results,
        backoff=lambda attempt: attempt + 0.5,
        sleep=sleeps.append,
    )
    with pytest.raises(SinkUnavailable) as caught:
        sink.write([b"m value=1 1"])
    assert type(caught.value) is SinkUnavailable
    assert len(script.requests) == V1.max_retries + 1
    assert sleeps == [0.5, 1.5, 2.5]
    assert results.calls == [(node, False) for node in [*NODES, NODES[0]]]
    assert (caught.value.cluster, caught.value.node) == ("influx-a", "http://a:8086")
    assert "HTTP 500" in str(caught.value)


def test_timeout_raises_sink_timeout(make_sink: Callable[..., InfluxSink]) -> None:
    """When the last attempt timed out, the write raises SinkTimeout (a SinkUnavailable)."""
    script = Script([httpx.ReadTimeout("slow")])
    results = Results()
    sink = make_sink(script, target=target(max_retries=1), on_node_result=results)
    with pytest.raises(SinkTimeout) as caught:
        sink.write([b"m value=1 1"])
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)
    assert results.calls == [("http://a:8086", False)] * 2


def test_connection_refused_raises_unavailable_not_timeout(
    make_sink: Callable[..., InfluxSink],
) -> None:
    """A refused connection is retried, then raised as SinkUnavailable, not SinkTimeout."""
    script = Script([httpx.ConnectError("[Errno 111] Connection refused")])
    with pytest.raises(SinkUnavailable) as caught:
        make_sink(script, target=target(max_retries=2)).write([b"m value=1 1"])
    assert type(caught.value) is SinkUnavailable
    assert len(script.requests) == 3


def test_no_healthy_node_raises_unavailable(make_sink: Callable[..., InfluxSink]) -> None:
    """With no healthy node to pick, the write fails at once without a request."""
    script = Script([httpx.Response(204)])
    with pytest.raises(SinkUnavailable, match="no healthy node"):
        make_sink(script, nodes=[]).write([b"m value=1 1"])
    assert script.requests == []


def test_nodes_gone_during_retries_raise_the_last_failure(
    make_sink: Callable[..., InfluxSink],
) -> None:
    """If the healthy-node list empties between attempts, the last failure is raised at once."""
    script = Script([httpx.ReadTimeout("slow")])
    answers: list[list[str]] = [NODES[:1], []]
    sink = InfluxSink(
        V1,
        lambda: answers.pop(0),
        transport=httpx.MockTransport(script),
        sleep=lambda seconds: None,
    )
    with sink, pytest.raises(SinkTimeout) as caught:
        sink.write([b"m value=1 1"])
    assert caught.value.node == "http://a:8086"
    assert len(script.requests) == 1


def test_closed_sink_refuses_to_write(make_sink: Callable[..., InfluxSink]) -> None:
    """A write after close() is a programming error, not a sink failure."""
    sink = make_sink(Script([httpx.Response(204)]))
    sink.close()
    with pytest.raises(RuntimeError, match="closed"):
        sink.write([b"m value=1 1"])


def test_unexpected_redirect_raises_unavailable(make_sink: Callable[..., InfluxSink]) -> None:
    """A 3xx is not followed: it is a node failure, retried, then SinkUnavailable."""
    script = Script([httpx.Response(307, headers={"Location": "http://elsewhere/write"})])
    results = Results()
    sink = make_sink(script, target=target(max_retries=1), on_node_result=results)
    with pytest.raises(SinkUnavailable, match="HTTP 307"):
        sink.write([b"m value=1 1"])
    assert script.hosts == ["a", "a"]
    assert results.calls == [("http://a:8086", False)] * 2


def test_concurrent_writes_share_the_round_robin(make_sink: Callable[..., InfluxSink]) -> None:
    """Writes from several threads at once all succeed and spread evenly over the nodes."""
    script = Script([httpx.Response(204)])
    sink = make_sink(script, nodes=NODES)

    def work() -> None:
        for _ in range(30):
            assert sink.write([b"m value=1 1"]) == []

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Counter(script.hosts) == {"a": 80, "b": 80, "c": 80}


def test_default_backoff_doubles_with_jitter_and_caps_at_two_seconds() -> None:
    """default_backoff(n) lies in [b/2, b] for b = min(2s, 0.1s * 2**n)."""
    for attempt in range(12):
        bound = min(2.0, 0.1 * 2**attempt)
        for _ in range(20):
            assert bound / 2 <= default_backoff(attempt) <= bound


# --- 400: isolate the bad lines ------------------------------------------------------------


def test_partial_write_rejects_exactly_the_named_lines(
    make_sink: Callable[..., InfluxSink],
) -> None:
    """The lines a partial-write answer names come back as Rejected; nothing is re-sent."""
    server = FakeInflux()
    payloads = [b"m value=1 1", b"m BAD 2\n", b"m value=3 3", b"m value=4 4\nm BAD 5\nm value=6 6"]
    rejected = make_sink(server).write(payloads)
    assert rejected == [
        Rejected(1, b"m BAD 2", "unable to parse 'm BAD 2': invalid field format"),
        Rejected(3, b"m BAD 5", "unable to parse 'm BAD 5': invalid field format"),
    ]
    assert len(server.requests) == 1
    assert server.stored == [b"m value=1 1", b"m value=3 3", b"m value=4 4", b"m value=6 6"]


def test_all_lines_bad_answer_without_partial_prefix(
    make_sink: Callable[..., InfluxSink],
) -> None:
    """When no line parsed (no 'partial write:' prefix), every named line is Rejected."""
    server = FakeInflux()
    rejected = make_sink(server).write([b"a BAD", b"b BAD\n# comment\n"])
    assert [(r.index, r.line) for r in rejected] == [(0, b"a BAD"), (1, b"b BAD")]
    assert len(server.requests) == 1


def test_identical_bad_lines_are_all_rejected(make_sink: Callable[..., InfluxSink]) -> None:
    """The same bad line in two payloads is rejected at both indexes."""
    rejected = make_sink(FakeInflux()).write([b"m BAD", b"m value=1 1", b"m BAD"])
    assert [r.index for r in rejected] == [0, 2]


def test_leading_whitespace_line_is_matched_and_returned_exactly(
    make_sink: Callable[..., InfluxSink],
) -> None:
    """InfluxDB names a line without its leading blanks; Rejected keeps the exact bytes."""
    server = FakeInflux()
    rejected = make_sink(server).write([b"m value=1 1\n  \tm BAD 2"])
    assert [(r.index, r.line) for r in rejected] == [(0, b"  \tm BAD 2")]
    assert len(server.requests) == 1


def test_blank_and_comment_lines_are_never_rejected(make_sink: Callable[..., InfluxSink]) -> None:
    """Blank lines and '# comments' never come back as Rejected, even during bisection."""
    server = FakeInflux()
    rejected = make_sink(server).write([b"\n\n# c\nm CONFLICT=1 1\n   \nm value=1 1\n"])
    assert [r.line for r in rejected] == [b"m CONFLICT=1 1"]
    assert server.stored[-1] == b"m value=1 1"


def test_type_conflict_falls_back_to_bisection(make_sink: Callable[..., InfluxSink]) -> None:
    """A 400 that names no line is bisected until each dropped line is found; the rest is stored."""
    server = FakeInflux()
    payloads = [f"m value={i} {i}".encode() for i in range(16)]
    payloads[5] = b'm CONFLICT="s" 5'
    payloads[12] = b'm CONFLICT="t" 12'
    rejected = make_sink(server).write(payloads)
    assert [(r.index, r.line) for r in rejected] == [(5, payloads[5]), (12, payloads[12])]
    assert rejected[0].reason.startswith("field type conflict: ")
    assert set(server.stored) == set(payloads) - {payloads[5], payloads[12]}


def test_truncated_names_fall_back_to_bisection(make_sink: Callable[..., InfluxSink]) -> None:
    """Named lines that match none of ours (truncated) are found by bisection instead."""
    server = FakeInflux(truncate=True)
    payloads = [f"m value={i} {i}".encode() for i in range(10)]
    payloads[3] = b"m BAD long line 3"
    rejected = make_sink(server).write(payloads)
    assert [(r.index, r.line) for r in rejected] == [(3, b"m BAD long line 3")]
    assert set(server.stored) == set(payloads) - {payloads[3]}
    assert len(server.requests) > 1


def test_partly_matched_names_rewrite_the_rest(make_sink: Callable[..., InfluxSink]) -> None:
    """When only some named lines match, the matched ones are rejected and the rest re-checked."""
    answers: list[httpx.Response | Exception] = [
        httpx.Response(
            400,
            json={
                "error": "partial write: unable to parse 'm BAD 1': invalid field format\n"
                "unable to parse 'm BAD 2 trunc': invalid field format dropped=0"
            },
        ),
        httpx.Response(204),
    ]
    script = Script(answers)
    rejected = make_sink(script).write([b"m BAD 1", b"m value=2 2"])
    assert [r.index for r in rejected] == [0]
    assert body_of(script.requests[1]) == b"m value=2 2\n"


def test_quoted_newline_stays_inside_its_line() -> None:
    """A newline inside a quoted string field value does not end the line (as in InfluxDB)."""
    payload = b'm,t=a value="x\ny" 1\nm value=2 2\nm k="un\\"bal 3\nm value=4 4'
    assert split_lines(payload) == [
        b'm,t=a value="x\ny" 1',
        b"m value=2 2",
        b'm k="un\\"bal 3\nm value=4 4',
    ]


def test_request_level_400_is_misconfiguration(make_sink: Callable[..., InfluxSink]) -> None:
    """A 400 about the request, not its lines ('database is required'), is not bisected."""
    script = Script([httpx.Response(400, json={"error": "database is required"})])
    with pytest.raises(SinkMisconfigured, match="HTTP 400"):
        make_sink(script).write([b"m value=1 1", b"m value=2 2"])
    assert len(script.requests) == 1


# --- 413: split --------------------------------------------------------------------------


def test_413_splits_the_payload_list(make_sink: Callable[..., InfluxSink]) -> None:
    """A body over the server's limit is written as halves of the payload list."""
    server = FakeInflux(max_body=30)
    payloads = [f"m value={i} {i}".encode() for i in range(8)]  # 12-13 bytes each
    assert make_sink(server).write(payloads) == []
    assert sorted(server.stored) == sorted(payloads)
    written = [body_of(r) for r in server.requests if len(body_of(r)) <= 30]
    assert sorted(b"".join(written).splitlines()) == sorted(payloads)  # each exactly once


def test_413_splits_one_big_payload_into_lines(make_sink: Callable[..., InfluxSink]) -> None:
    """A single payload still too large is written line by line groups."""
    server = FakeInflux(max_body=30)
    lines = [f"m value={i} {i}".encode() for i in range(6)]
    assert make_sink(server).write([b"\n".join(lines)]) == []
    assert sorted(server.stored) == sorted(lines)


def test_413_single_line_is_rejected(make_sink: Callable[..., InfluxSink]) -> None:
    """A single line over the limit is Rejected as too large; its neighbours are written."""
    server = FakeInflux(max_body=30)
    big = b"m value=" + b"9" * 40 + b" 1"
    rejected = make_sink(server).write([b"m value=1 1", b"m value=2 2\n" + big])
    assert rejected == [Rejected(1, big, TOO_LARGE_REASON)]
    assert sorted(server.stored) == [b"m value=1 1", b"m value=2 2"]


def test_400_inside_a_413_split_keeps_payload_indexes(
    make_sink: Callable[..., InfluxSink],
) -> None:
    """Bad lines found in a half written after a 413 still carry their original index."""
    server = FakeInflux(max_body=40)
    payloads = [f"m value={i} {i}".encode() for i in range(8)]
    payloads[6] = b"m BAD 6"
    rejected = make_sink(server).write(payloads)
    assert [(r.index, r.line) for r in rejected] == [(6, b"m BAD 6")]
    assert sorted(server.stored) == sorted(set(payloads) - {b"m BAD 6"})


# --- misconfiguration and secrets ----------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_is_misconfiguration_and_not_retried(
    make_sink: Callable[..., InfluxSink], status: int
) -> None:
    """401/403 raise SinkMisconfigured naming cluster and status after a single request."""
    script = Script([httpx.Response(status, json={"error": "authorization failed"})])
    with pytest.raises(SinkMisconfigured) as caught:
        make_sink(script, nodes=NODES).write([b"m value=1 1"])
    assert len(script.requests) == 1
    assert caught.value.cluster == "influx-a"
    assert "influx-a" in str(caught.value)
    assert f"HTTP {status}" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (404, 'database not found: "nosuch"'),
        (404, 'bucket "b" not found'),
        (500, "retention policy not found: week"),
    ],
)
def test_missing_database_bucket_or_rp_is_misconfiguration(
    make_sink: Callable[..., InfluxSink], status: int, message: str
) -> None:
    """An unknown database, bucket or retention policy raises SinkMisconfigured, not retried."""
    script = Script([httpx.Response(status, json={"error": message})])
    with pytest.raises(SinkMisconfigured, match="not found"):
        make_sink(script).write([b"m value=1 1"])
    assert len(script.requests) == 1


def test_plain_404_is_a_node_failure(make_sink: Callable[..., InfluxSink]) -> None:
    """A 404 that is not about a database or bucket is unexpected: SinkUnavailable."""
    script = Script([httpx.Response(404, text="404 page not found")])
    with pytest.raises(SinkUnavailable, match="HTTP 404"):
        make_sink(script, target=target(max_retries=0)).write([b"m value=1 1"])


def test_secrets_never_appear_in_errors_logs_or_repr(
    make_sink: Callable[..., InfluxSink],
) -> None:
    """Passwords, tokens and user names stay out of exceptions, log events and reprs."""
    secret_target = target(username="bob-user", password="pw-XYZ", token="tok-XYZ", max_retries=1)
    echo = 'user "bob-user" with token tok-XYZ / pw-XYZ is not authorized'
    script = Script([httpx.Response(503, text=echo), httpx.Response(403, json={"error": echo})])
    nodes = ["http://bob-user:pw-XYZ@a:8086"]
    sink = make_sink(script, target=secret_target, nodes=nodes)
    with capture_logs() as events, pytest.raises(SinkMisconfigured) as caught:
        sink.write([b"m value=1 1"])
    texts = [str(caught.value), caught.value.node, repr(secret_target), repr(sink), repr(events)]
    for text in texts:
        for secret in ("bob-user", "pw-XYZ", "tok-XYZ"):
            assert secret not in text
    assert events[0]["event"] == "sink_node_failed"


# --- max-series-per-database (router.guard's counterpart in InfluxDB) ----------------------


@dataclass
class SeriesLimitedInflux:
    """InfluxDB 1.6 (inmem index) with ``max-series-per-database = limit``: a write whose new
    series would pass the limit stores its points of known series and drops every new one,
    in 1.6's exact words (pinned by tests/integration/test_guard.py)."""

    limit: int
    series: set[bytes] = field(default_factory=set)
    stored: list[bytes] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        lines = [line for line in body_of(request).split(b"\n") if line]
        new = {line.split(b" ")[0] for line in lines} - self.series
        if len(self.series) + len(new) <= self.limit:
            self.series |= new
            new = set()
        kept = [line for line in lines if line.split(b" ")[0] not in new]
        self.stored.extend(kept)
        if len(kept) == len(lines):
            return httpx.Response(204)
        why = f"max-series-per-database limit exceeded: ({self.limit})"
        return httpx.Response(
            400, json={"error": f"partial write: {why} dropped={len(lines) - len(kept)}"}
        )


def test_series_limit_rejects_only_the_lines_past_it(
    make_sink: Callable[..., InfluxSink],
) -> None:
    """Past max-series-per-database the database fills up to the limit, the lines of series
    over it are rejected with InfluxDB's reason, known series are stored, no node is blamed."""
    server = SeriesLimitedInflux(limit=10)
    results = Results()
    sink = make_sink(server, on_node_result=results)
    assert sink.write([b"m,s=%d v=1 1" % i for i in range(6)]) == []
    payloads = [b"m,s=%d v=2 2" % i for i in range(20)]  # 6 known, 14 new, room for 4
    rejected = sink.write(payloads)
    assert len(server.series) == 10
    assert {r.line for r in rejected} == {b"m,s=%d v=2 2" % i for i in range(20)} - {
        line.split(b" ")[0] + b" v=2 2" for line in server.series
    }
    assert len(rejected) == 10
    assert {r.reason for r in rejected} == {"max-series-per-database limit exceeded: (10)"}
    assert set(server.stored) >= {b"m,s=%d v=2 2" % i for i in range(6)}
    assert all(ok for _, ok in results.calls)


def test_full_database_rejects_a_batch_of_new_series_in_two_requests(
    make_sink: Callable[..., InfluxSink],
) -> None:
    """When even one new series is refused the database is full: every line of a batch of new
    series is rejected after one probe, without a bisection down to single lines."""
    server = SeriesLimitedInflux(limit=2, series={b"m,s=a", b"m,s=b"})
    rejected = make_sink(server).write([b"m,s=n%d v=1 1" % i for i in range(64)])
    assert [r.index for r in rejected] == list(range(64))
    assert len(server.requests) == 2
    assert server.stored == []
