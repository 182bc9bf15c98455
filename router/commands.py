"""The operator's commands: ``failover-router status | drain | undrain | backfill``.

They take the same flags and environment as ``run`` (``--topology``, ``--datacenter``, the
Consul flags) and talk to a running router or to Kafka/Consul, never to a router's files:

- ``status``: a running router's ``/api/status`` as tables; exit 0 when every route has a usable
  cluster, 1 otherwise (or when the router cannot be read);
- ``drain CLUSTER`` / ``undrain CLUSTER``: set / delete the Consul KV key
  ``{prefix}/{dc}/drain/{cluster}`` that every router of the datacenter watches; without Consul
  they print the topology edit to make and exit 3 (a file the router does not own is never
  rewritten);
- ``backfill``: write a time range of a route's topics to one cluster again
  (``router.backfill``), resumable, with progress; exit 0 done, 130 interrupted, 1 error,
  2 the Kafka brokers refused the credentials or TLS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import httpx
from rich.console import Console

from health.consul import ConsulAPI, ConsulSettings
from router.backfill import Backfill, BackfillError, Job, Progress, iso, parse_time, prepare
from router.console import BackfillReport, render_status, status_exit_code
from router.engine import influx_target, write_deadline
from router.errors import ConfigError, ConsulError, KafkaRefused, RouterError
from router.events import configure_logging
from router.kafka import DeadLetterProducer, KafkaAdmin, check_access
from router.sink import InfluxSink
from router.topology import Topology, load_topology

COMMANDS = ("status", "drain", "undrain", "backfill")
EXIT_EDIT_NEEDED = 3  # drain/undrain without Consul: the printed topology edit is to be made
EXIT_INTERRUPTED = 130
EXIT_KAFKA_REFUSED = 2  # the brokers refused the credentials or TLS (as `run`)

ConsulSettingsOf = Callable[[argparse.Namespace, str], ConsulSettings | None]


def _fail(cmd: str, message: str, code: int = 1) -> int:
    print(f"failover-router {cmd}: error: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace) -> Topology:
    """The topology named by --topology (ConfigError when invalid)."""
    return load_topology(args.topology, datacenter=args.datacenter)


def _config_errors(args: argparse.Namespace, exc: ConfigError) -> int:
    for err in exc.errors:
        print(f"{args.topology}: {err}", file=sys.stderr)
    return 1


# --- status --------------------------------------------------------------------------------


def status_url(args: argparse.Namespace) -> str:
    """--url, else $FROUTER_URL, else the topology's http.listen, else 127.0.0.1:8080."""
    if args.url:
        return str(args.url).rstrip("/")
    if args.topology:
        host, _, port = _load(args).http.listen.rpartition(":")
        host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        return f"http://{host}:{port}"
    return "http://127.0.0.1:8080"


def cmd_status(args: argparse.Namespace) -> int:
    try:
        url = status_url(args)
    except ConfigError as exc:
        return _config_errors(args, exc)
    try:
        resp = httpx.get(f"{url}/api/status", timeout=args.timeout)
        resp.raise_for_status()
        doc = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        return _fail("status", f"cannot read {url}/api/status: {exc}")
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        render_status(doc, Console())
    return status_exit_code(doc)


# --- drain / undrain -----------------------------------------------------------------------


def drain_key(prefix: str, datacenter: str, cluster: str) -> str:
    """The KV key every router of the datacenter watches (``health.shared``)."""
    return f"{prefix.strip('/')}/{datacenter}/drain/{cluster}"


