"""structlog set-up (JSON lines) and the ring of recent events the status page shows."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# Events a person watching a failover wants on the status page.
WATCHED = frozenset(
    {
        "cluster_state",
        "cluster_reachability",
        "destination_state",
        "failover",
        "handback",
        "retention_gap",
        "skipped_range",
        "sink_misconfigured",
        "sink_recovered",
        "reprobe_failed",
        "secret_unreadable",
        "kafka_clients_rebuilt",
        "kafka_clients_failed",
        "batch_failed",
        "topology_reloaded",
        "topology_rejected",
        "dead_letters",
        "router_started",
        "router_stopping",
        "leader_change",
        "leadership",
        "verdict_source",
        "drain_override",
        "nodes_discovered",
        "destination_stalled",
        "destination_unstalled",
        "destination_rebuilt",
        "destination_rebuild_failed",
        "handoff_timeout",
        "route_state",
        "route_rebuild_stuck",
        "route_build_failed",
        "lag_read_failed",
        "lag_read_recovered",
    }
)


class RecentEvents:
    """A structlog processor that keeps the last ``size`` watched events in memory."""

    def __init__(self, size: int = 200) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def __call__(
        self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if event_dict.get("event") in WATCHED:
            entry = {k: v for k, v in event_dict.items() if isinstance(v, str | int | float | bool)}
            entry.setdefault("ts", time.time())
            with self._lock:
                self._events.append(entry)
        return event_dict

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)


RECENT = RecentEvents()


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """JSON lines on stdout (or ``stream``), one event per state change, with a timestamp and
    level."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            RECENT,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=True,
    )
