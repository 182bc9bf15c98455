"""The route guard: block rules and the series-cardinality guard as a pure class (a fake clock),
its settings in the topology, its metrics, and a destination that uses it (with fakes)."""

from __future__ import annotations

import re
import threading
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry

from router.destination import Destination, DestinationSpec
from router.guard import BlockRule, Guard, Guards, Limits, build_guard
from router.metrics import Metrics
from router.offsets import TopicPart
from router.policy import StartFrom
from router.topology import GuardConfig, parse_topology
from tests.support import wait_until
from tests.unit.fakes import FakeAdmin, FakeDeadLetters, FakeSink, FakeSource, Kafka
from tests.unit.test_topology import MINIMAL, errors_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rule(
    name: str, measurement: str | None = None, key: str | None = None, value: str | None = None
) -> BlockRule:
    def compiled(pattern: str | None) -> re.Pattern[str] | None:
        return re.compile(pattern) if pattern is not None else None

    return BlockRule(name, compiled(measurement), compiled(key), compiled(value))


def limited(clock: Clock, **limits: object) -> Guard:
    settings: dict[str, object] = {"warmup": 0.0, **limits}
    return Guard((), Limits(**settings), clock=clock)  # type: ignore[arg-type]


def series(measurement: str, n: int, start: int = 0, ts: int = 1) -> bytes:
    return b"\n".join(
        b"%s,host=h%d v=1i %d" % (measurement.encode(), i, ts) for i in range(start, start + n)
    )


# --- pass-through ---------------------------------------------------------------------------


def test_known_series_pass_as_the_same_payload_object() -> None:
    """Once a series was let through, its messages come back as they are (no copy, no letter)."""
    guard = limited(Clock(), max_new_series_per_minute=100)
    payload = series("cpu", 20)
    assert guard.check(payload) == (payload, ())
    again = series("cpu", 20, ts=2)
    kept, refused = guard.check(again)
    assert kept is again and refused == ()
    one = b"cpu,host=h3 v=2i 3\n"
    assert guard.check(one)[0] is one


def test_a_guard_with_block_rules_only_tracks_no_series() -> None:
    """Without limits nothing is counted: every line not blocked passes."""
    guard = Guard([rule("tmp", measurement="^tmp_")])
    kept, refused = guard.check(series("cpu", 50))
    assert kept == series("cpu", 50) and not refused
    assert guard.stats().series == 0 and guard.stats().measurements == 0


def test_blank_lines_comments_and_lines_without_fields_are_left_to_influxdb() -> None:
    """What is not a point is neither refused nor counted; InfluxDB answers for it."""
    guard = limited(Clock(), max_series=1)
    payload = b"\n# cpu,host=x\n\ncpu,host=a\ncpu,host=a \ncpu,host=b v=1i 1\n"
    assert guard.check(payload) == (payload, ())
    assert guard.stats().series == 1


# --- block rules ------------------------------------------------------------------------------


def test_block_rule_by_measurement_regex_refuses_its_lines_only() -> None:
    """A measurement regex (searched) refuses matching lines with ``blocked:<rule>``; the rest
    of the message is written."""
    guard = Guard([rule("tmp", measurement="^tmp_")])
    kept, refused = guard.check(b"tmp_x,a=1 v=1i 1\ncpu v=1i 1\nmy_tmp_y v=1i 1\ntmp_z v=2 2")
    assert kept == b"cpu v=1i 1\nmy_tmp_y v=1i 1"
    assert refused == [(b"tmp_x,a=1 v=1i 1", "blocked:tmp"), (b"tmp_z v=2 2", "blocked:tmp")]
    assert guard.stats().blocked == {"tmp": 2}