def topology_edit(path: str, cluster: str, drain: bool) -> str:
    """The edit that drains (or undrains) ``cluster`` in the topology file, with its line."""
    where = ""
    try:
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if line.startswith(" ") and line.strip().startswith(f"{cluster}:"):
                where = f" (line {n})"
                break
    except OSError:
        pass
    verb = "drain" if drain else "undrain"
    return (
        "Consul is not configured (--consul-addr / CONSUL_HTTP_ADDR): nothing was changed.\n"
        f"To {verb} {cluster}, edit {path}: under clusters.{cluster}{where} set\n\n"
        f"    drain: {'true' if drain else 'false'}\n\n"
        "Every router watching the file applies it within a second (a drain hands the routes "
        "over gracefully; an undrain replays what the cluster missed)."
    )


def cmd_drain(args: argparse.Namespace, consul_of: ConsulSettingsOf, drain: bool) -> int:
    cmd = "drain" if drain else "undrain"
    try:
        topology = _load(args)
        consul = consul_of(args, "")
    except ConfigError as exc:
        return _config_errors(args, exc)
    name = args.cluster
    cfg = topology.clusters.get(name)
    if cfg is None:
        return _fail(cmd, f"unknown cluster {name!r} (clusters: {', '.join(topology.clusters)})")
    if consul is None:
        print(topology_edit(args.topology, name, drain))
        return EXIT_EDIT_NEEDED
    key = drain_key(consul.prefix, topology.datacenter, name)
    try:
        api = ConsulAPI(consul)
        if drain:
            api.put(key, b"true")
        else:
            api.delete(key)
    except ConsulError as exc:
        return _fail(cmd, str(exc))
    return _done(args, topology, key, drain)


def _done(args: argparse.Namespace, topology: Topology, key: str, drain: bool) -> int:
    name = args.cluster
    if drain:
        print(
            f"drained {name}: Consul KV {key} = true; every router of datacenter "
            f"{topology.datacenter} hands its routes over gracefully "
            f"(to end it: failover-router undrain {name})"
        )
        return 0
    print(f"undrained {name}: deleted Consul KV {key}")
    if topology.clusters[name].drain:
        print(
            f"but the topology still drains it (clusters.{name}.drain: true in "
            f"{args.topology}): {name} stays drained until that is false",
            file=sys.stderr,
        )
        return EXIT_EDIT_NEEDED
    return 0


# --- backfill ------------------------------------------------------------------------------


def backfill_job(args: argparse.Namespace, topology: Topology, now: float) -> Job:
    """The job the arguments describe; BackfillError names what is wrong with them."""
    routes = {r.name: r for r in topology.routes}
    route = routes.get(args.route)
    if route is None:
        raise BackfillError(f"unknown route {args.route!r} (routes: {', '.join(routes)})")
    if args.cluster not in topology.clusters:
        raise BackfillError(
            f"unknown cluster {args.cluster!r} (clusters: {', '.join(topology.clusters)})"
        )
    if args.cluster not in route.destinations:
        raise BackfillError(
            f"cluster {args.cluster!r} is not a destination of route {route.name} "
            f"(its clusters: {', '.join(route.destinations)})"
        )
    try:
        since = parse_time(args.since, now)
        until = parse_time(args.until, now) if args.until else None
    except ValueError as exc:
        raise BackfillError(str(exc)) from None
    if since > now:
        raise BackfillError(f"--since {iso(since)} is in the future")
    if until is not None and until <= since:
        raise BackfillError(f"--until {iso(until)} is not after --since {iso(since)}")
    cfg = topology.clusters[args.cluster]
    graphite = route.format == "graphite"
    return Job(
        route=route.name,
        cluster=args.cluster,
        group=f"{topology.group_id(route.name, args.cluster)}.backfill",
        topics=route.topics,
        since=since,
        until=until,
        max_points=route.batch.max_points,
        max_bytes=route.batch.max_bytes,
        linger=route.batch.linger,
        max_in_flight=route.batch.max_in_flight,
        write_deadline=write_deadline(cfg),
        graphite_templates=route.graphite_templates if graphite else (),
        stamp_missing=route.stamp_missing_timestamps,
        precision="ns" if graphite else cfg.precision,
        restart=args.restart,
    )


