"""The router against its ceiling, in one run: prints markdown tables, asserts nothing.

    .venv/bin/devstack up
    .venv/bin/python -m scripts.bench                          # every part, 1M points per run
    .venv/bin/python -m scripts.bench --points 200000 --backlog-points 1000000   # a quick run
    .venv/bin/python -m scripts.bench --only discard,influx    # some parts

Parts (``--only``, comma-separated; default: all but guard):

discard, influx
    One row per (shape, sink): ``--points`` points in Kafka (1 and 20 lines per message), then
    the *ceiling*: this process writes the same points, cut into the same batches (the route's
    ``max_points``), compressed the same way, with one httpx client and ``max_in_flight``
    threads, to the same sink; then one router process drains the backlog to that sink. Sinks:
    a discarding HTTP server started by the bench in its own process (``scripts.bench.sink``,
    answers 204, records the start of the first write and the end of the last, and the router's
    CPU time at both) and InfluxDB 1.6 (influx-a, direct; first and last write are taken from
    the destination group's commits, polled every 0.1 s). Router CPU (``/proc/<pid>/stat``,
    user + system) per point from first to last write, and from process start to the last
    commit; peak RSS is the kernel's ``VmHWM``; sink CPU is the discarding sink's process or
    influxd over the same span.
compression
    Into InfluxDB 1.6 with 20-line messages: ``none`` and gzip at each ``--gzip-levels``; the
    router's and influxd's CPU per point, points/s, the bytes per point on the wire, and what
    gzip alone costs per point in this process.
scale
    1, 2 and 3 router processes (``--scale``) on the same route and topic: their partitions are
    spread by the route's membership group while the cluster is drained; then the drain is
    lifted in every topology file, and the sink holds its answers until every router has
    ``max_in_flight`` writes waiting and answers them all at once, so the processes start
    together; aggregate points/s into the discarding sink and the routers' CPU per point. On a
    2-core host three processes contend for the cores with each other, Kafka and the sink.
backlog
    ``--backlog-points`` piled up in Kafka while influx-a is cut off through Toxiproxy (the
    router's RSS sampled every 0.2 s while it piles up), then replayed after the restore:
    replay points/s (first to last commit) against the ceiling through the same proxy.
floor
    What no router built on confluent-kafka goes below: this process reads the same backlog
    (1 and 20 lines per message) with a bare consumer (``consume(1000)``, the router's fetch
    settings, nothing done with the messages); its CPU per message and per point, librdkafka's
    threads included.
guard
    The route guard's cost: 1- and 20-line messages into the discarding sink, guard off and on,
    router CPU per point from first to last write; then the guard alone, in this process.

The load average is printed at the start and end of every part: the host is shared, read the
figures with it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from devstack import stack
from devstack.toxiproxy import Toxiproxy
from router.guard import BlockRule, Guard, Limits
from scripts.bench.harness import (
    BATCH,
    Ceiling,
    CommitWatch,
    Compression,
    Env,
    Router,
    RssSampler,
    SinkProcess,
    bodies,
    cluster_doc,
    free_port,
    load,
    new_topic,
    note,
    produce,
    rss_mib,
    settle,
    stack_pid,
    topology,
    wait_until,
)

PARTS = ("discard", "influx", "compression", "scale", "backlog", "floor", "guard")
DEFAULT_PARTS = PARTS[:-1]
GROUP = "bench-{tag}.bench.influx-a"  # the destination group of the bench's one route


@dataclass
class Options:
    points: int
    backlog_points: int
    backlog_lines: int
    shapes: tuple[int, ...]
    compression: Compression
    gzip_levels: tuple[int, ...]
    scale: tuple[int, ...]
    sink_impl: str
    ceiling_points: int
    repeat: int
    work: Path
    env: Env

    def timeout(self, points: int) -> float:
        """How long one drain may take: generous, the host is shared."""
        return 120 + points / 5_000


def emit(text: str = "") -> None:
    print(text, flush=True)


@contextmanager
def part(name: str) -> Iterator[list[str]]:
    """Prints the load average at the start and the end of a part, and its notes after it."""
    before = load()
    notes: list[str] = []
    note(f"part {name}: load average {before}")
    started = time.monotonic()
    yield notes
    after = load()
    note(f"part {name} done in {time.monotonic() - started:.0f} s: load average {after}")
    for line in notes:
        emit(line)
    emit(f"\nLoad average (1, 5, 15 min) at the start of the part: {before}; at its end: {after}.")
    emit()


def table(head: list[str], rows: list[list[str]]) -> None:
    emit("| " + " | ".join(head) + " |")
    emit("|" + "|".join(" --- " for _ in head) + "|")
    for row in rows:
        emit("| " + " | ".join(row) + " |")


def n0(x: float) -> str:
    return f"{x:,.0f}"


def n2(x: float) -> str:
    return f"{x:.2f}"


def per_point(cpu: float, points: int) -> float:
    return cpu / max(points, 1) * 1e6


# --- one router draining one backlog --------------------------------------------------------


@dataclass
class Run:
    """One router draining ``points`` points to one sink, next to its ceiling."""

    shape: int
    sink: str
    compression: Compression
    points: int
    ceiling: Ceiling
    rate: float  # router points/s, first to last write
    us: float  # router CPU per point, first to last write
    us_startup: float  # router CPU per point, process start to the last commit
    seconds_startup: float
    peak_rss: float
    sink_us: float
    writes: int | None = None  # requests the discarding sink saw (None: InfluxDB)
    lines_seen: int | None = None  # lines it counted (uncompressed bodies only)
    runs: list[Run] = field(default_factory=list)  # the repeats a median was taken over

    @property
    def ratio(self) -> float:
        return self.rate / max(self.ceiling.rate, 1e-9)

    def cells(self) -> list[str]:
        return [
            f"{self.shape}",
            self.sink,
            str(self.compression),
            n0(self.ceiling.rate),
            n2(self.ceiling.us_per_point),
            n0(self.rate),
            f"{self.ratio:.2f}",
            n2(self.us),
            n2(self.us_startup),
            f"{self.peak_rss:.0f}",
            n2(self.sink_us),
        ]


RUN_HEAD = [
    "lines/msg",
    "sink",
    "compression",
    "ceiling points/s",
    "ceiling CPU µs/pt",
    "router points/s",
    "router/ceiling",
    "router CPU µs/pt",
    "with start-up",
    "peak RSS MiB",
    "sink CPU µs/pt",
]


def drain_once(
    opts: Options,
    *,
    shape: int,
    sink: SinkProcess | None,
    compression: Compression,
    guard: dict[str, Any] | None = None,
    ceiling: bool = True,
) -> Run:
    """Produce, measure the ceiling, run one router over the backlog; one ``Run``."""
    env = opts.env
    points = opts.points
    topic, tag = new_topic(env)
    note(
        f"{shape} line(s)/message into {'the discarding sink' if sink else 'influx-a'}, "
        f"{compression}, {points:,} points (topic {topic})"
    )
    produce(env, topic, points, shape, f"bench_{tag}")
    db = env.database
    if sink is not None:
        base = sink.url
        target = f"{base}/router"
    else:
        base = target = env.endpoints["INFLUX_A_URL"]
    servers = ("kafka",) if sink is not None else ("kafka", "influx-a")
    cap = Ceiling(0, 1.0, 0.0)
    if ceiling:
        batches = bodies(f"ceiling_{tag}", min(points, opts.ceiling_points))
        settle(servers)
        cap = Ceiling.run(base + ("/ceiling" if sink else ""), db, batches, compression)
        del batches
        note(f"  ceiling {n0(cap.rate)} points/s, {n2(cap.us_per_point)} µs/point in the bench")
    doc = topology(
        env, topic, tag, cluster_doc(target, db, compression), port=free_port(), guard=guard
    )
    watch = CommitWatch(env, GROUP.format(tag=tag), topic, shape)
    settle(servers)
    router = Router(doc, opts.work, f"router-{tag}")
    sink_pid = stack_pid("influx-a") if sink is None else 0
    try:
        if sink is not None:
            sink.watch({"router": router.pid})
        pids = [router.pid] if sink is not None else [router.pid, sink_pid]
        watch.wait(pids, opts.timeout(points))
        peak = router.peak_rss()
    finally:
        router.stop()
    startup = watch.cpu_last[router.pid]
    seconds_startup = watch.t_last - router.started
    if sink is not None:
        st = sink.stats()
        w = st["writers"].get("router")
        if w is None:
            raise SystemExit("the discarding sink saw no write from the router")
        span = max(st["t_last"] - st["t_first"], 1e-9)
        us = per_point(st["cpu_last"]["router"] - st["cpu_first"]["router"], points)
        lines = None if w["compressed"] else int(w["lines"])
        if lines is not None and lines < points:
            raise SystemExit(f"the sink counted {lines} lines of {points} written")
        run = Run(
            shape,
            "discard",
            compression,
            points,
            cap,
            points / span,
            us,
            per_point(startup, points),
            seconds_startup,
            peak,
            per_point(st["own_last"] - st["own_first"], points),
            int(w["requests"]),
            lines,
        )
    else:
        moved = watch.points_moved
        us = per_point(watch.cpu_last[router.pid] - watch.cpu_first[router.pid], moved)
        influx_us = per_point(watch.cpu_last[sink_pid] - watch.cpu_first[sink_pid], moved)
        run = Run(
            shape,
            "influxdb-1.6",
            compression,
            points,
            cap,
            watch.rate,
            us,
            per_point(startup, points),
            seconds_startup,
            peak,
            influx_us,
        )
    note(
        f"  router {n0(run.rate)} points/s ({run.ratio:.2f} of the ceiling), "
        f"{n2(run.us)} µs/point, {n2(run.us_startup)} with start-up, "
        f"peak RSS {run.peak_rss:.0f} MiB"
    )
    return run


def median_run(runs: list[Run]) -> Run:
    """The median of each figure over repeated runs of one configuration."""
    med = statistics.median
    one = runs[0]
    ceiling = Ceiling(
        one.ceiling.points,
        med(r.ceiling.seconds for r in runs),
        med(r.ceiling.cpu for r in runs),
    )
    return Run(
        one.shape,
        one.sink,
        one.compression,
        one.points,
        ceiling,
        med(r.rate for r in runs),
        med(r.us for r in runs),
        med(r.us_startup for r in runs),
        med(r.seconds_startup for r in runs),
        max(r.peak_rss for r in runs),
        med(r.sink_us for r in runs),
        one.writes,
        one.lines_seen,
        runs,
    )


def repeated(opts: Options, configs: list[dict[str, Any]]) -> list[Run]:
    """Every configuration ``--repeat`` times, round by round (so a burst of load elsewhere
    hits every configuration alike); one median ``Run`` per configuration."""
    rounds: list[list[Run]] = [[] for _ in configs]
    for n in range(opts.repeat):
        if opts.repeat > 1:
            note(f"round {n + 1} of {opts.repeat}")
        for i, config in enumerate(configs):
            rounds[i].append(drain_once(opts, **config))
    return [median_run(runs) for runs in rounds]


def spread_notes(runs: list[Run], label: Callable[[Run], str]) -> list[str]:
    """One line per configuration with the range of router points/s over the repeats."""
    out = []
    for r in runs:
        if len(r.runs) > 1:
            rates = sorted(x.rate for x in r.runs)
            ratios = sorted(x.ratio for x in r.runs)
            out.append(
                f"- {label(r)}: router points/s {n0(rates[0])} to {n0(rates[-1])}, "
                f"router/ceiling {ratios[0]:.2f} to {ratios[-1]:.2f} over {len(r.runs)} runs."
            )
    return out


def throughput_part(opts: Options, sinks: list[str], sink: SinkProcess | None) -> None:
    with part("+".join(sinks)) as notes:
        configs: list[dict[str, Any]] = [
            {
                "shape": shape,
                "sink": sink if name == "discard" else None,
                "compression": opts.compression,
            }
            for shape in opts.shapes
            for name in sinks
        ]
        runs = repeated(opts, configs)
        emit(
            f"### Router against the ceiling ({opts.points:,} points per run, "
            f"{opts.env.partitions} partitions, one router process"
            + (f", median of {opts.repeat} runs" if opts.repeat > 1 else "")
            + ")\n"
        )
        table(RUN_HEAD, [r.cells() for r in runs])
        emit()
        notes.append(
            f"Batches of {BATCH.max_points} points, {BATCH.max_in_flight} in flight (ceiling: "
            f"{BATCH.max_in_flight} threads). Discarding sink: {opts.sink_impl}, its own "
            "process; router points/s from the start of its first write to the end of its "
            "last. InfluxDB rows: first to last commit (polled every 0.1 s), sink CPU is "
            "influxd's."
        )
        for r in runs:
            if r.writes:
                notes.append(
                    f"- {r.shape} line(s)/msg into the discarding sink: {r.writes} writes, "
                    f"{r.points / r.writes:,.0f} points per write; start to last commit "
                    f"{r.seconds_startup:.1f} s."
                )
        notes.extend(spread_notes(runs, lambda r: f"{r.shape} line(s)/msg into {r.sink}"))


# --- compression ----------------------------------------------------------------------------


def gzip_alone(comp: Compression, tag: str) -> tuple[float, float]:
    """(bytes per point on the wire, CPU µs per point of the encoding alone), on 20 batches."""
    sample = bodies(f"bench_{tag}", 20 * BATCH.max_points)
    points = len(sample) * BATCH.max_points
    wire = sum(len(comp.encode(b)) for b in sample) / points
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for b in sample:
            comp.encode(b)
        best = min(best, time.process_time() - t0)
    return wire, per_point(best, points)


def compression_part(opts: Options) -> None:
    with part("compression") as notes:
        rows: list[list[str]] = []
        choices = [Compression("none"), *(Compression("gzip", lv) for lv in opts.gzip_levels)]
        runs = repeated(opts, [{"shape": 20, "sink": None, "compression": c} for c in choices])
        for comp, run in zip(choices, runs, strict=True):
            wire, alone = gzip_alone(comp, "abcdef12")
            rows.append(
                [
                    str(comp),
                    f"{wire:.1f}",
                    n2(alone),
                    n0(wire * 8),
                    n0(run.ceiling.rate),
                    n0(run.rate),
                    f"{run.ratio:.2f}",
                    n2(run.us),
                    n2(run.sink_us),
                    n2(run.us + run.sink_us),
                ]
            )
        notes.extend(spread_notes(runs, lambda r: str(r.compression)))
        emit(
            f"### Compression into InfluxDB 1.6 (20 lines/message, {opts.points:,} points"
            + (f", median of {opts.repeat} runs" if opts.repeat > 1 else "")
            + ")\n"
        )
        table(
            [
                "compression",
                "bytes/point on the wire",
                "encoding alone µs/pt",
                "Mbit/s at 1M points/s",
                "ceiling points/s",
                "router points/s",
                "router/ceiling",
                "router CPU µs/pt",
                "influxd CPU µs/pt",
                "router + influxd µs/pt",
            ],
            rows,
        )
        notes.append(
            "\nMbit/s at 1M points/s: the link a datacenter writing a million points a second "
            "to this cluster needs. Encoding alone: gzip.compress of the same batches in this "
            "process, best of 3 over 100,000 points."
        )


# --- scale-out ------------------------------------------------------------------------------


def spread(routers: list[Router], partitions: int) -> bool:
    """Every process owns some partitions, together all of them, all paused (drained)."""
    owned = [r.destination() for r in routers]
    counts = [d["assigned"] for d in owned]
    return (
        sum(counts) == partitions
        and all(c > 0 for c in counts)
        and all(d["paused"] == d["assigned"] for d in owned)
    )


# a write the sink holds must not time out in the router meanwhile
SLOW_OK: dict[str, Any] = {"write_timeout": "60s"}


def _settled(routers: list[Router], partitions: int) -> Callable[[], bool]:
    """A check that holds once ``spread`` held three times in a row (0.2 s apart)."""
    seen: list[bool] = []

    def check() -> bool:
        seen.append(spread(routers, partitions))
        return seen[-3:] == [True] * 3

    return check


@dataclass
class ScaleRun:
    """``n`` router processes draining one backlog together into the discarding sink."""

    n: int
    shares: list[int]  # partitions per process
    rate: float  # aggregate points/s
    us: float  # the routers' CPU per point, together
    sink_us: float
    peak_rss: float  # of the largest process
    released: str  # how the sink's hold ended: "all" | "timeout"
    held: int  # writes held until the release


def scale_once(opts: Options, sink: SinkProcess, topic: str, tag: str, n: int) -> ScaleRun:
    env = opts.env
    lines = SCALE_LINES
    comp = opts.compression
    routers = [
        Router(
            topology(
                env,
                topic,
                tag,
                {**cluster_doc(f"{sink.url}/r{i}", env.database, comp), **SLOW_OK},
                port=free_port(),
                drain=True,
            ),
            opts.work,
            f"scale-{tag}-r{i}",
        )
        for i in range(n)
    ]
    try:
        for r in routers:
            r.wait_ready(path="/api/status")  # drained: /readyz waits for a command
        settled = _settled(routers, env.partitions)
        wait_until(f"{n} routers to share {env.partitions} partitions", settled, 120)
        shares = [r.destination()["assigned"] for r in routers]
        watch = CommitWatch(env, GROUP.format(tag=tag), topic, lines)
        settle(("kafka",))
        # the sink answers no write until every router has max_in_flight waiting
        sink.watch({f"r{i}": r.pid for i, r in enumerate(routers)}, BATCH.max_in_flight)
        note(f"  {n} router(s), partitions {shares}: lifting the drain")
        for r in routers:
            r.set_drain(False)
        watch.wait([r.pid for r in routers], opts.timeout(opts.points))
        peaks = [r.peak_rss() for r in routers]
    finally:
        for r in routers:
            r.stop()
    st = sink.stats()
    span = max(st["t_last"] - st["t_first"], 1e-9)
    cpu = sum(st["cpu_last"][k] - st["cpu_first"][k] for k in st["cpu_first"])
    held = sum(w["held"] for w in st["writers"].values())
    moved = opts.points - held * BATCH.max_points  # written after the release
    run = ScaleRun(
        n,
        shares,
        moved / span,
        per_point(cpu, moved),
        per_point(st["own_last"] - st["own_first"], moved),
        max(peaks),
        st["released"],
        held,
    )
    spans = [
        f"r{i}: {w['requests']} writes, "
        f"{w['t_first'] - st['t_first']:.2f}-{w['t_last'] - st['t_first']:.2f} s"
        for i in range(n)
        if (w := st["writers"].get(f"r{i}")) is not None
    ]
    note(
        f"  {n} router(s): {n0(run.rate)} points/s, {n2(run.us)} µs/point; released "
        f"({run.released}) with {held} writes held; {'; '.join(spans)}"
    )
    return run


SCALE_LINES = 20


def scale_part(opts: Options, sink: SinkProcess) -> None:
    env = opts.env
    with part("scale") as notes:
        topic, tag0 = new_topic(env)
        note(f"scale-out: {opts.points:,} points, {SCALE_LINES} lines/message, topic {topic}")
        produce(env, topic, opts.points, SCALE_LINES, f"bench_{tag0}")
        runs: dict[int, list[ScaleRun]] = {n: [] for n in opts.scale}
        for k in range(opts.repeat):
            for n in opts.scale:
                runs[n].append(scale_once(opts, sink, topic, f"{tag0}-x{n}-{k}", n))
        rows: list[list[str]] = []
        med = statistics.median
        for n, rs in runs.items():
            rate = med(r.rate for r in rs)
            rows.append(
                [
                    str(n),
                    "/".join(str(x) for x in rs[0].shares),
                    n0(rate),
                    n0(rate / n),
                    n2(med(r.us for r in rs)),
                    n2(med(r.sink_us for r in rs)),
                    f"{max(r.peak_rss for r in rs):.0f}",
                ]
            )
            if len(rs) > 1:
                rates = sorted(r.rate for r in rs)
                notes.append(
                    f"- {n} process(es): {n0(rates[0])} to {n0(rates[-1])} points/s over "
                    f"{len(rs)} runs."
                )
            late = [r for r in rs if r.released != "all"]
            if late:
                notes.append(
                    f"- {n} process(es): in {len(late)} run(s) the sink's hold ended by its "
                    "timeout: the routers did not start together."
                )
        emit(
            f"### Scale-out into the discarding sink ({opts.points:,} points, {SCALE_LINES} "
            f"lines/message, {env.partitions} partitions, {opts.compression}"
            + (f", median of {opts.repeat} runs" if opts.repeat > 1 else "")
            + ")\n"
        )
        table(
            [
                "router processes",
                "partitions each",
                "aggregate points/s",
                "per process",
                "routers' CPU µs/pt",
                "sink CPU µs/pt",
                "peak RSS MiB (largest)",
            ],
            rows,
        )
        notes.insert(
            0,
            "\nThe routers' partitions are spread while the cluster is drained; then the drain "
            "is lifted and the sink holds every answer until each router has "
            f"{BATCH.max_in_flight} writes waiting, and answers them all at once: from there to "
            "the last write of any router, the points written after the release (the held "
            "batches are not counted) and every process's CPU. On 2 cores, more than one "
            "router process competes with the others, with Kafka and with the sink: the "
            "aggregate shows contention, not the per-core scaling of a real deployment (one "
            "replica per core or per pod).",
        )


# --- backlog --------------------------------------------------------------------------------


def backlog_part(opts: Options) -> None:
    env = opts.env
    ep = env.endpoints
    proxy, proxy_url = ep["INFLUX_A_PROXY_NAME"], ep["INFLUX_A_PROXY_URL"]
    points, lines = opts.backlog_points, opts.backlog_lines
    toxi = Toxiproxy(ep["TOXIPROXY_URL"])
    with part("backlog") as notes:
        toxi.set_enabled(proxy, True)
        topic, tag = new_topic(env)
        note(f"backlog: {points:,} points, {lines} lines/message, behind {proxy} (topic {topic})")
        batches = bodies(f"ceiling_{tag}", min(points, opts.ceiling_points))
        settle(("kafka", "influx-a"))
        cap = Ceiling.run(proxy_url, env.database, batches, opts.compression)
        del batches
        note(f"  ceiling through the proxy {n0(cap.rate)} points/s")
        doc = topology(
            env,
            topic,
            tag,
            cluster_doc(proxy_url, env.database, opts.compression),
            port=free_port(),
        )
        router = Router(doc, opts.work, f"backlog-{tag}")
        sampler = RssSampler(router.pid)
        try:
            router.wait_ready()
            wait_until(
                "the router to own every partition",
                lambda: router.destination()["assigned"] == env.partitions,
                60,
            )
            idle = rss_mib(router.pid)
            sampler.start()
            toxi.set_enabled(proxy, False)
            wait_until(
                "influx-a to go DOWN and its partitions to pause",
                lambda: (
                    router.cluster_state() == "down"
                    and router.destination()["paused"] == env.partitions
                ),
                60,
            )
            sampler.phase("piling")
            cpu0 = router.cpu()
            produced = produce(env, topic, points, lines, f"bench_{tag}")
            cpu_piling = router.cpu() - cpu0
            watch = CommitWatch(env, GROUP.format(tag=tag), topic, lines)
            settle(("kafka", "influx-a"))
            sampler.phase("replay")
            restored = time.monotonic()
            toxi.set_enabled(proxy, True)
            watch.wait([router.pid], opts.timeout(points))
            caught_up = watch.t_last - restored
            sampler.stop()
            hwm = router.peak_rss()
        finally:
            sampler.stop()
            router.stop()
            toxi.set_enabled(proxy, True)
            toxi.close()
        rate = watch.rate
        us = per_point(watch.cpu_last[router.pid] - watch.cpu_first[router.pid], watch.points_moved)
        emit(
            f"### Backlog behind a cut cluster ({points:,} points, {lines} lines/message, "
            f"influx-a through Toxiproxy, {opts.compression})\n"
        )
        table(
            [
                "RSS idle MiB",
                "peak while piling up",
                "peak while replaying",
                "peak (VmHWM)",
                "replay points/s",
                "ceiling points/s",
                "replay/ceiling",
                "router CPU µs/pt",
                "restore to caught up",
            ],
            [
                [
                    f"{idle:.0f}",
                    f"{sampler.peak('piling'):.0f}",
                    f"{sampler.peak('replay'):.0f}",
                    f"{hwm:.0f}",
                    n0(rate),
                    n0(cap.rate),
                    f"{rate / max(cap.rate, 1e-9):.2f}",
                    n2(us),
                    f"{caught_up:.1f} s",
                ]
            ],
        )
        notes.append(
            f"\nProducing the backlog took {produced:.0f} s ({n0(points / produced)} points/s); "
            f"the paused router used {cpu_piling:.1f} s of CPU meanwhile. Replay points/s is "
            "first to last commit; 'restore to caught up' includes the health checker's rise "
            "(2 checks, 1 s apart)."
        )


# --- the route guard ------------------------------------------------------------------------

# Two block rules and both limits, none of which the bench's 1000 series (one measurement, tag
# ``host``) trips: what is measured is the cost on lines that pass.
GUARD: dict[str, Any] = {
    "block": [
        {"name": "tmp", "measurement": "^tmp_"},
        {"name": "request-id", "tag": {"key": "^request_id$"}},
    ],
    "max_new_series_per_minute": 2000,
    "max_series": 100_000,
}


def guard_alone(points: int, lines: int) -> float:
    """CPU µs per point of the guard alone on the bench's messages, every series known (the
    steady state: ``Guard.known``, what a destination calls per message), best of 5."""
    g = GUARD
    guard = Guard(
        [
            BlockRule("tmp", measurement=re.compile(g["block"][0]["measurement"])),
            BlockRule("request-id", tag_key=re.compile(g["block"][1]["tag"]["key"])),
        ],
        Limits(g["max_new_series_per_minute"], g["max_series"], warmup=0.0),
    )
    count = max(1, min(points, 200_000) // lines)
    msgs = [
        b"\n".join(
            b"bench_x,host=h%03d value=%di %d" % ((k + j) % 1000, k + j, 1_700_000_000 + k + j)
            for j in range(lines)
        )
        for k in range(0, count * lines, lines)
    ]
    for m in msgs:
        guard.check(m)
    known = guard.known
    if not all(known(m) for m in msgs):
        raise SystemExit("the guard refused a line of the bench: it measures the slow path")
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for m in msgs:
            known(m)
        best = min(best, time.process_time() - started)
    return per_point(best, count * lines)


def guard_part(opts: Options, sink: SinkProcess) -> None:
    with part("guard"):
        rows: list[list[str]] = []
        for shape in opts.shapes:
            us: dict[str, float] = {}
            for name, guard in (("off", None), ("on", GUARD)):
                run = drain_once(
                    opts,
                    shape=shape,
                    sink=sink,
                    compression=opts.compression,
                    guard=guard,
                    ceiling=False,
                )
                us[name] = run.us
            rows.append(
                [
                    str(shape),
                    n2(us["off"]),
                    n2(us["on"]),
                    f"{us['on'] - us['off']:+.2f}",
                    n2(guard_alone(opts.points, shape)),
                ]
            )
        emit(
            f"### The route guard's cost (discarding sink, {opts.points:,} points, "
            f"{opts.compression})\n"
        )
        table(
            [
                "lines/msg",
                "router CPU µs/pt, guard off",
                "guard on",
                "added by the guard",
                "the guard alone",
            ],
            rows,
        )


# --- floor ----------------------------------------------------------------------------------


def floor_once(opts: Options, shape: int) -> tuple[float, float, int]:
    """(CPU seconds of this process from the first message to the last, wall seconds,
    messages) for a bare consumer reading ``opts.points`` points of ``shape`` lines/message."""
    topic, tag = new_topic(opts.env)
    produce(opts.env, topic, opts.points, shape, f"bench_{tag}")
    messages = -(-opts.points // shape)
    consumer = Consumer(
        {
            "bootstrap.servers": opts.env.kafka,
            "group.id": f"bench-floor-{tag}",
            "enable.auto.commit": "false",
            "queued.max.messages.kbytes": "16384",  # the router's setting
            **opts.env.client_config,
        }
    )
    try:
        consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(opts.env.partitions)]
        )
        got, cpu0, wall0 = 0, 0.0, 0.0
        deadline = time.monotonic() + 600
        while got < messages and time.monotonic() < deadline:
            batch = consumer.consume(1000, 1.0)
            if batch and not got:
                cpu0, wall0 = time.process_time(), time.monotonic()
            got += len(batch)
        return time.process_time() - cpu0, time.monotonic() - wall0, got
    finally:
        consumer.close()


def floor_part(opts: Options) -> None:
    with part("floor") as notes:
        rows = []
        for shape in opts.shapes:
            cpu, wall, got = floor_once(opts, shape)
            points = got * shape
            rows.append(
                [
                    str(shape),
                    n0(got),
                    n2(cpu / got * 1e6),
                    n2(cpu / points * 1e6),
                    n0(points / wall),
                ]
            )
        emit("### The Kafka client alone (bare consumer, nothing done with the messages)\n")
        table(["lines/msg", "messages", "CPU µs/message", "CPU µs/point", "points/s"], rows)
        emit()
        notes.append(
            "This process's CPU (librdkafka's threads included) from the first message to the "
            "last: the floor under the router's CPU per point for the same shape."
        )


# --- main -----------------------------------------------------------------------------------


def csv_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m scripts.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--only",
        default=",".join(DEFAULT_PARTS),
        help=f"comma-separated parts of {', '.join(PARTS)} (default: all but guard)",
    )
    ap.add_argument("--points", type=int, default=1_000_000, help="points per run (default 1M)")
    ap.add_argument(
        "--backlog-points",
        type=int,
        default=10_000_000,
        help="points piled up behind the cut cluster (default 10M)",
    )
    ap.add_argument(
        "--backlog-lines",
        type=int,
        default=20,
        help="lines per message of the backlog (default 20)",
    )
    ap.add_argument(
        "--shapes",
        type=csv_ints,
        default=(1, 20),
        help="lines per Kafka message, one row each (default 1,20)",
    )
    ap.add_argument("--lines", dest="shapes", type=csv_ints, help="the same as --shapes")
    ap.add_argument(
        "--compression",
        type=Compression.parse,
        default=Compression.default(),
        help="the cluster's compression outside the compression part: none, gzip, "
        f"gzip:N (default: the topology's, {Compression.default()})",
    )
    ap.add_argument(
        "--gzip-levels",
        type=csv_ints,
        default=(1, 6),
        help="gzip levels of the compression part, next to none (default 1,6)",
    )
    ap.add_argument(
        "--scale",
        type=csv_ints,
        default=(1, 2, 3),
        help="router process counts of the scale part (default 1,2,3)",
    )
    ap.add_argument("--partitions", type=int, default=12, help="partitions per topic (12)")
    ap.add_argument(
        "--sink",
        choices=("asyncio", "threaded"),
        default="asyncio",
        help="the discarding sink's server (default asyncio)",
    )
    ap.add_argument(
        "--ceiling-points",
        type=int,
        default=2_000_000,
        help="at most this many points in a ceiling run (its batches are built in "
        "memory first, ~60 bytes per point)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each configuration (interleaved); the tables show medians (default 1)",
    )
    ap.add_argument(
        "--kafka-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a librdkafka setting for the routers (kafka.client_config), repeatable",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (router logs)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    client_config = dict(kv.split("=", 1) for kv in args.kafka_config if "=" in kv)
    if len(client_config) != len(args.kafka_config):
        ap.error("--kafka-config takes KEY=VALUE")
    work = Path(tempfile.mkdtemp(prefix="frouter-bench-"))
    opts = Options(
        points=args.points,
        backlog_points=args.backlog_points,
        backlog_lines=args.backlog_lines,
        shapes=args.shapes,
        compression=args.compression,
        gzip_levels=args.gzip_levels,
        scale=args.scale,
        sink_impl=args.sink,
        ceiling_points=args.ceiling_points,
        repeat=max(1, args.repeat),
        work=work,
        env=Env(stack.endpoints(), args.partitions, client_config),
    )
    emit(
        f"## failover-router bench, {time.strftime('%Y-%m-%d %H:%M')}: "
        f"`{' '.join(['python -m scripts.bench', *(argv if argv is not None else sys.argv[1:])])}`"
    )
    emit(f"\nLoad average at the start: {load()}; router logs in {work}.\n")
    sink = SinkProcess(args.sink) if {"discard", "scale", "guard"} & set(parts) else None
    steps: list[tuple[str, Callable[[], None]]] = []
    throughput = [p for p in ("discard", "influx") if p in parts]
    if throughput:
        steps.append(("throughput", lambda: throughput_part(opts, throughput, sink)))
    if "compression" in parts:
        steps.append(("compression", lambda: compression_part(opts)))
    if "scale" in parts and sink is not None:
        steps.append(("scale", lambda: scale_part(opts, sink)))
    if "backlog" in parts:
        steps.append(("backlog", lambda: backlog_part(opts)))
    if "floor" in parts:
        steps.append(("floor", lambda: floor_part(opts)))
    if "guard" in parts and sink is not None:
        steps.append(("guard", lambda: guard_part(opts, sink)))
    try:
        for _, step in steps:
            step()
    finally:
        if sink is not None:
            sink.close()
    if not args.keep:  # kept when a part failed: the routers' logs say why
        shutil.rmtree(work, ignore_errors=True)
    emit(f"Load average at the end: {load()}.")


if __name__ == "__main__":
    main()
