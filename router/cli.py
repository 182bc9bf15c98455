"""`failover-router run | check-topology`; the operator's commands (status, drain, undrain,
backfill) are in ``router.commands``.

Exit codes of ``run``: 0 after SIGTERM/SIGINT (writes finished, committed); 1 for a topology
or setting that cannot be used (every error on stderr); 2 when the Kafka brokers refuse the
router's credentials or TLS at start (the error names the brokers and the SASL mechanism).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import socket
import sys
import threading
from types import FrameType

import structlog

from health.consul import ConsulSettings
from router import commands
from router.engine import Router, write_deadline
from router.errors import ConfigError, KafkaRefused, RouterError
from router.events import configure_logging
from router.http import StatusServer
from router.kafka import KAFKA_CHECK_TIMEOUT, check_access
from router.secrets import file_secret, remember
from router.tls import ca_file_problem
from router.topology import Topology, check_topology_main, load_topology

log = structlog.get_logger("router")
EXIT_KAFKA_REFUSED = commands.EXIT_KAFKA_REFUSED  # the brokers refused the credentials or TLS


def consul_settings(args: argparse.Namespace, advertise: str) -> ConsulSettings | None:
    """The Consul settings of the flags. The token file always wins over CONSUL_HTTP_TOKEN
    (which counts only when no file is given, and only when not empty); nothing else of the
    environment reaches the Consul client (``health.consul``)."""
    if not args.consul_addr:
        return None
    token = os.environ.get("CONSUL_HTTP_TOKEN") or None
    source = "token from CONSUL_HTTP_TOKEN" if token else "no token"
    token_file: str | None = None
    if args.consul_token_file:  # read on every Consul call, again only when it changed
        token_file = os.path.abspath(args.consul_token_file)  # no symlink resolved: rotation
        source = f"token from --consul-token-file {token_file}"
        try:
            token = file_secret(token_file)
        except ValueError as exc:
            raise ConfigError([f"--consul-token-file: {exc}"]) from exc
    elif token:
        remember(token)  # scrubbed from every output like the secrets of the topology
    ca_file = getattr(args, "consul_ca_file", None) or None
    if ca_file:
        ca_file = os.path.abspath(ca_file)
        why = ca_file_problem(ca_file)
        if why:
            raise ConfigError([f"--consul-ca-file: {why}"])
    return ConsulSettings(
        address=args.consul_addr,
        token=token,
        token_file=token_file,
        prefix=args.consul_prefix,
        session_ttl=args.consul_session_ttl,
        advertise=advertise,
        ca_file=ca_file,
        token_source=source,
    )


def check_kafka(topology: Topology, timeout: float = KAFKA_CHECK_TIMEOUT) -> None:
    """Before anything starts: do the brokers accept the credentials and TLS? Raises
    KafkaRefused if not; a Kafka that does not answer yet is only a warning (the router
    starts and connects when it can, as it always did)."""
    outcome = check_access(
        topology.kafka.librdkafka_config(), datacenter=topology.datacenter, timeout=timeout
    )
    if outcome != "ok":
        log.warning(
            "kafka_unverified",
            bootstrap=topology.kafka.bootstrap,
            outcome=outcome,
            reason="no broker answered; starting anyway (kafka_log events say why later)",
        )


def shutdown_deadline(topology: Topology) -> float:
    """How long SIGTERM waits for the writes in flight: the largest write deadline of the
    clusters. The Helm chart derives terminationGracePeriodSeconds from the same rule."""
    return max((write_deadline(c) for c in topology.clusters.values()), default=60.0)


def run(args: argparse.Namespace) -> int:
    topology_path: str = args.topology
    try:
        topology = load_topology(topology_path, datacenter=args.datacenter)
        check_kafka(topology)
        server = StatusServer(args.listen or topology.http.listen)
        host = args.advertise_address or server.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostbyname(socket.gethostname())
        consul = consul_settings(args, f"{host}:{server.port}")
        router = Router(
            topology, topology_path=topology_path, datacenter=args.datacenter, consul=consul
        )
    except ConfigError as exc:
        for err in exc.errors:
            print(f"{topology_path}: {err}", file=sys.stderr)
        return 1
    except KafkaRefused as exc:
        log.error(
            "kafka_refused",
            bootstrap=topology.kafka.bootstrap,
            reason="the brokers refused the router at start",
            **exc.fields(),
        )
        print(f"failover-router: {exc}", file=sys.stderr)
        return EXIT_KAFKA_REFUSED
    except OSError as exc:
        print(f"failover-router: cannot listen: {exc.strerror}", file=sys.stderr)
        return 1
    server.router = router
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    router.start()
    log.info("http_listening", port=server.port)
    stop.wait()
    router.stop(timeout=shutdown_deadline(router.topology))
    server.stop()
    log.info("router_stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="failover-router")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser(
        "run",
        help="route the topology's topics to its clusters",
        description="Exit codes: 0 stopped by a signal; 1 invalid topology or settings; "
        "2 the Kafka brokers refused the credentials or TLS at start.",
    )
    p_run.add_argument("--topology", required=True, help="path of topology.yaml (watched)")
    p_run.add_argument("--datacenter", default=os.environ.get("FROUTER_DATACENTER"))
    p_run.add_argument(
        "--listen",
        default=os.environ.get("FROUTER_LISTEN"),
        help="host:port of the HTTP server (default: topology http.listen)",
    )
    p_run.add_argument("--log-level", default=os.environ.get("FROUTER_LOG_LEVEL", "info"))
    commands.consul_flags(
        p_run,
        addr_use="; enables discovery, the shared verdict, KV drains and self-registration",
        session_ttl_help="seconds (Consul accepts 10..86400)",
    )
    p_run.add_argument(
        "--advertise-address",
        default=os.environ.get("FROUTER_ADVERTISE_ADDRESS"),
        help="address Consul's check uses to reach /healthz (default: the listen host)",
    )
    p_check = sub.add_parser("check-topology", help="validate a topology file; exit 0 or 1")
    p_check.add_argument("file")
    p_check.add_argument("--datacenter", default=None)
    commands.add_parsers(sub)  # status, drain, undrain, backfill
    args = parser.parse_args(argv)
    if args.cmd == "check-topology":
        return check_topology_main(args.file, args.datacenter)
    if args.cmd in commands.COMMANDS:
        return commands.run(args, consul_settings)
    faulthandler.enable()  # a crash in a C extension still leaves every thread's stack
    configure_logging(args.log_level)
    try:
        return run(args)
    except RouterError as exc:
        log.error("router_failed", error=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