def _nodes(
    args: argparse.Namespace, consul_of: ConsulSettingsOf, topology: Topology, cluster: str
) -> list[str]:
    """The cluster's node URLs: from the topology, or its Consul service's passing instances."""
    cfg = topology.clusters[cluster]
    if cfg.urls:
        return list(cfg.urls)
    consul = consul_of(args, "")
    if consul is None or not cfg.consul_service:
        raise BackfillError(f"{cluster} is found through Consul: pass --consul-addr")
    try:
        _, urls = ConsulAPI(consul).passing_instances(
            cfg.consul_service, tag=cfg.consul_tag, dc=cfg.consul_datacenter
        )
    except ConsulError as exc:
        raise BackfillError(str(exc)) from exc
    if not urls:
        raise BackfillError(f"{cluster}: no passing instance of {cfg.consul_service} in Consul")
    return urls


def _run_backfill(
    args: argparse.Namespace, consul_of: ConsulSettingsOf, topology: Topology
) -> tuple[Job, Progress]:
    job = backfill_job(args, topology, time.time())
    urls = _nodes(args, consul_of, topology, job.cluster)
    config = topology.kafka.librdkafka_config()
    check_access(config, datacenter=topology.datacenter)  # KafkaRefused: exit 2
    admin = KafkaAdmin(config)
    dead_letters: DeadLetterProducer | None = None
    try:
        plan = prepare(admin, job)
        dead_letters = DeadLetterProducer(config, topology.kafka.dead_letters)
        target = influx_target(job.cluster, topology.clusters[job.cluster])
        if job.graphite_templates:  # converted lines carry nanosecond timestamps
            target = dataclasses.replace(target, precision="ns")
        with (
            InfluxSink(target, nodes=lambda: urls) as sink,
            BackfillReport(f"{job.route} -> {job.cluster}") as report,
        ):
            run = Backfill(
                job,
                plan,
                kafka_config=config,
                sink=sink,
                dead_letters=dead_letters,
                report=report,
                report_every=args.progress_interval,
            )
            stop_on_signal(run.stop)
            result = run.run()
            report(result)
        return job, result
    finally:
        if dead_letters is not None:
            dead_letters.close(10)
        admin.close()


