"""Local health checking: active HTTP probes plus passive write signals, per node, per cluster.

:class:`HealthChecker` implements :class:`health.verdict.VerdictSource` from the decisions of
:mod:`health.state` (hysteresis, ``min_healthy``, new-node rule); this module does the I/O.

Probes: v1 ``GET {node}/ping`` must answer 204; v2 ``GET {node}/health`` must answer 200 with a
JSON ``"status": "pass"``; a VictoriaMetrics node (``flavor``) ``GET {node}/health`` must answer
200 ``OK`` (it answers 503 while it shuts down). Anything else, and every httpx error, is a
failed check with a short reason ("connection refused", "no answer within 1s", "/ping answered
HTTP 503", "TLS: certificate verify failed: unable to get local issuer certificate"); no httpx
exception leaves this module and no reason carries a URL's userinfo or query.

Each cluster is probed with its own HTTP client, built by ``router.tls`` from the cluster's
``tls:`` settings (``ClusterSpec.tls``), the very factory the sink writes with: a probe trusts
exactly the CAs a write trusts, and neither reads the environment (``trust_env=False``). A
client is rebuilt when the settings change (``update``) or one of their files does.

Threads:

- the checker thread (``health-checker``, started by :meth:`HealthChecker.start`) submits one
  probe per node every ``interval`` to a pool of probe workers, never two at once to one node:
  a node whose probe is still running is probed again as soon as that probe ends (so a hung
  node is probed back to back, one ``timeout`` after the other). A hung node (a SIGSTOPped
  InfluxDB) thus holds one worker for at most the httpx ``timeout`` per phase and never delays
  the probes of other nodes. The same thread ends the ``down_after`` windows of
  :mod:`health.state` on time: it wakes at the earliest window end, so a node whose probe is
  still hanging goes DOWN then, not when the probe times out.
- probe workers (``health-probe_N``) run the HTTP request and feed the result into the state.
- any thread may call ``verdict``, ``healthy_nodes``, ``report_write``, ``subscribe``, ``update``.

State changes apply at once: ``verdict()`` reflects a probe or a reported write as soon as it
is counted. Subscribers, however, are always called on the checker thread (or by
:meth:`HealthChecker.probe_once` when no thread runs), one transition at a time in the order
they happened, with no lock held: a failed write reported from the sink's thread never re-enters
the sink through a callback, and a callback may call ``verdict`` or ``report_write``. A callback
must be quick and must not raise: an exception ends the checker thread, loudly
(``health_checker_crashed``); nothing here catches everything and keeps going.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import httpx
import structlog

from health.state import ClusterHealth, Transition, redact_url
from health.verdict import ClusterState, Subscriber, Verdict
from router.tls import ReloadingClient, TlsError, TlsSettings, http_client, tls_failure

log = structlog.get_logger("health")

MAX_PROBES_IN_FLIGHT = 64
"""Probe workers: as many nodes as this can hang at once without delaying the other probes."""


@dataclass(frozen=True)
class ClusterSpec:
    """What the checker needs to know about one cluster."""

    api: Literal["v1", "v2"]
    nodes: tuple[str, ...]
    min_healthy: int = 1
    flavor: Literal["influxdb", "victoriametrics"] = "influxdb"
    tls: TlsSettings | None = None  # https nodes: the same settings the sink writes with


@dataclass
class _ClusterClient:
    """The probe client of one cluster, or why there is none (TLS files unusable)."""

    tls: TlsSettings | None
    client: ReloadingClient | None
    why: str = ""
    stamp: tuple[object, ...] = ()  # the files' stamp when the client was (not) built


_PHRASES: tuple[tuple[type[Exception], str], ...] = (
    (httpx.ConnectTimeout, "no connection within {timeout}s"),
    (httpx.TimeoutException, "no answer within {timeout}s"),
    (httpx.RemoteProtocolError, "connection closed or invalid answer"),
    (httpx.ReadError, "connection broken"),
    (httpx.WriteError, "connection broken"),
    (httpx.InvalidURL, "invalid node URL"),
    (httpx.UnsupportedProtocol, "invalid node URL"),
)


def _describe(exc: httpx.HTTPError | httpx.InvalidURL, timeout: float) -> str:
    """A short reason for a failed request. Never ``str(exc)``, which may carry the URL."""
    tls = tls_failure(exc)
    if tls is not None:
        return tls
    if isinstance(exc, httpx.ConnectError):
        text = str(exc).lower()
        if "refused" in text:
            return "connection refused"
        if "name or service not known" in text or "nodename nor servname" in text:
            return "host name not resolved"
        return "cannot connect"
    for kind, phrase in _PHRASES:
        if isinstance(exc, kind):
            return phrase.format(timeout=f"{timeout:g}")
    return f"request failed ({type(exc).__name__})"


def _judge_ping(resp: httpx.Response) -> tuple[bool, str]:
    if resp.status_code == 204:
        return True, "ping ok"
    return False, f"/ping answered HTTP {resp.status_code}"


def _judge_health(resp: httpx.Response) -> tuple[bool, str]:
    if resp.status_code != 200:
        return False, f"/health answered HTTP {resp.status_code}"
    try:
        body = resp.json()
    except ValueError:  # json.JSONDecodeError and UnicodeDecodeError
        return False, "/health answered no JSON"
    status = body.get("status") if isinstance(body, dict) else None
    if status == "pass":
        return True, "health pass"
    return False, f"/health status {str(status)[:20]!r}"


def _judge_vm_health(resp: httpx.Response) -> tuple[bool, str]:
    if resp.status_code != 200:
        return False, f"/health answered HTTP {resp.status_code}"
    if resp.text.strip() != "OK":
        return False, "/health answered no OK"
    return True, "health ok"


_Judge = Callable[[httpx.Response], tuple[bool, str]]


def _probe_of(spec: ClusterSpec) -> tuple[str, _Judge]:
    """The path a node of this cluster is probed on, and how its answer is judged."""
    if spec.flavor == "victoriametrics":
        return "/health", _judge_vm_health
    if spec.api == "v1":
        return "/ping", _judge_ping
    return "/health", _judge_health


class HealthChecker:
    """Probes every node of every cluster and keeps a verdict per cluster (a VerdictSource)."""

    def __init__(
        self,
        clusters: Mapping[str, ClusterSpec],
        *,
        interval: float,
        timeout: float,
        fall: int,
        rise: int,
        down_after: float | None = None,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``down_after``: the window of :mod:`health.state` (None: ``fall`` alone decides).
        ``clock`` gives the verdicts' ``since``; ``monotonic`` measures windows and intervals."""
        if interval <= 0 or timeout <= 0:
            raise ValueError(f"interval and timeout must be > 0, got {interval} and {timeout}")
        if fall < 1 or rise < 1:
            raise ValueError(f"fall and rise must be >= 1, got {fall} and {rise}")
        if down_after is not None and not down_after > 0:
            raise ValueError(f"down_after must be > 0 or None, got {down_after}")
        self._interval = interval
        self._timeout = timeout
        self._fall = fall
        self._rise = rise
        self._down_after = down_after
        self._clock = clock
        self._mono = monotonic
        self._lock = threading.Lock()  # guards everything below up to _subscribers
        self._specs: dict[str, ClusterSpec] = {}
        self._health: dict[str, ClusterHealth] = {}
        self._in_flight: set[tuple[str, str]] = set()
        self._due: dict[tuple[str, str], float] = {}  # (cluster, node) -> next probe (monotonic)
        self._pending: deque[Transition] = deque()
        self._subscribers: list[Subscriber] = []
        self._dispatch_lock = threading.Lock()  # one dispatcher at a time keeps the order
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._transport = transport
        self._clients: dict[str, _ClusterClient] = {}  # one per cluster, for its TLS settings
        self.update(clusters)  # validates before any resource exists
        self._pool = ThreadPoolExecutor(MAX_PROBES_IN_FLIGHT, thread_name_prefix="health-probe")

    # --- VerdictSource ------------------------------------------------------------------

    def verdict(self, cluster: str) -> Verdict:
        with self._lock:
            return self._health[cluster].verdict()

    def healthy_nodes(self, cluster: str) -> list[str]:
        with self._lock:
            return self._health[cluster].healthy_nodes()

    def subscribe(self, callback: Subscriber) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def report_write(self, cluster: str, node: str, ok: bool) -> None:
        """Count a write like a probe: a failed one (refused, 5xx, no answer within the
        cluster's ``write_timeout``) is a failed check, a good one a good answer. Unknown
        clusters/nodes (a topology reload) are ignored."""
        self._record(cluster, node, ok, "write ok" if ok else "write failed")

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start probing in a daemon thread; the first round starts at once."""
        if self._thread is not None or self._closed:
            raise RuntimeError("a HealthChecker can be started once")
        self._thread = threading.Thread(target=self._run, name="health-checker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, wait for running probes (at most ``timeout`` per phase), close."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            clients, self._clients = self._clients, {}
        for entry in clients.values():
            if entry.client is not None:
                entry.client.close()

    def __enter__(self) -> HealthChecker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def update(self, clusters: Mapping[str, ClusterSpec]) -> None:
        """Replace the topology: clusters come and go, nodes change; known state is kept.

        A removed cluster is forgotten without a notification; a new one starts like at
        construction; a changed one keeps the state of the nodes that stay (see
        :mod:`health.state` for the new-node rule). Raises ``ValueError`` for an invalid spec
        before changing anything.
        """
        for name, spec in clusters.items():
            if spec.api not in ("v1", "v2"):
                raise ValueError(f"cluster {name!r}: unknown api {spec.api!r}")
            if spec.flavor not in ("influxdb", "victoriametrics"):
                raise ValueError(f"cluster {name!r}: unknown flavor {spec.flavor!r}")
            if spec.min_healthy < 1 or len(set(spec.nodes)) != len(spec.nodes):
                raise ValueError(f"cluster {name!r}: min_healthy < 1 or duplicate node URLs")
        now, mono = self._clock(), self._mono()
        self._update_clients(clusters)
        with self._lock:
            for name in [name for name in self._health if name not in clusters]:
                del self._health[name], self._specs[name]
                log.info("cluster_removed", cluster=name)
            for name, spec in clusters.items():
                health = self._health.get(name)
                if health is None:
                    self._health[name] = ClusterHealth(
                        name,
                        spec.nodes,
                        self._fall,
                        self._rise,
                        spec.min_healthy,
                        now=now,
                        down_after=self._down_after,
                        mono=mono,
                    )
                else:
                    transition = health.set_nodes(
                        spec.nodes, now, min_healthy=spec.min_healthy, mono=mono
                    )
                    if transition is not None:
                        self._transition(transition)
                self._specs[name] = spec
            probed = {(name, node) for name, spec in self._specs.items() for node in spec.nodes}
            self._due = {key: due for key, due in self._due.items() if key in probed}
        self._wake.set()  # new nodes are probed at once

    def _update_clients(self, clusters: Mapping[str, ClusterSpec]) -> None:
        """A client per cluster, built again when its TLS settings changed; gone ones closed."""
        with self._lock:
            old = dict(self._clients)
        fresh: dict[str, _ClusterClient] = {}
        closing: list[ReloadingClient] = []
        for name, spec in clusters.items():
            known = old.pop(name, None)
            if known is not None and known.tls == spec.tls and known.client is not None:
                fresh[name] = known
                continue
            if known is not None and known.client is not None:
                closing.append(known.client)
            fresh[name] = self._client_of(name, spec.tls)
        closing += [entry.client for entry in old.values() if entry.client is not None]
        with self._lock:
            self._clients = fresh
        for client in closing:
            client.close()

    def _client_of(self, cluster: str, tls: TlsSettings | None) -> _ClusterClient:
        """The cluster's probe client, or none and why (its TLS files cannot be used)."""

        def build() -> httpx.Client:
            return http_client(
                tls,
                timeout=self._timeout,
                transport=self._transport,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            )

        stamp = tls.stamp() if tls is not None else ()
        try:
            return _ClusterClient(tls, ReloadingClient(cluster, tls, build), "", stamp)
        except TlsError as exc:
            why = f"TLS: tls.{exc.key}: {exc}"
            log.error("tls_error", cluster=cluster, key=f"tls.{exc.key}", reason=why)
            return _ClusterClient(tls, None, why, stamp)

    def _client(self, cluster: str) -> tuple[ReloadingClient | None, str]:
        """The client to probe ``cluster`` with, or None and the probe's failure reason.
        A cluster whose TLS files could not be used is tried again once they changed."""
        with self._lock:
            entry = self._clients.get(cluster)
        if entry is None:
            return None, "cluster removed"
        if entry.client is not None:
            return entry.client, ""
        if entry.tls is None or entry.tls.stamp() == entry.stamp:
            return None, entry.why
        retried = self._client_of(cluster, entry.tls)
        with self._lock:
            if self._clients.get(cluster) is entry:
                self._clients[cluster] = retried
                return retried.client, retried.why
        if retried.client is not None:  # replaced meanwhile by an update
            retried.client.close()
        return self._client(cluster)

    def probe_once(self) -> None:
        """Probe every node once, wait for the answers, then deliver pending transitions.

        Synchronous, for tests and tools. A node whose probe is already running (from the
        checker thread) is not probed again. Once :meth:`start` was called, the checker thread
        stays the only one that calls subscribers, so this only probes.
        """
        futures = self._submit_round()
        wait(futures)
        for future in futures:
            _finished(future)
        if self._thread is None:
            self._dispatch()

    # --- internals ----------------------------------------------------------------------

    def _run(self) -> None:
        running: list[Future[None]] = []
        try:
            while not self._stopping.is_set():
                running = [future for future in running if not _finished(future)]
                running += self._submit_due()
                self._expire()
                self._dispatch()
                self._wake.wait(max(0.0, self._next_wake() - self._mono()))
                self._wake.clear()
        except BaseException:
            log.critical("health_checker_crashed", exc_info=True)
            raise

    def _idle(self, now: float) -> Iterator[tuple[str, ClusterSpec, str, float]]:
        """The nodes not being probed now, with when each is due (the caller holds the
        lock)."""
        for cluster, spec in self._specs.items():
            for node in spec.nodes:
                if (cluster, node) not in self._in_flight:
                    yield cluster, spec, node, self._due.get((cluster, node), now)

    def _submit_due(self) -> list[Future[None]]:
        """Probe every node whose time has come and whose previous probe has ended. The next
        one is due an ``interval`` after this one was due (no drift), or at once when this one
        ends later than that (a hung node is probed back to back)."""
        now = self._mono()
        with self._lock:
            jobs = []
            for cluster, spec, node, due in self._idle(now):
                if due > now:
                    continue
                following = due + self._interval
                self._due[(cluster, node)] = following if following > now else now + self._interval
                jobs.append((cluster, spec, node))
            self._in_flight.update((cluster, node) for cluster, _, node in jobs)
        return [self._pool.submit(self._probe_and_record, *job) for job in jobs]

    def _submit_round(self) -> list[Future[None]]:
        """Probe every node not being probed now, due or not (``probe_once``)."""
        now = self._mono()
        with self._lock:
            jobs = [(cluster, spec, node) for cluster, spec, node, _ in self._idle(now)]
            self._in_flight.update((cluster, node) for cluster, _, node in jobs)
            for cluster, _, node in jobs:
                self._due[(cluster, node)] = now + self._interval
        return [self._pool.submit(self._probe_and_record, *job) for job in jobs]

    def _next_wake(self) -> float:
        """When the checker thread has something to do: a probe due (of a node not being
        probed: a probe that ends wakes the thread), or a window ending."""
        now = self._mono()
        with self._lock:
            times = [due for _, _, _, due in self._idle(now)]
            times += [d for d in (h.deadline() for h in self._health.values()) if d is not None]
        return min(times, default=now + self._interval)

    def _expire(self) -> None:
        """Nodes whose ``down_after`` window ended go DOWN now (their probe may still hang)."""
        now, mono = self._clock(), self._mono()
        with self._lock:
            for name, health in self._health.items():
                gone, transition = health.expire(now, mono=mono)
                for node in gone:
                    self._log_node(name, node, was_up=True, reason=health.node(node).reason)
                if transition is not None:
                    self._transition(transition)

    def _probe_and_record(self, cluster: str, spec: ClusterSpec, node: str) -> None:
        try:
            ok, reason = self._probe(cluster, spec, node)
            self._record(cluster, node, ok, reason)
        finally:
            with self._lock:
                self._in_flight.discard((cluster, node))
            self._wake.set()  # its next probe may be due already (a probe that hung)

    def _probe(self, cluster: str, spec: ClusterSpec, node: str) -> tuple[bool, str]:
        path, judge = _probe_of(spec)
        client, why = self._client(cluster)
        if client is None:
            return False, why
        try:
            with client.client() as http:
                resp = http.get(node.rstrip("/") + path)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return False, _describe(exc, self._timeout)
        except TlsError as exc:  # the files went bad between a reload and this probe
            return False, f"TLS: tls.{exc.key}: {exc}"
        return judge(resp)

    def _record(self, cluster: str, node: str, ok: bool, reason: str) -> None:
        now, mono = self._clock(), self._mono()
        with self._lock:
            health = self._health.get(cluster)
            if health is None or node not in health.nodes:
                return  # removed by a topology update while the probe or write was running
            node_health = health.node(node)
            was_up = node_health.up
            transition = health.observe(node, ok, reason, now, mono=mono)
            if node_health.up != was_up:
                self._log_node(cluster, node, was_up=was_up, reason=node_health.reason)
            if transition is not None:
                self._transition(transition)
        if not ok and self._down_after is not None:
            self._wake.set()  # a window may have started: the checker thread ends it on time

    @staticmethod
    def _log_node(cluster: str, node: str, *, was_up: bool, reason: str) -> None:
        """One ``node_state`` event (a node changed state: the opposite of ``was_up``)."""
        log.info(
            "node_state",
            cluster=cluster,
            node=redact_url(node),
            from_state=_state(was_up),
            to_state=_state(not was_up),
            reason=reason,
        )

    def _transition(self, transition: Transition) -> None:
        """Log and queue one cluster transition; the caller holds ``_lock``."""
        old, new = transition
        log.warning(
            "cluster_state",
            cluster=new.cluster,
            from_state=str(old.state),
            to_state=str(new.state),
            reason=new.reason,
        )
        self._pending.append(transition)
        self._wake.set()

    def _dispatch(self) -> None:
        with self._dispatch_lock:
            while True:
                with self._lock:
                    if not self._pending:
                        return
                    old, new = self._pending.popleft()
                    subscribers = list(self._subscribers)
                for callback in subscribers:
                    callback(old, new)


def _finished(future: Future[None]) -> bool:
    """True if the probe is over; a bug that ended it is raised here, not lost."""
    if not future.done():
        return False
    future.result()
    return True


def _state(up: bool) -> str:
    return str(ClusterState.UP if up else ClusterState.DOWN)
