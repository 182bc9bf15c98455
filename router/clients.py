"""The Kafka clients that the destinations of one ``kafka:`` section share.

``KafkaClients`` is one set, built from the section with its secrets read now: the librdkafka
settings the consumers are built with, the admin client (offset readers, watermarks) and the
dead-letter producer. The router holds one current set. When the section changes in the
topology, or one of its secrets changes under it (``matches`` compares what the section
resolves to now), the router builds a new set, rebuilds every route with it, and retires the
old one: ``Retired`` keeps it open while a destination built with it is still leaving its
group, and closes it once none is.

``CurrentAdmin`` is the admin of whichever set is current, for the readers that outlive sets
(the lag reader).

A new set is checked against the brokers before it replaces the current one
(``KafkaClients.check``): if they refuse its credentials or its TLS (``KafkaRefused``) the
router keeps the set it has. ``serve`` delivers the log lines and errors librdkafka queued for
the handles that never fetch (``router.kafka``), once per pass of the reload thread.

Threads: sets are built, swapped and closed on the reload thread; ``CurrentAdmin`` is read
from the lag thread (one attribute read per call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import structlog

from router.errors import RouterError
from router.kafka import KAFKA_CHECK_TIMEOUT, DeadLetterProducer, KafkaAdmin, check_access
from router.offsets import Marks, TopicPart
from router.secrets import file_stamp
from router.topology import KafkaConfig

__all__ = ["CurrentAdmin", "KafkaClients", "Resolved", "Retired", "resolve"]

log = structlog.get_logger("router")

# what one kafka: section is now: its librdkafka settings (secrets read) and the state of the
# TLS files librdkafka reads at build (a rotated CA or certificate at the same path)
Resolved = tuple[dict[str, str], tuple[object, ...]]


def resolve(kafka: KafkaConfig) -> Resolved:
    """Raises ConfigError if one of its secrets cannot be read."""
    return kafka.librdkafka_config(), tuple(file_stamp(path) for path in kafka.tls_files())


@dataclass
class KafkaClients:
    """One set of Kafka clients, from one resolved ``kafka:`` section."""

    config: dict[str, str] = field(repr=False)  # librdkafka settings, secrets included
    admin: KafkaAdmin = field(repr=False)
    dead_letters: DeadLetterProducer = field(repr=False)
    generation: int = 0  # 0 for the first set, +1 for each rebuild
    files: tuple[object, ...] = ()  # the TLS files' stamps when built

    @classmethod
    def build(cls, kafka: KafkaConfig, generation: int = 0) -> KafkaClients:
        """Raises ConfigError (a secret cannot be read) or SourceError (librdkafka refused a
        setting). Builds handles only: nothing connects yet."""
        config, files = resolve(kafka)
        admin = KafkaAdmin(config)
        try:
            dead_letters = DeadLetterProducer(config, kafka.dead_letters)
        except RouterError:
            admin.close()
            raise
        return cls(config, admin, dead_letters, generation, files)

    @property
    def resolved(self) -> Resolved:
        return self.config, self.files

    def matches(self, kafka: KafkaConfig) -> bool:
        """Would ``kafka`` build the same clients now (same settings, secrets, TLS files,
        topic)? Raises ConfigError if one of its secrets cannot be read."""
        return self.same(kafka, resolve(kafka))

    def same(self, kafka: KafkaConfig, resolved: Resolved) -> bool:
        """``matches``, with ``kafka`` already resolved by the caller."""
        return kafka.dead_letters == self.dead_letters.topic and resolved == self.resolved

    def check(self, *, datacenter: str = "", timeout: float = KAFKA_CHECK_TIMEOUT) -> str:
        """Do the brokers accept these settings? ``"ok"``, ``"unreachable"`` or ``"timeout"``
        (nothing known yet); raises KafkaRefused when they refuse the credentials or TLS."""
        return check_access(self.config, datacenter=datacenter, timeout=timeout)

    def serve(self) -> None:
        """Deliver queued librdkafka log lines and errors of the admin and producer handles."""
        self.admin.serve()
        self.dead_letters.serve()

    def close(self) -> None:
        """Deliver what the producer still holds (bounded) and close the offset readers."""
        self.dead_letters.close()
        self.admin.close()


@dataclass
class _RetiredSet:
    clients: KafkaClients
    users: list[object]  # the destinations built with it, at the time it was retired


class Retired:
    """Replaced sets, each closed once none of its destinations is still leaving."""

    def __init__(self) -> None:
        self._sets: list[_RetiredSet] = []

    def add(self, clients: KafkaClients, users: Iterable[object]) -> None:
        self._sets.append(_RetiredSet(clients, list(users)))

    def reap(self, leaving: Sequence[object]) -> None:
        """Close every retired set none of whose destinations is in ``leaving`` any more."""
        still = {id(d) for d in leaving}
        for entry in list(self._sets):
            if any(id(u) in still for u in entry.users):
                continue
            self._sets.remove(entry)
            entry.clients.close()
            log.info("kafka_clients_closed", generation=entry.clients.generation)

    def close_all(self) -> None:
        for entry in self._sets:
            entry.clients.close()
        self._sets = []

    def serve(self) -> None:
        for entry in self._sets:
            entry.clients.serve()

    def __len__(self) -> int:
        return len(self._sets)


class CurrentAdmin:
    """The admin client of the current set (``router.lag.OffsetReader``)."""

    def __init__(self, current: Callable[[], KafkaClients]) -> None:
        self._current = current

    def partitions(self, topics: Iterable[str], *, timeout: float | None = None) -> list[TopicPart]:
        return self._current().admin.partitions(topics, timeout=timeout)

    def committed(
        self, group: str, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, int]:
        return self._current().admin.committed(group, tps, timeout=timeout)

    def watermarks(
        self, tps: Iterable[TopicPart], *, timeout: float | None = None
    ) -> dict[TopicPart, Marks]:
        return self._current().admin.watermarks(tps, timeout=timeout)
