"""`devstack up|down|env|status`: the local stack for tests and the demo."""

from __future__ import annotations

import argparse
import sys

import httpx

from devstack import stack
from devstack.toxiproxy import Toxiproxy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devstack", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start every server not running yet, wait until all answer")
    p_up.add_argument("--timeout", type=float, default=120.0)
    p_up.add_argument(
        "--with",
        dest="with_",
        action="append",
        default=[],
        choices=stack.OPTIONAL,
        help="also start this optional server (repeatable)",
    )
    p_up.add_argument(
        "--secure",
        action="store_true",
        help="also start the secured servers (influx-s: https + auth; consul-acl: ACLs on) and "
        "create their users, Kafka's SCRAM users and ACLs, and the Consul tokens",
    )
    sub.add_parser("down", help="stop the servers devstack started (by pid)")
    p_env = sub.add_parser("env", help="print the endpoints as KEY=VALUE lines")
    p_env.add_argument(
        "--secure",
        action="store_true",
        help="also the secured stack's: CA and certificate files, listeners, users, secret files",
    )
    sub.add_parser("status", help="print each server and its pid, or 'stopped'")
    for verb, text in (
        ("cut", "make an InfluxDB unreachable through its Toxiproxy proxy"),
        ("restore", "make it reachable again and remove its toxics"),
    ):
        p = sub.add_parser(verb, help=text)
        p.add_argument(
            "name",
            choices=[*(f"influx-{n}" for n in stack.INFLUX_NAMES), "influx-s", *stack.OPTIONAL],
        )
    p_restart = sub.add_parser("restart", help="start one server again (after kill -9)")
    p_restart.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "up":
            started = stack.up(timeout=args.timeout, with_=tuple(args.with_), secure=args.secure)
            print(
                f"devstack: up (started: {', '.join(started) or 'none, all running'})",
                file=sys.stderr,
            )
        elif args.cmd == "down":
            stopped = stack.down()
            print(f"devstack: down (stopped: {', '.join(stopped) or 'none'})", file=sys.stderr)
        elif args.cmd == "env":
            env = stack.endpoints()
            if args.secure:
                env |= stack.secure_env()
            for key, value in env.items():
                print(f"{key}={value}")
        elif args.cmd in ("cut", "restore"):
            proxy = args.name.replace("-", "_")
            tp = Toxiproxy(stack.endpoints()["TOXIPROXY_URL"])
            try:
                tp.set_enabled(proxy, args.cmd == "restore")
                if args.cmd == "restore":
                    tp.remove_all_toxics(proxy)
            finally:
                tp.close()
            print(f"devstack: {args.cmd} {args.name}", file=sys.stderr)
        elif args.cmd == "restart":
            stack.restart(args.name)
        else:
            for name, pid in stack.status():
                print(f"{name}\t{pid if pid is not None else 'stopped'}")
    except stack.StackError as exc:
        print(f"devstack: error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"devstack: error: toxiproxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