def test_block_rule_by_tag_key_and_value() -> None:
    """A tag key rule refuses lines having that tag; with a value regex only matching values."""
    guard = Guard(
        [rule("request-id", key="^request_id$"), rule("debug-env", key="^env$", value="^debug")]
    )
    payload = (
        b"http,request_id=ab12 v=1i 1\n"
        b"http,request_idx=1 v=1i 1\n"
        b"http,env=debug-3 v=1i 1\n"
        b"http,env=prod v=1i 1"
    )
    kept, refused = guard.check(payload)
    assert kept == b"http,request_idx=1 v=1i 1\nhttp,env=prod v=1i 1"
    assert [why for _, why in refused] == ["blocked:request-id", "blocked:debug-env"]
    assert guard.stats().blocked == {"request-id": 1, "debug-env": 1}


def test_a_rule_with_measurement_and_tag_needs_both() -> None:
    """Every condition a rule gives must hold."""
    guard = Guard([rule("jobs", measurement="^jobs$", key="^run$")])
    kept, refused = guard.check(b"jobs,run=1 v=1i 1\njobs,host=a v=1i 1\ncpu,run=1 v=1i 1")
    assert [line for line, _ in refused] == [b"jobs,run=1 v=1i 1"]
    assert kept == b"jobs,host=a v=1i 1\ncpu,run=1 v=1i 1"


def test_blocked_lines_are_counted_every_time() -> None:
    """A blocked series stays blocked (its decision is cached), and each line is counted."""
    guard = Guard([rule("tmp", measurement="^tmp")])
    for _ in range(3):
        guard.check(b"tmp,a=1 v=1i 1\ncpu v=1i 1")
    assert guard.stats().blocked == {"tmp": 3}


def test_rules_see_names_with_their_escapes_removed() -> None:
    """``my\\ cpu`` is the measurement ``my cpu``; ``ho\\,st`` the tag key ``ho,st``."""
    guard = Guard([rule("spaced", measurement="^my cpu$"), rule("comma", key="^ho,st$")])
    kept, refused = guard.check(
        b"my\\ cpu,a=1 v=1i 1\nother,ho\\,st=x v=1i 1\nmy\\ cpus v=1i 1\nother,ho=x v=1i 1"
    )
    assert [why for _, why in refused] == ["blocked:spaced", "blocked:comma"]
    assert kept == b"my\\ cpus v=1i 1\nother,ho=x v=1i 1"


def test_leading_whitespace_does_not_slip_past_a_rule() -> None:
    """InfluxDB skips leading whitespace, so does the guard."""
    guard = Guard([rule("tmp", measurement="^tmp")])
    kept, refused = guard.check(b"cpu v=1i 1\n  tmp v=1i 1\n\ttmp v=2i 2")
    assert kept == b"cpu v=1i 1"
    assert len(refused) == 2


def test_a_quoted_newline_keeps_its_line_whole() -> None:
    """A newline inside a string field does not end the line: the refused line is all of it."""
    guard = Guard([rule("logs", measurement="^logs$")])
    payload = b'logs,app=a msg="two\nlines",n=1i 1\ncpu v=1i 1'
    kept, refused = guard.check(payload)
    assert refused == [(b'logs,app=a msg="two\nlines",n=1i 1', "blocked:logs")]
    assert kept == b"cpu v=1i 1"


def test_every_line_refused_leaves_nothing_to_write() -> None:
    """A message whose lines are all refused is empty (its offset still commits)."""
    guard = Guard([rule("tmp", measurement="^tmp")])
    kept, refused = guard.check(b"tmp v=1i 1\ntmp v=2i 2\n")
    assert kept == b"" and len(refused) == 2


# --- cardinality ------------------------------------------------------------------------------


def test_new_series_over_the_rate_are_refused_and_known_ones_flow() -> None:
    """With max_new_series_per_minute N, N new series of a measurement pass, the next are
    refused with ``cardinality:<measurement>``, known series keep flowing."""
    clock = Clock()
    guard = limited(clock, max_new_series_per_minute=5)
    kept, refused = guard.check(series("jobs", 8))
    assert kept == series("jobs", 5)
    assert [why for _, why in refused] == ["cardinality:jobs"] * 3
    assert guard.check(series("jobs", 5, ts=2)) == (series("jobs", 5, ts=2), ())
    st = guard.stats()
    assert (st.series, st.new_series, st.refused) == (5, 5, 3)


