"""Runs: group prompt records into scenes and attempts and assemble a run's ``artifact-metadata.json``."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .contract import telemetry_block
from .models import ArtifactMetadata
from .policy import QueuePolicy
from .records import FINAL_OUTCOMES, PromptRecord

METADATA_FILE = "artifact-metadata.json"
SUMMARY_FILE = "run-summary.txt"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def run_id_problem(value: Any, *, name: str = "run_id") -> str | None:
    """Why ``value`` is not a usable run or scene id (safe characters, no path parts), or ``None``."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        return f"{name} must be text, got {type(value).__name__}"
    text = str(value)
    if not RUN_ID_RE.fullmatch(text) or ".." in text:
        return (
            f"{name} {text!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit, with no '..' and no path separators"
        )
    return None


def run_dir(output_dir: Path, run_id: str) -> Path:
    """Where a finalized run's files go: ``<output>/telemetry/runs/<run_id>``."""
    problem = run_id_problem(run_id)
    if problem:
        raise ValueError(problem)
    return Path(output_dir) / "telemetry" / "runs" / run_id


def _scene_key(rec: PromptRecord) -> str:
    return rec.SceneId if rec.SceneId not in (None, "") else rec.PromptId


def _scene_sort_key(scene_id: str) -> tuple[int, Any]:
    return (0, int(scene_id)) if scene_id.isdigit() else (1, scene_id)


def _frames(rec: PromptRecord) -> int | None:
    for m in rec.Markers:
        if m.FrameCount is not None:
            return m.FrameCount
    return len(rec.Outputs) if rec.Outcome == "success" else 0 if rec.Outcome in FINAL_OUTCOMES else None


def _prefix(rec: PromptRecord) -> str | None:
    if rec.Markers:
        return rec.Markers[0].Prefix
    prefix = rec.Tags.get("prefix")
    return str(prefix) if prefix is not None else None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _attempt_telemetry(rec: PromptRecord, policy: QueuePolicy, waits: Mapping[str, int]) -> dict[str, Any]:
    tel = dict(rec.Telemetry or telemetry_block(rec, policy))
    tel.update(
        {
            "MaxWaitSeconds": policy.max_wait_seconds,
            "PollIntervalSeconds": policy.poll_interval_seconds,
            "HistoryAttemptLimit": policy.history_max_attempts,
            "pollLimit": "unbounded" if policy.history_max_attempts == 0 else str(policy.history_max_attempts),
            "PostExecutionTimeoutSeconds": policy.post_execution_timeout_seconds,
            "SceneRetryBudget": policy.scene_retry_budget,
            "HistoryAttempts": int(waits.get(rec.PromptId, 0)),
        }
    )
    if rec.Outcome not in FINAL_OUTCOMES:
        limit = policy.history_max_attempts
        tel["HistoryExitReason"] = "attemptLimit" if limit and tel["HistoryAttempts"] >= limit else "unknown"
    return tel


def assemble_scene(
    scene_id: str, attempts: Sequence[PromptRecord], policy: QueuePolicy, waits: Mapping[str, int]
) -> dict[str, Any]:
    """One ``Scenes[]`` entry: its last attempt's telemetry, every attempt summarised."""
    attempts = sorted(attempts, key=lambda r: (r.StartedAt or r.QueuedAt or "", r.PromptId))
    last = attempts[-1]
    tags = {k: v for r in attempts for k, v in r.Tags.items()}
    frames = _frames(last)
    floor = _int_or_none(tags.get("frame_floor"))
    final = last.Outcome in FINAL_OUTCOMES and last.Outcome != "crashed"
    history_errors = [
        f"attempt {i}: {r.Outcome}: {r.Error.Message if r.Error and r.Error.Message else r.Outcome}"
        for i, r in enumerate(attempts, 1)
        if r.Outcome not in ("success", "running", "queued")
    ]
    summaries = []
    for i, r in enumerate(attempts, 1):
        tel = _attempt_telemetry(r, policy, waits)
        summaries.append(
            {
                "Attempt": i,
                "PromptId": r.PromptId,
                "Success": r.Outcome == "success",
                "Outcome": r.Outcome,
                "FrameCount": _frames(r),
                "DurationSeconds": r.DurationSeconds or 0.0,
                "FramePrefix": _prefix(r),
                "HistoryExitReason": tel["HistoryExitReason"],
                "QueueStart": r.QueuedAt,
                "QueueEnd": r.EndedAt,
                "Error": r.Error.Message if r.Error else None,
            }
        )
    warnings = list(dict.fromkeys(n for r in attempts for n in r.FallbackNotes))
    return {
        "SceneId": scene_id,
        "Title": tags.get("title"),
        "Prompt": tags.get("prompt"),
        "NegativePrompt": tags.get("negative_prompt"),
        "FrameFloor": floor,
        "FrameCount": frames,
        "FramePrefix": _prefix(last),
        "Success": last.Outcome == "success",
        "MeetsFrameFloor": (frames or 0) >= (floor or 0),
        "HistoryRetrieved": final,
        "HistoryErrors": history_errors
        if final
        else [*history_errors, f"attempt {len(attempts)}: no final record ({last.Outcome})"],
        "Warnings": warnings,
        "Errors": [s["Error"] for s in summaries if s["Error"]],
        "AttemptsRun": len(attempts),
        "Requeued": len(attempts) > 1,
        "AttemptSummaries": summaries,
        "Telemetry": _attempt_telemetry(last, policy, waits),
    }


def assemble_run(
    run_id: str,
    records: Sequence[PromptRecord],
    *,
    policy: QueuePolicy,
    output_dir: Path,
    run_info: Mapping[str, Any] | None = None,
    waits: Mapping[str, int] | None = None,
    llm: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's ``artifact-metadata.json`` content, validated by the contract model."""
    info = dict(run_info or {})
    waits = waits or {}
    by_scene: dict[str, list[PromptRecord]] = {}
    for rec in records:
        by_scene.setdefault(_scene_key(rec), []).append(rec)
    scenes = [assemble_scene(sid, by_scene[sid], policy, waits) for sid in sorted(by_scene, key=_scene_sort_key)]
    notes = list(info.get("PolicyNotes") or [])
    if notes:
        for scene in scenes:
            fallback = scene["Telemetry"]["System"].setdefault("FallbackNotes", [])
            fallback.extend(n for n in notes if n not in fallback)
    starts = [r.QueuedAt or r.StartedAt for r in records if (r.QueuedAt or r.StartedAt)]
    story = info.get("Story") or next((r.Tags.get("story") for r in records if r.Tags.get("story")), None)
    meta: dict[str, Any] = {
        "RunId": run_id,
        "Timestamp": min(starts) if starts else None,
        "RunDir": str(run_dir(output_dir, run_id)),
        "QueueConfig": policy.queue_config(),
        # No provider configured: no health check ran, so no LLMHealthInfo and no [LLM] line.
        "LLMHealthInfo": dict(llm) if llm else None,
        "Scenes": scenes,
        "Generator": f"run-telemetry {__version__}",
    }
    if isinstance(story, Mapping):
        meta["Story"] = {
            "Id": story.get("id", story.get("Id")),
            "Logline": story.get("logline", story.get("Logline")),
            "DirectorsVision": story.get("directors_vision", story.get("DirectorsVision")),
        }
    return ArtifactMetadata.model_validate(meta).to_json_dict()


def run_status(row: Mapping[str, Any]) -> str:
    """``running`` while any prompt is pending, ``failed`` when any failed, else ``complete``."""
    if row.get("Pending"):
        return "running"
    return "failed" if row.get("Failed") else "complete"
