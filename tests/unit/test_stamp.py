"""Lines without a timestamp get their Kafka message's timestamp: the pure function, the
precision arithmetic, the route option and the destination's use of them (with fakes)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from router.destination import Destination, DestinationSpec
from router.errors import ConfigError
from router.graphite import GraphiteConverter
from router.metrics import Metrics
from router.offsets import TopicPart
from router.policy import StartFrom
from router.stamp import Precision, kafka_time, lacks_timestamp, stamp_missing
from router.topology import parse_topology
from tests.support import wait_until
from tests.unit.fakes import FakeAdmin, FakeDeadLetters, FakeSink, FakeSource, Kafka

TS = 1_700_000_000_123_000_000  # what the tests stamp with (ns)

# (id, payload, expected) for payloads that need a stamp somewhere
STAMPED = [
    ("one line", b"cpu value=1i", b"cpu value=1i %d"),
    ("one line and its newline", b"cpu value=1i\n", b"cpu value=1i %d\n"),
    ("tags and several fields", b"cpu,host=a,dc=x u=1.5,s=2i", b"cpu,host=a,dc=x u=1.5,s=2i %d"),
    ("a field value ending in digits", b"cpu value=12345", b"cpu value=12345 %d"),
    ("a negative field value", b"cpu value=-12345", b"cpu value=-12345 %d"),
    (
        "only the lines without one",
        b"cpu value=1 5\ncpu value=2\ncpu value=3 -7",
        b"cpu value=1 5\ncpu value=2 %d\ncpu value=3 -7",
    ),
    ("every line", b"a v=1\nb v=2\n", b"a v=1 %d\nb v=2 %d\n"),
    (
        "escaped spaces in measurement and tags",
        b"my\\ cpu,host=web\\ 01 value=1",
        b"my\\ cpu,host=web\\ 01 value=1 %d",
    ),
    ("a quoted string with spaces", b'cpu s="a b 12"', b'cpu s="a b 12" %d'),
    ("an escaped quote in a string", b'cpu s="say \\"hi\\" 5"', b'cpu s="say \\"hi\\" 5" %d'),
    (
        "a newline inside a string ends no line",
        b'cpu s="x 1\ny 2",v=1i\ncpu v=2i 9',
        b'cpu s="x 1\ny 2",v=1i %d\ncpu v=2i 9',
    ),
    (
        "a string line that looks stamped is not",
        b'cpu s="a 1\n# b 2"',
        b'cpu s="a 1\n# b 2" %d',
    ),
    ("a newline after a backslash ends no line", b"cpu,t=a\\\nb v=1", b"cpu,t=a\\\nb v=1 %d"),
    ("comments are left alone", b"# note 123\n# note\ncpu v=1", b"# note 123\n# note\ncpu v=1 %d"),
    ("blank lines are kept", b"\ncpu v=1 5\n\n  \ncpu v=2\n", b"\ncpu v=1 5\n\n  \ncpu v=2 %d\n"),
    ("leading whitespace", b"  cpu v=1", b"  cpu v=1 %d"),
    ("trailing spaces stay after the stamp", b"cpu v=1  ", b"cpu v=1 %d  "),
]

# (id, payload) whose every line has a timestamp (or is no point): returned as the same object
UNCHANGED = [
    ("one line", b"cpu,host=a value=1i 1700000000000000000"),
    ("one line and its newline", b"cpu value=1i 1700000000000000000\n"),
    ("several lines", b"a v=1 1\nb v=2 2\nc v=3 3"),
    ("several lines and a newline", b"a v=1 1\nb v=2 2\n"),
    ("a negative timestamp", b"cpu v=1 -5"),
    ("negative timestamps", b"cpu v=1 -5\ncpu v=2 -6\n"),
    ("escaped spaces", b"my\\ cpu,host=web\\ 01 value=1 5"),
    ("a quoted string with spaces", b'cpu s="a b 12" 5\ncpu s="c" 6'),
    ("a newline inside a string", b'cpu s="x 1\ny",v=2i 5\ncpu v=2i 9'),
    ("comments and blank lines", b"# header\n\ncpu v=1 5\n  \n# 7\n"),
    ("trailing spaces", b"cpu v=1 5  \ncpu v=2 6 "),
    ("CRLF: refused by InfluxDB either way", b"cpu v=1\r\ncpu v=2 5\r\n"),
    ("no field set: refused by InfluxDB either way", b"cpu"),
    ("only a comment", b"# nothing here"),
    ("empty", b""),
]


@pytest.mark.parametrize(
    ("payload", "expected"), [c[1:] for c in STAMPED], ids=[c[0] for c in STAMPED]
)
def test_lines_without_a_timestamp_get_the_stamp(payload: bytes, expected: bytes) -> None:
    """Every point line without a timestamp, and only those, ends in `` <ts>``."""
    want = expected.replace(b"%d", b"%d" % TS)
    assert lacks_timestamp(payload)
    assert stamp_missing(payload, TS) == want


@pytest.mark.parametrize("payload", [c[1] for c in UNCHANGED], ids=[c[0] for c in UNCHANGED])
def test_payloads_with_every_timestamp_come_back_as_the_same_object(payload: bytes) -> None:
    """A payload with nothing to stamp is returned itself, not a copy."""
    assert stamp_missing(payload, TS) is payload


@pytest.mark.parametrize(
    "payload",
    [
        b"cpu v=1 1700000000000000000",
        b"cpu v=1 17\n",
        b"a v=1 1\nb v=2 -2",
        b"a v=1 1\nb v=2 2\n",
        b'cpu s="a b" 5\ncpu s="x 1\ny" 6\n',
    ],
)
def test_the_quick_test_says_no_for_stamped_payloads(payload: bytes) -> None:
    """Plain stamped payloads (the common case) never take the slow path."""
    assert not lacks_timestamp(payload)


@pytest.mark.parametrize(
    ("timestamp", "precision", "expected"),
    [
        ((1, 1_700_000_000_123), "ns", 1_700_000_000_123_000_000),
        ((1, 1_700_000_000_123), "us", 1_700_000_000_123_000),
        ((1, 1_700_000_000_123), "ms", 1_700_000_000_123),
        ((1, 1_700_000_000_123), "s", 1_700_000_000),
        ((2, 1_700_000_000_999), "s", 1_700_000_000),
        ((2, 5), "ns", 5_000_000),
        ((0, -1), "ns", None),
        ((0, -1), "s", None),
    ],
)
def test_kafka_time_converts_milliseconds_to_the_precision(
    timestamp: tuple[int, int], precision: Precision, expected: int | None
) -> None:
    """CreateTime and LogAppendTime convert (seconds round down); no timestamp is None."""
    assert kafka_time(timestamp, precision) == expected


def test_graphite_lines_without_a_timestamp_take_the_default() -> None:
    """The converter stamps a graphite line without a timestamp (or -1) with ``default_ns``."""
    lines, bad = GraphiteConverter(["measurement.field"]).convert(
        b"cpu.load 1\ncpu.load 2 -1\ncpu.load 3 1700000000", TS
    )
    assert bad == []
    assert lines.split(b"\n") == [
        b"cpu load=1.0 %d" % TS,
        b"cpu load=2.0 %d" % TS,
        b"cpu load=3.0 1700000000000000000",
    ]


# --- the route option ---------------------------------------------------------------------------

TOPOLOGY = """\
datacenter: dc1
kafka:
  bootstrap: "127.0.0.1:19092"