def test_the_rate_is_per_measurement() -> None:
    """One measurement at its limit does not stop another one's new series."""
    guard = limited(Clock(), max_new_series_per_minute=5)
    guard.check(series("jobs", 10))
    assert guard.check(series("cpu", 5)) == (series("cpu", 5), ())


def test_the_budget_refills_at_the_rate() -> None:
    """The bucket refills at N per minute: 12 seconds later one more of 5/min passes."""
    clock = Clock()
    guard = limited(clock, max_new_series_per_minute=5)
    guard.check(series("jobs", 5))
    assert guard.check(series("jobs", 1, start=5))[1]
    clock.now += 12
    assert guard.check(series("jobs", 1, start=6)) == (series("jobs", 1, start=6), ())
    assert guard.check(series("jobs", 1, start=7))[1]
    clock.now += 3600
    _, refused = guard.check(series("jobs", 7, start=100))
    assert len(refused) == 2  # a full bucket holds N, never more


def test_warmup_lets_every_series_through_but_max_series_still_holds() -> None:
    """During warmup the rate is not applied (after a restart every series is new);
    max_series is."""
    clock = Clock()
    guard = limited(clock, max_new_series_per_minute=5, max_series=50, warmup=60.0)
    assert guard.stats().warming_up
    kept, refused = guard.check(series("cpu", 60))
    assert kept == series("cpu", 50) and len(refused) == 10
    clock.now += 61
    assert not guard.stats().warming_up
    guard.check(series("mem", 5))
    assert len(guard.check(series("mem", 1, start=5))[1]) == 1


def test_max_series_per_measurement() -> None:
    """A measurement holds at most max_series series; others are not affected."""
    guard = limited(Clock(), max_series=3)
    assert len(guard.check(series("a", 4))[1]) == 1
    assert guard.check(series("b", 3))[1] == ()


def test_the_same_series_with_tags_in_another_order_is_one_series() -> None:
    """Tags are sorted for the series identity, as InfluxDB does."""
    guard = limited(Clock(), max_series=1)
    _, refused = guard.check(b"cpu,a=1,b=2 v=1i 1\ncpu,b=2,a=1 v=2i 2")
    assert not refused
    assert guard.stats().series == 1


def test_max_measurements_caps_the_measurements_tracked() -> None:
    """A measurement beyond max_measurements is refused (names that embed a timestamp make a
    new measurement per point)."""
    guard = limited(Clock(), max_series=10, max_measurements=3)
    payload = b"\n".join(b"app.%d.count v=1i 1" % i for i in range(5))
    _, refused = guard.check(payload)
    assert [why for _, why in refused] == ["cardinality:app.3.count", "cardinality:app.4.count"]
    assert guard.stats().measurements == 3


def test_max_tracked_series_caps_the_route() -> None:
    """Over every measurement, at most max_tracked_series series are tracked (memory)."""
    guard = limited(Clock(), max_series=100, max_tracked_series=4)
    guard.check(series("a", 3))
    kept, refused = guard.check(series("b", 3))
    assert kept == series("b", 1) and len(refused) == 2


def test_a_series_silent_for_the_ttl_is_forgotten_an_active_one_is_not() -> None:
    """Every ttl/2 a generation ends (on the next new series or stats read, as a scrape
    does): series not seen during the generation that ended are forgotten."""
    clock = Clock()
    guard = limited(clock, max_series=2, series_ttl=600.0)
    guard.check(b"m,s=active v=1i 1\nm,s=silent v=1i 1")
    for _ in range(4):
        clock.now += 200
        assert guard.check(b"m,s=active v=1i 2")[1] == ()
        guard.stats()
    assert guard.stats().series == 1
    assert guard.check(b"m,s=other v=1i 3")[1] == ()
    assert guard.check(b"m,s=silent v=1i 3")[1]  # new again, and over max_series


