"""From a prompt record to the contract's per-attempt ``Telemetry`` block (artifact-metadata.json)."""

from __future__ import annotations

from typing import Any

from .models import Telemetry
from .policy import QueuePolicy
from .records import PromptRecord

MIB = 1048576.0


def _device(snapshot: dict[str, Any] | None) -> dict[str, Any]:
    return dict((snapshot or {}).get("Device") or {})


def gpu_block(rec: PromptRecord) -> dict[str, Any]:
    """``Telemetry.GPU`` from the record's before/after snapshots; the name is never blank."""
    before, after = _device(rec.Before), _device(rec.After)
    dev = after or before
    free_b, free_a = before.get("VramFree"), after.get("VramFree")
    mb_b = round(free_b / MIB, 2) if isinstance(free_b, int | float) else 0.0
    mb_a = round(free_a / MIB, 2) if isinstance(free_a, int | float) else mb_b
    sources = [s for s in ((rec.Before or {}).get("Source"), (rec.After or {}).get("Source")) if s]
    block: dict[str, Any] = {
        "Name": str(dev.get("Name") or "unknown (no probe answered)"),
        "Type": dev.get("Type"),
        "Index": dev.get("Index"),
        "VramTotal": dev.get("VramTotal"),
        "VramFreeBefore": free_b,
        "VramFreeAfter": free_a,
        "VramBeforeMB": mb_b,
        "VramAfterMB": mb_a,
        "VramDeltaMB": round(mb_a - mb_b, 2),
        "Source": "/".join(dict.fromkeys(sources)) or None,
        "Uuid": dev.get("Uuid"),
        "PeakVramUsed": rec.PeakVram.Bytes,
        "PeakVramMB": rec.PeakVram.MB,
        "PeakSource": rec.PeakVram.Method,
    }
    return {k: v for k, v in block.items() if v is not None}


def exit_reason(rec: PromptRecord, policy: QueuePolicy) -> str:
    """``HistoryExitReason`` derived in-process: how waiting for this attempt's completion ended."""
    if rec.Outcome == "success":
        waited = [m.WaitSeconds for m in rec.Markers if m.WaitSeconds is not None]
        if waited and max(waited) > policy.post_execution_timeout_seconds:
            return "postExecution"
        return "success"
    return "unknown"


def telemetry_block(rec: PromptRecord, policy: QueuePolicy | None, *, history_attempts: int = 0) -> dict[str, Any]:
    """The contract ``Telemetry`` object of one attempt, validated by the model, as JSON-ready data."""
    policy = policy or QueuePolicy()
    attempts = int(rec.Tags.get("_history_attempts", history_attempts) or 0)
    reason = exit_reason(rec, policy)
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
        "GPU": gpu_block(rec),
        "System": {"Before": rec.Before, "After": rec.After, "FallbackNotes": list(rec.FallbackNotes)},
        "ForcedCopyTriggered": False,
    }
    done = [m for m in rec.Markers if m.State == "written"]
    data["DoneMarkerDetected"] = bool(done)
    if done:
        data["DoneMarkerWaitSeconds"] = done[0].WaitSeconds if done[0].WaitSeconds is not None else 0.0
        data["DoneMarkerPath"] = done[0].Path
    return Telemetry.model_validate(data).to_json_dict()
