"""Commit-after-write: offsets are committable only up to the lowest batch still in flight."""

from __future__ import annotations

from router.offsets import OffsetTracker

A = ("metrics", 0)
B = ("metrics", 1)


def test_single_batch_commits_its_next_offset() -> None:
    """A completed batch makes last offset + 1 committable."""
    t = OffsetTracker()
    t.add(1, {A: 9})
    assert t.complete(1) == {A: 10}


def test_later_batch_waits_for_earlier_one() -> None:
    """A batch completing before an earlier one of the same partition commits nothing."""
    t = OffsetTracker()
    t.add(1, {A: 9})
    t.add(2, {A: 19})
    assert t.complete(2) == {}
    assert t.complete(1) == {A: 20}


def test_partitions_are_independent() -> None:
    """An in-flight batch of one partition does not hold back another partition."""
    t = OffsetTracker()
    t.add(1, {A: 9})
    t.add(2, {A: 19, B: 4})
    assert t.complete(2) == {B: 5}
    assert t.complete(1) == {A: 20}


def test_failed_batch_blocks_its_partition() -> None:
    """After a failure, later successes of that partition never become committable."""
    t = OffsetTracker()
    t.add(1, {A: 9})
    t.add(2, {A: 19})
    assert t.fail(1) == [A]
    assert t.complete(2) == {}
    assert t.in_flight(A) == 1


def test_drop_forgets_partition_and_empty_batches() -> None:
    """Dropping a partition discards its pending batches and their results."""
    t = OffsetTracker()
    t.add(1, {A: 9})
    t.add(2, {A: 19, B: 3})
    t.drop([A])
    assert t.in_flight() == 1
    assert t.complete(1) == {}
    assert t.complete(2) == {B: 4}
    assert t.in_flight() == 0
