"""The topology: which Kafka topics go to which InfluxDB clusters, and how.

``topology.yaml`` becomes a tree of frozen pydantic models, validated once at load:

    Topology
    ├── datacenter    str (the ``datacenter`` argument overrides the file)
    ├── kafka         KafkaConfig     bootstrap, group prefix, dead-letter topic, security
    │                 ├── tls               TlsConfig          CA, client cert, key password
    │                 └── sasl_oauthbearer  OAuthBearerConfig  OIDC client credentials
    ├── clusters      {name: ClusterConfig}   urls or a Consul service, v1 database / v2 bucket
    │                 └── tls    TlsConfig    https nodes: the sink's and the probes' TLS
    ├── routes        (RouteConfig, ...)      topics -> primary + standby, or mirror clusters
    │                 ├── batch  BatchConfig
    │                 └── guard  GuardConfig      block rules, cardinality limits (optional)
    ├── health        HealthConfig    probe interval, timeout, fall/rise hysteresis
    └── http          HttpConfig      where the status/metrics server listens

Every problem in a file is reported at once, as ``ConfigError.errors``: one line per problem,
``"key.path: message (line N)"``, sorted by line. Line numbers come from the YAML node tree
(``yaml.compose``); a pydantic error ``loc`` is walked down that tree, and a key that is missing
from the file is reported at the line of its nearest parent.

Secrets (InfluxDB passwords and tokens, the SASL password, the OAuth client secret, TLS key
passwords) are never written in the topology: it names an environment variable (``*_env``) or
a file (``*_file``). They are resolved once at load to prove they exist, and again each time
``credentials()``, ``token()`` or ``librdkafka_config()`` is called (``router.secrets``: a file
is read again only when it changed, so asking per request is cheap), so a rotated secret is
what the next request or client uses. No model field holds a secret, so no repr, log line or
status page can show one. TLS files (``tls:``) are read at load too, to prove they can be used.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self
from urllib.parse import urlsplit

import certifi
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

from router.errors import ConfigError
from router.graphite import GraphiteError, parse_templates
from router.secrets import env_secret, file_secret, scrub
from router.tls import TlsError, TlsSettings, ca_file_problem, ssl_context

__all__ = [
    "BatchConfig",
    "BlockRuleConfig",
    "BlockTagConfig",
    "ByteSize",
    "ClusterConfig",
    "Duration",
    "GuardConfig",
    "HealthConfig",
    "HttpConfig",
    "KafkaConfig",
    "OAuthBearerConfig",
    "RouteConfig",
    "TlsConfig",
    "Topology",
    "check_topology_main",
    "load_topology",
    "parse_byte_size",
    "parse_duration",
    "parse_topology",
]

Loc = tuple[int | str, ...]
Problem = tuple[Loc, str]  # (key path relative to the model being validated, message)

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
TOPIC_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
GROUP_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HOST_PORT_PATTERN = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


# --- scalar types ------------------------------------------------------------------------------

_DURATION_PATTERN = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_PATTERN = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)$")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from ``"250ms"``, ``"1.5s"``, ``"2m"``, ``"1h"`` or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError("a duration must be a finite number of seconds")
        return float(value)
    if isinstance(value, str):
        match = _DURATION_PATTERN.match(value.strip())
        if match:
            return float(match[1]) * _DURATION_UNITS[match[2] or "s"]
    raise ValueError(f"invalid duration {value!r}: use e.g. '250ms', '1.5s', '2m' or seconds")


def parse_byte_size(value: object) -> int:
    """Bytes from an integer or ``"512KiB"``, ``"1MiB"``, ``"1MB"``, ``"10kB"`` (any case)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = _SIZE_PATTERN.match(value.strip())
        if match and match[2].lower() in _SIZE_UNITS:
            return int(float(match[1]) * _SIZE_UNITS[match[2].lower()])
    raise ValueError(f"invalid size {value!r}: use bytes or e.g. '512KiB', '1MiB', '10kB'")


