"""``Batcher.add_run`` (the hot path: a whole consume call at once) closes batches exactly where
``Batcher.add`` (message by message) closes them, with the same contents and offsets."""

from __future__ import annotations

import random

import pytest

from router.batch import Batch, Batcher
from router.offsets import TopicPart


def _shape(batches: list[Batch]) -> list[tuple[object, ...]]:
    return [(b.values, b.origins, b.offsets, b.last, b.points, b.size, b.messages) for b in batches]


def _messages(rng: random.Random, n: int, multi_line: bool) -> list[tuple[TopicPart, int, bytes]]:
    offsets = {("t", p): rng.randrange(0, 1000) for p in range(3)}
    out = []
    for _ in range(n):
        tp = ("t", rng.randrange(3))
        offsets[tp] += rng.choice((1, 1, 1, 2))  # compacted topics leave gaps
        lines = rng.choice((1, 1, 2, 5)) if multi_line else 1
        value = b"\n".join(b"m,h=%d v=%di %d" % (rng.randrange(99), k, k) for k in range(lines))
        if multi_line and rng.random() < 0.3:
            value += b"\n"  # Telegraf ends each message with a newline
        out.append((tp, offsets[tp], value))
    return out


def _by_add(batcher: Batcher, msgs: list[tuple[TopicPart, int, bytes]]) -> list[Batch]:
    full = []
    for tp, offset, value in msgs:
        full += batcher.add(tp, offset, value)
    return full


@pytest.mark.parametrize("seed", range(40))
def test_add_run_closes_batches_where_add_does(seed: int) -> None:
    """Random runs (1- and multi-line messages, several partitions, offset gaps, runs split
    over several consume calls, limits by points and by bytes): identical batches."""
    rng = random.Random(seed)
    multi_line = seed % 2 == 1
    max_points = rng.choice((1, 3, 7, 50, 5000))
    max_bytes = rng.choice((64, 200, 1000, 1 << 20))
    msgs = [m for m in _messages(rng, rng.randrange(1, 400), multi_line) if len(m[2]) <= max_bytes]
    one, two = Batcher(max_points, max_bytes, 1.0), Batcher(max_points, max_bytes, 1.0)
    expected = _by_add(one, msgs)
    got: list[Batch] = []
    i = 0
    while i < len(msgs):
        run = msgs[i : i + rng.randrange(1, 300)]
        got += two.add_run([m[0] for m in run], [m[1] for m in run], [m[2] for m in run])
        i += len(run)
    assert _shape(got) == _shape(expected)
    assert _shape([two.current]) == _shape([one.current])


def test_what_the_caller_knows_gives_the_same_batches() -> None:
    """``one_line_each`` and ``lasts`` passed by the destination change nothing."""
    rng = random.Random(7)
    msgs = _messages(rng, 250, multi_line=False)
    tps, offsets, values = [m[0] for m in msgs], [m[1] for m in msgs], [m[2] for m in msgs]
    plain, told = Batcher(100, 1 << 20, 1.0), Batcher(100, 1 << 20, 1.0)
    expected = plain.add_run(tps, offsets, values)
    lasts = dict(zip(tps, offsets, strict=True))
    got = told.add_run(tps, offsets, values, one_line_each=True, lasts=lasts)
    assert _shape(got) == _shape(expected)
    assert [b.points for b in got] == [100, 100]
    assert told.current.points == 50
