"""structlog set-up (JSON lines) and the ring of recent events the status page shows.

Every event is scrubbed of every secret the process has read (``router.secrets.scrub``) before
it is kept for the status page or written, and so is the traceback of an exception logged with
it: a secret that slipped into an error message still never leaves the process.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from router.secrets import scrub

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
        "kafka_refused",
        "tls_error",
        "consul_permission_denied",
        "consul_permission_granted",
    }
)


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {key: _scrubbed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(item) for item in value]
    if isinstance(value, BaseException):
        return scrub(f"{type(value).__name__}: {value}")
    return value


def scrub_event(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: every secret read so far cut out of every field."""
    for key, value in event_dict.items():
        if key != "exc_info":  # rendered (then scrubbed) by format_exc_info below
            event_dict[key] = _scrubbed(value)
    return event_dict


def scrub_exception(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor after ``format_exc_info``: the traceback it wrote, scrubbed."""
    text = event_dict.get("exception")
    if isinstance(text, str):
        event_dict["exception"] = scrub(text)
    return event_dict


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


def log_processors() -> list[Any]:
    """The router's processor chain: level, time, secrets scrubbed, the status page's ring,
    the traceback (scrubbed too), one JSON line."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        scrub_event,
        RECENT,
        structlog.processors.format_exc_info,
        scrub_exception,
        structlog.processors.JSONRenderer(),
    ]


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """JSON lines on stdout (or ``stream``), one event per state change, with a timestamp and
    level."""
    structlog.configure(
        processors=log_processors(),
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=True,
    )
