"""Waiting for late output files: present, and no longer growing, within a deadline.

Some output nodes return before their files are complete (encoders, network shares, nodes that write from a thread
of their own). A file is *settled* once two observations at least ``window`` seconds apart find it present with the
same size and modification time, and its modification time is at least ``QUIET_FACTOR`` windows old: a writer that
pauses exactly one window between chunks (an encoder flushing every second) is not taken for finished at the edge.
The mtime condition is capped at two windows of observed stability, so a file server's clock skew cannot hold a
file longer than that. The check never sleeps: :meth:`Settle.poll` says how long to wait before the next
observation, so a caller can re-check from a timer (the writer's delayed jobs) without blocking anything else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

FileState = tuple[int, int]  # (size in bytes, mtime in ns)
QUIET_FACTOR = 1.25  # a settled file's mtime is at least this many windows old


def file_state(path: Path) -> FileState | None:
    """``(size, mtime_ns)`` of a regular file, or ``None`` when it is missing or not a regular file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    return st.st_size, st.st_mtime_ns


@dataclass
class Settle:
    """The settle state of a set of files: ``poll(now)`` until it answers ``settled`` or ``timeout``.

    ``now`` and ``deadline`` are seconds on one monotonic clock; ``window`` is the settle window in seconds.
    """

    paths: list[Path]
    window: float
    deadline: float
    stat: Callable[[Path], FileState | None] = file_state
    wall: Callable[[], float] = time.time  # the clock file mtimes are on
    _seen: dict[Path, tuple[FileState, float]] = field(default_factory=dict)
    _settled: set[Path] = field(default_factory=set)

    @classmethod
    def of(cls, paths: Iterable[Path], *, window: float, deadline: float) -> Settle:
        """A settle check over ``paths`` (duplicates dropped, order kept)."""
        return cls(paths=list(dict.fromkeys(paths)), window=max(0.0, float(window)), deadline=deadline)

    def pending(self) -> list[Path]:
        """The files not settled yet."""
        return [p for p in self.paths if p not in self._settled]

    def poll(self, now: float) -> tuple[Literal["settled", "waiting", "timeout"], float]:
        """Observe every unsettled file once; return the verdict and the seconds to wait before the next poll."""
        next_due = None
        for path in self.pending():
            state = self.stat(path)
            seen = self._seen.get(path)
            if state is None:  # missing: looked at again soon, it may appear any moment
                self._seen.pop(path, None)
                next_due = now + min(self.window, 0.1) if next_due is None else min(next_due, now + 0.1)
                continue
            if seen is not None and seen[0] == state:
                quiet_at = now + (state[1] / 1e9 + QUIET_FACTOR * self.window - self.wall())
                due = max(seen[1] + self.window, min(quiet_at, seen[1] + 2 * self.window))
                if now >= due:
                    self._settled.add(path)
                    continue
            else:
                self._seen[path] = (state, now)
                due = now + self.window
            next_due = due if next_due is None else min(next_due, due)
        if not self.pending():
            return "settled", 0.0
        if now >= self.deadline:
            return "timeout", 0.0
        wait = self.window if next_due is None else next_due - now
        return "waiting", max(0.01, min(wait, self.deadline - now))
