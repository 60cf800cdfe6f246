"""``run-summary.txt``: render it from a run's metadata, and parse it back for the validator.

Layout (pipelines read these lines, so the wording is fixed)::

    Run summary: RunId=<RunId> Timestamp=<Timestamp>
    [HH:MM:SS] Queue policy: sceneRetries=1, historyMaxWait=600s, historyPollInterval=2s, historyMaxAttempts=unbounded, postExecutionTimeout=30s
    [HH:MM:SS] [LLM] Health check: success (url=<Url>, models=1, override=default)
    then, per scene in order:
    [HH:MM:SS] [Scene <id>][Attempt <n>] Frames=<n> Duration=<s>s Prefix=<prefix>      (one per attempt)
    [HH:MM:SS] [Scene <id>] Telemetry: DurationSeconds=45.2s | ... | gpu=<name> | note=<note 1> | note=<note 2>
    [HH:MM:SS] [Scene <id>] WARNING: Frame count below floor (FrameCount=<n>, FrameFloor=<m>)   (when below)
    [HH:MM:SS] [Scene <id>] HISTORY WARNING: ...   or   HISTORY ERROR: ...               (when HistoryRetrieved is false)

Rules a reader can rely on:

- Every line after the title starts with ``[HH:MM:SS] ``, a UTC time taken from the metadata so a render is
  reproducible: header lines use the run's ``Timestamp``; an attempt line its attempt's ``QueueEnd``; a scene's
  Telemetry and warning lines the scene's ``Telemetry.QueueEnd``. A missing time falls back to the run's
  ``Timestamp``, then to ``00:00:00``.
- The Telemetry line's fields are separated by `` | ``; after ``gpu=<name>`` comes one `` | note=<text>`` per entry of
  ``Telemetry.System.FallbackNotes``, in order. Line breaks inside any value are written as one space each.
- ``DurationSeconds`` is written with one decimal; MB values with at most one; ``ExecutionSuccessAt`` as HH:MM:SS UTC
  (``n/a`` when success was not detected); ``pollLimit`` and ``historyMaxAttempts`` as ``unbounded`` for 0.
- A history warning is ``HISTORY ERROR`` when the scene failed, otherwise ``HISTORY WARNING``.
- Only the LLM line appears when a health check ran or was skipped; it is left out when the run has no LLMHealthInfo.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .models import ArtifactMetadata, AttemptSummary, Scene, parse_iso8601, poll_limit_text

__all__ = [
    "NOTE_SEPARATOR",
    "ParsedSummary",
    "TelemetryLine",
    "format_number",
    "one_line",
    "parse_summary",
    "render_summary",
    "telemetry_line",
]

NOTE_SEPARATOR = " | note="
FIELD_SEPARATOR = " | "
_TIME_PREFIX = re.compile(r"^\[(\d{2}:\d{2}:\d{2})\] ")
_TELEMETRY = re.compile(r"^\[Scene (?P<id>.+?)\] Telemetry: (?P<body>.*)$")
_FRAME_FLOOR = re.compile(r"^\[Scene (?P<id>.+?)\] WARNING: Frame count below floor\b")
_HISTORY = re.compile(r"^\[Scene (?P<id>.+?)\] HISTORY (?:WARNING|ERROR)\b")
_QUEUE_POLICY = "Queue policy: "


def one_line(text: object) -> str:
    """``text`` with every line break (CRLF, CR or LF) replaced by one space, as summary lines carry values."""
    return re.sub(r"\r\n|\r|\n", " ", str(text))


def format_number(value: float | int) -> str:
    """A number without a trailing '.0' and with at most one decimal: 24000 → '24000', -1400.25 → '-1400.2'."""
    rounded = round(float(value), 1)
    return str(int(rounded)) if rounded.is_integer() else f"{rounded:.1f}"


def _clock(*candidates: str | None) -> str:
    for candidate in candidates:
        if candidate:
            try:
                return parse_iso8601(candidate).strftime("%H:%M:%S")
            except ValueError:
                continue
    return "00:00:00"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _seconds(value: float | int) -> str:
    return f"{format_number(value)}s"


def _queue_policy_line(run: ArtifactMetadata) -> str:
    q = run.queue_config
    return (
        f"Queue policy: sceneRetries={q.scene_retry_budget}, historyMaxWait={_seconds(q.history_max_wait_seconds)}, "
        f"historyPollInterval={_seconds(q.history_poll_interval_seconds)}, "
        f"historyMaxAttempts={poll_limit_text(q.history_max_attempts)}, "
        f"postExecutionTimeout={_seconds(q.post_execution_timeout_seconds)}"
    )


def _llm_line(run: ArtifactMetadata) -> str | None:
    llm = run.llm_health_info
    if llm is None:
        return None
    if llm.skipped:
        return "[LLM] Health check: skipped"
    models = llm.models if isinstance(llm.models, int) else len(llm.models or [])
    line = (
        f"[LLM] Health check: {one_line(llm.status or 'unknown')} (url={one_line(llm.url or 'n/a')}, "
        f"models={models}, override={one_line(llm.override or 'default')})"
    )
    return f"{line} error={one_line(llm.error)}" if llm.error else line


def _attempt_line(scene: Scene, attempt: AttemptSummary | None, number: int) -> str:
    if attempt is None:
        frames, duration, prefix = scene.frame_count, scene.telemetry.duration_seconds, scene.frame_prefix
    else:
        frames, duration = attempt.frame_count, attempt.duration_seconds
        prefix = attempt.frame_prefix if attempt.frame_prefix is not None else scene.frame_prefix
    return (
        f"[Scene {one_line(scene.scene_id)}][Attempt {number}] Frames={'?' if frames is None else frames} "
        f"Duration={'?' if duration is None else f'{duration:.1f}'}s Prefix={one_line(prefix or '')}"
    )


def telemetry_line(scene: Scene) -> str:
    """The ``[Scene <id>] Telemetry: ...`` line (without the time prefix) for ``scene``."""
    t = scene.telemetry
    success_at = _clock(t.execution_success_at) if t.execution_success_detected and t.execution_success_at else "n/a"
    parts = [
        f"DurationSeconds={t.duration_seconds:.1f}s",
        f"MaxWaitSeconds={_seconds(t.max_wait_seconds)}",
        f"PollIntervalSeconds={_seconds(t.poll_interval_seconds)}",
        f"HistoryAttempts={t.history_attempts}",
        f"pollLimit={poll_limit_text(t.history_attempt_limit)}",
        f"SceneRetryBudget={t.scene_retry_budget}",
        f"PostExecutionTimeoutSeconds={_seconds(t.post_execution_timeout_seconds)}",
        f"ExecutionSuccessDetected={_bool(t.execution_success_detected)}",
        f"ExecutionSuccessAt={success_at}",
        f"HistoryExitReason={t.history_exit_reason}",
        f"VRAMBeforeMB={format_number(t.gpu.vram_before_mb)}MB",
        f"VRAMAfterMB={format_number(t.gpu.vram_after_mb)}MB",
        f"VRAMDeltaMB={format_number(t.gpu.vram_delta_mb)}MB",
        f"gpu={one_line(t.gpu.name)}",
    ]
    notes = "".join(f"{NOTE_SEPARATOR}{one_line(note)}" for note in t.system.fallback_notes)
    return f"[Scene {one_line(scene.scene_id)}] Telemetry: {FIELD_SEPARATOR.join(parts)}{notes}"


def _scene_lines(scene: Scene, run_time: str | None) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    t = scene.telemetry
    attempts: list[AttemptSummary | None] = list(scene.attempt_summaries) or [None]
    for position, attempt in enumerate(attempts):
        if attempt is None:
            # No AttemptSummaries: the scene itself stands for its last attempt.
            number = scene.attempts_run or 1
            when = _clock(t.queue_end, run_time)
        else:
            number = attempt.attempt if attempt.attempt is not None else position + 1
            inner = attempt.telemetry.queue_end if attempt.telemetry else None
            last = position == len(attempts) - 1
            when = _clock(attempt.queue_end, inner, t.queue_end if last else None, run_time)
        lines.append((when, _attempt_line(scene, attempt, number)))
    scene_time = _clock(t.queue_end, run_time)
    lines.append((scene_time, telemetry_line(scene)))
    label = f"[Scene {one_line(scene.scene_id)}]"
    if scene.frame_count is not None and scene.frame_floor is not None and scene.frame_count < scene.frame_floor:
        lines.append(
            (
                scene_time,
                f"{label} WARNING: Frame count below floor (FrameCount={scene.frame_count}, "
                f"FrameFloor={scene.frame_floor})",
            )
        )
    if scene.history_retrieved is False:
        level = "ERROR" if scene.success is False else "WARNING"
        detail = (
            f"history not retrieved (HistoryExitReason={t.history_exit_reason}, HistoryAttempts={t.history_attempts})"
        )
        if scene.history_errors:
            detail += ": " + "; ".join(one_line(error) for error in scene.history_errors)
        lines.append((scene_time, f"{label} HISTORY {level}: {detail}"))
    return lines


def render_summary(metadata: ArtifactMetadata | Mapping[str, Any]) -> str:
    """The run-summary.txt text for a run (validated into ArtifactMetadata first when given a mapping)."""
    run = metadata if isinstance(metadata, ArtifactMetadata) else ArtifactMetadata.model_validate(metadata)
    header_time = _clock(run.timestamp)
    body: list[tuple[str, str]] = [(header_time, _queue_policy_line(run))]
    llm = _llm_line(run)
    if llm is not None:
        body.append((header_time, llm))
    for scene in run.scenes:
        body.extend(_scene_lines(scene, run.timestamp))
    title = f"Run summary: RunId={one_line(run.run_id or 'unknown')} Timestamp={one_line(run.timestamp or 'unknown')}"
    return "\n".join([title, *(f"[{when}] {text}" for when, text in body)]) + "\n"


# --- parsing --------------------------------------------------------------------------------------------------------


@dataclass
class TelemetryLine:
    """A parsed ``[Scene <id>] Telemetry:`` line."""

    scene_id: str
    text: str
    fields: dict[str, str]
    notes: list[str]

    def has_note(self, note: str) -> bool:
        """Whether ``note`` (as rendered on one line) is among this line's notes."""
        rendered = one_line(note)
        # Compare against the raw text too: a note may itself contain the separator.
        return rendered in self.notes or f"{NOTE_SEPARATOR}{rendered}{NOTE_SEPARATOR}" in self.text + NOTE_SEPARATOR


