"""Where a destination starts reading: ``start_offsets`` as a table, no Kafka."""

from __future__ import annotations

import pytest

from router.offsets import NO_OFFSET, Marks, StartPlan, start_offsets

P = ("metrics", 0)
N = NO_OFFSET

# mode, own, peer, (low, high) -> start, gap, skip, recorded
CASES = [
    pytest.param("own", 40, 90, (0, 100), 40, None, None, None, id="own-replays-from-own-commit"),
    pytest.param("takeover", 40, 90, (0, 100), 90, None, None, None, id="takeover-at-the-max"),
    pytest.param("takeover", 95, 90, (0, 100), 95, None, None, None, id="takeover-own-ahead"),
    pytest.param("own", N, 90, (0, 100), 0, None, None, 0, id="never-committed-starts-low"),
    pytest.param("takeover", N, N, (7, 100), 7, None, None, 7, id="nobody-committed"),
    pytest.param("takeover", N, 60, (0, 100), 60, None, None, None, id="standby-first-takeover"),
    pytest.param("own", 10, 90, (30, 100), 30, (10, 30), None, 30, id="retention-gap"),
    pytest.param("takeover", 5, 10, (30, 100), 30, (10, 30), None, 30, id="gap-over-the-max"),
    pytest.param("skip", 40, 90, (0, 100), 90, None, (40, 90), 90, id="skip-records-the-jump"),
    pytest.param("skip", 90, 90, (0, 100), 90, None, None, None, id="skip-nothing-missed"),
    pytest.param("skip", N, 90, (20, 100), 90, None, (20, 90), 90, id="skip-never-committed"),
    pytest.param("skip", 5, 10, (30, 100), 30, (10, 30), None, 30, id="skip-not-counted-twice"),
    pytest.param("own", 150, N, (0, 100), 100, None, None, None, id="never-above-high-mark"),
    pytest.param("own", N, N, (0, 0), 0, None, None, 0, id="partition-added-to-topic"),
]


@pytest.mark.parametrize(("mode", "own", "peer", "marks", "start", "gap", "skip", "rec"), CASES)
def test_start_offsets_table(  # noqa: PLR0917 - one row of the table
    mode: str,
    own: int,
    peer: int,
    marks: tuple[int, int],
    start: int,
    gap: tuple[int, int] | None,
    skip: tuple[int, int] | None,
    rec: int | None,
) -> None:
    """Each row: the start, the retention gap, the skip and the recorded commit of one case."""
    plan = start_offsets(mode, {P: own}, [{P: peer}], {P: Marks(*marks)})
    assert plan.starts == {P: start}
    assert plan.gaps == ({P: gap} if gap else {})
    assert plan.skips == ({P: skip} if skip else {})
    assert plan.record == ({P: rec} if rec is not None else {})


def test_own_mode_ignores_peers() -> None:
    """A primary replaying from its own commit never looks at the standby's offsets."""
    plan = start_offsets("own", {P: 3}, [{P: 99}, {P: 98}], {P: Marks(0, 100)})
    assert plan == StartPlan({P: 3}, {}, {}, {})


def test_every_partition_of_the_watermarks_gets_a_start() -> None:
    """A partition missing from every commit map still gets a start (the low mark)."""
    q = ("metrics", 1)
    plan = start_offsets("takeover", {P: 5}, [{}], {P: Marks(0, 10), q: Marks(2, 10)})
    assert plan.starts == {P: 5, q: 2}
