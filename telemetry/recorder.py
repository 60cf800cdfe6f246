"""The recorder: turns ComfyUI lifecycle events into prompt records, hands finished ones to the writer."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .records import (
    FINAL_OUTCOMES,
    MarkerState,
    NodeTiming,
    OutputRef,
    PromptError,
    PromptRecord,
    Span,
    iso,
)
from .store import Store
from .writer import Writer

logger = logging.getLogger("run_telemetry.recorder")

MIB = 1048576.0
TAG_NODE = "TelemetryCapture"

Snapshot = dict[str, Any]
Finisher = Callable[[PromptRecord], None]
Listener = Callable[[PromptRecord], None]


@dataclass
class _Live:
    """What the recorder holds for a prompt between its start and its end."""

    record: PromptRecord
    started_perf: float = 0.0
    nodes: dict[str, NodeTiming] = field(default_factory=dict)
    spans_open: dict[tuple[str, str], tuple[float, Snapshot]] = field(default_factory=dict)
    peak_start: Any = None


def device_free_bytes(snapshot: Mapping[str, Any] | None) -> int | None:
    """Free bytes of the compute device in a snapshot (``Device.VramFree``)."""
    if not snapshot:
        return None
    dev = snapshot.get("Device") or {}
    val = dev.get("VramFree")
    return int(val) if isinstance(val, int | float) else None


def outcome_from_messages(messages: list[Any]) -> tuple[str, dict[str, Any], float | None]:
    """(outcome, data of the deciding message, execution_success time) from a prompt's status messages.

    ``PromptExecutor.success`` can be stale, so the last decisive message type decides.
    """
    outcome, data, success_at = "error", {}, None
    for item in messages or []:
        try:
            event, payload = item[0], item[1]
        except (TypeError, IndexError, KeyError):
            continue
        if event == "execution_success":
            outcome, data = "success", payload
            ts = payload.get("timestamp")
            success_at = ts / 1000.0 if isinstance(ts, int | float) else None
        elif event == "execution_error":
            outcome, data = "error", payload
        elif event == "execution_interrupted":
            outcome, data = "interrupted", payload
    return outcome, data, success_at


def cached_nodes(messages: list[Any]) -> list[str]:
    """Node ids from the prompt's ``execution_cached`` message."""
    for item in messages or []:
        try:
            if item[0] == "execution_cached":
                return [str(n) for n in item[1].get("nodes", [])]
        except (TypeError, IndexError, AttributeError):
            continue
    return []


def outputs_from_history(history_result: Mapping[str, Any] | None) -> list[OutputRef]:
    """Every file entry (``{filename, subfolder, type}``) in the prompt's UI outputs."""
    found: list[OutputRef] = []
    outputs = (history_result or {}).get("outputs") or {}
    for node_id, ui in outputs.items():
        if not isinstance(ui, Mapping):
            continue
        for items in ui.values():
            if not isinstance(items, list):
                continue
            for it in items:
                if isinstance(it, Mapping) and isinstance(it.get("filename"), str):
                    found.append(
                        OutputRef(
                            NodeId=str(node_id),
                            Filename=it["filename"],
                            Subfolder=str(it.get("subfolder") or ""),
                            Type=str(it.get("type") or "output"),
                        )
                    )
    return found


def tags_from_graph(prompt: Mapping[str, Any] | None) -> dict[str, Any]:
    """Run tags set as literal widget values on TelemetryCapture nodes of the API prompt."""
    tags: dict[str, Any] = {}
    for node in (prompt or {}).values():
        if not isinstance(node, Mapping) or node.get("class_type") != TAG_NODE:
            continue
        inputs = node.get("inputs") or {}
        for key in ("run_id", "scene_id"):
            val = inputs.get(key)
            if isinstance(val, str) and val.strip() and key not in tags:
                tags[key] = val.strip()
        floor = inputs.get("frame_floor")
        if isinstance(floor, int) and floor > 0 and "frame_floor" not in tags:
            tags["frame_floor"] = floor
    return tags