@dataclass
class ParsedSummary:
    """What the validator needs from a run-summary.txt."""

    title: str = ""
    lines: list[str] = field(default_factory=list)
    queue_policy: dict[str, str] | None = None
    telemetry: dict[str, TelemetryLine] = field(default_factory=dict)
    frame_floor_warnings: set[str] = field(default_factory=set)
    history_warnings: set[str] = field(default_factory=set)


def _split_pairs(text: str, separator: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for part in text.split(separator):
        key, eq, value = part.partition("=")
        if eq:
            pairs.setdefault(key.strip(), value.strip())
    return pairs


def parse_summary(text: str) -> ParsedSummary:
    """Parse run-summary.txt text; lines it does not know are kept in ``lines`` and otherwise ignored.

    When a scene has several Telemetry lines (one per attempt), the last one counts.
    """
    raw_lines = text.splitlines()
    # A summary may lack the title line; a timed first line is already content.
    has_title = bool(raw_lines) and not _TIME_PREFIX.match(raw_lines[0])
    parsed = ParsedSummary(title=raw_lines[0] if has_title else "")
    for raw in raw_lines[1:] if has_title else raw_lines:
        content = _TIME_PREFIX.sub("", raw, count=1)
        parsed.lines.append(content)
        if content.startswith(_QUEUE_POLICY):
            parsed.queue_policy = _split_pairs(content[len(_QUEUE_POLICY) :], ",")
        elif match := _TELEMETRY.match(content):
            body = match["body"]
            head, _, tail = body.partition(NOTE_SEPARATOR)
            notes = tail.split(NOTE_SEPARATOR) if tail or NOTE_SEPARATOR in body else []
            parsed.telemetry[match["id"]] = TelemetryLine(
                scene_id=match["id"], text=body, fields=_split_pairs(head, FIELD_SEPARATOR), notes=notes
            )
        elif match := _FRAME_FLOOR.match(content):
            parsed.frame_floor_warnings.add(match["id"])
        elif match := _HISTORY.match(content):
            parsed.history_warnings.add(match["id"])
    return parsed
