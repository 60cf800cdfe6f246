"""Attempt accounting of a run's scenes, in memory: the hard bound on retries never depends on the store.

A scene is ``(run id, scene id)``; a run prompt without a scene id is its own scene, named by its prompt id, and the
retries the budget queues for it carry that name as their ``scene_id``, so the key never changes from one attempt to
the next. Every execution that starts is counted under its scene; the budget's own retries are planned here (with
the prompt id the retry will have) before they are queued, so ``RetryOf``/``Requeued`` can only come from the budget,
never from tags a client sends. Clearing the queue or interrupting moves to a new *epoch*: an attempt that started
in an older epoch is not retried, and retries planned in it are reported as pending, for the caller to dequeue.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_MAX_SCENES = 50_000


@dataclass(frozen=True)
class PlannedRetry:
    """A retry the budget queued: which scene, which attempt number, which failed prompt it retries."""

    run_id: str
    scene: str
    attempt: int
    retry_of: str
    epoch: int


class RetryBook:
    """Executions per scene and the budget's retries, bounded (oldest scenes forgotten first). Thread-safe."""

    def __init__(self, max_scenes: int = DEFAULT_MAX_SCENES) -> None:
        self._lock = threading.Lock()
        self._scenes: OrderedDict[tuple[str, str], set[str]] = OrderedDict()
        self._planned: OrderedDict[str, PlannedRetry] = OrderedDict()
        self._started_epoch: OrderedDict[str, int] = OrderedDict()
        self._max = max(1, int(max_scenes))
        self.epoch = 0

    @staticmethod
    def scene_of(prompt_id: str, scene_id: str | None) -> str:
        """The scene name of a run prompt: its scene id, or its own prompt id when it has none."""
        return scene_id if scene_id not in (None, "") else prompt_id

    def started(self, run_id: str, scene: str, prompt_id: str) -> int:
        """An execution of the scene started (prompt worker: a few dict operations); its attempt number."""
        with self._lock:
            ids = self._scenes.get((run_id, scene))
            if ids is None:
                ids = self._scenes[(run_id, scene)] = set()
                if len(self._scenes) > self._max:
                    self._scenes.popitem(last=False)
            ids.add(prompt_id)
            self._started_epoch[prompt_id] = self.epoch
            if len(self._started_epoch) > self._max:
                self._started_epoch.popitem(last=False)
            planned = self._planned.get(prompt_id)
            return max(len(ids), planned.attempt if planned else 0)

    def executions(self, run_id: str, scene: str) -> set[str]:
        """Prompt ids of the scene's executions this process saw start (a copy)."""
        with self._lock:
            return set(self._scenes.get((run_id, scene), ()))

    def plan(self, prompt_id: str, run_id: str, scene: str, attempt: int, retry_of: str) -> PlannedRetry:
        """Register the retry the budget is about to queue as ``prompt_id``."""
        with self._lock:
            planned = self._planned[prompt_id] = PlannedRetry(run_id, scene, attempt, retry_of, self.epoch)
            if len(self._planned) > self._max:
                self._planned.popitem(last=False)
            return planned

    def planned(self, prompt_id: str) -> PlannedRetry | None:
        """The budget's plan for ``prompt_id``, or ``None`` (it was not queued by the budget)."""
        with self._lock:
            return self._planned.get(prompt_id)

    def stale(self, prompt_id: str) -> bool:
        """Whether the queue was cleared or ComfyUI interrupted since this execution started (or retry was planned)."""
        with self._lock:
            epoch = self._started_epoch.get(prompt_id)
            if epoch is None:
                plan = self._planned.get(prompt_id)
                epoch = plan.epoch if plan else self.epoch
            return epoch != self.epoch

    def cancel(self) -> list[str]:
        """Start a new epoch (queue cleared, interrupt); return the planned retries that have not started."""
        with self._lock:
            self.epoch += 1
            return [pid for pid in self._planned if pid not in self._started_epoch]
