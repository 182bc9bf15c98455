"""Where a destination starts reading: ``start_offsets`` as a table, no Kafka."""

from __future__ import annotations

import pytest

from router.offsets import (
    MAX_HOLES,
    NO_OFFSET,
    Hole,
    Marks,
    decode_holes,
    encode_holes,
    merge_holes,
    start_offsets,
)

P = ("metrics", 0)
N = NO_OFFSET
G = tuple[int, int, int] | None
H = tuple[Hole, ...]

# mode, own, peer, (low, high) -> start, gap (first, earliest, lost), skip, recorded, holes after
CASES = [
    pytest.param("own", 40, 90, (0, 100), 40, None, None, None, (), id="own-replays-own-commit"),
    pytest.param(
        "takeover", 40, 90, (0, 100), 90, None, None, 90, ((40, 90),), id="takeover-at-the-max"
    ),
    pytest.param("takeover", 95, 90, (0, 100), 95, None, None, None, (), id="takeover-own-ahead"),
    pytest.param("own", N, 90, (0, 100), 0, None, None, 0, (), id="never-committed-starts-low"),
    pytest.param("takeover", N, N, (7, 100), 7, None, None, 7, (), id="nobody-committed"),
    pytest.param(
        "takeover", N, 60, (0, 100), 60, None, None, 60, ((0, 60),), id="standby-first-takeover"
    ),
    pytest.param("own", 10, 90, (30, 100), 30, (10, 30, 20), None, 30, (), id="retention-gap"),
    pytest.param(
        "takeover", 5, 10, (30, 100), 30, (10, 30, 20), None, 30, (), id="gap-over-the-max"
    ),
    pytest.param(
        "skip", 40, 90, (0, 100), 90, None, (40, 90), 90, (), id="skip-records-jump-not-hole"
    ),
    pytest.param("skip", 90, 90, (0, 100), 90, None, None, None, (), id="skip-nothing-missed"),
    pytest.param("skip", N, 90, (20, 100), 90, None, (20, 90), 90, (), id="skip-never-committed"),
    pytest.param(
        "skip", 5, 10, (30, 100), 30, (10, 30, 20), None, 30, (), id="skip-not-counted-twice"
    ),
    pytest.param("own", 150, N, (0, 100), 100, None, None, None, (), id="never-above-high-mark"),
    pytest.param("own", N, N, (0, 0), 0, None, None, 0, (), id="partition-added-to-topic"),
]


@pytest.mark.parametrize(
    ("mode", "own", "peer", "marks", "start", "gap", "skip", "rec", "holes"), CASES
)
def test_start_offsets_table(  # noqa: PLR0917 - one row of the table
    mode: str,
    own: int,
    peer: int,
    marks: tuple[int, int],
    start: int,
    gap: G,
    skip: tuple[int, int] | None,
    rec: int | None,
    holes: H,
) -> None:
    """Each row: the start, retention gap, skip, recorded commit and holes of one case."""
    plan = start_offsets(mode, {P: own}, [{P: peer}], {P: Marks(*marks)})
    assert plan.starts == {P: start}
    assert plan.gaps == ({P: gap} if gap else {})
    assert plan.skips == ({P: skip} if skip else {})
    assert plan.record == ({P: rec} if rec is not None else {})
    assert plan.holes == {P: holes}


def test_own_mode_ignores_peers() -> None:
    """A primary replaying from its own commit never looks at the standby's offsets."""
    plan = start_offsets("own", {P: 3}, [{P: 99}, {P: 98}], {P: Marks(0, 100)})
    assert plan.starts == {P: 3}
    assert plan.record == {}


def test_every_partition_of_the_watermarks_gets_a_start() -> None:
    """A partition missing from every commit map still gets a start (the low mark)."""
    q = ("metrics", 1)
    plan = start_offsets("takeover", {P: 5}, [{}], {P: Marks(0, 10), q: Marks(2, 10)})
    assert plan.starts == {P: 5, q: 2}


def test_a_standby_promoted_to_primary_replays_its_holes_first() -> None:
    """A cluster that took over at 90 from its commit at 40 (hole 40-90) and now runs from its
    own commits starts at 40: it gets the range it never held, and records that start."""
    plan = start_offsets("own", {P: 150}, [], {P: Marks(0, 200)}, {P: [(40, 90)]})
    assert plan.starts == {P: 40}
    assert plan.record == {P: 40}
    assert plan.holes == {P: ()}
    assert plan.gaps == {}


def test_holes_gone_from_kafka_are_counted_as_retention_loss() -> None:
    """Of a hole 40-90 with the log starting at 60, 20 messages are lost for good."""
    plan = start_offsets("own", {P: 150}, [], {P: Marks(60, 200)}, {P: [(40, 90)]})
    assert plan.starts == {P: 60}
    assert plan.gaps == {P: (40, 60, 20)}


def test_a_second_takeover_keeps_the_first_hole() -> None:
    """A standby that takes over twice carries both windows it missed."""
    plan = start_offsets("takeover", {P: 120}, [{P: 150}], {P: Marks(0, 200)}, {P: [(40, 90)]})
    assert plan.holes == {P: ((40, 90), (120, 150))}
    assert plan.starts == {P: 150}


def test_holes_round_trip_through_commit_metadata() -> None:
    """Holes encode to commit metadata and back; foreign metadata means no hole."""
    holes = ((1, 5), (9, 12))
    assert decode_holes(encode_holes(holes)) == holes
    assert decode_holes("something else") == ()
    assert decode_holes(None) == ()
    assert encode_holes(()) == ""


def test_too_many_holes_are_joined_where_closest() -> None:
    """Beyond the limit the two closest holes become one (a replay, never a loss)."""
    many = [(i * 10, i * 10 + 5) for i in range(MAX_HOLES)] + [(MAX_HOLES * 10 - 4, 10_000)]
    merged = merge_holes(many)
    assert len(merged) == MAX_HOLES
    assert merged[-1] == ((MAX_HOLES - 1) * 10, 10_000)
    assert len(encode_holes(merged)) < 4096
