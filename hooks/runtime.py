"""The one Runtime the ComfyUI adapters share: store, writer, recorder and the probe snapshot, wired once."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..telemetry import __version__
from ..telemetry.health import HealthMonitor, HealthPolicy, WorkerFacts
from ..telemetry.paths import UnsafePrefixError, resolve_prefix
from ..telemetry.policy import QueuePolicy, apply_overrides, policy_from_env
from ..telemetry.prefix_order import PrefixOrder
from ..telemetry.recorder import Recorder
from ..telemetry.records import FINAL_OUTCOMES, PromptRecord
from ..telemetry.retries import RetryBook
from ..telemetry.sanitize import TAG_LIMITS, text_problem
from ..telemetry.store import DEFAULT_RETENTION, Store
from ..telemetry.writer import Writer
from .queue import QueueEvents
from .webhooks import build_webhooks

logger = logging.getLogger("run_telemetry")

ENV_DIR = "RUN_TELEMETRY_DIR"
ENV_RETENTION = "RUN_TELEMETRY_RETENTION"
ENV_MIN_FREE_MB = "RUN_TELEMETRY_MIN_FREE_MB"
WORKER_THREAD_SUFFIX = (
    "(prompt_worker)"  # threading names ComfyUI's Thread(target=prompt_worker) "Thread-N (prompt_worker)"
)
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
        queue_counts: Callable[[], tuple[int, int]] | None = None,
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
        # Two threads: markers (and the other finishing steps) on one, every store write on the other, so a slow,
        # locked or failing store never holds up a marker.
        self.writer = Writer()
        self.store_writer = Writer("run-telemetry-store")
        self.output_dir = output_dir
        # ComfyUI's folders by UI output type (output, temp, input); set by hooks.install inside ComfyUI.
        self.folder_roots: Callable[[], dict[str, Path]] | None = None
        # What each prompt asked for and what ComfyUI ran (hooks/plan.py); set by hooks.install inside ComfyUI.
        self.plans: Any = None
        # Stale-marker clears and marker writes of prompts sharing a prefix, in acceptance order (hooks/finish.py).
        self.prefix_order = PrefixOrder()
        self._run_policies: dict[
            str, tuple[int, QueuePolicy, list[str]]
        ] = {}  # run id -> (runs_version, policy, notes)
        self._run_policies_lock = threading.Lock()
        self.snapshot = snapshot
        self.pending = pending
        self.queue_counts = queue_counts
        self.send = send
        self.recorder = Recorder(self.store, self.writer, snapshot, peak=peak, store_writer=self.store_writer)
        # Accepted into / dropped from ComfyUI's queue (hooks/queue.py; the queue is wrapped by hooks.install).
        self.queue_events = QueueEvents()
        self.queue_events.on_accept(self.recorder.accepted)
        self.queue_events.on_dequeue(self.cancel_queued)
        self.version = __version__
        # Attempts per scene and the budget's own retries, in memory (hooks/runs.py): the bound on retries.
        self.retries = RetryBook()
        # ComfyUI's version and how each hook point was wired (name -> how), shown in GET /telemetry.
        self.comfyui_version: str | None = None
        self.hooks: dict[str, str] = {}
        self.policy, self.policy_notes = policy_from_env(env)
        self.notes.extend(self.policy_notes)
        self.webhooks, self.webhook_targets = build_webhooks(self, env)
        self.max_wait_seconds = float(self.policy.max_wait_seconds)
        # fn(prompt_id, node_id, resolved prefix, other prefixes of a list) when a WriteDoneMarker runs.
        self.declare_hooks: list[Callable[[str | None, str, str, list[str]], None]] = []
        self._waits: dict[str, int] = {}
        self._waits_lock = threading.Lock()
        self.tag_limits = TAG_LIMITS
        # ComfyUI's prompt worker: the thread seen running prompts, and a BaseException that left one (it ends it).
        self.worker_thread: threading.Thread | None = None
        self.worker_exit: tuple[float, str] | None = None
        self.marker_error: tuple[float, str] | None = None
        self.health_policy = HealthPolicy(
            stuck_after_seconds=float(self.policy.max_wait_seconds),
            min_free_bytes=self._min_free_bytes(env),
            writer_busy_seconds=float(self.policy.post_execution_timeout_seconds) + 60.0,
        )
        self.health = HealthMonitor(
            policy=self.health_policy,
            worker=self.worker_facts,
            last_activity=lambda: self.recorder.last_activity,
            store=lambda: self.store.health().as_dict(),
            writer_busy=self.writer.busy_seconds,
            marker_error=lambda: self.marker_error,
            output_dir=output_dir,
            store_dir=self.data_dir,
            snapshot=_cached(snapshot, 5.0),
            comfyui=lambda: (self.comfyui_version, dict(self.hooks)),
        )
        # Health state changes: callables (previous report or None, report); webhooks send health.changed from here.
        self.health_listeners = self.health.listeners
        self.recorder.add_start_hook(self._seen_worker)
        self.recorder.add_listener(self._after_prompt)
        self.store.listeners.append(lambda _h: self.writer.submit(self._evaluate_health))

    def _min_free_bytes(self, env: dict[str, str]) -> int:
        raw = env.get(ENV_MIN_FREE_MB)
        default = HealthPolicy().min_free_bytes
        if not raw:
            return default
        try:
            mb = float(raw)
            if not mb >= 0:
                raise ValueError("must be a number >= 0")
            return int(mb * (1 << 20))
        except ValueError as exc:
            note = f"{ENV_MIN_FREE_MB}={raw!r} is not a number of MiB >= 0 ({exc}); keeping {default >> 20}"
            logger.error("Run Telemetry: %s", note)
            self.notes.append(note)
            return default

    # --- health ---

    def _seen_worker(self, rec: PromptRecord, prompt: Any) -> None:
        """Start hook (on ComfyUI's prompt worker): remember the thread, to tell later whether it is alive."""
        thread = threading.current_thread()
        if thread is not threading.main_thread():
            self.worker_thread = thread

    def worker_exiting(self, exc: BaseException) -> None:
        """A BaseException that is not an Exception (SystemExit …) left a prompt: it ends ComfyUI's worker thread."""
        self.worker_exit = (time.time(), f"{type(exc).__name__}: {exc}"[:300])
        logger.warning("Run Telemetry: %s left a prompt; ComfyUI's prompt worker thread ends", self.worker_exit[1])
        # The thread is still unwinding: look again once it is gone.
        for delay in (0.2, 1.0, 5.0):
            self.writer.submit_after(delay, self._evaluate_health)

    def _find_worker(self) -> threading.Thread | None:
        if self.worker_thread is None:
            for thread in threading.enumerate():
                if thread.name.endswith(WORKER_THREAD_SUFFIX):
                    self.worker_thread = thread
                    break
        return self.worker_thread

    def worker_facts(self) -> WorkerFacts:
        """ComfyUI's prompt worker: found, alive, why it exited, and what its queue holds."""
        thread = self._find_worker()
        running = queued = 0
        if self.queue_counts is not None:
            try:
                running, queued = self.queue_counts()
            except Exception as exc:
                logger.debug("queue counts unavailable: %s", exc)
        exit_ = self.worker_exit
        return WorkerFacts(
            found=thread is not None,
            alive=thread is not None and thread.is_alive(),
            exit_reason=exit_[1] if exit_ else None,
            exit_at=exit_[0] if exit_ else None,
            running=running,
            queued=queued,
        )

    def _after_prompt(self, rec: PromptRecord) -> None:
        """Recorder listener: the last marker write's result, for the marker writer check."""
        if rec.Outcome not in FINAL_OUTCOMES or not rec.Markers:
            return
        before = self.marker_error
        bad = [m for m in rec.Markers if m.State == "error"]
        if bad:
            self.marker_error = (time.time(), f"prefix {bad[0].Prefix!r}: {bad[0].Error}")
        elif any(m.State in ("written", "failed") for m in rec.Markers):
            self.marker_error = None
        if (before is None) != (self.marker_error is None):
            self._evaluate_health()

    def _evaluate_health(self) -> None:
        try:
            self.health.evaluate()
        except Exception:
            logger.exception("Run Telemetry: health evaluation failed")

    def notes_now(self) -> list[str]:
        """Start-up notes plus the store's state, for ``GET /telemetry``'s ``FallbackNotes``."""
        store_note = self.store.health().note()
        return [*self.notes, store_note] if store_note else list(self.notes)

    def flush(self, timeout: float = 10.0) -> bool:
        """Run every finishing step and store write submitted so far (tests, shutdown)."""
        return self.writer.flush(timeout) and self.store_writer.flush(timeout)

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
        return {
            **self.policy.as_dict(),
            "QueueConfig": self.policy.queue_config(),
            "TagLimits": self.tag_limits.as_dict(),
            "Notes": list(self.policy_notes),
        }

    def count_wait(self, prompt_id: str) -> None:
        """A consumer waited on (or polled) a known prompt: counted as a history attempt.

        Callers count only ids the recorder or ComfyUI's queue knows: an id that never existed costs no memory.
        """
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
        """The policy of a run: the environment's, with the run's own overrides; plus notes that affect it.

        Read from the store once per run while the store's ``runs_version`` holds (the writer asks twice per prompt).
        """
        version = getattr(self.store, "runs_version", None)
        if run_id and version is not None:
            hit = self._run_policies.get(run_id)
            if hit is not None and hit[0] == version:
                return hit[1], list(hit[2])
        failures = getattr(self.store, "read_failures", 0)
        policy, notes = self._run_policy(run_id)
        # A read that failed (the store locked by another process a moment) gave the environment's policy: not kept.
        if run_id and version is not None and getattr(self.store, "read_failures", 0) == failures:
            with self._run_policies_lock:  # the writer and HTTP threads both ask
                self._run_policies[run_id] = (version, policy, list(notes))
                while len(self._run_policies) > 1000:
                    self._run_policies.pop(next(iter(self._run_policies)))
        return policy, notes

    def _run_policy(self, run_id: str | None) -> tuple[QueuePolicy, list[str]]:
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


def _cached(fn: Callable[[], dict[str, Any]], ttl: float) -> Callable[[], dict[str, Any]]:
    """``fn`` called at most once per ``ttl`` seconds (the health check reads the probe chain through it)."""
    state: list[Any] = [None, -1e9]

    def get() -> dict[str, Any]:
        now = time.monotonic()
        if state[0] is None or now - state[1] > ttl:
            state[0], state[1] = fn(), now
        return state[0]

    return get


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
    bad_text = text_problem(prefix) if isinstance(prefix, str) else None
    if bad_text:
        return f"filename_prefix {bad_text}"
    try:
        resolve_prefix(output_directory(), prefix)
    except UnsafePrefixError as exc:
        return str(exc)
    except Exception as exc:  # outside ComfyUI the output folder is unknown; the write checks again
        logger.debug("prefix check skipped: %s", exc)
    return None