def _check_name(value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(
            f"invalid name {value!r}: use lowercase letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )
    return value


def _check_non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


def _check_topic_name(value: str) -> str:
    if not TOPIC_PATTERN.match(value):
        raise ValueError(f"invalid topic name {value!r}: use letters, digits, '.', '_' and '-'")
    return value


def _check_topic(value: str) -> str:
    """A topic name, or a regex if it starts with '^' (as librdkafka subscribes to it)."""
    if not value.startswith("^"):
        return _check_topic_name(value)
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regex {value!r}: {exc}") from None
    return value


def _check_regex(value: str) -> str:
    """A Python regular expression (searched in a name; the guard's block rules)."""
    if not value:
        raise ValueError("must not be empty")
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regex {value!r}: {exc}") from None
    return value


def _absolute_path(value: object, info: ValidationInfo) -> object:
    """A relative path is taken relative to the topology file's directory (when loaded from one)."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        raise ValueError("must not be empty")
    base = (info.context or {}).get("base_dir")
    path = Path(value)
    if isinstance(base, Path) and not path.is_absolute():
        return str(base / path)
    return value


def _check_host_port(value: str, *, allow_port_zero: bool = False) -> str:
    match = HOST_PORT_PATTERN.match(value.strip())
    lowest = 0 if allow_port_zero else 1
    if not match or not lowest <= int(match[2]) <= 65535:
        raise ValueError(f"invalid address {value!r}: use host:port")
    return value.strip()


def _check_bootstrap(value: str) -> str:
    servers = [part.strip() for part in value.split(",")]
    if not value.strip() or any(not part for part in servers):
        raise ValueError("must list host:port[,host:port...]")
    return ",".join(_check_host_port(server) for server in servers)


def _check_listen(value: str) -> str:
    return _check_host_port(value, allow_port_zero=True)


def _check_url(value: str) -> str:
    # A URL that carries credentials is not echoed: they must not reach the logs.
    parts = urlsplit(value.strip())
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in a URL are not allowed; use username_env/password_env")
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        raise ValueError(f"invalid url {value!r}: use http(s)://host:port")
    if parts.query or parts.fragment:  # not echoed either: a query may carry a token
        raise ValueError("a node url takes no query or fragment; use http(s)://host:port")
    return value.strip().rstrip("/")


def _string_values(value: object) -> object:
    """librdkafka settings are strings; YAML numbers and booleans are turned into theirs."""
    if not isinstance(value, Mapping):
        return value
    strings: dict[object, object] = {}
    for key, item in value.items():
        if isinstance(item, bool):
            strings[key] = "true" if item else "false"
        elif isinstance(item, int | float):
            strings[key] = str(item)
        else:
            strings[key] = item
    return strings


# --- secrets -------------------------------------------------------------------------------------
# The topology names an environment variable or a file; each is read at load to prove it is
# there, and again (``router.secrets``: a file only when it changed) each time a client asks.
# Names are only echoed once known to be names: a secret pasted into ``password_env`` by mistake
# must not reach a log.


def _check_env_secret(name: str) -> str:
    if not ENV_NAME_PATTERN.match(name):
        raise ValueError("not an environment variable name (letters, digits and '_')")
    env_secret(name)
    return name


def _check_file_secret(path: str) -> str:
    file_secret(path)
    return path


def _check_env_value(name: str) -> str:
    """A variable that holds a name, not a secret (a username): read, never scrubbed."""
    if not ENV_NAME_PATTERN.match(name):
        raise ValueError("not an environment variable name (letters, digits and '_')")
    env_secret(name, secret=False)
    return name


def _check_file_value(path: str) -> str:
    file_secret(path, secret=False)
    return path


def _check_readable(path: str) -> str:
    if not Path(path).is_file() or not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path}")
    return path


def _secret(
    env_key: str, env: str | None, file_key: str, file: str | None, *, secret: bool = True
) -> str | None:
    """Read a secret now from the variable or file the topology names; None if it names none.
    ``secret=False`` for a value that is not one (a username, a client id): not scrubbed.

    Raises ConfigError if it has gone since the topology was loaded.
    """
    try:
        if env is not None:
            return env_secret(env, secret=secret)
        if file is not None:
            return file_secret(file, secret=secret)
    except ValueError as exc:
        key = env_key if env is not None else file_key
        raise ConfigError([f"{key}: {exc}"], source="secrets") from exc
    return None


def _one_of(model: BaseModel, *keys: str) -> list[Problem]:
    """A secret is given by variable or by file, not both."""
    given = [key for key in keys if getattr(model, key) is not None]
    return [((key,), f"give {' or '.join(keys)}, not both") for key in given[1:]]


Duration = Annotated[float, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]
Name = Annotated[str, AfterValidator(_check_name)]
Topic = Annotated[str, AfterValidator(_check_topic)]
Regex = Annotated[str, AfterValidator(_check_regex)]
SecretEnv = Annotated[str, AfterValidator(_check_env_secret)]
SecretFile = Annotated[str, BeforeValidator(_absolute_path), AfterValidator(_check_file_secret)]
ValueEnv = Annotated[str, AfterValidator(_check_env_value)]  # a username: not a secret
ValueFile = Annotated[str, BeforeValidator(_absolute_path), AfterValidator(_check_file_value)]
ReadableFile = Annotated[str, BeforeValidator(_absolute_path), AfterValidator(_check_readable)]


# --- validation machinery ------------------------------------------------------------------------

_MESSAGES = {
    "missing": "required key is missing",
    "literal_error": "must be {expected}",
    "too_short": "must not be empty",
    "greater_than": "must be more than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
    "dict_type": "must be a mapping of keys",
    "tuple_type": "must be a list",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
}


def _friendly(model: type[BaseModel], error: ErrorDetails) -> str:
    """An operator's wording for one pydantic error found while validating ``model``."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), list(model.model_fields), n=1)
        return "unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
    if kind in _MESSAGES:
        return _MESSAGES[kind].format(**{key: _number(value) for key, value in ctx.items()})
    message = error["msg"].removeprefix("Value error, ")
    return message[:1].lower() + message[1:]


def _problems_of(model: type[BaseModel], exc: ValidationError) -> list[Problem]:
    """Each error as (loc, operator's message), keeping no reference to ``exc`` or its causes."""
    errors = exc.errors()
    return [
        (error["loc"], _friendly(model, error))
        for error in errors
        if not _emptied_by_bad_items(error, errors)
    ]


def _emptied_by_bad_items(error: ErrorDetails, errors: list[ErrorDetails]) -> bool:
    """A list reported too short only because its items were invalid (those are reported)."""
    depth = len(error["loc"])
    return error["type"] == "too_short" and any(
        other["loc"][:depth] == error["loc"] and len(other["loc"]) > depth for other in errors
    )


def _number(value: object) -> object:
    """60.0 -> 60, so a bound reads as the operator wrote it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _invalid(title: str, problems: Sequence[Problem]) -> ValidationError:
    # input=None: an error never carries the offending value, which may be a secret.
    return ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(
                type=PydanticCustomError("topology", "{message}", {"message": message}),
                loc=loc,
                input=None,
            )
            for loc, message in problems
        ],
    )


class _Model(BaseModel):
    """Frozen, closed models; every problem of one model is reported together.

    A subclass states its rules in two hooks: ``_raw_problems`` sees the input as written (so
    it runs even when some field is invalid) and ``_problems`` sees the validated model.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Keys that would hold a secret inline, refused with a hint (and not reported as unknown).
    _inline_secrets: ClassVar[Mapping[str, str]] = {}
    # Keys of an earlier version, refused with what replaced them (and not reported as unknown).
    _replaced: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="wrap")
    @classmethod
    def _validate_all(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        problems: list[Problem] = []
        if isinstance(data, Mapping):
            problems += cls._raw_problems(data)
            data = {
                key: value
                for key, value in data.items()
                if key not in cls._inline_secrets and key not in cls._replaced
            }
        model: Self | None = None
        try:
            model = handler(data)
        except ValidationError as exc:
            problems += _problems_of(cls, exc)
        finally:
            # pydantic#13817 (open in 2.13): a wrap validator's handler that outlives the call
            # (a kept traceback holds this frame) makes the GC visit the validator tree twice
            # and corrupts refcounts. So: drop it here, and raise outside the except block,
            # so that no error keeps the original exception (and its frames) as __context__.
            del handler
        if model is not None:
            problems += model._problems()
        if problems or model is None:
            raise _invalid(cls.__name__, problems)
        return model

    @classmethod
    def _raw_problems(cls, data: Mapping[Any, Any]) -> list[Problem]:
        problems: list[Problem] = [
            ((key,), f"inline secrets are not allowed; {hint}")
            for key, hint in cls._inline_secrets.items()
            if key in data
        ]
        return problems + [
            ((key,), f"replaced: {hint}") for key, hint in cls._replaced.items() if key in data
        ]

    def _problems(self) -> list[Problem]:
        return []


# --- models --------------------------------------------------------------------------------------


class TlsConfig(_Model):
    """TLS settings: whom to trust, the client certificate, or (for tests) no verification.

    A cluster's ``tls:`` (its https nodes, for writes and probes alike: ``router.tls``) and
    ``kafka.tls`` (the brokers, through librdkafka). Every file is read and checked at load:
    a CA bundle that holds no certificate, a key that does not match its certificate, or a key
    password that does not decrypt the key is an error at its key path.
    """

    _inline_secrets: ClassVar[Mapping[str, str]] = {
        "key_password": "use key_password_env or key_password_file",
    }

    ca_file: ReadableFile | None = None
    cert_file: ReadableFile | None = None
    key_file: ReadableFile | None = None
    key_password_env: SecretEnv | None = None
    key_password_file: SecretFile | None = None
    insecure_skip_verify: bool = False

    def key_password(self) -> str | None:
        """The client key's password, read now; None if none is given. Raises ConfigError."""
        return _secret(
            "tls.key_password_env",
            self.key_password_env,
            "tls.key_password_file",
            self.key_password_file,
        )

    def settings(self) -> TlsSettings:
        """What ``router.tls`` builds an SSL context from (the password read when built)."""
        return TlsSettings(
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            insecure_skip_verify=self.insecure_skip_verify,
            key_password=self.key_password,
            key_password_file=self.key_password_file,
        )

    def _problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.insecure_skip_verify and self.ca_file is not None:
            problems.append(
                (("ca_file",), "not with insecure_skip_verify: true (nothing is verified)")
            )
        if self.key_file is not None and self.cert_file is None:
            problems.append((("key_file",), "needs cert_file"))
        password_key = self._password_key()
        if password_key is not None and self.cert_file is None:
            problems.append(((password_key,), "needs cert_file and key_file"))
        problems += _one_of(self, "key_password_env", "key_password_file")
        if problems:
            return problems
        try:
            ssl_context(self.settings())
        except TlsError as exc:
            key = password_key if exc.key == "key_password" else exc.key
            return [((key or exc.key,), str(exc))]
        except ConfigError as exc:  # the password's variable or file went away meanwhile
            return [((password_key or "key_password_file",), "; ".join(exc.errors))]
        return []

    def _password_key(self) -> str | None:
        if self.key_password_env is not None:
            return "key_password_env"
        if self.key_password_file is not None:
            return "key_password_file"
        return None


def _check_endpoint(value: str) -> str:
    """An OAuth token endpoint: http(s)://host[:port]/path; no credentials (not echoed)."""
    parts = urlsplit(value.strip())
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in a URL are not allowed; use client_id/client_secret")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s):// URL")
    return value.strip()


class OAuthBearerConfig(_Model):
    """SASL OAUTHBEARER with OIDC client credentials: librdkafka fetches (and refreshes) a
    token from ``token_endpoint_url`` with the client id and secret, and sends it to the
    brokers (``sasl.oauthbearer.method=oidc``)."""

    _inline_secrets: ClassVar[Mapping[str, str]] = {
        "client_secret": "use client_secret_env or client_secret_file",
    }

    token_endpoint_url: Annotated[str, AfterValidator(_check_endpoint)]
    client_id_env: ValueEnv | None = None
    client_id_file: ValueFile | None = None
    client_secret_env: SecretEnv | None = None
    client_secret_file: SecretFile | None = None
    scope: Annotated[str, AfterValidator(_check_non_empty)] | None = None
    ca_file: ReadableFile | None = None  # CA of an https token endpoint (https.ca.location)

    def librdkafka_config(self) -> dict[str, str]:
        """The librdkafka settings, secrets read now. Raises ConfigError."""
        client_id = _secret(
            "sasl_oauthbearer.client_id_env",
            self.client_id_env,
            "sasl_oauthbearer.client_id_file",
            self.client_id_file,
            secret=False,
        )
        client_secret = _secret(
            "sasl_oauthbearer.client_secret_env",
            self.client_secret_env,
            "sasl_oauthbearer.client_secret_file",
            self.client_secret_file,
        )
        config = {
            "sasl.oauthbearer.method": "oidc",
            "sasl.oauthbearer.token.endpoint.url": self.token_endpoint_url,
            "sasl.oauthbearer.client.id": client_id or "",
            "sasl.oauthbearer.client.secret": client_secret or "",
        }
        if self.scope is not None:
            config["sasl.oauthbearer.scope"] = self.scope
        if self.token_endpoint_url.startswith("https:"):
            # like every other client of the router: no trust from the environment
            config["https.ca.location"] = self.ca_file or certifi.where()
        return config

    def _problems(self) -> list[Problem]:
        problems: list[Problem] = []
        for name in ("client_id", "client_secret"):
            env, file = f"{name}_env", f"{name}_file"
            if getattr(self, env) is None and getattr(self, file) is None:
                problems.append(((env,), f"{env} or {file} is required"))
            problems += _one_of(self, env, file)
        if self.ca_file is not None and not self.token_endpoint_url.startswith("https:"):
            problems.append((("ca_file",), "only for an https:// token_endpoint_url"))
        why = ca_file_problem(self.ca_file) if self.ca_file is not None else ""
        if why:
            problems.append((("ca_file",), why))
        return problems


# librdkafka keys the router sets itself, or that have a first-class field here.
_OWNED_KAFKA_KEYS = {
    "bootstrap.servers": "use kafka.bootstrap",
    "group.id": "the router sets it per (route, cluster)",
    "enable.auto.commit": "the router commits offsets itself",
    "enable.auto.offset.store": "the router stores offsets itself",
    "auto.offset.reset": "the router picks start offsets and counts retention gaps itself",
    "partition.assignment.strategy": "paused partitions are re-paused in an eager rebalance",
    "security.protocol": "use kafka.security_protocol",
    "sasl.mechanism": "use kafka.sasl_mechanism",
    "sasl.mechanisms": "use kafka.sasl_mechanism",
    "sasl.username": "use kafka.sasl_username_env",
    "ssl.ca.location": "use kafka.tls.ca_file",
    "ssl.certificate.location": "use kafka.tls.cert_file",
    "ssl.key.location": "use kafka.tls.key_file",
    "enable.ssl.certificate.verification": "use kafka.tls.insecure_skip_verify",
    "sasl.oauthbearer.method": "use kafka.sasl_oauthbearer",
    "sasl.oauthbearer.client.id": "use kafka.sasl_oauthbearer.client_id_env/_file",
    "sasl.oauthbearer.token.endpoint.url": "use kafka.sasl_oauthbearer.token_endpoint_url",
    "sasl.oauthbearer.scope": "use kafka.sasl_oauthbearer.scope",
    "https.ca.location": "use kafka.sasl_oauthbearer.ca_file",
}
_SECRET_KAFKA_KEYS = (
    "password",
    "secret",
    "ssl.key.pem",
    "sasl.oauthbearer.config",
    "ssl_engine_callback_data",
)
_SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
_SSL_PROTOCOLS = ("SSL", "SASL_SSL")
_USER_PASSWORD_KEYS = ("sasl_username_env", "sasl_password_env", "sasl_password_file")


class KafkaConfig(_Model):
    """The Kafka cluster of this datacenter, and how the router connects to it."""

    _inline_secrets: ClassVar[Mapping[str, str]] = {
        "sasl_password": "use sasl_password_env or sasl_password_file",
    }

    bootstrap: Annotated[str, AfterValidator(_check_bootstrap)]
    group_prefix: Annotated[str, Field(pattern=GROUP_PREFIX_PATTERN.pattern)] = "frouter"
    dead_letter_topic: Annotated[str, AfterValidator(_check_topic_name)] | None = None
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username_env: ValueEnv | None = None
    sasl_password_env: SecretEnv | None = None
    sasl_password_file: SecretFile | None = None
    sasl_oauthbearer: OAuthBearerConfig | None = None  # with sasl_mechanism OAUTHBEARER
    tls: TlsConfig | None = None  # with SSL / SASL_SSL
    ssl_ca_file: ReadableFile | None = None  # the older name of tls.ca_file (still read)
    client_config: Annotated[dict[str, str], BeforeValidator(_string_values)] = {}

    @property
    def dead_letters(self) -> str:
        """The topic bad messages go to: ``dead_letter_topic`` or ``{group_prefix}.dead-letter``."""
        return self.dead_letter_topic or f"{self.group_prefix}.dead-letter"

    def librdkafka_config(self) -> dict[str, str]:
        """Connection settings shared by consumers and producers, secrets resolved.

        Not included: ``group.id`` and ``enable.auto.commit``, which the consumer sets.
        Raises ConfigError if a secret cannot be read.
        """
        config = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol}
        if self.sasl_mechanism is not None:
            config["sasl.mechanism"] = self.sasl_mechanism
        username = _secret("sasl_username_env", self.sasl_username_env, "", None, secret=False)
        password = _secret(
            "sasl_password_env",
            self.sasl_password_env,
            "sasl_password_file",
            self.sasl_password_file,
        )
        if username is not None:
            config["sasl.username"] = username
        if password is not None:
            config["sasl.password"] = password
        if self.sasl_oauthbearer is not None:
            config |= self.sasl_oauthbearer.librdkafka_config()
        if self.security_protocol in _SSL_PROTOCOLS:
            config |= self._tls_config()
        return config | self.client_config

    def _tls_config(self) -> dict[str, str]:
        """``ssl.*`` settings; without a CA file the public CAs of certifi (as for InfluxDB),
        so that no environment variable (``SSL_CERT_FILE``) changes whom librdkafka trusts."""
        tls = self.tls or TlsConfig()
        config: dict[str, str] = {}
        if tls.insecure_skip_verify:
            config["enable.ssl.certificate.verification"] = "false"
            config["ssl.endpoint.identification.algorithm"] = "none"
        else:
            config["ssl.ca.location"] = tls.ca_file or self.ssl_ca_file or certifi.where()
        if tls.cert_file is not None:
            config["ssl.certificate.location"] = tls.cert_file
        if tls.key_file is not None:
            config["ssl.key.location"] = tls.key_file
        password = tls.key_password()
        if password is not None:
            config["ssl.key.password"] = password
        return config

    def tls_files(self) -> tuple[str, ...]:
        """The files librdkafka reads when a client is built (CA, certificate, key, the key's
        password, the token endpoint's CA): a change of one rebuilds the Kafka clients."""
        files: list[str | None] = []
        if self.security_protocol in _SSL_PROTOCOLS:
            tls = self.tls or TlsConfig()
            files += [tls.ca_file or self.ssl_ca_file, tls.cert_file, tls.key_file]
            files.append(tls.key_password_file)
        if self.sasl_oauthbearer is not None:
            files.append(self.sasl_oauthbearer.ca_file)
        return tuple(f for f in files if f)

    def _problems(self) -> list[Problem]:
        problems: list[Problem] = []
        protocol = self.security_protocol
        if protocol in _SASL_PROTOCOLS:
            problems += self._sasl_problems()
        else:
            problems += [
                ((key,), "only with security_protocol SASL_PLAINTEXT or SASL_SSL")
                for key in ("sasl_mechanism", *_USER_PASSWORD_KEYS, "sasl_oauthbearer")
                if getattr(self, key) is not None
            ]
        if protocol not in _SSL_PROTOCOLS:
            problems += [
                ((key,), "only with security_protocol SSL or SASL_SSL")
                for key in ("tls", "ssl_ca_file")
                if getattr(self, key) is not None
            ]
        if self.tls is not None:
            if self.ssl_ca_file is not None:
                problems.append(
                    (("ssl_ca_file",), "give tls.ca_file only (ssl_ca_file is its older name)")
                )
            if self.tls.cert_file is not None and self.tls.key_file is None:
                problems.append((("tls", "key_file"), "required with cert_file (librdkafka)"))
        elif self.ssl_ca_file is not None and (why := ca_file_problem(self.ssl_ca_file)):
            problems.append((("ssl_ca_file",), why))
        for key in self.client_config:
            if key in _OWNED_KAFKA_KEYS:
                problems.append((("client_config", key), f"not allowed: {_OWNED_KAFKA_KEYS[key]}"))
            elif any(word in key for word in _SECRET_KAFKA_KEYS):
                problems.append(
                    (("client_config", key), "secrets are not allowed in client_config")
                )
        return problems + _one_of(self, "sasl_password_env", "sasl_password_file")

    def _sasl_problems(self) -> list[Problem]:
        protocol = self.security_protocol
        needed = f"required when security_protocol is {protocol}"
        problems: list[Problem] = []
        if self.sasl_mechanism is None:
            problems.append((("sasl_mechanism",), needed))
            if self.sasl_oauthbearer is not None:
                return problems
        elif self.sasl_mechanism == "OAUTHBEARER":
            problems += [
                ((key,), "not with sasl_mechanism OAUTHBEARER; use sasl_oauthbearer")
                for key in _USER_PASSWORD_KEYS
                if getattr(self, key) is not None
            ]
            if self.sasl_oauthbearer is None:
                problems.append((("sasl_oauthbearer",), "required with sasl_mechanism OAUTHBEARER"))
            return problems
        elif self.sasl_oauthbearer is not None:
            problems.append((("sasl_oauthbearer",), "only with sasl_mechanism OAUTHBEARER"))
        if self.sasl_username_env is None:
            problems.append((("sasl_username_env",), needed))
        if self.sasl_password_env is None and self.sasl_password_file is None:
            problems.append(
                (
                    ("sasl_password_env",),
                    f"sasl_password_env or sasl_password_file is required when "
                    f"security_protocol is {protocol}",
                )
            )
        return problems


