"""What happens around a prompt's end, wired into the recorder: markers, the contract block, the websocket event."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ..telemetry.atomic import MarkerWriteError, remove_stale_temps
from ..telemetry.contract import gpu_block, telemetry_block
from ..telemetry.markers import (
    DoneMarker,
    FailedMarker,
    MarkerTelemetry,
    clear_markers,
    describe_outputs,
    marker_paths,
    write_done_marker,
    write_failed_marker,
)
from ..telemetry.paths import UnsafePrefixError, resolve_prefix
from ..telemetry.records import MarkerState, PromptRecord
from .runtime import Runtime

logger = logging.getLogger("run_telemetry")

MARKER_NODE = "WriteDoneMarker"
FAILED_MARKER_OUTCOMES = frozenset({"interrupted", "cancelled", "lost"})
EVENT = "telemetry.prompt"


def declared_markers(prompt: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(node id, literal prefix, sha256) of every WriteDoneMarker in an API prompt."""
    found = []
    for node_id, node in prompt.items():
        if isinstance(node, Mapping) and node.get("class_type") == MARKER_NODE:
            inputs = node.get("inputs") or {}
            prefix = inputs.get("filename_prefix")
            if isinstance(prefix, str):
                found.append((str(node_id), prefix, bool(inputs.get("sha256") is True)))
    return found


def _parse_iso(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def declare_at_accept(rec: PromptRecord, prompt: Mapping[str, Any]) -> None:
    """Declare the literal marker prefixes of the prompt on its record (a prompt that never runs still gets them)."""
    known = {m.NodeId for m in rec.Markers}
    for node_id, prefix, sha in declared_markers(prompt):
        if node_id not in known:
            rec.Markers.append(MarkerState(NodeId=node_id, Prefix=prefix, Sha256=sha))


def clean_cut_off_temps(rt: Runtime) -> None:
    """Remove the temp files a kill left beside the markers of prompts cut off by the last stop (their writer is gone)."""
    for prompt_id in getattr(rt, "cut_off", None) or ():
        try:
            rec = rt.store.get(prompt_id)
            for m in rec.Markers if rec else ():
                for path in marker_paths(resolve_prefix(rt.output_dir(), m.Prefix)):
                    remove_stale_temps(path)
        except Exception as exc:  # best effort: a leftover temp file is hidden and harmless to readers
            logger.warning("Run Telemetry: could not clean up after cut-off prompt %s: %s", prompt_id, exc)


def install_finishers(rt: Runtime) -> None:
    """Wire the marker steps, the contract block and the websocket event into the runtime's recorder."""
    rec_ = rt.recorder
    clean_cut_off_temps(rt)

    def clear_stale_markers(rec: PromptRecord, prompt: Mapping[str, Any]) -> None:
        """At start: forget last run's markers for every declared prefix, and declare them for the end."""
        declared = declared_markers(prompt)
        out = rt.output_dir() if declared else None  # resolving the folder costs more than scanning the prompt
        known = {m.NodeId for m in rec.Markers}  # declared at acceptance already (declare_at_accept)
        for node_id, prefix, sha in declared:
            if node_id not in known:
                rec.Markers.append(MarkerState(NodeId=node_id, Prefix=prefix, Sha256=sha))
            try:
                clear_markers(out, prefix)
            except UnsafePrefixError:
                pass  # refused with a clear message when the node validates; nothing to clear
            except MarkerWriteError as exc:
                rec.FallbackNotes.append(f"could not remove the previous marker for {prefix!r}: {exc}")

    rec_.add_accept_hook(lambda rec, item: declare_at_accept(rec, item.prompt))
    rec_.add_start_hook(clear_stale_markers)
    # Markers first: the contract block reads their state (DoneMarker*, postExecution).
    rec_.add_finisher("done marker", lambda rec: write_markers(rt, rec))
    rec_.add_finisher("contract telemetry", lambda rec: build_contract(rt, rec))
    if rt.send is not None:
        send = rt.send

        def emit(rec: PromptRecord) -> None:
            send(EVENT, rec.summary())

        rec_.add_listener(emit)


def build_contract(rt: Runtime, rec: PromptRecord) -> None:
    """Fill ``rec.Telemetry`` in the contract's shape (per-attempt ``Telemetry`` of artifact-metadata.json)."""
    policy, _ = rt.run_policy(rec.RunId)
    rec.Telemetry = telemetry_block(rec, policy, history_attempts=rt.waits().get(rec.PromptId, 0))


def write_markers(rt: Runtime, rec: PromptRecord) -> None:
    """At the end: ``.done`` for a success, ``.failed`` otherwise, for every marker of the prompt."""
    if not rec.Markers:
        return
    out = rt.output_dir()
    gpu = gpu_block(rec)
    summary = MarkerTelemetry(
        DurationSeconds=rec.DurationSeconds,
        VramBeforeMB=gpu.get("VramBeforeMB"),
        VramAfterMB=gpu.get("VramAfterMB"),
        VramDeltaMB=gpu.get("VramDeltaMB"),
        Gpu=gpu.get("Name"),
    )
    success_at = _parse_iso(rec.ExecutionSuccessAt)
    items = [{"filename": o.Filename, "subfolder": o.Subfolder, "type": o.Type} for o in rec.Outputs]
    for m in rec.Markers:
        if rec.Outcome != "success" and rec.RetriedBy:
            m.State = "skipped"
            m.Error = f"no .failed written: the scene is retried as prompt {rec.RetriedBy}"
            continue
        try:
            if rec.Outcome == "success":
                outputs = describe_outputs(out, items, sha256=m.Sha256)
                frames = m.FrameCount if m.FrameCount is not None else len(outputs)
                marker: DoneMarker | FailedMarker = DoneMarker(
                    PromptId=rec.PromptId, Prefix=m.Prefix, FrameCount=frames, Outputs=outputs, Telemetry=summary
                )
                result = write_done_marker(out, m.Prefix, marker)
                m.State = "written"
            else:
                err = rec.Error
                marker = FailedMarker(
                    PromptId=rec.PromptId,
                    Prefix=m.Prefix,
                    Outcome=rec.Outcome if rec.Outcome in FAILED_MARKER_OUTCOMES else "error",
                    Node=err.NodeId if err else None,
                    NodeType=err.NodeType if err else None,
                    Message=(err.Message if err and err.Message else rec.Outcome),
                    Telemetry=summary,
                )
                result = write_failed_marker(out, m.Prefix, marker)
                m.State = "failed"
            m.Path = str(result.path)
            if success_at is not None and rec.Outcome == "success":
                m.WaitSeconds = round(max(0.0, time.time() - success_at), 6)
            if result.fallback_note:
                rec.FallbackNotes.append(result.fallback_note)
        except (MarkerWriteError, UnsafePrefixError, OSError) as exc:
            m.State = "error"
            m.Error = str(exc)
            rec.FallbackNotes.append(f"marker for prefix {m.Prefix!r} could not be written: {exc}")
            logger.error("Run Telemetry: marker for prefix %r could not be written: %s", m.Prefix, exc)
