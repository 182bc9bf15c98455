"""The sink reads the answers of every server it knows, in their own words.

InfluxDB 1.8.3 and VictoriaMetrics v1.151.0 answers are the bodies those servers sent on the
local stack (tests/integration/test_influx18.py pins them against the running servers);
InfluxDB 2.x answers are built as its source builds them (``http/write_handler.go``,
``kit/transport/http/error_handler.go``): there is no 2.x server here.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from router.errors import SinkMisconfigured
from router.sink import (
    InfluxSink,
    InfluxTarget,
    Rejected,
    _name_victoriametrics_line,
    _server_message,
    split_lines,
)

V2 = InfluxTarget(cluster="influx-d", api="v2", org="o", bucket="metrics/autogen", token="u:p")
VM = InfluxTarget(cluster="influx-vm", api="v1", flavor="victoriametrics", database="metrics")
MakeSink = Callable[..., InfluxSink]


def body_of(request: httpx.Request) -> bytes:
    raw = request.content
    return gzip.decompress(raw) if request.headers.get("content-encoding") == "gzip" else raw


@dataclass
class Script:
    """Answers requests in order from a list (the last answer repeats); records each body."""

    answers: list[httpx.Response]
    bodies: list[bytes] = field(default_factory=list)
    urls: list[httpx.URL] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(body_of(request))
        self.urls.append(request.url)
        return self.answers[min(len(self.bodies) - 1, len(self.answers) - 1)]


@pytest.fixture
def make_sink() -> Iterator[MakeSink]:
    sinks: list[InfluxSink] = []

    def make(
        handler: Callable[[httpx.Request], httpx.Response], target: InfluxTarget
    ) -> InfluxSink:
        sink = InfluxSink(
            target,
            lambda: ["http://n:8086"],
            transport=httpx.MockTransport(handler),
            backoff=lambda attempt: 0.0,
            sleep=lambda seconds: None,
        )
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


def influx18(status: int, error: str) -> httpx.Response:
    """An answer as InfluxDB 1.8.3 sends it, on /write and /api/v2/write alike."""
    return httpx.Response(status, json={"error": error})


def influx2(status: int, code: str, message: str) -> httpx.Response:
    """An answer as InfluxDB 2.x's HTTP error handler encodes it."""
    return httpx.Response(status, json={"code": code, "message": message})


# --- InfluxDB 1.8.3 over the v2 API ---------------------------------------------------------


def test_influx18_v2_partial_write_names_its_lines(make_sink: MakeSink) -> None:
    """1.8.3's v2 partial write (1.x's words, dropped=0) rejects the named lines in one request."""
    answer = influx18(
        400,
        "partial write: unable to parse 'm2 value= 2': missing field value\n"
        "unable to parse 'm2 nofield 4': invalid field format dropped=0",
    )
    script = Script([answer])
    payloads = [b"m2 value=1 1", b"  m2 value= 2", b"m2 value=3 3", b"m2 nofield 4"]
    rejected = make_sink(script, V2).write(payloads)
    assert rejected == [
        Rejected(1, b"  m2 value= 2", "unable to parse 'm2 value= 2': missing field value"),
        Rejected(3, b"m2 nofield 4", "unable to parse 'm2 nofield 4': invalid field format"),
    ]
    assert len(script.bodies) == 1


def test_influx18_v2_all_bad_rejects_every_named_line(make_sink: MakeSink) -> None:
    """1.8.3 without 'partial write:' (nothing parsed): every named line, one request."""
    answer = influx18(
        400,
        "unable to parse 'm2 value= 1': missing field value\nunable to parse 'm2': missing fields",
    )
    script = Script([answer])
    rejected = make_sink(script, V2).write([b"m2 value= 1", b"m2"])
    assert [(r.index, r.line) for r in rejected] == [(0, b"m2 value= 1"), (1, b"m2")]
    assert len(script.bodies) == 1