class ClusterConfig(_Model):
    """One InfluxDB cluster: its nodes (URLs or a Consul service), target and credentials."""

    _inline_secrets: ClassVar[Mapping[str, str]] = {
        "password": "use password_env or password_file",
        "token": "use token_env or token_file",
    }
    _replaced: ClassVar[Mapping[str, str]] = {
        "gzip": "use compression: gzip (or none) and compression_level",
    }

    urls: tuple[Annotated[str, AfterValidator(_check_url)], ...] = ()
    consul_service: Annotated[str, AfterValidator(_check_non_empty)] | None = None
    consul_tag: Annotated[str, AfterValidator(_check_non_empty)] | None = None
    consul_datacenter: Annotated[str, AfterValidator(_check_non_empty)] | None = None
    api: Literal["v1", "v2"] = "v1"
    flavor: Literal["influxdb", "victoriametrics"] = "influxdb"
    database: Annotated[str, AfterValidator(_check_non_empty)] | None = None
    retention_policy: Annotated[str, AfterValidator(_check_non_empty)] | None = None
    org: Annotated[str, AfterValidator(_check_non_empty)] | None = None
    bucket: Annotated[str, AfterValidator(_check_non_empty)] | None = None
    username_env: ValueEnv | None = None
    password_env: SecretEnv | None = None
    password_file: SecretFile | None = None
    token_env: SecretEnv | None = None
    token_file: SecretFile | None = None
    precision: Literal["ns", "us", "ms", "s"] = "ns"
    drain: bool = False
    min_healthy: int = Field(default=1, ge=1)
    write_timeout: Duration = Field(default=5.0, gt=0)
    max_retries: int = Field(default=3, ge=0, le=20)
    # how long one batch may take with its retries; None: max(60s, 4 x (retries+1) x timeout)
    write_deadline: Duration | None = Field(default=None, gt=0)
    # request bodies: none (same network: less CPU on both sides) or gzip (a WAN link)
    compression: Literal["none", "gzip"] = "none"
    compression_level: int = Field(default=1, ge=1, le=9)
    tls: TlsConfig | None = None  # https nodes: CA, client certificate (writes and probes)

    def tls_settings(self) -> TlsSettings | None:
        """What the sink and the probes build their HTTP client from (``router.tls``)."""
        return self.tls.settings() if self.tls is not None else None

    def credentials(self) -> tuple[str, str] | None:
        """(username, password) for v1 basic auth, read now; None if the cluster has none.

        Raises ConfigError if the variable or file has gone since load.
        """
        username = _secret("username_env", self.username_env, "", None, secret=False)
        password = _secret("password_env", self.password_env, "password_file", self.password_file)
        if username is None or password is None:
            return None
        return username, password

    def token(self) -> str | None:
        """The v2 API token, read now; None if the cluster has none. Raises ConfigError."""
        return _secret("token_env", self.token_env, "token_file", self.token_file)

    def _problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.urls and self.consul_service is not None:
            problems.append((("consul_service",), "give urls or consul_service, not both"))
        elif not self.urls and self.consul_service is None:
            problems.append((("urls",), "give urls or consul_service (one is required)"))
        if self.consul_service is None:
            problems += [
                ((key,), "only with consul_service")
                for key in ("consul_tag", "consul_datacenter")
                if getattr(self, key) is not None
            ]
        if self.urls and self.min_healthy > len(self.urls):
            problems.append(
                (
                    ("min_healthy",),
                    f"is {self.min_healthy} but only {len(self.urls)} urls are listed",
                )
            )
        problems += [
            (("urls", index), f"{url!r} is listed twice")
            for index, url in enumerate(self.urls)
            if url in self.urls[:index]
        ]
        if (
            self.tls is not None
            and self.urls
            and not any(u.startswith("https:") for u in self.urls)
        ):
            problems.append((("tls",), "only for https:// urls (every url here is http://)"))
        v1_keys = ("database", "retention_policy", "username_env", "password_env", "password_file")
        v2_keys = ("org", "bucket", "token_env", "token_file")
        required, foreign = (v1_keys[:1], v2_keys) if self.api == "v1" else (v2_keys[:2], v1_keys)
        other = "v2" if self.api == "v1" else "v1"
        problems += [
            ((key,), f"required for api {self.api}")
            for key in required
            if getattr(self, key) is None
        ]
        problems += [
            ((key,), f"only for api {other}") for key in foreign if getattr(self, key) is not None
        ]
        has_password = self.password_env is not None or self.password_file is not None
        if self.username_env is not None and not has_password:
            problems.append((("username_env",), "needs password_env or password_file"))
        if has_password and self.username_env is None:
            key = "password_env" if self.password_env is not None else "password_file"
            problems.append(((key,), "needs username_env"))
        problems += _one_of(self, "password_env", "password_file")
        if self.flavor == "victoriametrics":
            if self.api != "v1":
                problems.append(
                    (("api",), "flavor victoriametrics takes api v1 (its v2 write ignores bucket)")
                )
            if self.retention_policy is not None:
                problems.append(
                    (("retention_policy",), "not with flavor victoriametrics (it has none)")
                )
        return problems + _one_of(self, "token_env", "token_file")


