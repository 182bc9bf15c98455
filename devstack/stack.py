"""The local stack: real Kafka (KRaft), four InfluxDB 1.x, Toxiproxy and Consul on 127.0.0.1.

influx-a, -b and -c are Debian's InfluxDB 1.6 without auth; influx-d is InfluxDB 1.8.3 (built
from the Go module proxy) with auth on, an admin user made by ``up``, and the v2 write API.
VictoriaMetrics is optional: ``up(with_=("victoriametrics",))`` (``devstack up --with
victoriametrics``) starts it too; the tests that need it ask for it.

Every server is a plain child process started from binaries that ``devstack/install.sh``
put in the cache dir (``$FROUTER_CACHE``, default ``~/.cache/failover-router``). Run state
(data dirs, logs, pid files) lives in ``$FROUTER_STACK_DIR`` (default ``$FROUTER_CACHE/stack``).

``up`` is idempotent: a server whose pid file names a live process of ours is left alone.
``down`` stops only the pids it wrote. Ports are fixed (see ``PORTS``) and can be shifted as a
block with ``FROUTER_PORT_OFFSET`` to run a second stack beside the first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

KAFKA_VERSION = "4.1.1"
TOXIPROXY_VERSION = "v2.5.0"
CONSUL_VERSION = "v1.16.3"
INFLUXDB18_VERSION = "v1.8.3"
VICTORIAMETRICS_VERSION = "v1.151.0"
KAFKA_CLUSTER_ID = "ZnJvdXRlci1kZXZzdGFjaw"  # any 22-char base64 uuid; fixed so restarts reuse data
INFLUX_NAMES = ("a", "b", "c", "d")
INFLUX18_NAMES = ("d",)  # InfluxDB 1.8.3 with auth; the others are Debian's 1.6 without
INFLUX18_USERNAME = "admin"  # the admin user `up` creates (a local, throwaway stack)
INFLUX18_PASSWORD = "frouter-admin"
OPTIONAL = ("victoriametrics",)  # started only when asked for
DATABASE = "metrics"

_BASE_PORTS = {
    "kafka": 19092,
    "kafka_controller": 19093,
    "toxiproxy": 18474,
    "influx_a": 18086,
    "influx_b": 18087,
    "influx_c": 18088,
    "influx_d": 18089,
    "influx_a_rpc": 18186,
    "influx_b_rpc": 18187,
    "influx_c_rpc": 18188,
    "influx_d_rpc": 18189,
    "influx_a_proxy": 28086,
    "influx_b_proxy": 28087,
    "influx_c_proxy": 28088,
    "influx_d_proxy": 28089,
    "victoriametrics": 18428,
    "victoriametrics_proxy": 28428,
    "consul_http": 18500,
    "consul_server": 18300,
    "consul_serf_lan": 18301,
    "consul_serf_wan": 18302,
}


# Servers started by this process, kept so that it can reap them (no zombies, no warnings).
_children: dict[int, subprocess.Popen[bytes]] = {}


class StackError(Exception):
    """A server could not be installed, started, or reached. The message is one line."""


def _port_offset() -> int:
    raw = os.environ.get("FROUTER_PORT_OFFSET", "0")
    try:
        return int(raw)
    except ValueError as exc:
        raise StackError(f"FROUTER_PORT_OFFSET must be an integer, got {raw!r}") from exc


def ports() -> dict[str, int]:
    offset = _port_offset()
    return {name: port + offset for name, port in _BASE_PORTS.items()}


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "failover-router"
    return Path(os.environ.get("FROUTER_CACHE", str(default)))


def stack_dir() -> Path:
    return Path(os.environ.get("FROUTER_STACK_DIR", str(cache_dir() / "stack")))


def endpoints() -> dict[str, str]:
    """The KEY=VALUE facts tests and the demo need, all on 127.0.0.1."""
    p = ports()
    env = {
        "KAFKA_BOOTSTRAP": f"127.0.0.1:{p['kafka']}",
        "TOXIPROXY_URL": f"http://127.0.0.1:{p['toxiproxy']}",
    }
    for n in INFLUX_NAMES:
        up = n.upper()
        env[f"INFLUX_{up}_URL"] = f"http://127.0.0.1:{p[f'influx_{n}']}"
        env[f"INFLUX_{up}_PROXY_URL"] = f"http://127.0.0.1:{p[f'influx_{n}_proxy']}"
        env[f"INFLUX_{up}_PROXY_NAME"] = f"influx_{n}"
    for n in INFLUX18_NAMES:
        env[f"INFLUX_{n.upper()}_USERNAME"] = INFLUX18_USERNAME
        env[f"INFLUX_{n.upper()}_PASSWORD"] = INFLUX18_PASSWORD
    env["INFLUX_DATABASE"] = DATABASE
    env["VICTORIAMETRICS_URL"] = f"http://127.0.0.1:{p['victoriametrics']}"
    env["VICTORIAMETRICS_PROXY_URL"] = f"http://127.0.0.1:{p['victoriametrics_proxy']}"
    env["VICTORIAMETRICS_PROXY_NAME"] = "victoriametrics"
    env["CONSUL_HTTP_ADDR"] = f"127.0.0.1:{p['consul_http']}"
    return env


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int
    ready: Callable[[], bool]
    marker: str  # a substring of /proc/PID/cmdline that proves the pid is still ours
    prepare: Callable[[], None] = field(default=lambda: None)
    stale: Callable[[], bool] = field(default=lambda: False)  # running with outdated settings
    extra_ports: tuple[int, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pidfile(self) -> Path:
        return stack_dir() / "run" / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return stack_dir() / "log" / f"{self.name}.log"


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _alive_pid(svc: Service) -> int | None:
    """The pid from the pid file if that process is alive and still ours."""
    try:
        pid = int(svc.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    state = ""
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
    if state in ("", "Z", "X"):
        return None
    return pid if svc.marker in _cmdline(pid) else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _http_ok(url: str, status: tuple[int, ...] = (200, 204)) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code in status
    except httpx.HTTPError:
        return False


# --- Kafka ------------------------------------------------------------------------------


def _kafka_home() -> Path:
    return cache_dir() / f"kafka-{KAFKA_VERSION}"


def _kafka_properties() -> str:
    """The broker's server.properties. Topics are never created by a produce or a metadata
    request (``auto.create.topics.enable=false``): a missing topic stays missing, as in the
    clusters the router meets in production, so every test and script creates its own."""
    p = ports()
    data = stack_dir() / "kafka" / "data"
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{p['kafka_controller']}",
            f"listeners=PLAINTEXT://127.0.0.1:{p['kafka']},"
            f"CONTROLLER://127.0.0.1:{p['kafka_controller']}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{p['kafka']}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            f"log.dirs={data}",
            "num.partitions=4",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "log.retention.check.interval.ms=5000",
            "",
        ]
    )


def _kafka_stale() -> bool:
    """The running broker was started with other settings than ``_kafka_properties()`` (an
    older stack dir, say with auto-create on): ``up`` restarts it rather than keep them."""
    props = stack_dir() / "kafka" / "server.properties"
    try:
        return props.read_text() != _kafka_properties()
    except OSError:
        return True


def _kafka_prepare() -> None:
    """Written on every start, so a changed setting reaches an existing stack dir too."""
    home = stack_dir() / "kafka"
    data = home / "data"
    props = home / "server.properties"
    home.mkdir(parents=True, exist_ok=True)
    props.write_text(_kafka_properties())
    (home / "log4j2.properties").write_text(
        "\n".join(
            [
                "rootLogger.level=INFO",
                "rootLogger.appenderRef.out.ref=OUT",
                "appender.out.type=Console",
                "appender.out.name=OUT",
                "appender.out.layout.type=PatternLayout",
                "appender.out.layout.pattern=[%d] %p %m (%c)%n",
                "logger.kafka.name=kafka",
                "logger.kafka.level=WARN",
                "logger.state.name=state.change.logger",
                "logger.state.level=WARN",
                "logger.org.name=org.apache.kafka",
                "logger.org.level=WARN",
                "",
            ]
        )
    )
    if not (data / "meta.properties").exists():
        data.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(
            [
                *_java_cmd(home),
                "kafka.tools.StorageTool",
                "format",
                "-t",
                KAFKA_CLUSTER_ID,
                "-c",
                str(props),
                "--ignore-formatted",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise StackError(f"kafka storage format failed: {tail[0]}")


def _java_cmd(home: Path) -> list[str]:
    libs = _kafka_home() / "libs"
    if not (libs / ".complete").exists():
        raise StackError(f"Kafka jars missing in {libs}: run devstack/install.sh (or ./dev setup)")
    java = shutil.which("java")
    if java is None:
        raise StackError("java not found on PATH: run devstack/install.sh (or ./dev setup)")
    return [
        java,
        "-Xms256m",
        "-Xmx1g",
        "-XX:+UseG1GC",
        f"-Dlog4j2.configurationFile={home / 'log4j2.properties'}",
        "-cp",
        f"{libs}/*",
    ]


def _kafka_ready() -> bool:
    if _port_free(ports()["kafka"]):
        return False
    admin = AdminClient({"bootstrap.servers": endpoints()["KAFKA_BOOTSTRAP"]})
    try:
        md = admin.list_topics(timeout=2)
    except KafkaException:
        return False
    return bool(md.brokers)


# --- InfluxDB ---------------------------------------------------------------------------


def influx_config(
    home: Path, http_port: int, rpc_port: int, *, auth: bool = False, max_series: int = 0
) -> str:
    """The influxdb.conf of a loopback InfluxDB 1.x with its data under ``home`` (also used by
    tests that start a dedicated one: auth on, or a series limit)."""
    limit = f"\n  max-series-per-database = {max_series}" if max_series else ""
    return f"""reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{home}/meta"
  logging-enabled = false
