"""Helpers shared by the tests: deadline-bounded waits and InfluxDB/Kafka look-ups."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import httpx

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.2, what: str = ""
) -> T:
    """Poll ``probe`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T = probe()
    while not last:
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or probe}: {last!r}"
            )
        time.sleep(interval)
        last = probe()
    return last


def influx_query(url: str, db: str, q: str) -> list[list[object]]:
    """Run an InfluxQL query; return the rows of the first series (empty if none)."""
    resp = httpx.get(f"{url}/query", params={"db": db, "q": q}, timeout=10)
    resp.raise_for_status()
    result = resp.json()["results"][0]
    if "error" in result:
        raise AssertionError(f"influx query {q!r} failed: {result['error']}")
    series = result.get("series") or []
    return list(series[0]["values"]) if series else []


def influx_count(url: str, db: str, measurement: str, field: str = "value") -> int:
    """Distinct points stored in ``measurement`` (InfluxDB keeps one per series+timestamp)."""
    rows = influx_query(url, db, f'SELECT count("{field}") FROM "{measurement}"')
    return int(rows[0][1]) if rows else 0  # type: ignore[call-overload]