def test_influx18_v2_type_conflict_is_bisected(make_sink: MakeSink) -> None:
    """1.8.3's type conflict names no line: the batch is bisected down to the dropped line."""
    conflict = influx18(
        400,
        'partial write: field type conflict: input field "value" on measurement "m2" is '
        "type string, already exists as type float dropped=1",
    )

    def server(request: httpx.Request) -> httpx.Response:
        return conflict if b'"text"' in body_of(request) else httpx.Response(204)

    payloads = [b'm2 value="text" 5', b"m2 value=6 6", b"m2 value=7 7"]
    rejected = make_sink(server, V2).write(payloads)
    assert [(r.index, r.line) for r in rejected] == [(0, payloads[0])]
    assert rejected[0].reason.startswith("field type conflict: input field")


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, "authorization failed"),  # a wrong password in the token
        (401, "unable to parse authentication credentials"),  # a token without ':'
        (404, 'database not found: "nosuch"'),  # bucket=nosuch
        (500, "retention policy not found: nosuch"),  # bucket=metrics/nosuch
    ],
)
def test_influx18_v2_refusals_are_misconfiguration(
    make_sink: MakeSink, status: int, error: str
) -> None:
    """What 1.8.3 says to a bad token, bucket or retention policy stops the sink, unretried."""
    script = Script([influx18(status, error)])
    with pytest.raises(SinkMisconfigured, match=f"HTTP {status}"):
        make_sink(script, V2).write([b"m value=1 1"])
    assert len(script.bodies) == 1


def test_v2_write_carries_bucket_org_precision_and_token(make_sink: MakeSink) -> None:
    """The v2 request is what 1.8.3 accepted: bucket db/rp, org, precision ns, Token user:pass."""
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    make_sink(server, V2).write([b"m value=1 1"])
    assert seen[0].url.path == "/api/v2/write"
    assert dict(seen[0].url.params) == {"bucket": "metrics/autogen", "precision": "ns", "org": "o"}
    assert seen[0].headers["authorization"] == "Token u:p"


# --- InfluxDB 2.x ---------------------------------------------------------------------------


def test_influx2_parse_error_refuses_all_and_the_rest_is_sent_again(make_sink: MakeSink) -> None:
    """2.x refuses the whole request for a bad line: it is rejected, the others sent again."""
    script = Script(
        [
            influx2(400, "invalid", "unable to parse 'm BAD 2': invalid field format"),
            httpx.Response(204),
        ]
    )
    rejected = make_sink(script, V2).write([b"m value=1 1", b"m BAD 2", b"m value=3 3"])
    assert [(r.index, r.line) for r in rejected] == [(1, b"m BAD 2")]
    assert script.bodies[1] == b"m value=1 1\nm value=3 3\n"


def test_influx2_type_conflict_422_is_a_partial_write(make_sink: MakeSink) -> None:
    """2.x's 422 type conflict is read as 1.x's partial write: bisected, never retried as a
    failure of the node."""
    conflict = influx2(
        422,
        "unprocessable entity",
        "failure writing points to database: partial write: field type conflict: input field "
        '"value" on measurement "m" is type string, already exists as type float dropped=1',
    )

    def server(request: httpx.Request) -> httpx.Response:
        return conflict if b'"s"' in body_of(request) else httpx.Response(204)

    payloads = [f"m value={i} {i}".encode() for i in range(8)]
    payloads[6] = b'm value="s" 6'
    rejected = make_sink(server, V2).write(payloads)
    assert [(r.index, r.line) for r in rejected] == [(6, payloads[6])]
    assert rejected[0].reason.startswith("field type conflict: ")


def test_influx2_422_quoting_not_found_is_not_misconfiguration(make_sink: MakeSink) -> None:
    """A 422 that quotes data ("bucket not found" in a measurement name) is about the data."""
    conflict = influx2(
        422,
        "unprocessable entity",
        "failure writing points to database: partial write: field type conflict: input field "
        '"value" on measurement "bucket not found" is type string, already exists as type '
        "float dropped=1",
    )
    rejected = make_sink(Script([conflict]), V2).write([b'bucket\\ not\\ found value="s" 1'])
    assert [r.index for r in rejected] == [0]


def test_server_message_drops_2x_wrapper_only() -> None:
    """Only the "failure writing points to database: " wrapper is dropped from a message."""
    wrapped = influx2(422, "unprocessable entity", "failure writing points to database: x")
    assert _server_message(wrapped) == "x"
    internal = influx2(500, "internal error", "unexpected error writing points to database: y")
    assert _server_message(internal) == "unexpected error writing points to database: y"


# --- VictoriaMetrics ------------------------------------------------------------------------