class BatchConfig(_Model):
    """How many points a destination collects before one write to InfluxDB."""

    max_points: int = Field(default=5000, ge=1, le=1_000_000)
    max_bytes: ByteSize = Field(default=1024**2, ge=1024, le=64 * 1024**2)
    linger: Duration = Field(default=0.2, ge=0, le=60)
    max_in_flight: int = Field(default=4, ge=1, le=64)


class BlockTagConfig(_Model):
    """A tag a block rule looks for: its key and, optionally, its value (regexes, searched)."""

    key: Regex
    value: Regex | None = None


class BlockRuleConfig(_Model):
    """Lines this rule matches are dead-lettered with reason ``blocked:<name>``."""

    name: Name
    measurement: Regex | None = None
    tag: BlockTagConfig | None = None

    def _problems(self) -> list[Problem]:
        if self.measurement is None and self.tag is None:
            return [((), "give measurement, tag or both")]
        return []


class GuardConfig(_Model):
    """A route's guard against bad metrics (``router.guard``); no section: no guard at all."""

    block: tuple[BlockRuleConfig, ...] = ()
    max_new_series_per_minute: int | None = Field(default=None, ge=1, le=10_000_000)
    max_series: int | None = Field(default=None, ge=1, le=100_000_000)
    max_tracked_series: int = Field(default=1_000_000, ge=1000, le=100_000_000)
    max_measurements: int = Field(default=10_000, ge=1, le=1_000_000)
    series_ttl: Duration = Field(default=3600.0, ge=60, le=30 * 86400)
    warmup: Duration = Field(default=600.0, ge=0, le=86400)

    def _problems(self) -> list[Problem]:
        limited = self.max_new_series_per_minute is not None or self.max_series is not None
        problems: list[Problem] = []
        if not self.block and not limited:
            problems.append(((), "give block rules, max_new_series_per_minute or max_series"))
        if not limited:
            problems += [
                ((key,), "only with max_new_series_per_minute or max_series")
                for key in ("max_tracked_series", "max_measurements", "series_ttl")
                if key in self.model_fields_set
            ]
        if "warmup" in self.model_fields_set and self.max_new_series_per_minute is None:
            problems.append((("warmup",), "only with max_new_series_per_minute"))
        names = tuple(rule.name for rule in self.block)
        problems += [
            (("block", index, "name"), f"{name!r} is used by an earlier rule")
            for index, name in enumerate(names)
            if name in names[:index]
        ]
        return problems


