"""The Consul adapter: the only module that imports py-consul. Every failure becomes ConsulError.

Only the handful of calls the router needs: healthy service instances (blocking), sessions,
KV (blocking reads, acquire/release, put/delete), and the agent's own service registration.
The ACL token is never logged. Given as a file (``--consul-token-file``), it is read before
every call and used from then on, the file read again only when it changed (``router.secrets``):
a rotated token needs no restart.

Only ``ConsulSettings`` decides what the client uses. py-consul reads ``CONSUL_HTTP_TOKEN``
over the token it is given (so the environment would beat ``--consul-token-file``, and an
empty variable would remove the token), and its HTTP session (requests) reads
``REQUESTS_CA_BUNDLE`` and proxy variables: here the token is set again after the client is
built and before every call, and the session does not read the environment
(``trust_env=False``). An https agent is verified with ``--consul-ca-file`` (else certifi's
public CAs).

A 403 is ``ConsulDenied``, whose message says which token was sent (where it came from, never
its value) and what Consul answered: "ACL not found" (the token is unknown) or the permission
that is missing.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import certifi
import consul
import requests

from router.errors import ConsulDenied, ConsulError
from router.secrets import file_secret, scrub
from router.tls import tls_failure

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
    ca_file: str | None = None  # CA bundle of an https agent (--consul-ca-file)
    token_source: str = ""  # where the token comes from, for messages ("" = worked out here)

    def token_description(self) -> str:
        """Which token is sent, without its value: for a permission-denied message."""
        if self.token_source:
            return self.token_source
        if self.token_file is not None:
            return f"token from --consul-token-file {self.token_file}"
        return "a token" if self.token else "no token"


class ConsulAPI:
    def __init__(self, settings: ConsulSettings, timeout: float = 5.0) -> None:
        raw = settings.address if "://" in settings.address else f"http://{settings.address}"
        url = urlsplit(raw)
        scheme = url.scheme or "http"
        self._client = consul.Consul(
            host=url.hostname or "127.0.0.1",
            port=url.port or 8500,
            scheme=scheme,
            token=settings.token,
            verify=(settings.ca_file or certifi.where()) if scheme == "https" else True,
            connections_timeout=timeout,
        )
        # py-consul took CONSUL_HTTP_TOKEN over ours, and requests would read the environment
        self._client.token = settings.token
        self._client.http.session.trust_env = False
        self.address = f"{url.hostname}:{url.port or 8500}"
        self._settings = settings

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        token_file = self._settings.token_file
        if token_file is not None:
            try:  # the client puts its token in the header of every request it sends
                self._client.token = file_secret(token_file)
            except ValueError as exc:
                raise ConsulError(f"consul {what}: token file: {exc}") from exc
        else:
            self._client.token = self._settings.token
        try:
            return fn(*args, **kwargs)
        except consul.ACLPermissionDenied as exc:
            raise ConsulDenied(self._denied(what, str(exc))) from exc
        except _FAILURES as exc:
            # The exception text may quote the request URL; it never holds the token (a header).
            tls = tls_failure(exc) if isinstance(exc, requests.RequestException) else None
            if tls is not None:
                text = f"{tls} (--consul-ca-file names the CA of the agent's certificate)"
            else:
                text = scrub(f"{type(exc).__name__}: {exc}")
            raise ConsulError(f"consul {what} failed: {text}") from exc

    def _denied(self, what: str, body: str) -> str:
        """``consul: permission denied (<which token>) for <call>: <Consul's words>``."""
        answer = scrub(" ".join(body.split()))[:300] or "403"
        token = self._settings.token_description()
        if "acl not found" in answer.lower():
            answer += " (Consul does not know this token)"
        return f"consul: permission denied ({token}) for {what}: {answer}"

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