def cmd_backfill(args: argparse.Namespace, consul_of: ConsulSettingsOf) -> int:
    try:
        topology = _load(args)
    except ConfigError as exc:
        return _config_errors(args, exc)
    try:
        job, result = _run_backfill(args, consul_of, topology)
    except KafkaRefused as exc:  # credentials or TLS refused: as `run` at start
        return _fail("backfill", str(exc), EXIT_KAFKA_REFUSED)
    except RouterError as exc:  # BackfillError, SourceError, ConfigError (a secret)...
        return _fail("backfill", str(exc))
    if result.state == "interrupted":
        print(
            f"backfill interrupted at {result.done:,} of {result.total:,} messages; run the "
            f"same command again to resume (group {job.group})",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    print(
        f"backfill done: {result.total:,} messages of route {job.route} in {job.cluster} "
        f"({result.points:,} points written by this run; group {job.group})",
        file=sys.stderr,
    )
    return 0


def stop_on_signal(stop: Callable[[], None]) -> None:
    """SIGINT/SIGTERM: finish the writes in flight, commit, return; a second SIGINT: at once."""
    seen: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        if seen and signum == signal.SIGINT:
            raise KeyboardInterrupt
        seen.append(signum)
        print("stopping: finishing the writes in flight (Ctrl-C again: now)", file=sys.stderr)
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# --- the parsers ---------------------------------------------------------------------------


def _topology_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    env = os.environ.get("FROUTER_TOPOLOGY")
    p.add_argument(
        "--topology",
        required=required and not env,
        default=env,
        help="path of topology.yaml (env FROUTER_TOPOLOGY)",
    )
    p.add_argument("--datacenter", default=os.environ.get("FROUTER_DATACENTER"))


def consul_flags(
    p: argparse.ArgumentParser, *, addr_use: str = "", session_ttl_help: str = argparse.SUPPRESS
) -> None:
    """The Consul flags of ``run`` and of the operator's commands (``addr_use``: what Consul
    is for in that command, appended to the address's help)."""
    p.add_argument(
        "--consul-addr",
        default=os.environ.get("CONSUL_HTTP_ADDR"),
        help="Consul agent: host:port, http://host:port or https://host:port "
        f"(env CONSUL_HTTP_ADDR){addr_use}",
    )
    p.add_argument(
        "--consul-token-file",
        default=os.environ.get("CONSUL_HTTP_TOKEN_FILE"),
        help="file holding the Consul ACL token (env CONSUL_HTTP_TOKEN_FILE), read again "
        "whenever it changes. It always wins over CONSUL_HTTP_TOKEN, which is used only when no "
        "token file is given (an empty CONSUL_HTTP_TOKEN means no token)",
    )
    p.add_argument(
        "--consul-ca-file",
        default=os.environ.get("CONSUL_CACERT"),
        help="CA bundle that signs an https Consul agent's certificate (env CONSUL_CACERT; "
        "default: the public CAs of certifi; REQUESTS_CA_BUNDLE and the like are ignored)",
    )
    p.add_argument(
        "--consul-prefix", default=os.environ.get("FROUTER_CONSUL_PREFIX", "failover-router")
    )
    p.add_argument("--consul-session-ttl", type=float, default=10.0, help=session_ttl_help)


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The operator's subcommands, on ``failover-router``'s parser."""
    p_status = sub.add_parser(
        "status",
        help="a running router's status as tables; exit 0 if every route has a usable "
        "cluster, else 1",
    )
    p_status.add_argument(
        "--url",
        default=os.environ.get("FROUTER_URL"),
        help="the router's HTTP address (env FROUTER_URL; default: the topology's "
        "http.listen, else http://127.0.0.1:8080)",
    )
    _topology_flags(p_status, required=False)
    p_status.add_argument("--timeout", type=float, default=5.0, help="seconds")
    p_status.add_argument("--json", action="store_true", help="print /api/status as JSON")
    for verb, text in (
        ("drain", "hand a cluster's routes over gracefully (Consul KV, else the topology edit)"),
        ("undrain", "end a drain: the cluster replays what it missed and takes its routes back"),
    ):
        p = sub.add_parser(verb, help=text)
        p.add_argument("cluster")
        _topology_flags(p)
        consul_flags(p)
    p_back = sub.add_parser(
        "backfill", help="write a time range of a route's topics to one cluster again"
    )
    _topology_flags(p_back)
    consul_flags(p_back)
    p_back.add_argument("--route", required=True)
    p_back.add_argument("--cluster", required=True)
    p_back.add_argument(
        "--since",
        required=True,
        help="ISO 8601 (2026-11-20T00:00Z; no zone: UTC), or a duration ago (6h, 2d)",
    )
    p_back.add_argument("--until", help="same forms (default: the topics' end when it starts)")
    p_back.add_argument("--restart", action="store_true", help="ignore an earlier run's progress")
    p_back.add_argument(
        "--progress-interval", type=float, default=1.0, help="seconds between progress reports"
    )
    p_back.add_argument("--log-level", default=os.environ.get("FROUTER_LOG_LEVEL", "warning"))


def run(args: argparse.Namespace, consul_of: ConsulSettingsOf) -> int:
    """Carry out one of ``COMMANDS``; returns the exit code."""
    if args.cmd == "status":
        return cmd_status(args)
    if args.cmd in ("drain", "undrain"):
        configure_logging("warning", sys.stderr)
        return cmd_drain(args, consul_of, args.cmd == "drain")
    configure_logging(args.log_level, sys.stderr)
    return cmd_backfill(args, consul_of)