[data]
  dir = "{home}/data"
  wal-dir = "{home}/wal"
  query-log-enabled = false
  index-version = "inmem"{limit}
[coordinator]
  log-queries-after = "0s"
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  log-enabled = false
  auth-enabled = {"true" if auth else "false"}
[subscriber]
  enabled = false
[continuous_queries]
  enabled = false
[logging]
  level = "warn"
"""


def _influx_prepare(n: str) -> Callable[[], None]:
    def prepare() -> None:
        p = ports()
        home = stack_dir() / f"influx-{n}"
        home.mkdir(parents=True, exist_ok=True)
        (home / "influxdb.conf").write_text(
            influx_config(home, p[f"influx_{n}"], p[f"influx_{n}_rpc"], auth=n in INFLUX18_NAMES)
        )

    return prepare


def _influxd18_bin() -> Path:
    return cache_dir() / "bin" / f"influxd-{INFLUXDB18_VERSION}"


def _influx_service(n: str) -> Service:
    p = ports()
    url = endpoints()[f"INFLUX_{n.upper()}_URL"]
    if n in INFLUX18_NAMES:
        influxd = str(_influxd18_bin())
    else:
        influxd = shutil.which("influxd") or "/usr/bin/influxd"
    conf = stack_dir() / f"influx-{n}" / "influxdb.conf"
    return Service(
        name=f"influx-{n}",
        argv=[influxd, "run", "-config", str(conf)],
        port=p[f"influx_{n}"],
        extra_ports=(p[f"influx_{n}_rpc"],),
        ready=lambda: _http_ok(f"{url}/ping"),
        marker=str(conf),
        prepare=_influx_prepare(n),
    )


# --- VictoriaMetrics (optional) ---------------------------------------------------------


def _victoriametrics_bin() -> Path:
    return cache_dir() / "bin" / f"victoria-metrics-{VICTORIAMETRICS_VERSION}"


def _victoriametrics_service() -> Service:
    """Single-node VictoriaMetrics, line protocol on /write.

    ``-retentionPeriod=100y``: the default (1 month) silently drops older points with a 204,
    and the tests write 2023 timestamps. ``-dedup.minScrapeInterval=1ms``: a re-sent point
    (same series, same millisecond) replaces itself, as it does in InfluxDB; VictoriaMetrics
    keeps milliseconds only. ``-search.latencyOffset=0s``: reads see a write at once.
    """
    p = ports()
    data = stack_dir() / "victoriametrics" / "data"
    return Service(
        name="victoriametrics",
        argv=[
            str(_victoriametrics_bin()),
            f"-httpListenAddr=127.0.0.1:{p['victoriametrics']}",
            f"-storageDataPath={data}",
            "-retentionPeriod=100y",
            "-dedup.minScrapeInterval=1ms",
            "-search.latencyOffset=0s",
            "-influxListenAddr=",
            "-loggerLevel=WARN",
        ],
        port=p["victoriametrics"],
        ready=lambda: _http_ok(f"{endpoints()['VICTORIAMETRICS_URL']}/health", (200,)),
        marker=f"-storageDataPath={data}",
    )


# --- Toxiproxy --------------------------------------------------------------------------


def _toxiproxy_bin() -> Path:
    return cache_dir() / "bin" / f"toxiproxy-server-{TOXIPROXY_VERSION}"


def _toxiproxy_service() -> Service:
    p = ports()
    return Service(
        name="toxiproxy",
        argv=[str(_toxiproxy_bin()), "-host", "127.0.0.1", "-port", str(p["toxiproxy"])],
        port=p["toxiproxy"],
        ready=lambda: _http_ok(f"{endpoints()['TOXIPROXY_URL']}/version"),
        marker=f"toxiproxy-server-{TOXIPROXY_VERSION}",
    )


# --- Consul -----------------------------------------------------------------------------


def _consul_bin() -> Path:
    return cache_dir() / "bin" / f"consul-{CONSUL_VERSION}"


def _consul_ready() -> bool:
    try:
        resp = httpx.get(f"http://{endpoints()['CONSUL_HTTP_ADDR']}/v1/status/leader", timeout=1)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200 and resp.json() not in ("", None)


def _consul_service() -> Service:
    """A dev agent (in-memory server, its own leader) on non-default ports, no DNS/gRPC."""
    p = ports()
    return Service(
        name="consul",
        argv=[
            str(_consul_bin()),
            "agent",
            "-dev",
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
            "-advertise",
            "127.0.0.1",
            "-node",
            "devstack",
            "-http-port",
            str(p["consul_http"]),
            "-server-port",
            str(p["consul_server"]),
            "-serf-lan-port",
            str(p["consul_serf_lan"]),
            "-serf-wan-port",
            str(p["consul_serf_wan"]),
            "-dns-port",
            "-1",
            "-grpc-port",
            "-1",
            "-grpc-tls-port",
            "-1",
            "-https-port",
            "-1",
            "-log-level",
            "warn",
        ],
        port=p["consul_http"],
        extra_ports=(p["consul_server"], p["consul_serf_lan"], p["consul_serf_wan"]),
        ready=_consul_ready,
        marker=f"consul-{CONSUL_VERSION}",
    )


def _kafka_service() -> Service:
    p = ports()
    home = stack_dir() / "kafka"
    props = home / "server.properties"

    def argv() -> list[str]:
        return [*_java_cmd(home), "kafka.Kafka", str(props)]

    svc = Service(
        name="kafka",
        argv=[],
        port=p["kafka"],
        extra_ports=(p["kafka_controller"],),
        ready=_kafka_ready,
        marker=str(props),
        prepare=_kafka_prepare,
        stale=_kafka_stale,
    )
    svc.argv = argv() if (_kafka_home() / "libs" / ".complete").exists() else []
    return svc


def services() -> list[Service]:
    """Every server the stack knows, the optional ones (``OPTIONAL``) last."""
    return [
        _kafka_service(),
        *(_influx_service(n) for n in INFLUX_NAMES),
        _toxiproxy_service(),
        _consul_service(),
        _victoriametrics_service(),
    ]


def _check_installed(with_: tuple[str, ...] = ()) -> None:
    missing = []
    if not _influxd18_bin().exists():
        missing.append(f"influxd {INFLUXDB18_VERSION} ({_influxd18_bin()})")
    if "victoriametrics" in with_ and not _victoriametrics_bin().exists():
        missing.append(f"victoria-metrics ({_victoriametrics_bin()})")
    if not (_kafka_home() / "libs" / ".complete").exists():
        missing.append(f"kafka jars ({_kafka_home()})")
    if shutil.which("influxd") is None:
        missing.append("influxd (Debian package influxdb)")
    if shutil.which("java") is None:
        missing.append("java")
    if not _toxiproxy_bin().exists():
        missing.append(f"toxiproxy-server ({_toxiproxy_bin()})")
    if not _consul_bin().exists():
        missing.append(f"consul ({_consul_bin()})")
    if missing:
        raise StackError(f"missing: {', '.join(missing)}; run ./dev setup (devstack/install.sh)")


def _check_ports(svc: Service) -> None:
    for port in (svc.port, *svc.extra_ports):
        if not _port_free(port):
            raise StackError(
                f"port 127.0.0.1:{port} for {svc.name} is taken by a process devstack did not "
                f"start (stop it or set FROUTER_PORT_OFFSET)"
            )


def _start(svc: Service) -> None:
    for pid, proc in list(_children.items()):  # reap servers a test killed with SIGKILL
        if proc.poll() is not None:
            del _children[pid]
    _check_ports(svc)
    svc.prepare()
    svc.pidfile.parent.mkdir(parents=True, exist_ok=True)
    svc.logfile.parent.mkdir(parents=True, exist_ok=True)
    with svc.logfile.open("ab") as log:
        proc = subprocess.Popen(
            svc.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **svc.env},
        )
    svc.pidfile.write_text(f"{proc.pid}\n")
    _children[proc.pid] = proc


def _wait_ready(svc: Service, deadline: float) -> None:
    while time.monotonic() < deadline:
        if svc.ready():
            return
        if _alive_pid(svc) is None:
            raise StackError(f"{svc.name} exited during start-up; see {svc.logfile}")
        time.sleep(0.2)
    raise StackError(f"{svc.name} did not answer on port {svc.port} in time; see {svc.logfile}")


def _populate_toxiproxy() -> None:
    p = ports()
    proxies = [
        {
            "name": f"influx_{n}",
            "listen": f"127.0.0.1:{p[f'influx_{n}_proxy']}",
            "upstream": f"127.0.0.1:{p[f'influx_{n}']}",
            "enabled": True,
        }
        for n in INFLUX_NAMES
    ]
    proxies.append(  # there even when the server is not: a proxy to nothing refuses, as a cut
        {
            "name": "victoriametrics",
            "listen": f"127.0.0.1:{p['victoriametrics_proxy']}",
            "upstream": f"127.0.0.1:{p['victoriametrics']}",
            "enabled": True,
        }
    )
    base = endpoints()["TOXIPROXY_URL"]
    resp = httpx.post(f"{base}/populate", content=json.dumps(proxies), timeout=5)
    if resp.status_code >= 300:
        raise StackError(f"toxiproxy populate failed: HTTP {resp.status_code} {resp.text.strip()}")


def _create_databases() -> None:
    """The database everywhere; on the servers with auth, the admin user first.

    InfluxDB 1.x lets anyone create the first admin user while none exists; once it does,
    the same statement with its credentials is a no-op. So this is idempotent."""
    for n in INFLUX_NAMES:
        url = endpoints()[f"INFLUX_{n.upper()}_URL"]
        auth: httpx.BasicAuth | None = None
        if n in INFLUX18_NAMES:
            auth = httpx.BasicAuth(INFLUX18_USERNAME, INFLUX18_PASSWORD)
            q = (
                f'CREATE USER "{INFLUX18_USERNAME}" WITH PASSWORD '
                f"'{INFLUX18_PASSWORD}' WITH ALL PRIVILEGES"
            )
            resp = httpx.post(f"{url}/query", params={"q": q}, auth=auth, timeout=5)
            if resp.status_code != 200 or "error" in resp.text:
                raise StackError(f"influx-{n}: CREATE USER failed: HTTP {resp.status_code}")
        q = f'CREATE DATABASE "{DATABASE}"'
        resp = httpx.post(f"{url}/query", params={"q": q}, auth=auth, timeout=5)
        if resp.status_code != 200:
            raise StackError(f"influx-{n}: CREATE DATABASE failed: HTTP {resp.status_code}")


def up(timeout: float = 120.0, with_: tuple[str, ...] = ()) -> list[str]:
    """Start every server that is not already running; wait until all answer.

    Optional servers (``OPTIONAL``) are started only when named in ``with_``. Returns the
    names of the services this call started (empty when all were running). A running server
    whose settings changed (Kafka's server.properties, say an old stack dir with topic
    auto-creation on) is restarted with the new ones; it is not in the returned list.
    """
    unknown = sorted(set(with_) - set(OPTIONAL))
    if unknown:
        raise StackError(f"no optional server named {', '.join(unknown)} (known: {OPTIONAL})")
    _check_installed(with_)
    svcs = [svc for svc in services() if svc.name not in OPTIONAL or svc.name in with_]
    restarted: set[str] = set()  # running with outdated settings: started again, not "started" here
    for svc in svcs:
        pid = _alive_pid(svc)
        if pid is not None and svc.stale():
            _stop_pid(pid, 30.0)
            restarted.add(svc.name)
    to_start = [svc for svc in svcs if _alive_pid(svc) is None]
    for svc in to_start:  # all ports first: a taken port must not leave half a stack behind
        _check_ports(svc)
    for svc in to_start:
        _start(svc)
    started = [svc.name for svc in to_start if svc.name not in restarted]
    deadline = time.monotonic() + timeout
    for svc in svcs:
        _wait_ready(svc, deadline)
    _populate_toxiproxy()
    _create_databases()
    return started


def _stop_pid(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGCONT)  # a SIGSTOPped server cannot handle SIGTERM
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            _reap(pid)
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    proc = _children.pop(pid, None)
    if proc is not None:
        proc.wait(timeout=10)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def down(names: list[str] | None = None, timeout: float = 30.0) -> list[str]:
    """Stop the servers devstack started (by their pid files). Returns the names stopped."""
    stopped = []
    for svc in reversed(services()):
        if names is not None and svc.name not in names:
            continue
        pid = _alive_pid(svc)
        if pid is not None:
            _stop_pid(pid, timeout)
            stopped.append(svc.name)
        svc.pidfile.unlink(missing_ok=True)
    return stopped


def service(name: str) -> Service:
    for svc in services():
        if svc.name == name:
            return svc
    raise StackError(f"no service named {name!r}")


def pid_of(name: str) -> int | None:
    """The pid of a running stack server (tests use it to kill -9 or SIGSTOP one)."""
    return _alive_pid(service(name))


def restart(name: str, timeout: float = 60.0) -> None:
    """Start one server again after a test killed it, and wait until it answers."""
    svc = service(name)
    pid = _alive_pid(svc)
    if pid is not None:
        _stop_pid(pid, timeout)
    _start(svc)
    _wait_ready(svc, time.monotonic() + timeout)


def status() -> Iterator[tuple[str, int | None]]:
    for svc in services():
        yield svc.name, _alive_pid(svc)
