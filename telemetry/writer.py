"""One background writer thread: file and database writes happen here, never on ComfyUI's prompt worker."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

logger = logging.getLogger("run_telemetry.writer")

Job = Callable[[], None]


class Writer:
    """Runs submitted jobs in order on one daemon thread, which blocks (does not poll) while idle.

    ``submit`` runs on ComfyUI's prompt worker twice per prompt, so it is one put on a C-implemented queue.
    """

    def __init__(self, name: str = "run-telemetry-writer") -> None:
        self._q: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Job) -> None:
        """Queue ``job``; the thread starts on first use (and again if it ever ended)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
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

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every job submitted before this call has run; return False on timeout."""
        done = threading.Event()
        self.submit(done.set)  # one thread, in order: when this runs, everything before it has
        return done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued jobs and end the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout)
