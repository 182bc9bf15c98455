"""TLS to InfluxDB: the one place that builds the HTTP clients of the sink and the probes.

A cluster's ``tls:`` settings (``TlsSettings``: a CA bundle, a client certificate and key, the
key's password, or no verification at all) become one ``ssl.SSLContext`` (``ssl_context``) and
one ``httpx.Client`` (``http_client``). ``router.sink`` (writes, re-probes, backfill) and
``health.checker`` (probes) both build their clients here, so a write and a probe of one cluster
can never trust different CAs again. Every client is built with ``trust_env=False``: no
environment variable (``SSL_CERT_FILE``, ``SSL_CERT_DIR``, ``HTTPS_PROXY``...) changes whom the
router trusts or where its requests go. Without ``ca_file`` the trusted CAs are the public ones
of ``certifi`` (what httpx itself ships), never the host's environment.

Files are watched: ``TlsSettings.stamp()`` is what identifies their content now (device, inode,
size, modification time, as ``router.secrets`` does for secrets), and ``ReloadingClient`` builds
a new client (a new context, the files read again) before the first request after a file
changed, e.g. a CA bundle or a client certificate that cert-manager or the kubelet rotated.
Requests already under way finish on the client they started with; that client is closed when
its last request is done. A file that cannot be read or parsed after a change keeps the previous
client, with one ``tls_error`` event, until it can.

``tls_failure(exc)`` tells a TLS failure (certificate not trusted, hostname mismatch, the server
refusing our certificate) from any other transport error, so the probe's reason, the write's
outcome and its events say "TLS: certificate verify failed: ..." and name the cluster, instead
of a generic "cannot connect".

Threads: any thread may call ``ReloadingClient.request`` (httpx clients are thread-safe); the
swap of a client is done under a short lock that is never held during a request.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import certifi
import httpx
import structlog

from router.secrets import file_stamp

__all__ = [
    "ReloadingClient",
    "TlsError",
    "TlsSettings",
    "ca_file_problem",
    "http_client",
    "ssl_context",
    "tls_failure",
]

log = structlog.get_logger("router.tls")


class TlsError(ValueError):
    """A TLS file cannot be used: ``key`` names the setting (``ca_file``, ``cert_file``...)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


