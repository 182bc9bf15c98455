"""Re-probes of misconfigured clusters, so a fixed password or database recovers by itself.

A cluster whose writes InfluxDB refused (401/403, unknown database, bucket or retention
policy) is unusable: its destinations are ``stopped`` and its routes fail over. The
``Reprober`` checks it again, with the cluster's credentials as they are now, until a probe is
accepted; then ``on_recovered`` makes the cluster usable again (the policy activates its
destinations, a primary replays what it missed and takes the route back).

When (``probe_delay``, pure): 1 s after the refusal, then 2, 4, 8, 16 s, then every 30 s, each
shortened by up to 20 % at random so replicas refused together do not probe together; never
more than ``CAP``. A probe is also due at once when ``version(cluster)`` changes: the engine
passes the state of the cluster's secret files, so a rotated password is tried within a pass
(``POLL``), not at the next step of the back-off. A fix made elsewhere (a password set on the
server, a database created) is therefore seen within ``CAP`` seconds. A cluster refused again
within ``FLAP_WINDOW`` of its recovery (a probe accepted but writes refused) goes on from where
its back-off was, so a cluster that keeps flapping is retried every ``CAP`` seconds, not every
second.

Threads: one thread ("reprobe") runs the probes, one at a time; a probe is bounded by the
cluster's write timeout. ``add`` and ``discard`` may be called from any thread (a destination
thread reports a refusal through the engine) and never wait for a probe: ``_lock`` guards the
table only. ``on_recovered`` is called on the reprobe thread, without the lock.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from router.errors import RouterError, SinkMisconfigured
from router.worker import Worker

__all__ = ["CAP", "FIRST", "FLAP_WINDOW", "JITTER", "Reprober", "probe_delay"]

log = structlog.get_logger("router")

FIRST = 1.0  # seconds from the refusal to the first probe
CAP = 30.0  # never longer between two probes of one cluster
JITTER = 0.2  # each delay is shortened by up to this fraction
POLL = 0.5  # seconds between two looks at the table (and at the secret versions)
FLAP_WINDOW = 2 * CAP  # refused again this soon after a recovery: the back-off goes on

_UNSEEN = object()


def probe_delay(attempt: int, rand: float) -> float:
    """Seconds before probe number ``attempt`` (1, 2, ...) of one refusal: ``FIRST`` doubling
    up to ``CAP``, shortened by ``JITTER`` x ``rand`` (``rand`` in [0, 1))."""
    base = min(CAP, FIRST * 2.0 ** min(max(attempt, 1) - 1, 32))
    return base * (1.0 - JITTER * rand)


@dataclass
class _Entry:
    reason: str  # why the cluster is refused now (the last refusal or probe answer)
    due: float  # monotonic time of the next probe
    attempts: int = 0  # probes made since the refusal
    version: object = _UNSEEN  # the secret version the last probe (or the refusal) saw


class Reprober(Worker):
    def __init__(
        self,
        *,
        probe: Callable[[str], None],
        on_recovered: Callable[[str], None],
        version: Callable[[str], object] = lambda cluster: None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        poll: float = POLL,
    ) -> None:
        """``probe(cluster)`` returns if the cluster accepts writes now and raises a
        RouterError (``SinkMisconfigured``: still refused) otherwise."""
        self._probe = probe
        self._on_recovered = on_recovered
        self._version = version
        self._clock = clock
        self._rand = rand
        self._poll = poll
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._recovered: dict[str, tuple[float, int]] = {}  # cluster -> (when, probes it took)
        Worker.__init__(self, "reprobe")

    # --- any thread -----------------------------------------------------------------------

    def add(self, cluster: str, reason: str) -> None:
        """The cluster refused a write: probe it from now on (a cluster already watched keeps
        its schedule)."""
        with self._lock:
            if cluster in self._entries:
                self._entries[cluster].reason = reason
                return
            now = self._clock()
            when, probes = self._recovered.pop(cluster, (float("-inf"), 0))
            attempts = probes if now - when < FLAP_WINDOW else 0
            due = now + probe_delay(attempts + 1, self._rand())
            self._entries[cluster] = _Entry(reason, due, attempts)
        self._wake.set()

    def discard(self, cluster: str) -> None:
        """Stop probing the cluster (its entry in the topology changed, or it is gone)."""
        with self._lock:
            self._entries.pop(cluster, None)

    def watched(self) -> dict[str, float]:
        """Cluster -> seconds until its next probe (0 when due)."""
        now = self._clock()
        with self._lock:
            return {c: max(0.0, e.due - now) for c, e in self._entries.items()}

    # --- the reprobe thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.run_once()
                self._wake.wait(self._poll)
                self._wake.clear()
        except Exception:
            log.exception("reprobe_crashed")  # a bug: refused clusters no longer recover
            raise

    def run_once(self) -> None:
        """Probe every cluster that is due, or whose secrets changed since it was refused."""
        with self._lock:
            clusters = list(self._entries)
        for cluster in clusters:
            if self._stop.is_set():
                return
            version = self._version(cluster)
            with self._lock:
                entry = self._entries.get(cluster)
                if entry is None:
                    continue
                if entry.version is _UNSEEN:
                    entry.version = version
                changed = version != entry.version
                if not changed and self._clock() < entry.due:
                    continue
                entry.version = version
            self._probe_one(cluster, "secret changed" if changed else "back-off over")

    def _probe_one(self, cluster: str, why: str) -> None:
        try:
            self._probe(cluster)
        except RouterError as exc:
            refused = isinstance(exc, SinkMisconfigured)
            with self._lock:
                entry = self._entries.get(cluster)
                if entry is None:
                    return
                entry.attempts += 1
                delay = probe_delay(entry.attempts + 1, self._rand())
                entry.due = self._clock() + delay
                entry.reason = str(exc)
                attempts = entry.attempts
            log.warning(
                "reprobe_failed",
                cluster=cluster,
                attempt=attempts,
                trigger=why,
                outcome="refused" if refused else "unavailable",
                reason=str(exc),
                retry_in=round(delay, 1),
            )
            return
        with self._lock:
            entry = self._entries.pop(cluster, None)
            if entry is not None:
                self._recovered[cluster] = (self._clock(), entry.attempts + 1)
        if entry is None:
            return  # discarded while the probe ran
        log.info("reprobe_accepted", cluster=cluster, attempt=entry.attempts + 1, trigger=why)
        self._on_recovered(cluster)
