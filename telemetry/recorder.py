"""The recorder: turns ComfyUI lifecycle events into prompt records, hands finished ones to the writer."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .records import (
    FINAL_OUTCOMES,
    UNRUN_OUTCOMES,
    MarkerState,
    NodeTiming,
    OutputRef,
    PromptError,
    PromptRecord,
    Span,
    iso,
)
from .runs import run_id_problem
from .sanitize import TAG_LIMITS, clean_value, tags_problem
from .store import Store
from .writer import Writer

logger = logging.getLogger("run_telemetry.recorder")

MIB = 1048576.0
# A prompt's "running" row (and event) is written once it has run this long: a kill leaves that row for the next
# start to mark as cut off. Shorter prompts get only their final row, and their recording costs no write while they
# run (the write's GIL time would otherwise come out of the prompt's own time).
RUNNING_ROW_DELAY = 0.05
TAG_NODE = "TelemetryCapture"
# The longest a prompt's markers wait for its running row to reach the store (kill -9 recovery needs the row: the next
# start marks the prompt cut off and removes a half-written marker's temp file). A store that is locked, slow or in
# trouble costs the markers at most this, once; while the store reports a problem they do not wait at all.
MARKER_STORE_WAIT_SECONDS = 0.1
# Levels kept when a whole record has to be reduced: the tag limit plus the record's own nesting.
RECORD_MAX_DEPTH = TAG_LIMITS.max_depth + 8

Snapshot = dict[str, Any]
Finisher = Callable[[PromptRecord], None]
# Called on the writer thread before the finishers: ``None`` to go on, or seconds after which to ask again.
Gate = Callable[[PromptRecord], float | None]
Listener = Callable[[PromptRecord], None]


class QueuedPrompt(Protocol):
    """What the recorder reads of a prompt ComfyUI's queue accepted (``hooks.queue.QueueItem`` has this shape)."""

    prompt_id: str
    prompt: Mapping[str, Any]
    extra_data: Mapping[str, Any]
    outputs_to_execute: list[str]


AcceptHook = Callable[[PromptRecord, QueuedPrompt], None]


@dataclass
class _Live:
    """What the recorder holds for a prompt between its start and its end.

    ``nodes`` holds plain ``(seconds, calls, class type or None)`` tuples: the per-node path runs on ComfyUI's prompt
    worker once per node, so it does no model building; the records are made on the writer thread at the end.
    Tuples of plain values, not lists: Python's collector stops tracking them at its first look, so they never add
    to the objects that make a full collection of ComfyUI's whole heap due (bench/README.md, "overhead").
    """

    record: PromptRecord
    started_perf: float = 0.0
    nodes: dict[str, tuple[float, int, str | None]] = field(default_factory=dict)
    dynprompt: Any = None
    spans_open: dict[tuple[str, str], tuple[float, Snapshot]] = field(default_factory=dict)
    peak_start: Any = None
    row_written: bool = False  # the "running" row is in the store (written by the writer thread)


@dataclass(frozen=True)
class _End:
    """What the prompt worker captures when the executor returns; the rest of the work is the writer's."""

    perf: float
    clock: float
    messages: list[Any]
    outputs: dict[str, Any]
    exception: BaseException | None
    after: Snapshot | None
    peak: tuple[int | None, str] | None
    peak_error: str | None


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


def node_timings(
    nodes: Mapping[str, list[Any]], cached: set[str], workflow: Mapping[str, Any], dynprompt: Any = None
) -> list[NodeTiming]:
    """NodeTiming records from the worker's ``[seconds, calls, class type]`` lists, plus ComfyUI's cached nodes."""

    def class_of(node_id: str) -> str:
        node = workflow.get(node_id)
        if isinstance(node, Mapping):
            return str(node.get("class_type", ""))
        if dynprompt is not None:  # a node another node expanded into (not in the submitted prompt)
            try:
                return str(dynprompt.get_node(node_id).get("class_type", ""))
            except Exception:
                return ""
        return ""

    # model_construct: the values are already the declared types (no validation needed, 40 nodes × a few µs saved)
    out = [
        NodeTiming.model_construct(
            NodeId=node_id,
            ClassType=ct if ct is not None else class_of(node_id),
            Seconds=round(float(seconds), 6),
            Calls=int(calls),
            Cached=node_id in cached,
        )
        for node_id, (seconds, calls, ct) in nodes.items()
    ]
    out += [
        NodeTiming.model_construct(NodeId=n, ClassType=class_of(n), Seconds=0.0, Calls=0, Cached=True)
        for n in cached
        if n not in nodes
    ]
    return out


