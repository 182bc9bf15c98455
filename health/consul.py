"""The Consul adapter: the only module that imports py-consul. Every failure becomes ConsulError.

Only the handful of calls the router needs: healthy service instances (blocking), sessions,
KV (blocking reads, acquire/release, put/delete), and the agent's own service registration.
The ACL token is never logged. Given as a file (``--consul-token-file``), it is read before
every call and used from then on, the file read again only when it changed (``router.secrets``):
a rotated token needs no restart.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import consul
import requests

from router.errors import ConsulError
from router.secrets import file_secret

_FAILURES = (consul.ConsulException, requests.RequestException, ValueError, KeyError, TypeError)


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: bytes
    session: str | None  # the session holding the key's lock, if any


@dataclass(frozen=True)
class ConsulSettings:
    """How to reach Consul. From flags/env (never from the topology file, never logged)."""

    address: str  # "127.0.0.1:8500" or "http(s)://host:port"
    token: str | None = field(default=None, repr=False)
    token_file: str | None = None  # read on every call instead of ``token`` (rotation)
    prefix: str = "failover-router"
    session_ttl: float = 10.0  # seconds; Consul accepts 10..86400
    advertise: str = ""  # host:port Consul's HTTP check uses to reach our /healthz


class ConsulAPI:
    def __init__(self, settings: ConsulSettings, timeout: float = 5.0) -> None:
        raw = settings.address if "://" in settings.address else f"http://{settings.address}"
        url = urlsplit(raw)
        self._client = consul.Consul(
            host=url.hostname or "127.0.0.1",
            port=url.port or 8500,
            scheme=url.scheme or "http",
            token=settings.token,
            connections_timeout=timeout,
        )
        self.address = f"{url.hostname}:{url.port or 8500}"
        self._token_file = settings.token_file

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._token_file is not None:
            try:  # the client puts its token in the header of every request it sends
                self._client.token = file_secret(self._token_file)
            except ValueError as exc:
                raise ConsulError(f"consul {what}: token file: {exc}") from exc
        try:
            return fn(*args, **kwargs)
        except _FAILURES as exc:
            # The exception text may quote the request URL; it never holds the token (a header).
            raise ConsulError(f"consul {what} failed: {type(exc).__name__}: {exc}") from exc

    # --- discovery ----------------------------------------------------------------------

    def passing_instances(
        self,
        service: str,
        *,
        tag: str | None = None,
        dc: str | None = None,
        index: str | None = None,
        wait: str = "10s",
    ) -> tuple[str, list[str] | None]:
        """(index, node URLs of the instances whose every check passes).

        None instead of a list when the catalog has no instance at all (an agent that lost its
        state, a service not registered yet): the caller keeps what it knew.
        """
        idx, entries = self._call(
            "health.service",
            self._client.health.service,
            service,
            tag=tag,
            dc=dc,
            index=index,
            wait=wait if index else None,
        )
        if not entries:
            return str(idx), None
        urls = []
        for entry in entries:
            if any(c.get("Status") != "passing" for c in entry.get("Checks") or []):
                continue
            svc = entry["Service"]
            host = svc.get("Address") or entry["Node"]["Address"]
            scheme = "https" if "https" in (svc.get("Tags") or []) else "http"
            urls.append(f"{scheme}://{host}:{svc['Port']}")
        return str(idx), sorted(set(urls))

    # --- sessions and KV ----------------------------------------------------------------

    def create_session(self, name: str, ttl: float, checks: list[str]) -> str:
        sid = self._call(
            "session.create",
            self._client.session.create,
            name=name,
            checks=checks,
            lock_delay=0,
            behavior="release",
            ttl=int(ttl),
        )
        return str(sid)

    def renew_session(self, session: str) -> bool:
        """False when the session is gone (invalidated): a new one is needed."""
        return self._call("session.renew", self._client.session.renew, session) is not None

    def destroy_session(self, session: str) -> None:
        self._call("session.destroy", self._client.session.destroy, session)

    def acquire(self, key: str, session: str, value: bytes) -> bool:
        return bool(self._call("kv.acquire", self._client.kv.put, key, value, acquire=session))

    def release(self, key: str, session: str) -> None:
        self._call("kv.release", self._client.kv.put, key, b"", release=session)

    def put(self, key: str, value: bytes) -> None:
        if not self._call("kv.put", self._client.kv.put, key, value):
            raise ConsulError(f"consul kv.put {key} refused")

    def delete(self, key: str) -> None:
        self._call("kv.delete", self._client.kv.delete, key)

    def get_prefix(
        self, prefix: str, index: str | None = None, wait: str = "10s"
    ) -> tuple[str, list[KVEntry]]:
        """(index, entries under prefix); blocks up to ``wait`` when ``index`` is given."""
        idx, items = self._call(
            "kv.get",
            self._client.kv.get,
            prefix,
            recurse=True,
            index=index,
            wait=wait if index else None,
        )
        entries = [
            KVEntry(item["Key"], item.get("Value") or b"", item.get("Session"))
            for item in items or []
        ]
        return str(idx), entries

    # --- the router's own registration --------------------------------------------------

    def register_self(
        self, service_id: str, name: str, address: str, port: int, tags: list[str]
    ) -> str:
        """Register this replica with an HTTP check on /healthz; returns the check id."""
        check = consul.Check.http(
            f"http://{address}:{port}/healthz", interval="1s", timeout="1s", deregister="1m"
        )
        check["status"] = "passing"  # a session may name the check right away
        self._call(
            "agent.service.register",
            self._client.agent.service.register,
            name,
            service_id=service_id,
            address=address,
            port=port,
            tags=tags,
            check=check,
        )
        return f"service:{service_id}"

    def is_registered(self, service_id: str) -> bool:
        services = self._call("agent.services", self._client.agent.services)
        return service_id in (services or {})

    def deregister_self(self, service_id: str) -> None:
        self._call("agent.service.deregister", self._client.agent.service.deregister, service_id)


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


def decode(raw: bytes) -> dict[str, Any]:
    """A KV value we wrote; tolerant of base64 (raw HTTP) and of garbage (returns {})."""
    for data in (raw, _b64(raw)):
        try:
            doc = json.loads(data)
        except ValueError:
            continue
        if isinstance(doc, dict):
            return doc
    return {}


def _b64(raw: bytes) -> bytes:
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        return b""
