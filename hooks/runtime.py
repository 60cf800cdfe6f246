"""The one Runtime the ComfyUI adapters share: store, writer, recorder and the probe snapshot, wired once."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..telemetry import __version__
from ..telemetry.paths import UnsafePrefixError, resolve_prefix
from ..telemetry.policy import QueuePolicy, apply_overrides, policy_from_env
from ..telemetry.prefix_order import PrefixOrder
from ..telemetry.recorder import Recorder
from ..telemetry.retries import RetryBook
from ..telemetry.store import DEFAULT_RETENTION, Store
from ..telemetry.writer import Writer
from .queue import QueueEvents
from .webhooks import build_webhooks

logger = logging.getLogger("run_telemetry")

ENV_DIR = "RUN_TELEMETRY_DIR"
ENV_RETENTION = "RUN_TELEMETRY_RETENTION"
CUT_OFF_NOTE = "ComfyUI stopped (crash or kill) before this prompt finished; marked on the next start"
LOST_NOTE = (
    "ComfyUI stopped while this prompt was still queued (ComfyUI does not restore its queue): it never ran; "
    "marked lost on the next start"
)
CANCELLED_NOTES = {
    "clear": "cancelled before it ran: the queue was cleared (POST /queue clear)",
    "delete": "cancelled before it ran: removed from the queue (POST /queue delete or the jobs cancel route)",
}


class Runtime:
    """Everything the nodes, hooks and routes share inside one ComfyUI process."""

    def __init__(
        self,
        *,
        user_dir: Path,
        output_dir: Callable[[], Path],
        snapshot: Callable[[], dict[str, Any]],
        pending: Callable[[str], bool] = lambda _pid: False,
        send: Callable[[str, dict[str, Any]], None] | None = None,
        env: dict[str, str] | None = None,
        peak: tuple[Callable[[], Any], Callable[[Any], tuple[int | None, str]]] | None = None,
    ) -> None:
        env = dict(os.environ if env is None else env)
        self.notes: list[str] = []
        self.data_dir = Path(env.get(ENV_DIR) or (Path(user_dir) / "telemetry"))
        retention = DEFAULT_RETENTION
        raw = env.get(ENV_RETENTION)
        if raw:
            try:
                retention = int(raw)
                if retention < 1:
                    raise ValueError("must be at least 1")
            except ValueError as exc:
                note = f"{ENV_RETENTION}={raw!r} is not a whole number >= 1 ({exc}); keeping {DEFAULT_RETENTION}"
                logger.error("Run Telemetry: %s", note)
                self.notes.append(note)
                retention = DEFAULT_RETENTION
        self.store = Store(self.data_dir / "telemetry.sqlite3", retention=retention)
        self.cut_off = self.store.mark_cut_off(CUT_OFF_NOTE)
        # Accepted by the last process and never started: finished as lost once the finishers are wired.
        self.lost = self.store.queued_records()
        if self.lost:
            logger.warning(
                "Run Telemetry: %d prompt(s) were still queued when ComfyUI stopped (lost): %s",
                len(self.lost),
                [r.PromptId for r in self.lost],
            )
        if self.cut_off:
            logger.warning(
                "Run Telemetry: %d prompt(s) were cut off by the last stop: %s", len(self.cut_off), self.cut_off
            )
        self.writer = Writer()
        self.output_dir = output_dir
        # ComfyUI's folders by UI output type (output, temp, input); set by hooks.install inside ComfyUI.
        self.folder_roots: Callable[[], dict[str, Path]] | None = None
        # What each prompt asked for and what ComfyUI ran (hooks/plan.py); set by hooks.install inside ComfyUI.
        self.plans: Any = None
        # Stale-marker clears and marker writes of prompts sharing a prefix, in acceptance order (hooks/finish.py).
        self.prefix_order = PrefixOrder()
        self.snapshot = snapshot
        self.pending = pending
        self.send = send
        self.recorder = Recorder(self.store, self.writer, snapshot, peak=peak)
        # Accepted into / dropped from ComfyUI's queue (hooks/queue.py; the queue is wrapped by hooks.install).
        self.queue_events = QueueEvents()
        self.queue_events.on_accept(self.recorder.accepted)
        self.queue_events.on_dequeue(self.cancel_queued)
        self.version = __version__
        # Attempts per scene and the budget's own retries, in memory (hooks/runs.py): the bound on retries.
        self.retries = RetryBook()
        self.policy, self.policy_notes = policy_from_env(env)
        self.notes.extend(self.policy_notes)
        self.webhooks, self.webhook_targets = build_webhooks(self, env)
        self.max_wait_seconds = float(self.policy.max_wait_seconds)
        # fn(prompt_id, node_id, resolved prefix, other prefixes of a list) when a WriteDoneMarker runs.
        self.declare_hooks: list[Callable[[str | None, str, str, list[str]], None]] = []
        self._waits: dict[str, int] = {}
        self._waits_lock = threading.Lock()

    def cancel_queued(self, items: list[Any], how: str) -> None:
        """Dequeue hook: prompts removed from ComfyUI's queue unrun get final ``cancelled`` records."""
        self.recorder.dropped(items, "cancelled", CANCELLED_NOTES.get(how, f"cancelled before it ran ({how})"))

    def finish_lost(self) -> list[str]:
        """Finish the records the last process left queued as ``lost`` (markers, store, listeners); their ids."""
        lost, self.lost = self.lost, []
        for rec in lost:
            self.recorder.finish_unrun(rec, "lost", LOST_NOTE)
        return [r.PromptId for r in lost]

    def policy_view(self) -> dict[str, Any]:
        """The queue policy in force (from the environment) and the notes about invalid values."""
        return {**self.policy.as_dict(), "QueueConfig": self.policy.queue_config(), "Notes": list(self.policy_notes)}

    def count_wait(self, prompt_id: str) -> None:
        """A consumer waited on (or polled) a prompt: counted as a history attempt."""
        with self._waits_lock:
            self._waits[prompt_id] = self._waits.get(prompt_id, 0) + 1
            if len(self._waits) > 50_000:  # bounded: forget the oldest half
                for key in list(self._waits)[:25_000]:
                    del self._waits[key]

    def waits(self) -> dict[str, int]:
        """Wait counts per prompt id (a copy)."""
        with self._waits_lock:
            return dict(self._waits)

    def run_policy(self, run_id: str | None) -> tuple[QueuePolicy, list[str]]:
        """The policy of a run: the environment's, with the run's own overrides; plus notes that affect it."""
        info = self.store.run_info(run_id) if run_id else None
        policy, notes = apply_overrides(self.policy, (info or {}).get("PolicyOverrides"))
        ceiling = self.policy.scene_retry_budget
        if policy.scene_retry_budget > ceiling:  # SCENE_RETRY_BUDGET bounds every run: a run may lower it only
            notes.append(
                f"the run's policy asks for scene_retry_budget={policy.scene_retry_budget}; "
                f"SCENE_RETRY_BUDGET={ceiling} is the ceiling"
            )
            policy = replace(policy, scene_retry_budget=ceiling)
        return policy, [*self.policy_notes, *notes]

    def current_prompt_id(self) -> str | None:
        """The prompt being executed on this thread (ComfyUI's executing context, else the recorder's)."""
        try:
            from comfy_execution.utils import get_executing_context  # ComfyUI >= 0.3.4x

            ctx = get_executing_context()
            if ctx is not None and getattr(ctx, "prompt_id", None):
                return str(ctx.prompt_id)
        except Exception:  # older ComfyUI or outside a node: the recorder knows the running prompt
            pass
        return self.recorder.current_prompt_id

    def span_start(self, node_id: str, label: str) -> None:
        """TelemetryCapture: open a span in the running prompt."""
        self.recorder.span_start(node_id, label, prompt_id=self.current_prompt_id())

    def span_end(self, node_id: str, label: str) -> None:
        """TelemetryCapture: close a span."""
        self.recorder.span_end(node_id, label, prompt_id=self.current_prompt_id())

    def declare_marker(
        self, node_id: str, prefix: str, frames: int | None, sha256: bool, *, others: list[str] | None = None
    ) -> None:
        """WriteDoneMarker ran: register its resolved prefix, written once the prompt ends."""
        prompt_id = self.current_prompt_id()
        self.recorder.declare_marker(node_id, prefix, frames, sha256, prompt_id=prompt_id)
        for fn in self.declare_hooks:
            try:
                fn(prompt_id, node_id, prefix, others or [])
            except Exception:
                logger.exception("Run Telemetry: marker declaration hook failed for node %s", node_id)