# What a listing (GET /telemetry, PromptRecord.summary) does not show: copying large tags for it made it slow.
_LISTING_EXCLUDE = frozenset({"Workflow", "Tags", "Before", "After", "Nodes", "Outputs"})


def dump_record(rec: PromptRecord) -> tuple[PromptRecord, str]:
    """(record, its JSON without the workflow): ``rec`` itself when it serialises, else a reduced copy with a note.

    A record can hold a value no JSON writer accepts (a lone surrogate, nesting past the serialiser's limit) that
    reached it by a way the submission checks do not cover: it is then stored and served with such values escaped or
    cut (``sanitize.clean_value``), so one client's value never stops another's record, route or marker.
    """
    try:
        return rec, rec.model_dump_json(exclude={"Workflow"})
    except Exception as exc:  # pydantic-core's serialisation error, RecursionError, UnicodeEncodeError …
        reason = f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        data = clean_value(rec.model_dump(mode="python", exclude={"Workflow"}), max_depth=RECORD_MAX_DEPTH)
        reduced = PromptRecord.model_validate(data)
    except Exception as exc:  # the record's own shape is broken: keep what identifies it
        reduced = PromptRecord(
            PromptId=str(clean_value(rec.PromptId)),
            Outcome=rec.Outcome,
            FallbackNotes=[f"record could not be rebuilt: {type(exc).__name__}"],
        )
    note = f"record reduced for storage: a value could not be serialised ({reason}); such values are escaped or cut"
    reduced.FallbackNotes.append(str(clean_value(note)))
    logger.warning("Run Telemetry: record of prompt %r reduced for storage: %s", reduced.PromptId, reason)
    return reduced, reduced.model_dump_json(exclude={"Workflow"})


def _kept(rec: PromptRecord) -> PromptRecord:
    """The form a finished record is kept in memory for listings (``GET /telemetry``): without the workflow, tags,
    snapshots, node timings and outputs, which the kept JSON body has (``Recorder.get`` parses it).

    A shallow copy: the nested objects it keeps are the final record's own, which nothing changes any more. Each
    finished record stays in memory for the next ``recent_size`` prompts, so Python's collector promotes what it
    holds to its oldest generation; the fewer objects, the rarer a full collection of ComfyUI's whole heap (~0.4 s
    on the bench machine; bench/README.md, "overhead").
    """
    return rec.model_copy(
        update={"Workflow": None, "Tags": {}, "Before": None, "After": None, "Nodes": [], "Outputs": []}
    )


