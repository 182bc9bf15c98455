"""A few calls of Toxiproxy's HTTP API, for tests and the demo to break the network on purpose."""

from __future__ import annotations

from typing import Any

import httpx


class Toxiproxy:
    def __init__(self, url: str) -> None:
        self._http = httpx.Client(base_url=url, timeout=5.0)

    def close(self) -> None:
        self._http.close()

    def _ok(self, resp: httpx.Response) -> Any:
        resp.raise_for_status()
        return resp.json() if resp.content else None

    def set_enabled(self, proxy: str, enabled: bool) -> None:
        """Cut (False) or restore (True) a proxy: a cut proxy refuses every connection."""
        self._ok(self._http.post(f"/proxies/{proxy}", json={"enabled": enabled}))

    def add_toxic(
        self,
        proxy: str,
        kind: str,
        attributes: dict[str, int],
        *,
        stream: str = "downstream",
        name: str | None = None,
    ) -> str:
        """Add a toxic (latency, timeout, reset_peer, ...); returns its name."""
        toxic_name = name or f"{kind}_{stream}"
        body = {"name": toxic_name, "type": kind, "stream": stream, "attributes": attributes}
        self._ok(self._http.post(f"/proxies/{proxy}/toxics", json=body))
        return toxic_name

    def remove_toxic(self, proxy: str, name: str) -> None:
        self._ok(self._http.delete(f"/proxies/{proxy}/toxics/{name}"))

    def remove_all_toxics(self, proxy: str) -> None:
        for toxic in self._ok(self._http.get(f"/proxies/{proxy}/toxics")) or []:
            self.remove_toxic(proxy, toxic["name"])

    def reset(self) -> None:
        """Enable every proxy and remove every toxic."""
        self._ok(self._http.post("/reset"))