class RouteConfig(_Model):
    """Topics -> a primary and ordered standbys (failover), or clusters that all get everything."""

    name: Name
    topics: tuple[Topic, ...] = Field(min_length=1)
    format: Literal["line", "graphite"] = "line"
    graphite_templates: tuple[str, ...] = ()
    # A line without a timestamp gets its Kafka message's timestamp (idempotent re-sends);
    # false: InfluxDB stamps it on arrival (and a replayed line is stored again).
    stamp_missing_timestamps: bool = True
    mode: Literal["failover", "mirror"] = "failover"
    primary: str | None = None
    standby: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()
    skip_missed: bool = False
    handback_lag: int = Field(default=1000, ge=0)
    batch: BatchConfig = BatchConfig()
    guard: GuardConfig | None = None  # block rules and cardinality limits (router.guard)

    @property
    def destinations(self) -> tuple[str, ...]:
        """The clusters of this route: primary then standbys in order, or the mirror clusters."""
        if self.mode == "mirror":
            return self.clusters
        return (self.primary, *self.standby) if self.primary is not None else self.standby

    def _problems(self) -> list[Problem]:
        problems: list[Problem] = []
        if self.format == "graphite" and not self.graphite_templates:
            problems.append((("graphite_templates",), "required when format is graphite"))
        if self.format == "line" and self.graphite_templates:
            problems.append((("graphite_templates",), "only for format graphite"))
        if self.format == "graphite" and self.graphite_templates:
            try:
                parse_templates(self.graphite_templates)
            except GraphiteError as exc:
                where = ("graphite_templates", exc.index) if exc.index is not None else ()
                problems.append((("graphite_templates", *where[1:]), str(exc)))
        if self.mode == "failover":
            if self.primary is None:
                problems.append((("primary",), "required in failover mode"))
            if self.clusters:
                problems.append(
                    (("clusters",), "not allowed in failover mode; use primary and standby")
                )
        else:
            if not self.clusters:
                problems.append((("clusters",), "required in mirror mode (at least one)"))
            if self.primary is not None:
                problems.append((("primary",), "not allowed in mirror mode; use clusters"))
            if self.standby:
                problems.append((("standby",), "not allowed in mirror mode; use clusters"))
            problems += [
                ((key,), "only for failover mode")
                for key in ("skip_missed", "handback_lag")
                if key in self.model_fields_set
            ]
        problems += [
            (("standby", index), f"{name!r} is the primary; a cluster is not its own standby")
            for index, name in enumerate(self.standby)
            if name == self.primary
        ]
        for key, names in (
            ("topics", self.topics),
            ("standby", self.standby),
            ("clusters", self.clusters),
        ):
            problems += _duplicates(key, names)
        return problems


