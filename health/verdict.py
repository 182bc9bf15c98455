"""What the router needs to know about a destination cluster: the narrow interface it consumes.

The local :class:`health.checker.HealthChecker` implements :class:`VerdictSource`; the
Consul-shared verdict will implement the same Protocol. Keep it narrow: the router asks
"is this cluster usable, and through which nodes", listens for transitions, and reports how its
writes went. Everything else (probes, hysteresis, who decides) stays behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class ClusterState(StrEnum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class Verdict:
    """The state of one cluster and why. Unchanged between two transitions of that cluster.

    ``since`` is the ``time.time()`` of the last transition (of the start, before any).
    ``reason`` is short and human, e.g. ``"0/1 nodes up (min_healthy 1); http://h:8086: 3/3
    checks failed: connection refused"``; never a secret, never a URL with credentials.
    """

    cluster: str
    state: ClusterState
    since: float
    reason: str


Subscriber = Callable[[Verdict, Verdict], None]
"""Called with (old, new) on every transition of a cluster; ``old`` is the previous ``new``."""


class VerdictSource(Protocol):
    def verdict(self, cluster: str) -> Verdict:
        """The current verdict; ``KeyError`` for a cluster the source does not know."""
        ...

    def healthy_nodes(self, cluster: str) -> list[str]:
        """Node URLs usable for writes now, in topology order; ``KeyError`` if unknown."""
        ...

    def subscribe(self, callback: Subscriber) -> None:
        """Call ``callback(old, new)`` on every cluster transition, from the source's thread."""
        ...

    def report_write(self, cluster: str, node: str, ok: bool) -> None:
        """A passive signal from the sink: a write to ``node`` succeeded or failed."""
        ...