def _copy(rec: PromptRecord, *, running: bool = False, listing: bool = False) -> PromptRecord:
    """A reader's copy of a record another thread may be changing: one serialization (atomic under the GIL)."""
    try:
        body = rec.model_dump_json(exclude=_LISTING_EXCLUDE if listing else {"Workflow"})
    except Exception:  # a value no JSON writer accepts: the reduced copy (never a 500 for every reader)
        body = dump_record(rec)[1]
    copy = PromptRecord.model_validate_json(body)
    if running:
        copy.Outcome = "running"
    return copy


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
        # Runs on the prompt worker for every node of every prompt: the cheap test first.
        if type(node) is not dict and not isinstance(node, Mapping):
            continue
        if node.get("class_type") != TAG_NODE:
            continue
        inputs = node.get("inputs") or {}
        for key in ("run_id", "scene_id"):
            val = inputs.get(key)
            # Same rule as VALIDATE_INPUTS and extra_data: an id with path parts never becomes a run or scene.
            if isinstance(val, str) and val.strip() and key not in tags and run_id_problem(val.strip()) is None:
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
        running_row_delay: float = RUNNING_ROW_DELAY,
        store_writer: Writer | None = None,
        marker_store_wait: float = MARKER_STORE_WAIT_SECONDS,
    ) -> None:
        """``writer`` runs the finishing steps (markers first); ``store_writer`` (default: the same thread) runs every
        store write, so a slow, locked or failing store never holds up a marker."""
        self.store = store
        self.writer = writer
        self.store_writer = store_writer or writer
        self.marker_store_wait = marker_store_wait
        # Rows for the store thread, written together: the rows that wait while it writes go in one transaction.
        self._rows: list[tuple[tuple[Any, ...], threading.Event | None, Callable[[], None] | None]] = []
        self._rows_lock = threading.Lock()
        self._rows_flush_due = False
        # monotonic time of the last prompt start or end, or node return: the health check's "nothing ran since"
        self.last_activity = time.monotonic()
        self._snapshot = snapshot
        self._clock = clock
        self._perf = perf
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        # Accepted into ComfyUI's queue, not started yet (readers see them "queued" from the moment of acceptance).
        self._queued: dict[str, PromptRecord] = {}
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
        self._gates: list[tuple[str, Gate]] = []
        self._start_hooks: list[Callable[[PromptRecord, Mapping[str, Any]], None]] = []
        self._accept_hooks: list[AcceptHook] = []
        self._listeners: list[Listener] = []
        self.current_prompt_id: str | None = None
        self._peak = peak
        self.running_row_delay = running_row_delay
        # Record order (store, pruning, latest attempt): a counter, so a clock stepped back changes nothing.
        self._seq = itertools.count(int(getattr(store, "last_seq", 0) or 0) + 1)

    # --- wiring ---

    def add_finisher(self, name: str, fn: Finisher, *, first: bool = False) -> None:
        """Run ``fn(record)`` on the writer thread before a finished record is stored (markers, contract block)."""
        if first:
            self._finishers.insert(0, (name, fn))
        else:
            self._finishers.append((name, fn))

    def add_gate(self, name: str, fn: Gate) -> None:
        """Hold a finished record before its finishers until ``fn(record)`` returns ``None``.

        ``fn`` runs on the writer thread and returns seconds to wait before it is asked again (late output files,
        an earlier prompt's marker at the same prefix): a delayed writer job, so nothing blocks meanwhile, and the
        record stays "running" to readers until every gate has passed. Gates are asked in order; a failing gate is
        noted on the record and passed.
        """
        self._gates.append((name, fn))

    def add_start_hook(self, fn: Callable[[PromptRecord, Mapping[str, Any]], None]) -> None:
        """Run ``fn(record, prompt)`` on the worker thread when a prompt starts (kept cheap)."""
        self._start_hooks.append(fn)

    def add_accept_hook(self, fn: AcceptHook) -> None:
        """Run ``fn(record, item)`` when ComfyUI's queue accepts a prompt (aiohttp's thread: quick, no store writes).

        ``record`` is the new ``queued`` record (tags, run and scene already set; hooks may add markers, notes, tags);
        ``item`` is the queue entry (``prompt_id``, ``prompt``, ``extra_data``, ``outputs_to_execute``).
        """
        self._accept_hooks.append(fn)

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(record)`` after a record is stored (queued, started, finished)."""
        self._listeners.append(fn)

    # --- lifecycle (called by the ComfyUI adapter) ---

    def accepted(self, item: QueuedPrompt) -> PromptRecord:
        """ComfyUI's queue accepted a prompt (aiohttp's thread, before the prompt worker can see it).

        Makes the ``queued`` record (tags from ``extra_data.telemetry`` and the graph, run and scene, ``QueuedAt``),
        visible to readers at once; runs the accept hooks; its row is stored later by the writer thread (and not at
        all when the prompt starts first: the running row follows). Returns the record.
        """
        prompt_id = str(item.prompt_id)
        extra = item.extra_data if isinstance(item.extra_data, Mapping) else {}
        rec = PromptRecord(PromptId=prompt_id, Outcome="queued", Seq=next(self._seq))
        client = extra.get("client_id")
        rec.ClientId = client if isinstance(client, str) else None
        queued_ms = extra.get("create_time") or extra.get("run_telemetry_queued_ms")
        rec.QueuedAt = iso(queued_ms / 1000.0 if isinstance(queued_ms, int | float) else self._clock())
        self._apply_tags(rec, self._tags(item.prompt, extra))
        rec.Workflow = item.prompt if isinstance(item.prompt, dict) else dict(item.prompt or {})
        rec.Submission = {
            "extra_data": dict(extra),
            "outputs_to_execute": list(item.outputs_to_execute or ()),
            "sensitive": dict(getattr(item, "sensitive", None) or {}),
        }
        for hook in self._accept_hooks:
            try:
                hook(rec, item)
            except Exception as exc:
                logger.exception("Run Telemetry: accept hook failed for prompt %s", prompt_id)
                rec.FallbackNotes.append(f"accept hook {getattr(hook, '__name__', hook)} failed: {exc}")
        with self._lock:
            # A reused id: the older execution's record stays in the store; readers now see this one.
            self._recent.pop(prompt_id, None)
            self._final_json.pop(prompt_id, None)
            self._queued[prompt_id] = rec
            self.version += 1
        self.store_writer.submit_after(self.running_row_delay, lambda: self._persist_queued(rec))
        return rec

    def started(self, prompt_id: str, prompt: Mapping[str, Any] | None, extra_data: Mapping[str, Any] | None) -> None:
        """The worker picked the prompt up: snapshot before, queue wait; continues the ``queued`` record if any."""
        extra = extra_data if isinstance(extra_data, Mapping) else {}
        now = self._clock()
        with self._lock:
            rec = self._queued.pop(prompt_id, None)
            if rec is None:
                self._recent.pop(prompt_id, None)
            self._final_json.pop(prompt_id, None)
        if rec is None:  # not seen accepted (the queue hook is off): tags from here, as before
            rec = PromptRecord(PromptId=prompt_id, Seq=next(self._seq))
            rec.ClientId = extra.get("client_id")
            rec.Submission = {"extra_data": dict(extra)}
            self._apply_tags(rec, self._tags(prompt, extra))
        rec.Outcome = "running"
        queued_ms = extra.get("create_time") or extra.get("run_telemetry_queued_ms")
        if isinstance(queued_ms, int | float):
            rec.QueuedAt = iso(queued_ms / 1000.0)
            rec.QueueWaitSeconds = round(max(0.0, now - queued_ms / 1000.0), 6)
        rec.StartedAt = iso(now)
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
        self.last_activity = time.monotonic()
        # No copy here: the writer serializes the live record in one pydantic-core call, which holds the GIL, so
        # it sees either all or none of a concurrent change made on this thread (a span, a marker, a note).
        self.store_writer.submit_after(self.running_row_delay, lambda: self._persist_running(live))

    def node_called(
        self, prompt_id: str | None, node_id: str, class_type: str | None, seconds: float, dynprompt: Any = None
    ) -> None:
        """One call of ComfyUI's per-node ``execute`` returned after ``seconds``.

        The hot path: called on the prompt worker once per node, so it only adds to a list. ``class_type`` may be
        ``None``; it is then looked up at the end, in the workflow or in ``dynprompt`` (ComfyUI's DynamicPrompt,
        which also knows the nodes a node expanded into).
        """
        # dict.get is atomic under the GIL; the lock is only needed to pick the current prompt.
        live = self._live.get(prompt_id) if prompt_id else None
        if live is None:
            live = self._get_live(prompt_id)
            if live is None:
                return
        t = live.nodes.get(node_id)
        live.nodes[node_id] = (seconds, 1, class_type) if t is None else (t[0] + seconds, t[1] + 1, t[2])
        if dynprompt is not None and live.dynprompt is None:
            live.dynprompt = dynprompt
        self.last_activity = time.monotonic()

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
        """The executor returned: take the time and the snapshot after; the writer builds the final record."""
        end_perf = self._perf()
        self.last_activity = time.monotonic()
        now = self._clock()
        with self._lock:
            live = self._live.pop(prompt_id, None)
            if self.current_prompt_id == prompt_id:
                self.current_prompt_id = None
            if live is not None:
                self._finishing[prompt_id] = live.record
            self.version += 1
        if live is None:
            return
        after = self._safe_snapshot(live.record)
        peak = peak_error = None
        if self._peak is not None:
            try:
                peak = self._peak[1](live.peak_start)
            except Exception as exc:
                peak_error = f"unavailable: {type(exc).__name__}: {exc}"
        end = _End(
            perf=end_perf,
            clock=now,
            messages=list(status_messages or []),
            outputs=dict((history_result or {}).get("outputs") or {}),
            exception=exception,
            after=after,
            peak=peak,
            peak_error=peak_error,
        )
        self.writer.submit(lambda: self._finish(live, end))

    def dropped(self, items: list[QueuedPrompt], outcome: str, note: str) -> list[str]:
        """Queued prompts that will never run (``cancelled``: removed from the queue): final records, at once.

        Each goes through the same finishing steps as a prompt that ended (markers get a ``.failed`` naming
        ``outcome``, the contract block, the store, the listeners and so the waiters), on the writer thread; readers
        see the final outcome as soon as those steps are done. Returns the prompt ids.
        """
        if outcome not in UNRUN_OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(UNRUN_OUTCOMES)}, not {outcome!r}")
        now = self._clock()
        done = []
        for item in items:
            prompt_id = str(item.prompt_id)
            with self._lock:
                rec = self._queued.pop(prompt_id, None)
            if rec is None:  # accepted before the hook was wired, or its accept failed: from the queue entry
                rec = self.accepted(item)
                with self._lock:
                    self._queued.pop(prompt_id, None)
            self.finish_unrun(rec, outcome, note, now=now)
            done.append(prompt_id)
        return done

    def finish_unrun(self, rec: PromptRecord, outcome: str, note: str, *, now: float | None = None) -> None:
        """Finish a record of a prompt that never ran as ``outcome`` (``cancelled`` or ``lost``), on the writer."""
        rec.Outcome = outcome  # type: ignore[assignment]
        rec.EndedAt = iso(self._clock() if now is None else now)
        rec.Error = PromptError(ExceptionType=outcome.capitalize(), Message=note)
        rec.FallbackNotes.append(note)
        with self._lock:
            self._finishing[rec.PromptId] = rec
            self.version += 1
        self.writer.submit(lambda: self._finalize(rec))

    def tag_running(self, tags: Mapping[str, Any], prompt_id: str | None = None) -> None:
        """Tags a node computed while the prompt runs (inputs by link): each applies where none was set before."""
        live = self._get_live(prompt_id)
        if live is None:
            return
        fresh = {k: v for k, v in tags.items() if v not in (None, "", 0) and k not in live.record.Tags}
        if fresh:
            self._apply_tags(live.record, fresh)
            self._bump()

    def live_record(self, prompt_id: str | None) -> PromptRecord | None:
        """The record of a running prompt (``None``: the current one), for the node adapters to amend; or ``None``."""
        live = self._get_live(prompt_id)
        return live.record if live is not None else None

    # --- reads (routes) ---

    def get(self, prompt_id: str) -> PromptRecord | None:
        """The newest state of a prompt: live, queued, recently finished, or from the store."""
        with self._lock:
            live = self._live.get(prompt_id)
            if live is not None:
                return _copy(live.record)
            finishing = self._finishing.get(prompt_id)
            if finishing is not None:
                # Final only once the finishing steps ran (its .done/.failed on disk, so a waiter can read it next):
                # until then one that ran reads "running", one that never ran (cancelled, lost) "queued".
                copy = _copy(finishing, running=True)
                if finishing.Outcome in UNRUN_OUTCOMES:
                    copy.Outcome = "queued"
                return copy
            queued = self._queued.get(prompt_id)
            if queued is not None:
                return _copy(queued)
            rec = self._recent.get(prompt_id)
            body = self._final_json.get(prompt_id) if rec is not None else None
        if body is not None:
            return PromptRecord.model_validate_json(body)  # the whole record (memory keeps the listing form)
        stored = self.store.get(prompt_id)
        return stored if stored is not None else rec

    def recent(self, limit: int) -> list[PromptRecord]:
        """Newest prompts first: running and queued, then finished (live ones as listing copies: no tags, no
        snapshots, no node timings; what ``PromptRecord.summary`` shows)."""
        with self._lock:
            live = [_copy(lv.record, listing=True) for lv in self._live.values()]
            live += [_copy(r, running=r.Outcome not in UNRUN_OUTCOMES, listing=True) for r in self._finishing.values()]
            # A long queue: only the newest ``limit`` are copied.
            live += [_copy(r, listing=True) for r in itertools.islice(reversed(self._queued.values()), limit)]
            done = list(reversed(self._recent.values()))
        out = live + done
        if len(out) < limit:
            seen = {r.PromptId for r in out}
            out += [r for r in self.store.recent(limit) if r.PromptId not in seen]
        return out[:limit]

    def known(self, prompt_id: str) -> bool:
        """Whether ``prompt_id`` was already recorded: queued, running, finished (memory or store)."""
        with self._lock:
            if (
                prompt_id in self._queued
                or prompt_id in self._live
                or prompt_id in self._finishing
                or prompt_id in self._recent
            ):
                return True
        try:
            return self.store.has(prompt_id)
        except Exception:  # a store that cannot be read: memory is all there is
            logger.debug("store lookup of %s failed", prompt_id, exc_info=True)
            return False

    def final_json(self, prompt_id: str) -> bytes | None:
        """The serialized final record of a finished prompt (memory, then the store), or ``None``."""
        with self._lock:
            if prompt_id in self._live or prompt_id in self._finishing or prompt_id in self._queued:
                return None  # queued or running again (a reused prompt id): the old final body is not the answer
            body = self._final_json.get(prompt_id)
            if body is not None:
                self._final_json.move_to_end(prompt_id)  # least recently used goes first
                return body
            version = self.version
        body = self.store.final_json(prompt_id)
        if body is not None:
            with self._lock:
                # Only if nothing changed meanwhile (the id may have started again): final bodies never change.
                if self.version == version:
                    self._final_json[prompt_id] = body
                    while len(self._final_json) > self._recent_size:
                        self._final_json.popitem(last=False)
        return body

    # --- internals ---

    def _bump(self) -> None:
        with self._lock:
            self.version += 1

    def _get_live(self, prompt_id: str | None) -> _Live | None:
        with self._lock:
            pid = prompt_id or self.current_prompt_id
            return self._live.get(pid) if pid else None

    @staticmethod
    def _tags(prompt: Mapping[str, Any] | None, extra: Mapping[str, Any]) -> dict[str, Any]:
        tags = tags_from_graph(prompt)
        client_tags = extra.get("telemetry")
        if isinstance(client_tags, Mapping):
            tags.update({k: v for k, v in client_tags.items() if v is not None})  # the client's tags win
        return tags

    def _apply_tags(self, rec: PromptRecord, tags: dict[str, Any]) -> None:
        if not tags:
            return
        problem = tags_problem(tags, "tags")
        if problem is not None:  # refused at POST /prompt; this prompt came by another way (or an older queue)
            tags = clean_value(tags)
            rec.FallbackNotes.append(str(clean_value(f"tags reduced: {problem[1]}")))
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

    def _complete(self, live: _Live, end: _End) -> PromptRecord:
        """Fill the final record from what the worker captured (writer thread; the worker no longer touches it)."""
        rec = live.record
        rec.DurationSeconds = round(end.perf - live.started_perf, 6)
        rec.EndedAt = iso(end.clock)
        outcome, data, success_at = outcome_from_messages(end.messages)
        if end.exception is not None:
            # asyncio.CancelledError (newer ComfyUI's event loop cancelled) and KeyboardInterrupt stopped the prompt
            # from outside: interrupted, naming the exception. Anything else (an Exception, SystemExit from a node
            # that ends the worker thread) is an error.
            stopped = isinstance(end.exception, asyncio.CancelledError | KeyboardInterrupt)
            outcome = "interrupted" if stopped else "error"
            exc_type = type(end.exception).__name__
            data = {
                "exception_message": str(end.exception) or f"prompt ended by {exc_type}",
                "exception_type": exc_type,
            }
        rec.Outcome = outcome  # type: ignore[assignment]
        if success_at is not None:
            rec.ExecutionSuccessAt = iso(success_at)
        if outcome != "success":
            # A node's own text (its exception message) goes into records and .failed markers: made valid text here.
            rec.Error = PromptError(
                NodeId=clean_value(str(data["node_id"])) if data.get("node_id") is not None else None,
                NodeType=clean_value(data.get("node_type")),
                ExceptionType=clean_value(data.get("exception_type"))
                or ("Interrupted" if outcome == "interrupted" else None),
                Message=clean_value(data.get("exception_message"))
                or ("Interrupted by the user" if outcome == "interrupted" else None),
            )
        cached = set(cached_nodes(end.messages))
        rec.Nodes = node_timings(live.nodes, cached, rec.Workflow or {}, live.dynprompt)
        rec.Outputs = outputs_from_history({"outputs": end.outputs})
        rec.After = end.after
        if end.peak is not None:
            peak, method = end.peak
            rec.PeakVram.Bytes, rec.PeakVram.Method = peak, method
            rec.PeakVram.MB = round(peak / MIB, 1) if peak is not None else None
        elif end.peak_error is not None:
            rec.PeakVram.Method = end.peak_error
        return rec

    def _finish(self, live: _Live, end: _End) -> None:
        if live.record.Markers and not live.row_written:
            self._running_row_before_markers(live)
        try:
            rec = self._complete(live, end)
        except Exception as exc:  # never lose the prompt: store what there is, say why the rest is missing
            logger.exception("Run Telemetry: building the record of prompt %s failed", live.record.PromptId)
            rec = live.record
            if rec.Outcome not in FINAL_OUTCOMES:
                rec.Outcome = "error"
            rec.FallbackNotes.append(f"record incomplete: {type(exc).__name__}: {exc}")
        self._pass_gates(rec, 0)

    def _pass_gates(self, rec: PromptRecord, start: int) -> None:
        """Ask the gates from ``start`` on; finish the record once all have passed (writer thread)."""
        for index in range(start, len(self._gates)):
            name, gate = self._gates[index]
            try:
                delay = gate(rec)
            except Exception as exc:
                logger.exception("Run Telemetry: gate %s failed for prompt %s", name, rec.PromptId)
                rec.FallbackNotes.append(f"{name} failed: {type(exc).__name__}: {exc}")
                delay = None
            if delay is not None:
                self.writer.submit_after(max(0.0, delay), lambda i=index: self._pass_gates(rec, i))
                return
        self._finalize(rec)

    def _finalize(self, rec: PromptRecord) -> None:
        """Run the finishers (markers first), publish the final record, hand it to the store (writer thread)."""
        prompt_id = rec.PromptId
        try:
            for name, fn in self._finishers:
                try:
                    fn(rec)
                except Exception as exc:
                    logger.exception("Run Telemetry: finishing step %s failed for prompt %s", name, rec.PromptId)
                    rec.FallbackNotes.append(f"{name} failed: {type(exc).__name__}: {exc}")
            rec.Workflow = rec.Submission = None  # needed only by the finishers (retry); keeps stored records small
            rec, body = dump_record(rec)
        except Exception as exc:  # last resort: the prompt must leave "finishing" whatever happened above
            logger.exception("Run Telemetry: finishing prompt %s failed", prompt_id)
            rec = PromptRecord(
                PromptId=str(clean_value(prompt_id)),
                Outcome=rec.Outcome if rec.Outcome in FINAL_OUTCOMES else "error",
                Seq=rec.Seq,
                FallbackNotes=[f"record lost while finishing: {type(exc).__name__}"],
            )
            body = rec.model_dump_json(exclude={"Workflow"})
        with self._lock:
            self._recent[rec.PromptId] = _kept(rec)
            self._final_json[rec.PromptId] = body.encode()
            while len(self._final_json) > self._recent_size:
                self._final_json.popitem(last=False)
            self._finishing.pop(prompt_id, None)
            self._finishing.pop(rec.PromptId, None)
            self.version += 1
            while len(self._recent) > self._recent_size:
                self._recent.popitem(last=False)
            row = (rec.PromptId, rec.RunId, rec.SceneId, rec.Outcome, body, rec.Seq)
            # Handed over under the lock that ends the prompt: a queued or running row the store thread hands over
            # (it checks under this lock that the prompt has not ended) is always before it, never after.
            submit = self.store_writer is not self.writer and self._append_row(row)
        # Readers see the final record (and the markers it names) now; the store has it once its thread gets to it.
        self._publish(rec)
        if self.store_writer is self.writer:
            self._store_row(*row)
        elif submit:
            self.store_writer.submit(self._flush_rows)

    def _running_row_before_markers(self, live: _Live) -> None:
        """Store the running row of a prompt whose markers are about to be written, waiting a bounded moment only.

        A kill in the middle of the marker write must find this prompt's row after the restart (to mark it cut off
        and remove the half-written temp file), even for a prompt under the running-row delay. The markers wait for
        it at most ``marker_store_wait`` seconds, and not at all while the store reports a problem (locked, damaged,
        in memory) or its thread is still busy with an earlier write: the row still follows on the store's thread,
        before the final row.
        """
        with self._lock:
            if live.row_written:
                return
            live.row_written = True
        rec = live.record
        _, body = dump_record(rec)  # on this thread: the record is not changing now (the worker has let go of it)
        row = (rec.PromptId, rec.RunId, rec.SceneId, "running", body, rec.Seq)
        if self.store_writer is self.writer:
            self._store_row(*row)
            return
        stored = threading.Event()
        busy = self.store_writer.busy_seconds()  # the store's thread, stuck on an earlier write: not worth a wait
        self._queue_row(row, stored)
        health = getattr(self.store, "health", None)
        if (health is None or health().Ok) and (busy is None or busy < self.marker_store_wait):
            stored.wait(self.marker_store_wait)

    def _persist_queued(self, rec: PromptRecord) -> None:
        """Store the row of a prompt still queued (the next start marks it ``lost`` if ComfyUI stops first)."""

        def publish() -> None:
            # Still queued: else its running or final event went out already and this one would undo it.
            with self._lock:
                current = self._queued.get(rec.PromptId) is rec
            if current:
                self._publish(PromptRecord.model_validate_json(body))

        with self._lock:
            if self._queued.get(rec.PromptId) is not rec:
                return  # started (its running row follows) or dropped (its final row follows) meanwhile
            # Under the lock: started() takes the record out under it before changing it, so this is a clean view.
            body = dump_record(rec)[1]
            if self.store_writer is self.writer:
                submit = False
            else:  # handed over under the lock too: the prompt's later rows come after this one
                submit = self._append_row((rec.PromptId, rec.RunId, rec.SceneId, "queued", body, rec.Seq), then=publish)
        if self.store_writer is self.writer:
            self._store(rec, body, outcome="queued", then=publish)
        elif submit:
            self.store_writer.submit(self._flush_rows)

    def _persist_running(self, live: _Live, *, publish: bool = True) -> None:
        """Store the row of a prompt still running (a kill leaves it for the next start to mark as cut off)."""
        rec = live.record
        with self._lock:
            if live.row_written:
                return
            if self._live.get(rec.PromptId) is not live:
                if publish:
                    return  # it ended before the delay: its final row follows, the running one is not needed
                # Called by _finish itself (markers are about to be written): keep the row, without the event.
            live.row_written = True
        _, body = dump_record(rec)  # one call: a consistent view (see started)

        def then() -> None:
            # Still running: else the final event went out already and this one would undo it.
            with self._lock:
                current = self._live.get(rec.PromptId) is live
            if current:
                self._publish(PromptRecord.model_validate_json(body))

        row = (rec.PromptId, rec.RunId, rec.SceneId, "running", body, rec.Seq)
        if self.store_writer is self.writer:
            self._store_row(*row)
            if publish:
                then()
            return
        with self._lock:
            # Handed over under the lock, and only while the prompt has not ended: its final row (handed over under
            # this lock once it ended) must come after this one, or the store would keep "running" for good.
            if self._live.get(rec.PromptId) is not live and self._finishing.get(rec.PromptId) is not rec:
                return
            submit = self._append_row(row, then=then if publish else None)
        if submit:
            self.store_writer.submit(self._flush_rows)

    def _store(
        self, rec: PromptRecord, body: str, *, outcome: str | None = None, then: Callable[[], None] | None = None
    ) -> None:
        """Store thread: the row of ``rec`` with ``body`` (with the rows waiting beside it, in one transaction);
        ``then`` runs once it is stored (the event of a queued or running row follows its row, as readers expect)."""
        row = (rec.PromptId, rec.RunId, rec.SceneId, outcome or rec.Outcome, body, rec.Seq)
        if self.store_writer is self.writer:
            self._store_row(*row)
            if then is not None:
                then()
        else:
            self._queue_row(row, then=then)

    def _queue_row(
        self, row: tuple[Any, ...], stored: threading.Event | None = None, *, then: Callable[[], None] | None = None
    ) -> None:
        """Hand a row to the store thread; ``stored`` is set, and ``then`` called, once it was written (or failed)."""
        if self._append_row(row, stored, then=then):
            self.store_writer.submit(self._flush_rows)

    def _append_row(
        self, row: tuple[Any, ...], stored: threading.Event | None = None, *, then: Callable[[], None] | None = None
    ) -> bool:
        """Add a row to the store thread's batch; True when the caller must submit the flush job."""
        with self._rows_lock:
            self._rows.append((row, stored, then))
            if self._rows_flush_due:
                return False  # the flush already queued takes this row too
            self._rows_flush_due = True
            return True

    def _flush_rows(self) -> None:
        """Store thread: every row waiting, in order, in one transaction (one row: as before)."""
        with self._rows_lock:
            rows, self._rows = self._rows, []
            self._rows_flush_due = False
        try:
            put_many = getattr(self.store, "put_json_many", None)
            written = False
            if len(rows) > 1 and put_many is not None:
                try:
                    put_many([row for row, _, _ in rows])
                    written = True
                except Exception as exc:  # one bad row must not lose the others: one by one, as before
                    logger.warning("Run Telemetry: storing %d rows together failed (%s); one by one", len(rows), exc)
            if not written:
                for row, _, _ in rows:
                    self._store_row(*row)
        finally:
            for _, stored, then in rows:
                if stored is not None:
                    stored.set()
                if then is not None:
                    try:
                        then()
                    except Exception:
                        logger.exception("Run Telemetry: publishing after a store write failed")

    def _store_row(
        self, prompt_id: str, run_id: str | None, scene_id: str | None, outcome: str, body: str, seq: int | None
    ) -> None:
        """Store thread: one row. A store problem is handled (and shown) by the store; this logs what is left."""
        try:
            self.store.put_json(prompt_id, run_id, scene_id, outcome, body, seq=seq)
        except Exception as exc:
            logger.warning("Run Telemetry: could not store prompt %s: %s: %s", prompt_id, type(exc).__name__, exc)

    def _publish(self, rec: PromptRecord) -> None:
        for fn in self._listeners:
            try:
                fn(rec)
            except Exception:
                logger.exception("Run Telemetry: a listener failed")