def _duplicates(key: str, names: tuple[str, ...]) -> list[Problem]:
    return [
        ((key, index), f"{name!r} is listed twice")
        for index, name in enumerate(names)
        if name in names[:index]
    ]


class HealthConfig(_Model):
    """Active probes of every node, and the hysteresis of node and cluster states.

    A node goes DOWN after ``fall`` failed checks in a row (probes or writes), or once it has
    given no good answer for ``down_after`` with at least one failed check in that time (a
    hung node, whose checks time out); UP again after ``rise`` good checks in a row
    (``health/state.py``). ``down_after`` defaults to ``interval + timeout + 0.5 s`` (2.5 s):
    a hung node's first probe fails within an interval and a timeout, and a node that stops for
    less than about ``timeout + 0.5 s`` is not taken DOWN. The section is read at start: a
    change needs a restart.
    """

    interval: Duration = Field(default=1.0, gt=0)
    timeout: Duration = Field(default=1.0, gt=0)
    fall: int = Field(default=3, ge=1, le=100)
    rise: int = Field(default=3, ge=1, le=100)
    down_after: Duration | None = Field(default=None, gt=0, le=3600)

    @property
    def window(self) -> float:
        """``down_after`` as given, else its default (``interval + timeout + 0.5 s``)."""
        if self.down_after is not None:
            return self.down_after
        return self.interval + self.timeout + 0.5

    def _problems(self) -> list[Problem]:
        if self.down_after is not None and self.down_after <= self.interval:
            # a node is probed once per interval: its last good answer is up to an interval
            # old, so a shorter window would take it DOWN on any one failed check
            return [
                (
                    ("down_after",),
                    f"must be longer than interval ({_number(self.interval)}s), "
                    "or one failed check takes a node down",
                )
            ]
        return []


