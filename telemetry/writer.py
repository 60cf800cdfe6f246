"""One background writer thread: file and database writes happen here, never on ComfyUI's prompt worker."""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger("run_telemetry.writer")

Job = Callable[[], None]


@dataclass(frozen=True)
class _Later:
    due: float
    job: Job


class _Flush:
    """Run every delayed job now, then set the event."""

    def __init__(self) -> None:
        self.done = threading.Event()


class Writer:
    """Runs submitted jobs in order on one daemon thread, which blocks (does not poll) while idle.

    ``submit`` runs on ComfyUI's prompt worker twice per prompt, so it is one put on a C-implemented queue.
    ``submit_after`` defers a job: the thread waits for it with a timeout only while one is pending.
    """

    def __init__(self, name: str = "run-telemetry-writer", *, clock: Callable[[], float] = time.monotonic) -> None:
        self._q: queue.SimpleQueue[Job | _Later | _Flush | None] = queue.SimpleQueue()
        self._name = name
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._busy_since: float | None = None

    def submit(self, job: Job) -> None:
        """Queue ``job``; the thread starts on first use (and again if it ever ended)."""
        self._put(job)

    def submit_after(self, delay: float, job: Job) -> None:
        """Run ``job`` once ``delay`` seconds have passed (or at the next ``flush``/``stop``, if sooner)."""
        self._put(_Later(self._clock() + delay, job))

    def _put(self, item: Job | _Later | _Flush | None) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._ensure_thread()
        self._q.put(item)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        later: list[tuple[float, int, Job]] = []
        order = itertools.count()
        carry: _Flush | None = None  # a flush met while draining at a flush or stop: handled next
        while True:
            try:
                if carry is not None:
                    item, carry = carry, None
                elif later:
                    item = self._q.get(timeout=max(0.0, later[0][0] - self._clock()))
                else:
                    item = self._q.get()
            except queue.Empty:
                item = _DUE
            if item is None or isinstance(item, _Flush):
                # The delayed jobs run now, and so do the jobs they submit (the recorder's row batch): else those
                # would run after the flush returned, or never once the thread ended. Delayed jobs they submit
                # (a gate polling again) wait for their time, as before.
                stop = item is None
                deferred: list[_Later] = []
                while later:
                    self._call(heapq.heappop(later)[2])
                    while carry is None:
                        try:
                            more = self._q.get_nowait()
                        except queue.Empty:
                            break
                        if more is None:
                            stop = True
                        elif isinstance(more, _Flush):
                            carry = more  # submitted after this one: its turn comes next
                        elif isinstance(more, _Later):
                            deferred.append(more)
                        else:
                            self._call(more)
                for d in deferred:
                    heapq.heappush(later, (d.due, next(order), d.job))
                if stop:
                    return
                item.done.set()
                continue
            if isinstance(item, _Later):
                heapq.heappush(later, (item.due, next(order), item.job))
            elif item is not _DUE:
                self._call(item)
            now = self._clock()
            while later and later[0][0] <= now:
                self._call(heapq.heappop(later)[2])

    def _call(self, job: Job) -> None:
        self._busy_since = time.monotonic()
        try:
            job()
        except Exception:  # a failed write must never kill the thread that serves every later prompt
            logger.exception("Run Telemetry: a background write failed")
        finally:
            self._busy_since = None

    def busy_seconds(self) -> float | None:
        """How long the job running now has run, or ``None`` when the thread is idle."""
        since = self._busy_since
        return None if since is None else max(0.0, time.monotonic() - since)

    def is_current(self) -> bool:
        """Whether the caller runs on this writer's thread."""
        return threading.current_thread() is self._thread

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Run every job submitted before this call, delayed ones included; return False on timeout."""
        marker = _Flush()
        self._put(marker)  # one thread, in order: when the marker is reached, everything before it has run
        return marker.done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued jobs (delayed ones at once) and end the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._q.put(None)
            self._thread.join(timeout)


def _due() -> None:  # the sentinel for "a delayed job is due"; never called
    raise AssertionError("not a job")


_DUE: Job = _due
