"""One background writer thread: file and database writes happen here, never on ComfyUI's prompt worker."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

logger = logging.getLogger("run_telemetry.writer")

Job = Callable[[], None]


class Writer:
    """Runs submitted jobs in order on one daemon thread, which blocks (does not poll) while idle."""

    def __init__(self, name: str = "run-telemetry-writer") -> None:
        self._q: queue.Queue[Job | None] = queue.Queue()
        self._name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition()
        self._pending = 0

    def submit(self, job: Job) -> None:
        """Queue ``job``; the thread starts on first use."""
        with self._idle:
            self._pending += 1
        self._ensure_thread()
        self._q.put(job)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # a failed write must never kill the thread that serves every later prompt
                logger.exception("Run Telemetry: a background write failed")
            finally:
                with self._idle:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.notify_all()

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every submitted job has run; return False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued jobs and end the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout)
