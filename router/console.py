"""What the CLI prints on a terminal: the status page as tables, and backfill progress.

``status_exit_code`` is the rule ``failover-router status`` exits with (0: every route has a
usable cluster, 1: not). ``render_status`` draws ``/api/status`` with rich; on a pipe rich
prints the same tables without colours. ``BackfillReport`` shows a progress bar on a terminal
and JSON lines otherwise (one per report, the last one with ``state`` ``done`` or
``interrupted``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from router.backfill import Progress as BackfillProgress

BAD_STATES = frozenset({"backoff", "blocked", "stopped", "crashed"})


def usable_cluster(route: Mapping[str, Any], clusters: Mapping[str, Any]) -> bool:
    """Whether the route has a cluster the router may write to now: the control loop's view
    for a running route; for one being rebuilt, the clusters' states."""
    if route.get("state", "running") == "running" and "has_usable_cluster" in route:
        return bool(route["has_usable_cluster"])
    for d in route.get("destinations", ()):
        c = clusters.get(d.get("cluster"), {})
        if c.get("state") == "up" and not c.get("drain") and not c.get("misconfigured"):
            return True
    return False


def status_exit_code(doc: Mapping[str, Any]) -> int:
    """0 when every route has a usable cluster, else 1."""
    clusters = doc.get("clusters", {})
    routes = doc.get("routes", [])
    return 0 if all(usable_cluster(r, clusters) for r in routes) else 1


def ago(ts: float | None, now: float) -> str:
    if not ts:
        return ""
    return f"{span(now - ts)} ago"


def span(seconds: float) -> str:
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _lag(d: Mapping[str, Any]) -> tuple[str, str]:
    if d.get("idle_expected"):
        return "idle (expected)", ""
    lag = d.get("lag")
    secs = d.get("lag_seconds")
    text = "" if lag is None else f"{lag:,}"
    age = "" if not lag else ("?" if secs is None else span(secs))
    return text, age if lag else ("0 s" if lag == 0 else "")


def render_status(doc: Mapping[str, Any], console: Console, now: float | None = None) -> None:
    """The status page as terminal tables."""
    now = time.time() if now is None else now
    clusters = doc.get("clusters", {})
    problems = list(doc.get("problems", []))
    problems += [
        f"route {r['name']}: no usable cluster"
        for r in doc.get("routes", [])
        if not usable_cluster(r, clusters)
    ]
    head = f"failover-router · datacenter {doc.get('datacenter', '?')}"
    if problems:
        console.print(f"[bold]{head}[/] · [bold red]UNHEALTHY[/]")
        for p in problems:
            console.print(f"  [red]✗[/] {p}", highlight=False)
    else:
        console.print(f"[bold]{head}[/] · [bold green]healthy[/]")
    for w in doc.get("warnings", []):
        console.print(f"  [yellow]![/] {w}", highlight=False)
    if doc.get("topology_error"):
        console.print(f"  [red]topology rejected:[/] {doc['topology_error']}", highlight=False)
    totals = doc.get("totals", {})
    console.print(
        f"totals: dead letters {totals.get('dead_letters', 0):,} · retention loss "
        f"{totals.get('retention_lost', 0):,} · skipped {totals.get('skipped', 0):,} · "
        f"failovers {totals.get('failovers', 0):,}",
        highlight=False,
    )
    for r in doc.get("routes", []):
        active = ", ".join(r.get("active", [])) or "none"
        title = (
            f"route {r['name']} ({r['mode']}) · active: {active} since "
            f"{ago(r.get('active_since'), now)} · {r.get('active_reason', '')}"
        )
        table = Table(title=title, title_justify="left", expand=False)
        for col in ("destination", "state", "points/s", "lag", "lag age", "parts (paused)"):
            table.add_column(col, justify="right" if col in ("points/s", "lag") else "left")
        table.add_column("dead letters", justify="right")
        table.add_column("retention lost", justify="right")
        for d in r.get("destinations", []):
            role = (
                ("primary" if d["cluster"] == r.get("primary") else "standby")
                if r["mode"] == "failover"
                else "mirror"
            )
            state = d["state"]
            if d.get("stalled"):
                state = f"[bold red]STALLED[/] {', '.join(d['stalled_partitions'])} ({state})"
            elif state in BAD_STATES:
                state = f"[red]{state}[/] {d.get('error') or d.get('reason', '')}"
            rate = d.get("points_per_s")
            lag, age = _lag(d)
            table.add_row(
                f"{d['cluster']} ({role}{', receiving' if d.get('active') else ''})",
                state,
                "" if rate is None else f"{rate:,.0f}",
                lag,
                age,
                f"{d.get('assigned', 0)} ({d.get('paused', 0)})",
                f"{d.get('dead_letters', 0):,}",
                f"{d.get('retention_lost', 0):,}",
            )
        console.print(table)
    ct = Table(title="clusters", title_justify="left")
    for col in ("cluster", "state", "since", "nodes up", "drain", "reason"):
        ct.add_column(col)
    for name, c in clusters.items():
        state = "MISCONFIGURED" if c.get("misconfigured") else str(c.get("state", "")).upper()
        colour = "green" if state == "UP" else "red"
        ct.add_row(
            name,
            f"[{colour}]{state}[/]",
            ago(c.get("since"), now),
            f"{c.get('healthy_nodes', 0)}/{c.get('nodes', 0)}",
            f"drained ({c.get('drain_source')})" if c.get("drain") else "",
            str(c.get("reason", "")),
        )
    console.print(ct)


class BackfillReport:
    """Backfill progress: a rich bar on a terminal, JSON lines on anything else."""

    def __init__(self, title: str, out: IO[str] | None = None, tty: bool | None = None) -> None:
        self._out = out or sys.stdout
        self._tty = self._out.isatty() if tty is None else tty
        self._title = title
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> BackfillReport:
        if self._tty:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("messages · {task.fields[rate]} points/s · ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[state]}"),
                console=Console(file=self._out),
            )
            self._bar.start()
            self._task = self._bar.add_task(self._title, total=None, rate="0", state="")
        return self

    def __call__(self, p: BackfillProgress) -> None:
        if self._bar is not None and self._task is not None:
            state = "" if p.state == "running" else p.state
            self._bar.update(
                self._task,
                completed=p.done,
                total=p.total,
                rate=f"{p.points_per_s:,.0f}",
                state=state,
            )
        else:
            self._out.write(json.dumps(p.json()) + "\n")
            self._out.flush()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