class HttpConfig(_Model):
    """The router's own HTTP server: metrics, health endpoints, status page."""

    listen: Annotated[str, AfterValidator(_check_listen)] = "127.0.0.1:8080"

    @property
    def host(self) -> str:
        """The host part of ``listen``, without the brackets of an IPv6 address."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The port part of ``listen`` (0 lets the OS choose)."""
        return int(self.listen.rpartition(":")[2])


class Topology(_Model):
    """The whole topology of one datacenter."""

    datacenter: Annotated[str, AfterValidator(_check_non_empty)]
    kafka: KafkaConfig
    clusters: dict[Name, ClusterConfig] = Field(min_length=1)
    routes: tuple[RouteConfig, ...] = Field(min_length=1)
    health: HealthConfig = HealthConfig()
    http: HttpConfig = HttpConfig()

    def cluster(self, name: str) -> ClusterConfig:
        """The cluster called ``name``; KeyError if it is not declared."""
        try:
            return self.clusters[name]
        except KeyError:
            raise KeyError(f"unknown cluster {name!r}") from None

    def route(self, name: str) -> RouteConfig:
        """The route called ``name``; KeyError if there is none."""
        for route in self.routes:
            if route.name == name:
                return route
        raise KeyError(f"unknown route {name!r}")

    def group_id(self, route_name: str, cluster_name: str) -> str:
        """The consumer group of (route, cluster); KeyError unless the cluster is a destination."""
        if cluster_name not in self.route(route_name).destinations:
            raise KeyError(f"cluster {cluster_name!r} is not a destination of route {route_name!r}")
        return f"{self.kafka.group_prefix}.{route_name}.{cluster_name}"

    @classmethod
    def _raw_problems(cls, data: Mapping[Any, Any]) -> list[Problem]:
        """Route names are unique and name declared clusters (checked even if a field is bad)."""
        clusters, routes = data.get("clusters"), data.get("routes")
        if not isinstance(routes, list | tuple):
            return []
        declared = set(clusters) if isinstance(clusters, Mapping) else None
        problems: list[Problem] = []
        first: dict[str, int] = {}
        for index, route in enumerate(routes):
            name = _raw_field(route, "name")
            if isinstance(name, str) and first.setdefault(name, index) != index:
                problems.append(
                    (
                        ("routes", index, "name"),
                        f"duplicate route name {name!r} (first at routes[{first[name]}])",
                    )
                )
            if declared is None:
                continue
            problems += [
                (("routes", index, *loc), f"unknown cluster {cluster!r}")
                for loc, cluster in _cluster_references(route)
                if cluster not in declared
            ]
        return problems


