"""Backfill decisions without Kafka: times, where a run starts (fresh or resumed), what
retention took, and the arguments refused with a clear error."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from router.backfill import (
    BackfillError,
    Plan,
    Progress,
    iso,
    parse_time,
    plan_range,
    range_meta,
    retention_problems,
)
from router.commands import backfill_job
from router.console import BackfillReport
from router.offsets import NO_OFFSET, Marks, TopicPart
from router.topology import parse_topology

T0: TopicPart = ("t", 0)
T1: TopicPart = ("t", 1)
NOW = 1_800_000_000.0

TOPOLOGY = """
datacenter: dc1
kafka: {bootstrap: "127.0.0.1:9092", group_prefix: fr}
clusters:
  a: {urls: ["http://127.0.0.1:8086"], database: m}
  b: {urls: ["http://127.0.0.1:8087"], database: m}
  c: {urls: ["http://127.0.0.1:8088"], database: m}
routes:
  - {name: r, topics: [t], primary: a, standby: [b]}
"""


def args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {
        "route": "r",
        "cluster": "a",
        "since": "2026-11-20T00:00Z",
        "until": None,
        "restart": False,
    }
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-20T00:00Z", 1795132800.0),
        ("2026-11-20T00:00:00+00:00", 1795132800.0),
        ("2026-11-20 01:00+01:00", 1795132800.0),
        ("2026-11-20T00:00", 1795132800.0),  # no zone: UTC
        ("6h", NOW - 6 * 3600),
        ("90m", NOW - 5400),
        ("2d", NOW - 2 * 86400),
        ("now", NOW),
    ],
)
def test_parse_time_accepts_iso_and_durations_ago(text: str, expected: float) -> None:
    """ISO 8601 with or without a zone (UTC), 'now', or a duration ago."""
    assert parse_time(text, NOW) == expected


def test_parse_time_refuses_anything_else_and_says_what_works() -> None:
    """A typo gets an error listing the accepted forms."""
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday", NOW)


def test_a_first_run_starts_at_the_offsets_of_since() -> None:
    """No earlier progress: the range is [offsets of --since, end offsets)."""
    plan = plan_range(
        since=1.0,
        until=None,
        since_offsets={T0: 10, T1: 0},
        end_offsets={T0: 50, T1: 20},
        commits={},
    )
    assert plan == Plan(
        first={T0: 10, T1: 0}, start={T0: 10, T1: 0}, end={T0: 50, T1: 20}, resumed=False
    )
    assert plan.total == 60
    assert plan.done({T0: 30}) == 20


def commits(
    since: float,
    until: float | None,
    first: dict[TopicPart, int],
    end: dict[TopicPart, int],
    at: dict[TopicPart, int],
) -> dict[TopicPart, tuple[int, str]]:
    return {tp: (at[tp], range_meta(since, until, first[tp], end[tp])) for tp in first}


def test_the_same_range_resumes_from_its_commits_with_its_first_ends() -> None:
    """A rerun with the same --since/--until continues where the last one committed, and keeps
    the first run's end offsets (the stream grew meanwhile)."""
    saved = commits(1.0, None, {T0: 10, T1: 0}, {T0: 50, T1: 20}, {T0: 30, T1: 20})
    plan = plan_range(
        since=1.0,
        until=None,
        since_offsets={T0: 10, T1: 0},
        end_offsets={T0: 90, T1: 70},
        commits=saved,
    )
    assert plan.resumed
    assert plan.start == {T0: 30, T1: 20} and plan.end == {T0: 50, T1: 20}
    assert plan.done(plan.start) == 40 and plan.total == 60


def test_another_range_or_restart_starts_over() -> None:
    """Progress recorded for another --since, or --restart, is ignored."""
    saved = commits(1.0, None, {T0: 10}, {T0: 50}, {T0: 30})
    other = plan_range(
        since=2.0, until=None, since_offsets={T0: 12}, end_offsets={T0: 60}, commits=saved
    )
    assert not other.resumed and other.start == {T0: 12}
    again = plan_range(
        since=1.0,
        until=None,
        since_offsets={T0: 10},
        end_offsets={T0: 60},
        commits=saved,
        restart=True,
    )
    assert not again.resumed and again.start == {T0: 10}


