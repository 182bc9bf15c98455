"""Secrets named by the topology: environment variables and files, read when they are used.

A ``*_env`` secret is looked up each time (a process's environment does not change under it, so
this costs a dict lookup). A ``*_file`` secret is read again only when the file changed: each
call ``stat``s the path (following symlinks) and compares its device, inode, size and
modification time with the last read. That sees an edit in place, a file replaced by a rename,
and the way the kubelet rotates a mounted Secret (the ``..data`` symlink is swapped to a new
directory, so the path resolves to another inode). A ``stat`` is a few microseconds: callers
may ask for a secret on every request.

If a file that was read before cannot be read now, or is empty (an editor that truncates first,
a Secret being replaced by hand), the last value read is returned and ``secret_unreadable`` is
logged once for that state of the file: a rotation never stops a client halfway. A file never
read successfully raises ``ValueError``.

Only paths and variable names are ever logged or put in an error, never a value. Safe to call
from any thread.

Every secret value read here (and every one handed to ``remember``: the Consul token of
``CONSUL_HTTP_TOKEN``) is also remembered, so that ``scrub`` can cut it out of any text that
leaves the process: every log line (``router.events`` scrubs each event, librdkafka's own lines
included), the status page and ``/api/status``, error messages. Values that are not secrets
(usernames, an OAuth client id) are read with ``secret=False`` and not remembered, and a value
shorter than ``MIN_SCRUBBED`` characters is not remembered either: cutting a short word out of
every line would garble the logs, and such a secret is too weak to use anyway. The last
``REMEMBERED`` values are kept, so a rotated-out secret stays scrubbed for a while.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import structlog

__all__ = [
    "MIN_SCRUBBED",
    "SCRUBBED",
    "env_secret",
    "file_secret",
    "file_stamp",
    "forget_all",
    "remember",
    "scrub",
]

log = structlog.get_logger("router.secrets")

Stamp = tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns)

_lock = threading.Lock()
_files: dict[str, tuple[Stamp, str]] = {}  # path -> (stamp of the last good read, value)
_warned: dict[str, Stamp | None] = {}  # path -> file state last reported unreadable

MIN_SCRUBBED = 6  # shorter values are not scrubbed (see the module docstring)
REMEMBERED = 64  # how many secret values are kept for scrubbing
SCRUBBED = "***"  # what a secret becomes in any text that leaves the process


class _Remembered:
    """The secret values to scrub: oldest first, and longest first for ``scrub``."""

    def __init__(self) -> None:
        self.values: OrderedDict[str, None] = OrderedDict()
        self.by_length: tuple[str, ...] = ()  # swapped as a whole: read without the lock


_remembered = _Remembered()


def remember(value: str) -> None:
    """Scrub ``value`` from every text ``scrub`` sees from now on (if it is long enough)."""
    if len(value) < MIN_SCRUBBED:
        return
    with _lock:
        known = _remembered.values
        if value in known:
            known.move_to_end(value)
            return
        known[value] = None
        while len(known) > REMEMBERED:
            known.popitem(last=False)
        _remembered.by_length = tuple(sorted(known, key=len, reverse=True))


def scrub(text: str) -> str:
    """``text`` with every remembered secret replaced by ``***`` (a secret inside a longer
    one is cut after it)."""
    for secret in _remembered.by_length:
        if secret in text:
            text = text.replace(secret, SCRUBBED)
    return text


def forget_all() -> None:
    """Forget every remembered secret (tests)."""
    with _lock:
        _remembered.values.clear()
        _remembered.by_length = ()


def env_secret(name: str, *, secret: bool = True) -> str:
    """The value of environment variable ``name``; ValueError if it is unset or empty.

    ``secret=False`` for a value that is not one (a username): it is not scrubbed.
    """
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"environment variable {name} is not set")
    if not value:
        raise ValueError(f"environment variable {name} is empty")
    if secret:
        remember(value)
    return value


def file_stamp(path: str) -> Stamp | None:
    """What identifies the file's current content cheaply; None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def file_secret(path: str, *, secret: bool = True) -> str:
    """The file's text without its trailing newline, read again only if the file changed.

    Raises ValueError if it cannot be read (or is empty) and was never read before.
    ``secret=False`` for a value that is not one (an OAuth client id): it is not scrubbed.
    """
    stamp = file_stamp(path)
    with _lock:
        cached = _files.get(path)
    if cached is not None and stamp is not None and cached[0] == stamp:
        if secret and cached[1] not in _remembered.values:  # evicted, or forgotten (tests)
            remember(cached[1])
        return cached[1]
    try:
        value = _read(path)
    except ValueError as exc:
        if cached is None:
            raise
        with _lock:
            report = _warned.get(path, ()) != stamp
            _warned[path] = stamp
        if report:
            log.warning(
                "secret_unreadable",
                path=path,
                error=str(exc),
                reason="keeping the value read last until the file is readable again",
            )
        return cached[1]
    if secret:
        remember(value)
    after = file_stamp(path)
    with _lock:
        _warned.pop(path, None)
        if after is not None and after == stamp:  # not changed while we read it
            _files[path] = (after, value)
        else:
            _files.pop(path, None)  # read again next time
    return value


def _read(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text") from exc
    secret = text.rstrip("\r\n")
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret
