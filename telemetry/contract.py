"""From a prompt record to the contract's per-attempt ``Telemetry`` block (artifact-metadata.json)."""

from __future__ import annotations

from typing import Any

from .models import SystemSnapshot, Telemetry
from .policy import QueuePolicy
from .probes import build_gpu_block, build_system_block
from .records import PromptRecord


def _snapshot(data: dict[str, Any] | None) -> SystemSnapshot | None:
    if not data:
        return None
    try:
        return SystemSnapshot.model_validate(data)
    except ValueError:
        return None


Snapshots = tuple[SystemSnapshot | None, SystemSnapshot | None]


def snapshots(rec: PromptRecord) -> Snapshots:
    """The record's before/after snapshots as models (``None`` where missing or unreadable)."""
    return _snapshot(rec.Before), _snapshot(rec.After)


def gpu_block(rec: PromptRecord, parsed: Snapshots | None = None) -> dict[str, Any]:
    """``Telemetry.GPU`` from the record's before/after snapshots (the probe module's rounding); never blank."""
    before, after = parsed or snapshots(rec)
    before = before or after
    after = after or before
    if before is None or after is None:
        return {"Name": "unknown (no probe answered)", "VramBeforeMB": 0.0, "VramAfterMB": 0.0, "VramDeltaMB": 0.0}
    return build_gpu_block(
        before, after, peak_used_bytes=rec.PeakVram.Bytes, peak_source=rec.PeakVram.Method
    ).to_json_dict()


def system_block(rec: PromptRecord, parsed: Snapshots | None = None) -> dict[str, Any]:
    """``Telemetry.System``: both snapshots and every fallback note of the prompt, each once."""
    before, after = parsed or snapshots(rec)
    notes = list(rec.FallbackNotes)
    if before is not None and after is not None:
        block = build_system_block(before, after).to_json_dict()
        block["FallbackNotes"] = list(dict.fromkeys([*notes, *block.get("FallbackNotes", [])]))
        return block
    return {"Before": rec.Before, "After": rec.After, "FallbackNotes": notes}


def exit_reason(rec: PromptRecord, policy: QueuePolicy) -> str:
    """``HistoryExitReason`` derived in-process: how waiting for this attempt's completion ended."""
    if rec.Outcome == "success":
        if any(m.Outcome == "outputsIncomplete" for m in rec.Markers):
            return "postExecution"  # the outputs were still incomplete when the post-execution timeout ran out
        waited = [m.WaitSeconds for m in rec.Markers if m.WaitSeconds is not None]
        if waited and max(waited) > policy.post_execution_timeout_seconds:
            return "postExecution"
        return "success"
    return "unknown"


def telemetry_block(rec: PromptRecord, policy: QueuePolicy | None, *, history_attempts: int = 0) -> dict[str, Any]:
    """The contract ``Telemetry`` object of one attempt, validated by the model, as JSON-ready data."""
    policy = policy or QueuePolicy()
    attempts = int(history_attempts)
    reason = exit_reason(rec, policy)
    parsed = snapshots(rec)  # once for both blocks: this runs for every prompt on the writer thread
    data: dict[str, Any] = {
        "PromptId": rec.PromptId,
        "DurationSeconds": rec.DurationSeconds or 0.0,
        "QueueStart": rec.QueuedAt,
        "QueueEnd": rec.EndedAt,
        "ExecutionStartedAt": rec.StartedAt,
        "QueueWaitSeconds": rec.QueueWaitSeconds,
        "MaxWaitSeconds": policy.max_wait_seconds,
        "PollIntervalSeconds": policy.poll_interval_seconds,
        "HistoryAttempts": attempts,
        "HistoryAttemptLimit": policy.history_max_attempts,
        "HistoryExitReason": reason,
        "ExecutionSuccessDetected": rec.ExecutionSuccessAt is not None,
        "ExecutionSuccessAt": rec.ExecutionSuccessAt,
        "PostExecutionTimeoutSeconds": policy.post_execution_timeout_seconds,
        "HistoryPostExecutionTimeoutReached": reason == "postExecution",
        "SceneRetryBudget": policy.scene_retry_budget,
        "GPU": gpu_block(rec, parsed),
        "System": system_block(rec, parsed),
        "ForcedCopyTriggered": False,
    }
    done = [m for m in rec.Markers if m.State == "written"]
    data["DoneMarkerDetected"] = bool(done)
    if done:
        data["DoneMarkerWaitSeconds"] = done[0].WaitSeconds if done[0].WaitSeconds is not None else 0.0
        data["DoneMarkerPath"] = done[0].Path
    return Telemetry.model_validate(data).to_json_dict()