def test_a_partition_without_progress_means_no_resume() -> None:
    """Every partition must carry the range: a half-known one (or junk metadata) starts over."""
    saved = commits(1.0, None, {T0: 10}, {T0: 50}, {T0: 30})
    saved[T1] = (NO_OFFSET, "")
    plan = plan_range(
        since=1.0,
        until=None,
        since_offsets={T0: 10, T1: 0},
        end_offsets={T0: 50, T1: 5},
        commits=saved,
    )
    assert not plan.resumed
    junk = {T0: (30, "holes:1-2")}
    assert not plan_range(
        since=1.0, until=None, since_offsets={T0: 10}, end_offsets={T0: 50}, commits=junk
    ).resumed


def test_range_meta_is_small_json() -> None:
    """The metadata fits Kafka's commit metadata limit with room to spare."""
    meta = range_meta(1795132800.0, None, 123456789, 987654321)
    assert json.loads(meta)["end"] == 987654321 and len(meta) < 128


def test_retention_took_data_when_the_oldest_message_is_younger_than_since() -> None:
    """A partition with deleted offsets whose first retained message is after --since lost
    data of the range: said with when data starts and how many messages are gone."""
    marks = {T0: Marks(500, 900), T1: Marks(0, 40)}
    lines = retention_problems(1000.0, marks, {T0: 1000.0 + 7200})
    assert lines == [
        f"t[0]: the earliest message Kafka still holds is from {iso(8200.0)} "
        "(2 h 0 min after --since), 500 earlier messages were deleted"
    ]
    assert retention_problems(9000.0, marks, {T0: 8200.0}) == []  # since is within retention


def test_backfill_arguments_name_what_is_unknown() -> None:
    """Unknown route, unknown cluster, a cluster not in the route, times out of order: each
    a clear error that lists what exists."""
    topology = parse_topology(TOPOLOGY)
    with pytest.raises(BackfillError, match=r"unknown route 'x' \(routes: r\)"):
        backfill_job(args(route="x"), topology, NOW)
    with pytest.raises(BackfillError, match=r"unknown cluster 'z' \(clusters: a, b, c\)"):
        backfill_job(args(cluster="z"), topology, NOW)
    with pytest.raises(BackfillError, match="'c' is not a destination of route r"):
        backfill_job(args(cluster="c"), topology, NOW)
    with pytest.raises(BackfillError, match="is not after --since"):
        backfill_job(args(until="2026-11-19T00:00Z"), topology, NOW)
    with pytest.raises(BackfillError, match="not a time"):
        backfill_job(args(since="last tuesday"), topology, NOW)


def test_the_backfill_group_is_its_own() -> None:
    """{group_prefix}.{route}.{cluster}.backfill: never the live group."""
    job = backfill_job(args(), parse_topology(TOPOLOGY), NOW)
    assert job.group == "fr.r.a.backfill"
    assert job.since == 1795132800.0 and job.until is None


def test_progress_is_a_bar_on_a_terminal_and_json_lines_otherwise() -> None:
    """Piped: one JSON object per report; on a terminal: a bar with done/total, no JSON."""
    p = Progress(
        done=50,
        total=200,
        points=50,
        points_per_s=25.0,
        messages_per_s=25.0,
        eta=6.0,
        state="running",
        resumed=False,
    )
    piped = io.StringIO()
    with BackfillReport("r -> a", out=piped, tty=False) as report:
        report(p)
    doc = json.loads(piped.getvalue())
    assert doc["percent"] == 25.0 and doc["eta_s"] == 6.0 and doc["event"] == "backfill_progress"
    term = io.StringIO()
    with BackfillReport("r -> a", out=term, tty=True) as report:
        report(p)
    assert "50/200" in term.getvalue() and "{" not in term.getvalue()
