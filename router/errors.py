"""The one exception tree of failover-router. Library exceptions (confluent-kafka, httpx,
py-consul, pydantic, PyYAML) are translated once, at the adapter that calls the library, with
``raise ... from exc``; none of their types reaches the routing code.

    RouterError
    ├── ConfigError            topology invalid: .errors holds every "key.path: message (line N)"
    ├── SourceError            Kafka: cannot consume, commit, produce dead letters, read offsets
    ├── ConsulError            Consul unreachable or refused a call (the router falls back to
    │                          its local verdict; never fatal)
    └── SinkError              an InfluxDB write did not succeed
        ├── SinkUnavailable    5xx, connection refused/reset: retry, then a health signal
        │   └── SinkTimeout    no answer within the write timeout (also retried)
        ├── SinkRejected       400: some lines are bad (they go to the dead-letter topic)
        ├── SinkTooLarge       413: the body is over the server's limit (split the batch)
        └── SinkMisconfigured  401/403 or unknown database/bucket: stop this destination, loudly
"""

from __future__ import annotations


class RouterError(Exception):
    """Base of every error failover-router raises on purpose."""


class ConfigError(RouterError):
    """The topology is invalid. ``errors`` lists each problem with its key path."""

    def __init__(self, errors: list[str], source: str = "topology") -> None:
        self.errors = list(errors)
        self.source = source
        super().__init__(f"{source}: " + "; ".join(self.errors))


class SourceError(RouterError):
    """Kafka did not do what we asked (consume, commit, produce, list offsets)."""


class ConsulError(RouterError):
    """A Consul call failed: the agent is unreachable, timed out, or refused (ACL)."""


class SinkError(RouterError):
    """An InfluxDB write failed. ``cluster`` and ``node`` say where; never a secret."""

    def __init__(self, message: str, *, cluster: str = "", node: str = "") -> None:
        self.cluster = cluster
        self.node = node
        super().__init__(message)


class SinkUnavailable(SinkError):
    """The node did not accept the write for a reason that may pass (5xx, refused, reset)."""


class SinkTimeout(SinkUnavailable):
    """The node gave no answer within the write timeout."""


class SinkRejected(SinkError):
    """HTTP 400: the server refused some lines; ``bad_lines`` are those it named."""

    def __init__(
        self, message: str, *, bad_lines: list[bytes], cluster: str = "", node: str = ""
    ) -> None:
        self.bad_lines = bad_lines
        super().__init__(message, cluster=cluster, node=node)


class SinkTooLarge(SinkError):
    """HTTP 413: the request body is over the server's limit."""


class SinkMisconfigured(SinkError):
    """401/403, or the database/bucket does not exist: retrying cannot help."""
