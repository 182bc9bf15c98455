"""The one exception tree of failover-router. Library exceptions (confluent-kafka, httpx,
py-consul, pydantic, PyYAML) are translated once, at the adapter that calls the library, with
``raise ... from exc``; none of their types reaches the routing code.

    RouterError
    ├── ConfigError            topology invalid: .errors holds every "key.path: message (line N)"
    ├── SourceError            Kafka: cannot consume, commit, read offsets
    │   ├── DeadLetterError    dead letters not confirmed stored (topic missing, ACL denied,
    │   │                      too large, fatal producer error, no answer in time): .topic,
    │   │                      .code (the Kafka error name); the batch must not commit
    │   └── KafkaRefused       the brokers refused the router's credentials (SASL) or TLS:
    │                          .mechanism, .code; exit 2 at start, the previous kafka: section
    │                          kept on a reload
    ├── ConsulError            Consul unreachable or refused a call (the router falls back to
    │   │                      its local verdict; never fatal)
    │   └── ConsulDenied       403: the ACL token is missing, unknown or lacks a permission
    └── SinkError              an InfluxDB write did not succeed
        ├── SinkUnavailable    5xx, connection refused/reset: retry, then a health signal
        │   ├── SinkTimeout    no answer within the write timeout (also retried)
        │   └── SinkTlsError   TLS failed: certificate not trusted, wrong name, our client
        │                      certificate refused (retried like the others; says so)
        └── SinkMisconfigured  401/403 or unknown database/bucket: stop this destination, loudly

A 400 (bad lines) or 413 (body too large) is not an error of this tree: the sink resolves it
itself (isolates the lines, splits the batch) and returns the refused lines to be dead-lettered.
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


class DeadLetterError(SourceError):
    """Dead letters were not all confirmed stored in ``topic``; their batch must not commit.

    ``code`` is the first Kafka error's name (``UNKNOWN_TOPIC_OR_PART``,
    ``TOPIC_AUTHORIZATION_FAILED``, ``MSG_SIZE_TOO_LARGE``, ``_FATAL``...) or ``unconfirmed``
    when no answer came in time. The message names the topic and that error, never a secret.
    """

    def __init__(self, message: str, *, topic: str = "", code: str = "") -> None:
        self.topic = topic
        self.code = code
        super().__init__(message)


class KafkaRefused(SourceError):
    """The brokers refused the router: SASL authentication failed, or TLS did (a certificate
    not trusted, our certificate refused). ``mechanism`` is the SASL mechanism (or "" for
    TLS), ``code`` librdkafka's error name (``_AUTHENTICATION``, ``_SSL``). Never a secret."""

    def __init__(self, message: str, *, mechanism: str = "", code: str = "") -> None:
        self.mechanism = mechanism
        self.code = code
        super().__init__(message)

    def fields(self) -> dict[str, str]:
        """What the ``kafka_refused`` event says of it (with ``bootstrap`` and ``reason``)."""
        return {"mechanism": self.mechanism or "TLS", "code": self.code, "error": str(self)}


class ConsulError(RouterError):
    """A Consul call failed: the agent is unreachable, timed out, or refused (ACL)."""


class ConsulDenied(ConsulError):
    """Consul answered 403: no token, an unknown token, or one that lacks the permission."""


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


class SinkTlsError(SinkUnavailable):
    """TLS with the node failed: its certificate is not trusted or not for its name, or it
    refused ours. The message says ``TLS: ...``."""


class SinkMisconfigured(SinkError):
    """401/403, or the database/bucket does not exist: retrying cannot help."""
