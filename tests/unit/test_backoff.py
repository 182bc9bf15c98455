"""The retry delay of a failing destination grows, is capped and is spread."""

from __future__ import annotations

import random

import pytest

from router.backoff import BASE, CAP, JITTER, backoff_delay


class _Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_no_failure_no_wait() -> None:
    """A destination that has not failed waits for nothing."""
    assert backoff_delay(0) == 0.0


def test_delay_doubles_with_each_failure() -> None:
    """Without jitter the delay is BASE, 2 x BASE, 4 x BASE..."""
    mid = _Fixed(0.5)
    assert [backoff_delay(n, mid) for n in (1, 2, 3)] == [BASE, 2 * BASE, 4 * BASE]


def test_delay_is_capped_even_after_many_failures() -> None:
    """However long a cluster stays bad, the next attempt is at most CAP (+ jitter) away."""
    assert backoff_delay(1000, _Fixed(1.0)) == pytest.approx(CAP * (1 + JITTER))


def test_jitter_spreads_the_delay_both_ways() -> None:
    """The random spread moves the delay by at most JITTER in either direction."""
    assert backoff_delay(1, _Fixed(0.0)) == pytest.approx(BASE * (1 - JITTER))
    assert backoff_delay(1, _Fixed(1.0)) == pytest.approx(BASE * (1 + JITTER))
