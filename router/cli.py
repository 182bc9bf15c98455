"""`failover-router run | check-topology`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from types import FrameType

import structlog

from router.engine import Router
from router.errors import ConfigError, RouterError
from router.events import configure_logging
from router.http import StatusServer
from router.topology import check_topology_main, load_topology

log = structlog.get_logger("router")


def run(topology_path: str, datacenter: str | None, listen: str | None) -> int:
    try:
        topology = load_topology(topology_path, datacenter=datacenter)
    except ConfigError as exc:
        for err in exc.errors:
            print(f"{topology_path}: {err}", file=sys.stderr)
        return 1
    router = Router(topology, topology_path=topology_path, datacenter=datacenter)
    server = StatusServer(router, listen or topology.http.listen)
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
    router.stop()
    server.stop()
    log.info("router_stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="failover-router")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="route the topology's topics to its clusters")
    p_run.add_argument("--topology", required=True, help="path of topology.yaml (watched)")
    p_run.add_argument("--datacenter", default=os.environ.get("FROUTER_DATACENTER"))
    p_run.add_argument(
        "--listen",
        default=os.environ.get("FROUTER_LISTEN"),
        help="host:port of the HTTP server (default: topology http.listen)",
    )
    p_run.add_argument("--log-level", default=os.environ.get("FROUTER_LOG_LEVEL", "info"))
    p_check = sub.add_parser("check-topology", help="validate a topology file; exit 0 or 1")
    p_check.add_argument("file")
    p_check.add_argument("--datacenter", default=None)
    args = parser.parse_args(argv)
    if args.cmd == "check-topology":
        return check_topology_main(args.file, args.datacenter)
    configure_logging(args.log_level)
    try:
        return run(args.topology, args.datacenter, args.listen)
    except RouterError as exc:
        log.error("router_failed", error=str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
