"""Which replica owns which partition of a route: one Kafka consumer group per route.

``RouteMembership`` joins the group ``{group_prefix}.{route}`` subscribed to the route's
topics, with the cooperative-sticky assignor (a rebalance moves only the partitions that must
move). It never fetches a message: every partition it is assigned is paused at once. It only
decides ownership: every destination of the route in this process reads exactly the partitions
this membership owns, with ``assign()``, and commits to its own destination group
``{group_prefix}.{route}.{cluster}``. So every destination of one partition lives in one
process, and a handoff between clusters (failover, drain, hand-back) is decided and carried out
in that one process: exact, whatever moment each replica sees a topology edit.

Fencing: a replica that lost a partition must not commit to it again. On a revoke the
membership asks every attached destination source to give the partitions up (each finishes or
abandons its in-flight writes within its bounded revoke, commits what landed and unassigns)
and waits for their acknowledgements up to ``REVOKE_WAIT``; then it fences the partitions in
every source (a fenced partition's commits are dropped, under the source's commit lock, so no
commit is in progress once the fence is up) and only then returns from the callback, letting
Kafka hand the partitions to another replica. A lost assignment (session timeout) is fenced at
once, without a final commit.

Readiness (``ownership``, read by ``/readyz``): the membership is *settled* once the group gave
it an assignment, an empty one included, until a loss. With the cooperative protocol a replica
that joins gets an empty assignment first and its partitions in a second round, once their
previous owner released them; so the engine counts an empty assignment as final only after it
stood for a while (``router.engine.EMPTY_ASSIGNMENT_GRACE``).

Threads: one thread per membership runs ``poll`` (the callbacks run on it); sources are called
from it only through ``grant``/``revoke``/``fence``, which are thread-safe.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog
from confluent_kafka import Consumer, KafkaException, TopicPartition

from router.errors import SourceError
from router.kafka import client_config
from router.offsets import TopicPart
from router.secrets import scrub

log = structlog.get_logger("router")

REVOKE_WAIT = 8.0  # seconds a revoke waits for the destinations' acknowledgements


@dataclass(frozen=True)
class Ownership:
    """A replica's hold on a route's partitions (``RouteMembership.ownership``)."""

    settled: bool  # the group gave this replica an assignment (maybe empty) since it joined
    owned: frozenset[TopicPart]
    empty_for: float  # seconds the settled assignment has been empty (0: it is not)


class Member(Protocol):
    """What the membership needs of a destination's source (``router.source.AssignedSource``)."""

    def grant(self, tps: Sequence[TopicPart]) -> None: ...
    def revoke(self, tps: Sequence[TopicPart]) -> threading.Event: ...
    def fence(self, tps: Sequence[TopicPart]) -> None: ...


def membership_config(
    group: str, client_id: str, kafka_config: Mapping[str, str]
) -> dict[str, str]:
    return {
        "session.timeout.ms": "10000",
        "heartbeat.interval.ms": "1000",
        "client.id": client_id,
        **kafka_config,
        "group.id": group,
        "enable.auto.commit": "false",
        "enable.auto.offset.store": "false",
        "auto.offset.reset": "latest",  # never fetches anyway: every partition is paused
        "partition.assignment.strategy": "cooperative-sticky",
        "queued.max.messages.kbytes": "64",
    }


