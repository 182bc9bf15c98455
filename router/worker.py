"""A long-lived background thread of the router: a name, a stop flag and a wake-up event.

The control loop, the lag reader, the reload watcher and the re-prober are each one of these;
they implement ``_run`` and wait on ``self._wake`` with a timeout between passes.
"""

from __future__ import annotations

import threading


class Worker:
    def __init__(self, name: str, stop_timeout: float = 10.0) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._stop_timeout = stop_timeout
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(self._stop_timeout if timeout is None else timeout)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        raise NotImplementedError
