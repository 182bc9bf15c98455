"""Render the dashboard with matplotlib from real Prometheus query results.

Grafana itself cannot run here, so this draws each panel of ``dashboards/generate.py`` at its
grid position, from the answers of a real Prometheus's HTTP API (``query_range`` for every
target, the same queries Grafana would send, with the template variables set to "All"):
time series as lines, state timelines as coloured bars, the table as text. It is a picture of
the data, not of Grafana: no tooltips, simplified styling.

    python -m dashboards.render --prometheus http://127.0.0.1:9090 --minutes 10 out.png
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from matplotlib.figure import Figure

from dashboards import generate

# What Grafana substitutes with every variable at "All" (and a rate window for 1 s scrapes).
DEFAULT_VARS = {
    "$datacenter": ".*",
    "$route": ".*",
    "$__rate_interval": "10s",
    "$__interval": "1s",
}

BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a"]


@dataclass
class Series:
    labels: dict[str, str]
    legend: str
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    """The query as Grafana sends it, with the template variables replaced."""
    for name, value in sorted((variables or DEFAULT_VARS).items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt:
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt)


def query_range(
    client: httpx.Client, expr: str, start: float, end: float, *, step: float, fmt: str = ""
) -> list[Series]:
    """One PromQL range query; raises on an error answer."""
    resp = client.get(
        "/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": step},
    )
    body = resp.json()
    if resp.status_code != 200 or body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error', resp.text)}")
    out = []
    for item in body["data"]["result"]:
        labels = dict(item["metric"])
        s = Series(labels, legend(fmt, labels))
        for t, v in item["values"]:
            s.times.append(float(t))
            s.values.append(float(v))
        out.append(s)
    return out


def fetch(
    client: httpx.Client,
    dashboard: dict[str, Any],
    start: float,
    end: float,
    *,
    step: float = 1.0,
    variables: dict[str, str] | None = None,
) -> dict[str, list[list[Series]]]:
    """Per panel title, per target: the series Prometheus answers."""
    out: dict[str, list[list[Series]]] = {}
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        out[panel["title"]] = [
            (query_instant if t.get("instant") else query_range)(
                client,
                substitute(t["expr"], variables),
                start,
                end,
                step=step,
                fmt=t.get("legendFormat", ""),
            )
            for t in panel["targets"]
        ]
    return out


def query_instant(
    client: httpx.Client, expr: str, start: float, end: float, *, step: float, fmt: str = ""
) -> list[Series]:
    """An instant query at ``end`` (a table's "now"), in the same shape as a range query."""
    del start, step
    resp = client.get("/api/v1/query", params={"query": expr, "time": end})
    body = resp.json()
    if resp.status_code != 200 or body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body.get('error', resp.text)}")
    out = []
    for item in body["data"]["result"]:
        labels = dict(item["metric"])
        t, v = item["value"]
        out.append(Series(labels, legend(fmt, labels), [float(t)], [float(v)]))
    return out


def _style(ax: Any, title: str) -> None:
    ax.set_facecolor(PANEL)
    ax.set_title(title, color=TEXT, fontsize=9, loc="left")
    ax.tick_params(colors=TEXT, labelsize=7)
    for spine in ax.spines.values():
        spine.set_color(GRID)
    ax.grid(color=GRID, linewidth=0.5)


def _timeseries(ax: Any, series: list[Series], start: float) -> None:
    for i, s in enumerate(series):
        ax.plot(
            [t - start for t in s.times],
            s.values,
            color=PALETTE[i % len(PALETTE)],
            linewidth=1.2,
            label=s.legend,
        )
    if series:
        ax.legend(fontsize=6, loc="upper left", facecolor=PANEL, labelcolor=TEXT, framealpha=0.6)
    ax.set_xlabel("seconds", color=TEXT, fontsize=7)


def _timeline(ax: Any, rows: list[tuple[Series, dict[float, str]]], start: float) -> None:
    """One bar per series, coloured by its value mappings; the series name above its bar."""
    ax.grid(False)
    for row, (s, colors) in enumerate(rows):
        y = len(rows) - 1 - row
        for i, (t, v) in enumerate(zip(s.times, s.values, strict=True)):
            nxt = s.times[i + 1] if i + 1 < len(s.times) and s.times[i + 1] - t < 2.5 else t + 1
            color = colors.get(v, "#5794f2")
            if color != "none":
                ax.broken_barh([(t - start, nxt - t)], (y - 0.3, 0.5), facecolors=color)
        ax.text(
            0.005,
            y + 0.24,
            s.legend,
            transform=ax.get_yaxis_transform(),
            color=TEXT,
            fontsize=7,
            va="bottom",
        )
    ax.set_yticks([])
    ax.set_ylim(-0.5, max(len(rows), 1) - 0.1)
    ax.set_xlabel("seconds", color=TEXT, fontsize=7)


def _table(ax: Any, series: list[Series]) -> None:
    ax.axis("off")
    rows = [(s.labels.get("route", ""), s.labels.get("cluster", "")) for s in series]
    ax.text(
        0.03,
        0.9,
        "route            cluster",
        color=TEXT,
        fontsize=8,
        family="monospace",
        transform=ax.transAxes,
        va="top",
    )
    for i, (route, cluster) in enumerate(sorted(rows)):
        ax.text(
            0.03,
            0.78 - 0.1 * i,
            f"{route:<16} {cluster}",
            color="#73bf69",
            fontsize=8,
            family="monospace",
            transform=ax.transAxes,
            va="top",
        )


def plot(
    dashboard: dict[str, Any],
    data: dict[str, list[list[Series]]],
    start: float,
    path: Path,
    subtitle: str = "",
) -> Path:
    """Draw every panel at its grid position; write a PNG."""
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    fig = Figure(figsize=(20, bottom * 0.36), facecolor=BG)
    fig.suptitle(
        f"{dashboard['title']}   {subtitle}", color=TEXT, x=0.01, ha="left", fontsize=12, y=0.998
    )
    top_pad = 0.6
    height = bottom + top_pad

    def rect(g: dict[str, int]) -> tuple[float, float, float, float]:
        pad_x, pad_left, pad_top, pad_bottom = 0.008, 0.03, 0.9, 0.9
        return (
            g["x"] / 24 + pad_left,
            1 - (g["y"] + g["h"] + top_pad) / height + pad_bottom / height,
            g["w"] / 24 - pad_left - pad_x,
            (g["h"] - pad_top - pad_bottom) / height,
        )

    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        if panel["type"] == "row":
            fig.text(
                0.005,
                1 - (g["y"] + top_pad + 0.6) / height,
                panel["title"],
                color=TEXT,
                fontsize=11,
                weight="bold",
            )
            continue
        ax = fig.add_axes(rect(g))
        _style(ax, panel["title"])
        targets = data.get(panel["title"], [])
        series = [s for target in targets for s in target]
        if panel["type"] == "timeseries":
            _timeseries(ax, series, start)
        elif panel["type"] == "state-timeline":
            rows = [
                (s, _colors(panel, panel["targets"][i]["refId"]))
                for i, target in enumerate(targets)
                for s in target
            ]
            _timeline(ax, rows, start)
        else:
            _table(ax, series)
    fig.savefig(path, facecolor=BG, dpi=80)
    return path


def _colors(panel: dict[str, Any], ref: str) -> dict[float, str]:
    """Value -> colour of one target: its override's mappings, else the panel's."""
    mappings = panel["fieldConfig"]["defaults"]["mappings"]
    for override in panel["fieldConfig"]["overrides"]:
        if override["matcher"]["options"] == ref:
            mappings = override["properties"][0]["value"]
    return {
        float(value): ("none" if opt["color"] == "transparent" else _color(opt["color"]))
        for m in mappings
        for value, opt in m["options"].items()
    }


def _color(name: str) -> str:
    return {"green": "#73bf69", "red": "#f2495c", "blue": "#5794f2", "orange": "#ff9830"}.get(
        name, name
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dashboards.render", description=__doc__)
    parser.add_argument("--prometheus", required=True, help="base URL of Prometheus")
    parser.add_argument("--minutes", type=float, default=15.0, help="time range up to now")
    parser.add_argument("--step", type=float, default=2.0)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    end = time.time()
    start = end - args.minutes * 60
    dashboard = generate.build()
    with httpx.Client(base_url=args.prometheus, timeout=30) as client:
        data = fetch(client, dashboard, start, end, step=args.step)
    plot(dashboard, data, start, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
