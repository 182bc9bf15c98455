"""How long a destination waits before it tries again, as a pure function of its failures."""

from __future__ import annotations

import random

BASE = 0.5  # seconds after the first failure
CAP = 30.0  # never more than this between two attempts
JITTER = 0.2  # +/- this fraction, so replicas that failed together do not retry together


def backoff_delay(failures: int, rand: random.Random | None = None) -> float:
    """Seconds to wait after ``failures`` consecutive failures (1, 2, ...): doubling from
    ``BASE`` up to ``CAP``, with +/- ``JITTER`` of random spread; 0 for no failure."""
    if failures <= 0:
        return 0.0
    delay = min(CAP, BASE * 2.0 ** min(failures - 1, 32))
    r: float = rand.random() if rand is not None else random.random()
    return delay * (1 - JITTER + 2 * JITTER * r)