@dataclass(frozen=True)
class TlsSettings:
    """A cluster's ``tls:`` as the HTTP clients use it.

    ``key_password`` is asked each time a context is built (it reads the secret now); it is
    never shown (not in a repr, not in an error).
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_verify: bool = False
    key_password: Callable[[], str | None] | None = field(default=None, repr=False, compare=False)
    key_password_file: str | None = None  # watched like the other files (a rotation)

    def files(self) -> tuple[str, ...]:
        return tuple(
            f for f in (self.ca_file, self.cert_file, self.key_file, self.key_password_file) if f
        )

    def stamp(self) -> tuple[object, ...]:
        """What changes when one of the files changes (rotated, replaced, edited)."""
        return tuple(file_stamp(path) for path in self.files())


def ssl_context(tls: TlsSettings | None) -> ssl.SSLContext:
    """The client-side context of ``tls``: TLS 1.2+, hostname checked, trusting ``ca_file``
    (else certifi's public CAs), presenting ``cert_file``/``key_file`` when given.

    Raises TlsError naming the setting that cannot be used, never a secret.
    """
    settings = tls or TlsSettings()
    if settings.insecure_skip_verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(cafile=settings.ca_file or certifi.where())
        except FileNotFoundError as exc:
            raise TlsError("ca_file", f"cannot read {settings.ca_file}: {exc.strerror}") from None
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise TlsError(
                "ca_file", f"{settings.ca_file} holds no usable PEM certificate ({_why(exc)})"
            ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file is not None:
        _load_client_certificate(context, settings)
    return context


def ca_file_problem(path: str) -> str:
    """Why ``path`` cannot serve as a CA bundle ("" when it can), for a setting's check."""
    try:
        ssl_context(TlsSettings(ca_file=path))
    except TlsError as exc:
        return str(exc)
    return ""


def _load_client_certificate(context: ssl.SSLContext, tls: TlsSettings) -> None:
    cert = tls.cert_file or ""
    key_path = tls.key_file or cert  # a PEM file may hold the certificate and its key
    for key, path in (("cert_file", cert), ("key_file", tls.key_file)):
        if path is not None:
            _check_readable(key, path)
    try:
        encrypted = b"ENCRYPTED" in Path(key_path).read_bytes()
    except OSError as exc:
        raise TlsError("key_file", f"cannot read {key_path}: {exc.strerror}") from None
    password = tls.key_password() if tls.key_password is not None else None
    try:
        # never None: OpenSSL would prompt on the terminal for the password of an encrypted key
        context.load_cert_chain(cert, tls.key_file, password=password or "")
    except (ssl.SSLError, OSError) as exc:
        if "KEY_VALUES_MISMATCH" in str(getattr(exc, "reason", "") or ""):
            message = f"{tls.key_file} is not the key of {cert}"
            raise TlsError("key_file", message) from None
        if encrypted and password:
            raise TlsError("key_password", f"does not decrypt {key_path}") from None
        if encrypted:
            raise TlsError("key_file", f"{key_path} is encrypted: give a key password") from None
        if tls.key_file is None:
            message = f"{cert} holds no usable certificate and key: give key_file"
            raise TlsError("cert_file", message) from None
        message = f"cannot load the certificate {cert} with the key {tls.key_file} ({_why(exc)})"
        raise TlsError("cert_file", message) from None


def _check_readable(key: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise TlsError(key, f"cannot read {path}: {exc.strerror}") from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason) if exc.reason else "not in PEM form"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def http_client(
    tls: TlsSettings | None,
    *,
    timeout: httpx.Timeout | float,
    transport: httpx.BaseTransport | None = None,
    **options: Any,
) -> httpx.Client:
    """The httpx client of one cluster: ``ssl_context(tls)``, ``trust_env=False``, no
    redirects. ``options`` go to ``httpx.Client`` (headers, limits). Raises TlsError."""
    return httpx.Client(
        verify=ssl_context(tls),
        trust_env=False,
        timeout=timeout,
        transport=transport,
        follow_redirects=False,
        **options,
    )


class _Slot:
    """One built client and the requests using it."""

    def __init__(self, client: httpx.Client, stamp: tuple[object, ...]) -> None:
        self.client = client
        self.stamp = stamp
        self.users = 0
        self.retired = False


class ReloadingClient:
    """An httpx client of one cluster's TLS settings, rebuilt when one of its files changes.

    ``build`` makes the client (``http_client`` with the caller's options); it is called at
    construction (a TlsError there is raised) and again after a file changed (a TlsError then
    keeps the old client and is logged once per state of the files).
    """

    def __init__(
        self, cluster: str, tls: TlsSettings | None, build: Callable[[], httpx.Client]
    ) -> None:
        self.cluster = cluster
        self.tls = tls
        self._build = build
        self._lock = threading.Lock()
        self._slot = _Slot(build(), self._stamp())
        self._failed_stamp: tuple[object, ...] | None = None
        self._closed = False

    def _stamp(self) -> tuple[object, ...]:
        return self.tls.stamp() if self.tls is not None else ()

    @contextmanager
    def client(self) -> Iterator[httpx.Client]:
        """The client to send one request with (rebuilt first if a TLS file changed)."""
        slot = self._current()
        try:
            yield slot.client
        finally:
            with self._lock:
                slot.users -= 1
                close = slot.retired and slot.users == 0
            if close:
                slot.client.close()

    def _current(self) -> _Slot:
        stamp = self._stamp()
        with self._lock:
            closed = self._closed
            slot = self._slot
            if not closed and stamp in (slot.stamp, self._failed_stamp):
                slot.users += 1
                return slot
        if closed:  # a request that raced a close (a reload replaced the cluster): one-off
            once = _Slot(self._build(), stamp)
            once.users, once.retired = 1, True
            return once
        try:  # built outside the lock: reading files must not hold up other requests
            fresh = _Slot(self._build(), stamp)
        except TlsError as exc:
            with self._lock:
                self._failed_stamp = stamp
                slot = self._slot
                slot.users += 1
            log.error(
                "tls_error",
                cluster=self.cluster,
                key=f"tls.{exc.key}",
                error=str(exc),
                reason="a TLS file changed and cannot be used; keeping the previous client",
            )
            return slot
        with self._lock:
            old, self._slot = self._slot, fresh
            self._failed_stamp = None
            fresh.users += 1
            old.retired = True
            close_old = old.users == 0
        if close_old:
            old.client.close()
        log.info("tls_reloaded", cluster=self.cluster, reason="a TLS file changed")
        return fresh

    def close(self) -> None:
        with self._lock:
            self._closed = True
            slot = self._slot
            slot.retired = True
            close = slot.users == 0
        if close:
            slot.client.close()


# --- telling a TLS failure from other transport errors --------------------------------------


def tls_failure(exc: BaseException) -> str | None:
    """``"TLS: ..."`` when ``exc`` (an httpx error) was caused by TLS, else None.

    Walks the exception's causes for the ``ssl`` error httpcore raised: a certificate the
    trusted CAs do not vouch for, a name the certificate does not hold, an expired certificate
    (``certificate verify failed: <why>``), or a handshake the server ended (it wants a client
    certificate, or refused ours). The text is OpenSSL's; it never holds a URL or a secret.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            detail = current.verify_message or "certificate verify failed"
            return f"TLS: certificate verify failed: {detail}"
        if isinstance(current, ssl.SSLError):
            return f"TLS: handshake failed: {_why(current)}"
        current = current.__cause__ or current.__context__
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS: certificate verify failed"
    if text.startswith("[SSL") or "SSL:" in text:
        return "TLS: handshake failed"
    return None