clusters:
  influx-a:
    urls: ["http://127.0.0.1:28086"]
    database: metrics
routes:
  - name: r
    topics: ["m"]
    primary: influx-a
"""


def test_route_option_defaults_to_stamping() -> None:
    """A route that does not say otherwise stamps lines without a timestamp."""
    assert parse_topology(TOPOLOGY).route("r").stamp_missing_timestamps is True


def test_route_option_can_be_turned_off() -> None:
    """``stamp_missing_timestamps: false`` leaves them to InfluxDB's arrival time."""
    text = TOPOLOGY + "    stamp_missing_timestamps: false\n"
    assert parse_topology(text).route("r").stamp_missing_timestamps is False


def test_route_option_must_be_a_bool() -> None:
    """Anything but true or false is reported at the key's path and line."""
    with pytest.raises(ConfigError) as caught:
        parse_topology(TOPOLOGY + "    stamp_missing_timestamps: sometimes\n", source="t.yaml")
    assert caught.value.errors == [
        "routes[0].stamp_missing_timestamps: must be true or false (line 12)"
    ]


# --- the destination ----------------------------------------------------------------------------

P0: TopicPart = ("m", 0)
SPEC = DestinationSpec(
    route="r",
    cluster="a",
    group="g.r.a",
    topics=("m",),
    peer_groups=("g.r.a",),
    max_points=10,
    max_bytes=10_000,
    linger=0.02,
    max_in_flight=2,
    write_deadline=5.0,
)
MSG_MS = 1_700_000_000_000  # the fakes' message timestamp at offset 0 (plus the offset)


def run_destination(spec: DestinationSpec, *values: bytes) -> list[bytes]:
    """Write ``values`` (one message each, partition P0) through a destination; the lines its
    sink received once the partition committed to the end."""
    kafka = Kafka()
    kafka.produce(P0, *values)
    source, sink = FakeSource(kafka, spec.group), FakeSink()
    dest = Destination(
        spec,
        sink=sink,
        admin=FakeAdmin(kafka),
        dead_letters=FakeDeadLetters(),
        metrics=Metrics(CollectorRegistry()),
        source=source,
    )
    source.rebalance([P0])
    dest.start()
    try:
        dest.activate(StartFrom.OWN)
        wait_until(
            lambda: kafka.committed(spec.group).get(P0) == len(values),
            timeout=10,
            what="commit to end",
        )
        return sink.lines
    finally:
        dest.stop(timeout=10)


@pytest.mark.parametrize(
    ("precision", "scale"), [("ns", 1_000_000), ("us", 1_000), ("ms", 1), ("s", None)]
)
def test_destination_stamps_lines_with_the_message_time(
    precision: Precision, scale: int | None
) -> None:
    """With the option on, a line without a timestamp gets its message's, in the precision."""
    spec = replace(SPEC, stamp_missing=True, precision=precision)
    lines = run_destination(spec, b"m v=0i", b"m v=1i 77", b"m v=2i\nm v=3i 78")
    ms = [MSG_MS, MSG_MS + 2]
    ts = [m // 1000 for m in ms] if scale is None else [m * scale for m in ms]
    assert lines == [b"m v=0i %d" % ts[0], b"m v=1i 77", b"m v=2i %d" % ts[1], b"m v=3i 78"]


def test_destination_leaves_lines_alone_when_the_option_is_off() -> None:
    """With the option off (the spec's default), lines pass through unchanged."""
    lines = run_destination(SPEC, b"m v=0i", b"m v=1i 77")
    assert lines == [b"m v=0i", b"m v=1i 77"]


def test_destination_stamps_graphite_lines_with_the_message_time() -> None:
    """A graphite route's lines without a timestamp get the message's, in nanoseconds."""
    spec = replace(SPEC, stamp_missing=True, graphite_templates=("measurement.field",))
    lines = run_destination(spec, b"cpu.load 1", b"cpu.load 2 1700000000")
    assert lines == [b"cpu load=1.0 %d" % (MSG_MS * 1_000_000), b"cpu load=2.0 1700000000000000000"]