def _raw_field(obj: object, key: str) -> object:
    """``obj[key]`` of a mapping or ``obj.key`` of a model; None for anything else."""
    if isinstance(obj, Mapping):
        return obj.get(key)
    if isinstance(obj, BaseModel):
        return getattr(obj, key, None)
    return None


def _cluster_references(route: object) -> Iterator[tuple[Loc, str]]:
    """Each cluster name a raw route mentions, with its key path inside the route."""
    primary = _raw_field(route, "primary")
    if isinstance(primary, str):
        yield ("primary",), primary
    for key in ("standby", "clusters"):
        names = _raw_field(route, key)
        if isinstance(names, list | tuple):
            for index, name in enumerate(names):
                if isinstance(name, str):
                    yield (key, index), name


# --- loading -------------------------------------------------------------------------------------


def load_topology(path: str | Path, datacenter: str | None = None) -> Topology:
    """Read and validate a topology file; relative ``*_file`` paths are taken from its folder.

    Raises ConfigError listing every problem (also when the file cannot be read).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read file: {exc.strerror}"], source=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(["cannot read file: not UTF-8 text"], source=str(path)) from exc
    return _parse(text, str(path), datacenter, path.resolve().parent)


def parse_topology(text: str, source: str = "<string>", datacenter: str | None = None) -> Topology:
    """Validate a topology given as YAML text; ``source`` names it in errors.

    ``datacenter``, when given, replaces the file's ``datacenter``. Raises ConfigError.
    """
    return _parse(text, source, datacenter, None)


def _parse(text: str, source: str, datacenter: str | None, base_dir: Path | None) -> Topology:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        duplicates = list(_duplicate_keys(root, "", set())) if root is not None else []
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_error(exc)], source=source) from exc
    finally:
        loader.dispose()
    if root is None:
        raise ConfigError(["(root): the file is empty (line 1)"], source=source)
    if datacenter is not None and isinstance(data, dict):
        data["datacenter"] = datacenter
    topology: Topology | None = None
    located: list[tuple[int, str]] = []
    try:
        topology = Topology.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        located = [_located(root, error["loc"], error["msg"]) for error in exc.errors()]
    # Raised outside the except block: see pydantic#13817 in _Model._validate_all.
    errors = sorted(duplicates + located, key=lambda error: error[0])
    if errors or topology is None:
        raise ConfigError([text for _, text in errors], source=source)
    return topology


def _yaml_error(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        what = ", ".join(part for part in (exc.context, exc.problem) if part)
        return f"yaml: {what} (line {exc.problem_mark.line + 1})"
    return f"yaml: {exc}"


def _join(path: str, segment: int | str, in_sequence: bool) -> str:
    if in_sequence:
        return f"{path}[{segment}]"
    return f"{path}.{segment}" if path else str(segment)


def _located(root: yaml.Node, loc: Loc, message: str) -> tuple[int, str]:
    """(line, "key.path: message (line N)") for a pydantic loc, walked down the YAML nodes."""
    node: yaml.Node | None = root
    line = root.start_mark.line + 1
    path = ""
    for segment in loc:
        if segment == "[key]":  # the error is about a mapping key: its line is already known
            continue
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:  # the last of duplicate keys is the one used
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(segment):
                    child, line = value_node, key_node.start_mark.line + 1
            path = _join(path, segment, in_sequence=False)
        elif isinstance(node, yaml.SequenceNode) and isinstance(segment, int):
            if 0 <= segment < len(node.value):
                child = node.value[segment]
                line = child.start_mark.line + 1
            path = _join(path, segment, in_sequence=True)
        else:  # below a key the file does not have: keep the parent's line
            path = _join(path, segment, in_sequence=isinstance(segment, int))
        node = child
    return line, f"{path or '(root)'}: {message} (line {line})"


def _duplicate_keys(node: yaml.Node, path: str, seen: set[int]) -> Iterator[tuple[int, str]]:
    """A key given twice in one mapping: YAML would keep the last one silently."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue
            key, line = key_node.value, key_node.start_mark.line + 1
            child_path = _join(path, key, in_sequence=False)
            if key in first:
                yield (
                    line,
                    f"{child_path}: duplicate key (first on line {first[key]}) (line {line})",
                )
            first.setdefault(key, line)
            yield from _duplicate_keys(value_node, child_path, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _duplicate_keys(item, _join(path, index, in_sequence=True), seen)


# --- check-topology ------------------------------------------------------------------------------


def check_topology_main(path: str, datacenter: str | None) -> int:
    """``failover-router check-topology FILE``: print a summary (0) or every error (1)."""
    try:
        topology = load_topology(path, datacenter)
    except ConfigError as exc:
        for error in exc.errors:  # no error holds a secret; scrubbed all the same
            print(scrub(f"{path}: {error}"), file=sys.stderr)
        return 1
    print(
        f"ok: {len(topology.clusters)} clusters, {len(topology.routes)} routes, "
        f"datacenter {topology.datacenter}"
    )
    return 0