def test_stats_name_the_top_offenders() -> None:
    """The status page's offenders: most refused lines first, most series first."""
    guard = limited(Clock(), max_new_series_per_minute=3)
    guard.check(series("jobs", 10))
    guard.check(series("runs", 5))
    guard.check(series("cpu", 2))
    st = guard.stats(top=2)
    assert [(s.name, s.refused) for s in st.top_refused] == [("jobs", 7), ("runs", 2)]
    assert [(s.name, s.series) for s in st.top_series] == [("jobs", 3), ("runs", 3)]
    assert st.limited == 2


def test_destinations_on_several_threads_share_one_guard() -> None:
    """Concurrent checks of one route never let more new series through than the limit."""
    guard = limited(Clock(), max_series=100)
    threads = [
        threading.Thread(
            target=lambda k=k: [guard.check(series("m", 1, start=k * 1000 + i)) for i in range(60)]
        )
        for k in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert guard.stats().series == 100


# --- from the topology -----------------------------------------------------------------------

GUARDED = (
    MINIMAL
    + """\
    guard:
      block:
        - {name: tmp, measurement: "^tmp_"}
        - {name: request-id, tag: {key: "^request_id$"}}
      max_new_series_per_minute: 500
      max_series: 100000
"""
)


def test_topology_guard_section_builds_the_guard() -> None:
    """The route's ``guard:`` section becomes rules and limits; no section: no guard."""
    cfg = parse_topology(GUARDED).routes[0].guard
    assert cfg is not None
    guard = build_guard(cfg)
    kept, refused = guard.check(b"tmp_a v=1i 1\nx,request_id=1 v=1i 1\ncpu v=1i 1")
    assert kept == b"cpu v=1i 1"
    assert [why for _, why in refused] == ["blocked:tmp", "blocked:request-id"]
    assert guard.stats().warming_up  # the default warmup
    assert parse_topology(MINIMAL).routes[0].guard is None
    # the defaults docs/topology.md gives
    assert (cfg.max_tracked_series, cfg.max_measurements) == (1_000_000, 10_000)
    assert (cfg.series_ttl, cfg.warmup) == (3600.0, 600.0)


@pytest.mark.parametrize(
    ("section", "error"),
    [
        (
            "    guard: {}\n",
            "routes[0].guard: give block rules, max_new_series_per_minute or max_series (line 16)",
        ),
        (
            "    guard:\n      block: [{name: x}]\n",
            "routes[0].guard.block[0]: give measurement, tag or both (line 17)",
        ),
        (
            '    guard:\n      block: [{name: x, measurement: "^(a"}]\n',
            "routes[0].guard.block[0].measurement: invalid regex '^(a': missing ), "
            "unterminated subpattern at position 1 (line 17)",
        ),
        (
            "    guard:\n      block: [{name: x, tag: {key: a}}, {name: x, tag: {key: b}}]\n",
            "routes[0].guard.block[1].name: 'x' is used by an earlier rule (line 17)",
        ),
        (
            "    guard:\n      max_series: 10\n      warmup: 1m\n",
            "routes[0].guard.warmup: only with max_new_series_per_minute (line 18)",
        ),
        (
            "    guard:\n      block: [{name: x, tag: {key: a}}]\n      max_tracked_series: 5000\n",
            "routes[0].guard.max_tracked_series: only with max_new_series_per_minute or "
            "max_series (line 18)",
        ),
        (
            "    guard:\n      max_new_series_per_minute: 0\n",
            "routes[0].guard.max_new_series_per_minute: must be at least 1 (line 17)",
        ),
    ],
    ids=[
        "empty",
        "rule-without-condition",
        "bad-regex",
        "duplicate-rule",
        "warmup",
        "caps",
        "rate",
    ],
)
def test_topology_guard_errors_name_their_key(section: str, error: str) -> None:
    """Every problem of a guard section is reported at its key path and line."""
    assert errors_of(MINIMAL + section) == [error]


def test_guards_share_one_guard_per_route_and_config() -> None:
    """A route's destinations get one guard; a changed section gets a new one."""
    cfg = GuardConfig(max_series=10)
    guards = Guards()
    first = guards.get("r", cfg)
    assert first is not None and guards.get("r", GuardConfig(max_series=10)) is first
    other = guards.get("other", cfg)
    assert other is not first
    changed = guards.get("r", GuardConfig(max_series=11))
    assert changed is not None and changed is not first
    assert guards.get("r", None) is None
    assert set(guards.stats()) == {"r", "other"}
    del other  # held by no destination any more (a removed route): gone
    assert set(guards.stats()) == {"r"}


def test_metrics_expose_counts_per_route_and_rule_only() -> None:
    """Blocked lines per rule and cardinality figures per route; no measurement label."""
    guard = Guard([rule("tmp", measurement="^tmp")], Limits(max_new_series_per_minute=1, warmup=0))
    guard.check(b"tmp v=1i 1\njobs,run=1 v=1i 1\njobs,run=2 v=1i 1")
    metrics = Metrics(CollectorRegistry())
    metrics.watch_guards(lambda: {"r": guard.stats()})
    get = metrics.registry.get_sample_value
    assert get("frouter_guard_blocked_lines_total", {"route": "r", "rule": "tmp"}) == 1
    assert get("frouter_guard_cardinality_refused_lines_total", {"route": "r"}) == 1
    assert get("frouter_guard_series", {"route": "r"}) == 1
    assert get("frouter_guard_limited_measurements", {"route": "r"}) == 1
    metrics.watch_guards(dict)  # a second router on the same registry replaces the source
    assert get("frouter_guard_series", {"route": "r"}) is None


# --- a destination that uses it (fakes) --------------------------------------------------------

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


@pytest.mark.parametrize("graphite", [False, True], ids=["line", "graphite"])
def test_destination_dead_letters_refused_lines_and_commits_past_them(graphite: bool) -> None:
    """Refused lines reach the dead letters with their reason and source offset, the rest is
    written, and a message whose every line was refused still commits."""
    guard = Guard([rule("tmp", measurement="^tmp")])
    spec = replace(SPEC, guard=guard)
    if graphite:
        spec = replace(spec, graphite_templates=("measurement.field",))
        values = [b"cpu.load 1 1700000000\ntmp.x 2 1700000000", b"tmp.y 3 1700000000"]
        written = [b"cpu load=1.0 1700000000000000000"]
    else:
        values = [b"cpu v=1i 1\ntmp_x v=2i 2", b"tmp_y v=3i 3"]
        written = [b"cpu v=1i 1"]
    kafka = Kafka()
    kafka.produce(P0, *values)
    source, sink, dlq = FakeSource(kafka, spec.group), FakeSink(), FakeDeadLetters()
    dest = Destination(
        spec,
        sink=sink,
        admin=FakeAdmin(kafka),
        dead_letters=dlq,
        metrics=Metrics(CollectorRegistry()),
        source=source,
    )
    source.rebalance([P0])
    dest.start()
    try:
        dest.activate(StartFrom.OWN)
        wait_until(lambda: kafka.committed(spec.group).get(P0) == 2, timeout=10, what="commit")
    finally:
        dest.stop(timeout=10)
    assert sink.lines == written
    assert [(dl.reason, dl.offset, dl.topic, dl.route) for dl in dlq.letters] == [
        ("blocked:tmp", 0, "m", "r"),
        ("blocked:tmp", 1, "m", "r"),
    ]