_RUNTIME: Runtime | None = None
_LOCK = threading.Lock()


def get() -> Runtime | None:
    """The wired runtime, or ``None`` when wiring failed (nodes then only pass values through)."""
    return _RUNTIME


def set_runtime(rt: Runtime | None) -> None:
    """Install the process-wide runtime (done once by ``hooks.install``)."""
    global _RUNTIME
    with _LOCK:
        _RUNTIME = rt


def output_directory() -> Path:
    """ComfyUI's output folder, absolute (as ``get_save_image_path`` compares it)."""
    import folder_paths  # ComfyUI's module; only imported inside ComfyUI

    return Path(os.path.abspath(folder_paths.get_output_directory()))


def folder_roots() -> dict[str, Path]:
    """ComfyUI's folders by UI output ``type``: ``output``, ``temp``, ``input`` (absolute)."""
    import folder_paths  # ComfyUI's module; only imported inside ComfyUI

    return {
        "output": output_directory(),
        "temp": Path(os.path.abspath(folder_paths.get_temp_directory())),
        "input": Path(os.path.abspath(folder_paths.get_input_directory())),
    }


def expand_prefix(prefix: str, *, width: int = 0, height: int = 0) -> str:
    """``prefix`` with the tokens SaveImage expands (``%year%`` … ``%width%``), by ComfyUI's own helper.

    ``folder_paths.get_save_image_path`` is the function SaveImage calls; its fifth result is the expanded prefix
    (it also creates the folder, as SaveImage would). A prefix it refuses is returned unexpanded, for
    :func:`prefix_problem` to explain.
    """
    if "%" not in prefix:
        return prefix
    import folder_paths  # ComfyUI's module; only imported inside ComfyUI

    try:
        return str(folder_paths.get_save_image_path(prefix, str(output_directory()), width, height)[4])
    except Exception as exc:  # "outside the output folder" and friends: the caller's check names the problem
        logger.debug("prefix %r not expanded: %s", prefix, exc)
        return prefix


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` may not be used as a marker prefix, or ``None`` when it is safe."""
    try:
        resolve_prefix(output_directory(), prefix)
    except UnsafePrefixError as exc:
        return str(exc)
    except Exception as exc:  # outside ComfyUI the output folder is unknown; the write checks again
        logger.debug("prefix check skipped: %s", exc)
    return None