class Recorder:
    """Builds prompt records from lifecycle events. Thread-safe; cheap on the prompt worker thread."""

    def __init__(
        self,
        store: Store,
        writer: Writer,
        snapshot: Callable[[], Snapshot],
        *,
        clock: Callable[[], float] = time.time,
        perf: Callable[[], float] = time.perf_counter,
        recent_size: int = 500,
        peak: tuple[Callable[[], Any], Callable[[Any], tuple[int | None, str]]] | None = None,
    ) -> None:
        self.store = store
        self.writer = writer
        self._snapshot = snapshot
        self._clock = clock
        self._perf = perf
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        # Ended on the worker, not yet through the writer (markers, store): still "running" to readers, so a
        # reader that sees a final outcome can trust that the marker and the stored record exist.
        self._finishing: dict[str, PromptRecord] = {}
        self._recent: OrderedDict[str, PromptRecord] = OrderedDict()
        self._recent_size = recent_size
        # Serialized final records (immutable once final): routes answer from here without re-serializing.
        self._final_json: OrderedDict[str, bytes] = OrderedDict()
        # Bumped under the lock on every change a reader can see, so route caches can key on it exactly.
        self.version = 0
        self._finishers: list[tuple[str, Finisher]] = []
        self._start_hooks: list[Callable[[PromptRecord, Mapping[str, Any]], None]] = []
        self._listeners: list[Listener] = []
        self.current_prompt_id: str | None = None
        self._peak = peak

    # --- wiring ---

    def add_finisher(self, name: str, fn: Finisher, *, first: bool = False) -> None:
        """Run ``fn(record)`` on the writer thread before a finished record is stored (markers, contract block)."""
        if first:
            self._finishers.insert(0, (name, fn))
        else:
            self._finishers.append((name, fn))

    def add_start_hook(self, fn: Callable[[PromptRecord, Mapping[str, Any]], None]) -> None:
        """Run ``fn(record, prompt)`` on the worker thread when a prompt starts (kept cheap)."""
        self._start_hooks.append(fn)

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(record)`` after a record is stored (queued, started, finished)."""
        self._listeners.append(fn)

    # --- lifecycle (called by the ComfyUI adapter) ---

    def started(self, prompt_id: str, prompt: Mapping[str, Any] | None, extra_data: Mapping[str, Any] | None) -> None:
        """The worker picked the prompt up: snapshot before, tags, queue wait."""
        extra = dict(extra_data or {})
        now = self._clock()
        with self._lock:
            rec = self._recent.pop(prompt_id, None)
            self._final_json.pop(prompt_id, None)
        if rec is None:
            rec = PromptRecord(PromptId=prompt_id)
        rec.Outcome = "running"
        rec.ClientId = rec.ClientId or extra.get("client_id")
        queued_ms = extra.get("create_time") or extra.get("run_telemetry_queued_ms")
        if isinstance(queued_ms, int | float):
            rec.QueuedAt = iso(queued_ms / 1000.0)
            rec.QueueWaitSeconds = round(max(0.0, now - queued_ms / 1000.0), 6)
        rec.StartedAt = iso(now)
        tags = tags_from_graph(prompt)
        client_tags = extra.get("telemetry")
        if isinstance(client_tags, Mapping):
            tags.update({k: v for k, v in client_tags.items() if v is not None})  # the client's tags win
        self._apply_tags(rec, tags)
        if prompt is not None:
            rec.Workflow = dict(prompt)
        rec.Before = self._safe_snapshot(rec)
        for hook in self._start_hooks:
            try:
                hook(rec, prompt or {})
            except Exception as exc:
                rec.FallbackNotes.append(f"start hook {getattr(hook, '__name__', hook)} failed: {exc}")
        peak_start = None
        if self._peak is not None:
            try:
                peak_start = self._peak[0]()
            except Exception as exc:
                rec.FallbackNotes.append(f"peak VRAM unavailable: {exc}")
        live = _Live(record=rec, started_perf=self._perf(), peak_start=peak_start)
        with self._lock:
            self._live[prompt_id] = live
            self.current_prompt_id = prompt_id
            self.version += 1
        # Copy now, on this thread: by the time the writer runs, ended() may already have changed ``rec``.
        # The workflow stays out of the copy (only the retry step at the end needs it).
        workflow, rec.Workflow = rec.Workflow, None
        running = rec.model_copy(deep=True)
        rec.Workflow = workflow
        self.writer.submit(lambda: self._persist(running, publish=True))

    def node_called(self, prompt_id: str | None, node_id: str, class_type: str, seconds: float) -> None:
        """One call of ComfyUI's per-node ``execute`` returned after ``seconds``."""
        live = self._get_live(prompt_id)
        if live is None:
            return
        t = live.nodes.get(node_id)
        if t is None:
            t = live.nodes[node_id] = NodeTiming(NodeId=node_id, ClassType=class_type)
        t.Seconds += seconds
        t.Calls += 1

    def span_start(self, node_id: str, label: str, prompt_id: str | None = None) -> None:
        """Open a TelemetryCapture span (idempotent: ComfyUI may ask a lazy node twice)."""
        live = self._get_live(prompt_id)
        if live is None or (node_id, label) in live.spans_open:
            return
        if any(s.NodeId == node_id and s.Label == label for s in live.record.Spans):
            return
        live.spans_open[(node_id, label)] = (self._perf(), self._safe_snapshot(live.record))

    def span_end(self, node_id: str, label: str, prompt_id: str | None = None) -> None:
        """Close a span and add it to the record."""
        live = self._get_live(prompt_id)
        if live is None:
            return
        opened = live.spans_open.pop((node_id, label), None)
        after = self._safe_snapshot(live.record)
        if opened is None:
            # The input was ready before the node was scheduled (cached upstream): no time to attribute.
            opened = (self._perf(), after)
        t0, before = opened
        b, a = device_free_bytes(before), device_free_bytes(after)
        live.record.Spans.append(
            Span(
                Label=label,
                NodeId=node_id,
                Seconds=round(self._perf() - t0, 6),
                VramBeforeMB=round(b / MIB, 2) if b is not None else None,
                VramAfterMB=round(a / MIB, 2) if a is not None else None,
                VramDeltaMB=round((a - b) / MIB, 2) if a is not None and b is not None else None,
                Source=(after or {}).get("Source"),
            )
        )
        self._bump()

    def declare_marker(
        self, node_id: str, prefix: str, frames: int | None, sha256: bool, prompt_id: str | None = None
    ) -> None:
        """A WriteDoneMarker node ran: remember its prefix and frame count for the end of the prompt."""
        live = self._get_live(prompt_id)
        if live is None:
            return
        for m in live.record.Markers:
            if m.NodeId == node_id:
                m.Prefix, m.FrameCount, m.Sha256 = prefix, frames, sha256
                self._bump()
                return
        live.record.Markers.append(MarkerState(NodeId=node_id, Prefix=prefix, FrameCount=frames, Sha256=sha256))
        self._bump()

    def ended(
        self,
        prompt_id: str,
        status_messages: list[Any] | None,
        history_result: Mapping[str, Any] | None,
        *,
        exception: BaseException | None = None,
    ) -> None:
        """The executor returned: outcome, outputs, node timings, snapshot after; the rest goes to the writer."""
        end_perf = self._perf()
        with self._lock:
            live = self._live.pop(prompt_id, None)
            if self.current_prompt_id == prompt_id:
                self.current_prompt_id = None
            if live is not None:
                self._finishing[prompt_id] = live.record
            self.version += 1
        if live is None:
            return
        rec = live.record
        rec.DurationSeconds = round(end_perf - live.started_perf, 6)
        rec.EndedAt = iso(self._clock())
        outcome, data, success_at = outcome_from_messages(status_messages or [])
        if exception is not None:
            outcome = "error"
            data = {"exception_message": str(exception), "exception_type": type(exception).__name__}
        rec.Outcome = outcome  # type: ignore[assignment]
        if success_at is not None:
            rec.ExecutionSuccessAt = iso(success_at)
        if outcome != "success":
            rec.Error = PromptError(
                NodeId=str(data["node_id"]) if data.get("node_id") is not None else None,
                NodeType=data.get("node_type"),
                ExceptionType=data.get("exception_type") or ("Interrupted" if outcome == "interrupted" else None),
                Message=data.get("exception_message")
                or ("Interrupted by the user" if outcome == "interrupted" else None),
            )
        cached = set(cached_nodes(status_messages or []))
        workflow = rec.Workflow or {}
        for node_id in cached:
            if node_id not in live.nodes:
                ct = (workflow.get(node_id) or {}).get("class_type", "")
                live.nodes[node_id] = NodeTiming(NodeId=node_id, ClassType=ct, Cached=True)
        for t in live.nodes.values():
            t.Seconds = round(t.Seconds, 6)
            if t.NodeId in cached:
                t.Cached = True
        rec.Nodes = list(live.nodes.values())
        rec.Outputs = outputs_from_history(history_result)
        rec.After = self._safe_snapshot(rec)
        if self._peak is not None:
            try:
                peak, method = self._peak[1](live.peak_start)
                rec.PeakVram.Bytes, rec.PeakVram.Method = peak, method
                rec.PeakVram.MB = round(peak / MIB, 1) if peak is not None else None
            except Exception as exc:
                rec.PeakVram.Method = f"unavailable: {type(exc).__name__}: {exc}"
        self.writer.submit(lambda: self._finish(rec))

    # --- reads (routes) ---

    def get(self, prompt_id: str) -> PromptRecord | None:
        """The newest state of a prompt: live, queued, recently finished, or from the store."""
        with self._lock:
            live = self._live.get(prompt_id)
            if live is not None:
                return live.record.model_copy(deep=True)
            finishing = self._finishing.get(prompt_id)
            if finishing is not None:
                return finishing.model_copy(update={"Outcome": "running"}, deep=True)
            rec = self._recent.get(prompt_id)
        if rec is not None:
            return rec
        return self.store.get(prompt_id)

    def recent(self, limit: int) -> list[PromptRecord]:
        """Newest prompts first: running and queued, then finished."""
        with self._lock:
            live = [lv.record.model_copy(deep=True) for lv in self._live.values()]
            live += [r.model_copy(update={"Outcome": "running"}, deep=True) for r in self._finishing.values()]
            done = list(reversed(self._recent.values()))
        out = live + done
        if len(out) < limit:
            seen = {r.PromptId for r in out}
            out += [r for r in self.store.recent(limit) if r.PromptId not in seen]
        return out[:limit]

    def final_json(self, prompt_id: str) -> bytes | None:
        """The serialized final record of a finished prompt (memory, then the store), or ``None``."""
        with self._lock:
            if prompt_id in self._live or prompt_id in self._finishing:
                return None  # running again (a reused prompt id): the old final body is not the answer
            body = self._final_json.get(prompt_id)
        return body if body is not None else self.store.final_json(prompt_id)

    # --- internals ---

    def _bump(self) -> None:
        with self._lock:
            self.version += 1

    def _get_live(self, prompt_id: str | None) -> _Live | None:
        with self._lock:
            pid = prompt_id or self.current_prompt_id
            return self._live.get(pid) if pid else None

    def _apply_tags(self, rec: PromptRecord, tags: dict[str, Any]) -> None:
        if not tags:
            return
        rec.Tags.update(tags)
        if tags.get("run_id"):
            rec.RunId = str(tags["run_id"])
        if tags.get("scene_id") is not None and str(tags.get("scene_id")) != "":
            rec.SceneId = str(tags["scene_id"])

    def _safe_snapshot(self, rec: PromptRecord) -> Snapshot | None:
        try:
            snap = self._snapshot()
        except Exception as exc:  # telemetry never fails a prompt
            note = f"snapshot failed: {type(exc).__name__}: {exc}"
            if note not in rec.FallbackNotes:
                rec.FallbackNotes.append(note)
            return None
        for note in (snap or {}).get("FallbackNotes") or []:
            if note not in rec.FallbackNotes:
                rec.FallbackNotes.append(note)
        return snap

    def _finish(self, rec: PromptRecord) -> None:
        for name, fn in self._finishers:
            try:
                fn(rec)
            except Exception as exc:
                logger.exception("Run Telemetry: finishing step %s failed for prompt %s", name, rec.PromptId)
                rec.FallbackNotes.append(f"{name} failed: {type(exc).__name__}: {exc}")
        rec.Workflow = None  # needed only by the finishers (retry); keeps stored records small
        self._persist(rec, publish=False)
        body = rec.model_dump_json(exclude={"Workflow"}).encode()
        with self._lock:
            self._recent[rec.PromptId] = rec
            self._final_json[rec.PromptId] = body
            while len(self._final_json) > self._recent_size:
                self._final_json.popitem(last=False)
            self._finishing.pop(rec.PromptId, None)
            self.version += 1
            while len(self._recent) > self._recent_size:
                self._recent.popitem(last=False)
        self._publish(rec)

    def _persist(self, rec: PromptRecord, *, publish: bool) -> None:
        if rec.Outcome not in FINAL_OUTCOMES:
            # A queued/running write that lands after the prompt finished must not overwrite the final record.
            with self._lock:
                if rec.PromptId in self._recent:
                    return
                if rec.PromptId in self._finishing:
                    # Ended on the worker, final write queued behind this one: still store the running row, so a
                    # kill while its markers are written leaves a row the next start marks as cut off; only the
                    # stale "running" event is not published.
                    publish = False
        try:
            self.store.put(rec)
        except Exception as exc:
            logger.exception("Run Telemetry: could not store prompt %s", rec.PromptId)
            rec.FallbackNotes.append(f"store write failed: {type(exc).__name__}: {exc}")
        if publish:
            self._publish(rec)

    def _publish(self, rec: PromptRecord) -> None:
        for fn in self._listeners:
            try:
                fn(rec)
            except Exception:
                logger.exception("Run Telemetry: a listener failed")