class RouteMembership:
    """The route's partitions that this replica owns, handed to the attached sources."""

    def __init__(
        self, route: str, group: str, topics: Sequence[str], kafka_config: Mapping[str, str]
    ) -> None:
        self.route = route
        self.group = group
        self.topics = tuple(topics)
        self._topics = list(topics)
        try:
            self._consumer = Consumer(
                client_config(membership_config(group, f"frouter-{route}-membership", kafka_config))
            )
        except KafkaException as exc:
            raise SourceError(
                f"cannot create the membership consumer of {group}: {scrub(str(exc))}"
            ) from exc
        self._lock = threading.Lock()
        self._owned: set[TopicPart] = set()
        self._members: list[Member] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"member-{route}", daemon=True)
        self.rebalances = 0
        self.error = ""
        self._settled = False  # an assignment (maybe empty) arrived since the join or a loss
        self._empty_since: float | None = None  # monotonic; while settled and owning nothing

    @property
    def members(self) -> int:
        with self._lock:
            return len(self._members)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def detach_all(self) -> list[Member]:
        with self._lock:
            members, self._members = self._members, []
        return members

    def ownership(self) -> Ownership:
        """What this replica holds of the route now (``/readyz`` reads it; never waits on I/O)."""
        with self._lock:
            empty_for = 0.0
            if self._settled and self._empty_since is not None:
                empty_for = time.monotonic() - self._empty_since
            return Ownership(self._settled, frozenset(self._owned), empty_for)

    def _owned_changed(self) -> None:
        """Under ``_lock``: start or end the clock of an empty assignment."""
        if self._owned:
            self._empty_since = None
        elif self._empty_since is None:
            self._empty_since = time.monotonic()

    @property
    def owned(self) -> frozenset[TopicPart]:
        with self._lock:
            return frozenset(self._owned)

    def attach(self, member: Member) -> None:
        """Add a destination's source; it is granted what this replica owns right now."""
        with self._lock:  # granted under the lock: no revoke can be queued before this grant
            self._members.append(member)
            owned = sorted(self._owned)
            if owned:
                member.grant(owned)

    def detach(self, member: Member) -> None:
        with self._lock:
            if member in self._members:
                self._members.remove(member)

    def start(self) -> None:
        try:
            self._consumer.subscribe(
                self._topics,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        except KafkaException as exc:
            raise SourceError(f"cannot subscribe {self.group} to {self._topics}: {exc}") from exc
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Leave the group (call after the destinations have flushed and committed)."""
        self._stop.set()
        if self._thread.ident:
            self._thread.join(timeout)
        else:  # never started: its consumer handle is closed here, not by the thread
            with contextlib.suppress(KafkaException, RuntimeError):
                self._consumer.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                msgs = self._consumer.poll(0.1)
                if msgs is not None and msgs.error() is not None:
                    self.error = str(msgs.error())
        except Exception as exc:  # deliberate: a dead membership thread must be visible
            log.exception("membership_crashed", route=self.route, error=str(exc))
            self.error = f"crashed: {type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                owned = sorted(self._owned)
                self._owned = set()
                members = list(self._members)
            self._give_up(members, owned, commit=True)
            try:
                self._consumer.close()  # leaves the group: partitions move at once
            except (KafkaException, RuntimeError) as exc:
                log.warning("membership_close_failed", route=self.route, error=str(exc))

    # --- callbacks, on the membership thread ----------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.incremental_assign(partitions)
        if partitions:
            consumer.pause(partitions)  # ownership only: this consumer never fetches
        tps = sorted((tp.topic, tp.partition) for tp in partitions)
        with self._lock:
            self._owned.update(tps)
            owned = len(self._owned)
            for m in self._members:
                m.grant(tps)
            self._settled = True  # librdkafka calls this with [] for an empty assignment too
            self._owned_changed()
        self.rebalances += 1
        log.info("partitions_owned", route=self.route, added=len(tps), owned=owned)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = sorted((tp.topic, tp.partition) for tp in partitions)
        with self._lock:
            self._owned.difference_update(tps)
            members = list(self._members)
            owned = len(self._owned)
            self._owned_changed()
        self._give_up(members, tps, commit=True)
        consumer.incremental_unassign(partitions)
        log.info("partitions_released", route=self.route, removed=len(tps), owned=owned)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        tps = sorted((tp.topic, tp.partition) for tp in partitions)
        with self._lock:
            self._owned.difference_update(tps)
            members = list(self._members)
            self._settled = False  # rejoining: not settled until the next assignment
            self._empty_since = None  # an empty assignment is timed from its arrival
        self._give_up(members, tps, commit=False)
        consumer.incremental_unassign(partitions)
        log.warning("partitions_lost", route=self.route, lost=len(tps))

    def _give_up(self, members: list[Member], tps: list[TopicPart], *, commit: bool) -> None:
        if not tps:
            return
        if not commit:
            for m in members:
                m.fence(tps)
        acks = [m.revoke(tps) for m in members]
        deadline = time.monotonic() + REVOKE_WAIT
        for ack in acks:
            ack.wait(max(0.0, deadline - time.monotonic()))
        late = sum(1 for a in acks if not a.is_set())
        if late:
            log.warning("revoke_unacknowledged", route=self.route, destinations=late)
        for m in members:
            m.fence(tps)  # from here on, no commit of these partitions leaves this replica