# Bodies VictoriaMetrics v1.151.0 answered on the local stack (POST /write, HTTP 400).
VM_SOME_BAD = (
    "cannot process influx line protocol data: incorrect influx line "
    '"  vm1 value= 2\\nvm1 value=3 1700000000003000000\\nvm1 nofield 4": '
    'missing field value for "vm1"; '
    "see https://docs.victoriametrics.com/victoriametrics/integrations/influxdb/"
)
VM_UNICODE = (
    "cannot process influx line protocol data: incorrect influx line "
    '"vm3,t=é value= 1\\nvm3 value=1 1700000000006000000": '
    'cannot parse field value for "value": field value cannot be empty; '
    "see https://docs.victoriametrics.com/victoriametrics/integrations/influxdb/"
)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (VM_SOME_BAD, "unable to parse 'vm1 value= 2': missing field value for \"vm1\""),
        (
            VM_UNICODE,
            "unable to parse 'vm3,t=é value= 1': cannot parse field value for \"value\": "
            "field value cannot be empty",
        ),
        (  # the request ended with the bad line; escapes inside it
            "cannot process influx line protocol data: incorrect influx line "
            '"m s=\\"a\\\\b\\t\\u00a0\\"": bad',
            "unable to parse 'm s=\"a\\b\t\u00a0\"': bad",
        ),
        (  # an invalid UTF-8 byte: left to bisection
            'cannot process influx line protocol data: incorrect influx line "m \\xff": bad',
            None,
        ),
        (  # cut short, no closing quote
            'cannot process influx line protocol data: incorrect influx line "m value= 1\\nm',
            None,
        ),
        ("partial write: unable to parse 'm': missing fields dropped=0", None),
    ],
)
def test_victoriametrics_names_its_first_bad_line(message: str, expected: str | None) -> None:
    """VictoriaMetrics' message becomes 1.x's words for its first line, or stays as it is."""
    assert _name_victoriametrics_line(message) == (expected or message)


def go_quote(text: str) -> str:
    """Go's %q of printable text (what VictoriaMetrics quotes the request with)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped.replace("\r", "\\r").replace("\t", "\\t") + '"'


@dataclass
class FakeVictoriaMetrics:
    """Refuses a whole request at its first line with BAD, in VictoriaMetrics' words."""

    stored: list[bytes] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        text = body_of(request).decode()
        rows = text.split("\n")
        for i, row in enumerate(rows):
            if "BAD" in row:
                rest = "\n".join(rows[i:])
                return httpx.Response(
                    400,
                    text="cannot process influx line protocol data: incorrect influx line "
                    f"{go_quote(rest)}: cannot parse field value; see https://docs.example/\n",
                )
        self.stored.extend(row.encode() for row in rows if row)
        return httpx.Response(204)


def test_victoriametrics_bad_lines_are_rejected_the_rest_written(make_sink: MakeSink) -> None:
    """Each bad line costs one request: it is rejected, every other line is written once."""
    server = FakeVictoriaMetrics()
    payloads = [f'm,t=x value={i},s="a b" {i}'.encode() for i in range(10)]
    payloads[2] = b"m BAD 2"
    payloads[7] = b'm,t=x value=7,s="x BAD" 7'
    rejected = make_sink(server, VM).write(payloads)
    assert [(r.index, r.line) for r in rejected] == [(2, payloads[2]), (7, payloads[7])]
    assert rejected[0].reason == "unable to parse 'm BAD 2': cannot parse field value"
    assert sorted(server.stored) == sorted(set(payloads) - {payloads[2], payloads[7]})
    assert len(server.requests) == 3


def test_victoriametrics_gets_ns_not_1x_n(make_sink: MakeSink) -> None:
    """VictoriaMetrics reads 1.x's precision "n" as "guess by size", so it is sent "ns"."""
    script = Script([httpx.Response(204)])
    make_sink(script, VM).write([b"m value=1 5"])
    assert dict(script.urls[0].params) == {"db": "metrics", "precision": "ns"}
    influx = InfluxTarget(cluster="a", api="v1", database="metrics", precision="us")
    make_sink(script, influx).write([b"m value=1 5"])
    assert dict(script.urls[1].params) == {"db": "metrics", "precision": "u"}


def test_unknown_flavor_is_refused() -> None:
    """A target with a flavor the sink does not know is a ValueError at construction."""
    with pytest.raises(ValueError, match="unknown flavor"):
        InfluxTarget(cluster="x", api="v1", database="m", flavor="graphite")  # type: ignore[arg-type]


def test_go_quote_matches_json_for_printable_text() -> None:
    """The test's Go quoting agrees with JSON's for printable ASCII (a check of the helper)."""
    text = 'm,t=a s="x\\y"\nm v=1'
    assert go_quote(text) == json.dumps(text)
    assert split_lines(text.encode()) == [b'm,t=a s="x\\y"', b"m v=1"]
