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
from datetime import datetime
from functools import lru_cache
from typing import Any

from .models import HISTORY_EXIT_REASONS, ArtifactMetadata, Scene, parse_iso8601, poll_limit_text

__all__ = [
    "NOTE_SEPARATOR",
    "ParsedSummary",
    "TelemetryLine",
    "format_number",
    "frame_floor_warning",
    "iso_clock",
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
_ATTEMPT = re.compile(
    r"^\[Scene (?P<id>.+?)\]\[Attempt (?P<n>\d+)\] Frames=(?P<frames>\S*) Duration=(?P<duration>\S*?)s?(?: |$)"
)
_ATTEMPT_TEXT = "][Attempt "
_QUEUE_POLICY = "Queue policy: "
_TIME_PREFIX_LENGTH = len("[HH:MM:SS] ")
# The prefix and fixed text each scene pattern needs: cheap tests before the regular expressions.
_SCENE_PREFIX = "[Scene "
_TELEMETRY_TEXT = "] Telemetry: "
_FRAME_FLOOR_TEXT = "] WARNING: Frame count below floor"
_HISTORY_TEXT = "] HISTORY "
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
# The form this package writes times in (iso_utc); its clock is the text between 'T' and '.'.
_UTC_MILLIS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
_EXIT_REASONS = frozenset(HISTORY_EXIT_REASONS)
# Floats are exact up to 2**53; a larger int in a float field is left to the model.
_EXACT_INT = 1 << 53


def one_line(text: object) -> str:
    """``text`` with every line break (CRLF, CR or LF) replaced by one space, as summary lines carry values."""
    text = str(text)
    return _LINE_BREAK.sub(" ", text) if "\n" in text or "\r" in text else text


def format_number(value: float | int) -> str:
    """A number without a trailing '.0' and with at most one decimal: 24000 → '24000', -1400.25 → '-1400.2'."""
    rounded = round(float(value), 1)
    return str(int(rounded)) if rounded.is_integer() else f"{rounded:.1f}"


def iso_clock(text: str) -> str | None:
    """``HH:MM:SS`` (UTC) of an ISO 8601 time, or ``None`` when ``text`` is not one (see :func:`parse_iso8601`)."""
    if len(text) == 24 and _UTC_MILLIS.fullmatch(text):
        # parse_iso8601 would build this same datetime and add the milliseconds, which never carry into the seconds.
        try:
            datetime.fromisoformat(text[:19])
        except ValueError:
            return None
        return text[11:19]
    try:
        return parse_iso8601(text).strftime("%H:%M:%S")
    except ValueError:
        return None


def _clock(*candidates: str | None) -> str:
    for candidate in candidates:
        if candidate:
            clock = iso_clock(candidate)
            if clock is not None:
                return clock
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


# --- scenes, read from plain data ------------------------------------------------------------------------------------
#
# Scenes are rendered from their JSON form (``Scene.to_json_dict()`` or what ``assemble_run`` builds), reading only the
# fields the summary shows. Each read checks the value is what the Scene model would hold after validation (a bool, an
# int, an int or float >= 0, ...); anything else raises _NotPlain and the whole run is validated into ArtifactMetadata
# first, so such input renders (or fails) exactly as it always did.


class _NotPlain(Exception):
    """A scene field is not in the form the model would hold; validate the run with the model instead."""


_LEFT_OUT = object()


def _is_float(value: Any) -> bool:
    # What a float field holds after validation: a float, or an int a float holds exactly (the model converts it).
    kind = type(value)
    return kind is float or (kind is int and -_EXACT_INT <= value <= _EXACT_INT)


def _optional_text(value: Any, key: str) -> str | None:
    if value is None or type(value) is str:
        return value
    raise _NotPlain(key)


def _optional_count(value: Any, key: str, minimum: int = 0) -> int | None:
    if value is None or (type(value) is int and value >= minimum):
        return value
    raise _NotPlain(key)


def _optional_flag(value: Any, key: str) -> bool | None:
    if value is None or type(value) is bool:
        return value
    raise _NotPlain(key)


def _texts(obj: dict[str, Any], key: str, *, required: bool = False) -> list[str]:
    # A list field: left out means empty unless required; null is not a list.
    value = obj.get(key, _LEFT_OUT)
    if value is _LEFT_OUT and not required:
        return []
    if type(value) is not list or any(type(item) is not str for item in value):
        raise _NotPlain(key)
    return value


@lru_cache(maxsize=256)
def _cached_seconds(value: int) -> str:
    # The policy's figures repeat on every scene.
    return _seconds(value)


class _SceneTelemetry:
    """The fields of a scene's ``Telemetry`` the summary shows, checked as the model would hold them."""

    __slots__ = ("attempts", "duration", "line", "queue_end", "reason")

    def __init__(self, t: Any, label: str) -> None:
        if type(t) is not dict:
            raise _NotPlain("Telemetry")
        get = t.get
        duration, max_wait, poll = get("DurationSeconds"), get("MaxWaitSeconds"), get("PollIntervalSeconds")
        attempts, limit, budget = get("HistoryAttempts"), get("HistoryAttemptLimit"), get("SceneRetryBudget")
        post, detected, success_at = (
            get("PostExecutionTimeoutSeconds"),
            get("ExecutionSuccessDetected"),
            get("ExecutionSuccessAt"),
        )
        reason, queue_end, gpu, system = get("HistoryExitReason"), get("QueueEnd"), get("GPU"), get("System")
        if not (
            _is_float(duration)
            and duration >= 0  # NaN fails, as the model's ge=0 does
            and type(max_wait) is int
            and type(poll) is int
            and type(attempts) is int
            and attempts >= 0
            and type(limit) is int
            and limit >= 0
            and type(budget) is int
            and type(post) is int
            and type(detected) is bool
            and (success_at is None or type(success_at) is str)
            and type(reason) is str
            and reason in _EXIT_REASONS
            and (queue_end is None or type(queue_end) is str)
            and type(gpu) is dict
            and type(system) is dict
        ):
            raise _NotPlain("Telemetry")
        name, before, after, delta = (
            gpu.get("Name"),
            gpu.get("VramBeforeMB"),
            gpu.get("VramAfterMB"),
            gpu.get("VramDeltaMB"),
        )
        if not (type(name) is str and _is_float(before) and _is_float(after) and _is_float(delta)):
            raise _NotPlain("GPU")
        notes = "".join(f"{NOTE_SEPARATOR}{one_line(note)}" for note in _texts(system, "FallbackNotes", required=True))
        self.duration, self.attempts, self.reason, self.queue_end = duration, attempts, reason, queue_end
        self.line = (
            f"{label} Telemetry: DurationSeconds={duration:.1f}s"
            f" | MaxWaitSeconds={_cached_seconds(max_wait)}"
            f" | PollIntervalSeconds={_cached_seconds(poll)}"
            f" | HistoryAttempts={attempts}"
            f" | pollLimit={poll_limit_text(limit)}"
            f" | SceneRetryBudget={budget}"
            f" | PostExecutionTimeoutSeconds={_cached_seconds(post)}"
            f" | ExecutionSuccessDetected={_bool(detected)}"
            f" | ExecutionSuccessAt={_clock(success_at) if detected and success_at else 'n/a'}"
            f" | HistoryExitReason={reason}"
            f" | VRAMBeforeMB={format_number(before)}MB"
            f" | VRAMAfterMB={format_number(after)}MB"
            f" | VRAMDeltaMB={format_number(delta)}MB"
            f" | gpu={one_line(name)}{notes}"
        )


def _scene_label(scene: Any) -> str:
    if type(scene) is not dict:
        raise _NotPlain("Scenes")
    value = scene.get("SceneId")
    if type(value) is str or type(value) is int:
        return f"[Scene {one_line(value)}]"
    raise _NotPlain("SceneId")


def _attempt_line(label: str, number: int, frames: int | None, duration: float | int | None, prefix: str | None) -> str:
    return (
        f"{label}[Attempt {number}] Frames={'?' if frames is None else frames} "
        f"Duration={'?' if duration is None else f'{duration:.1f}'}s Prefix={one_line(prefix or '')}"
    )


def frame_floor_warning(frame_count: int, floor: int) -> str:
    """The frame-floor warning, as the summary prints it after ``WARNING:`` and ``Scenes[].Warnings`` carries it."""
    return f"Frame count below floor (FrameCount={frame_count}, FrameFloor={floor})"


def _scene_lines(scene: Any, run_time: str | None, out: list[str]) -> None:
    """Append the scene's timed lines to ``out``."""
    label = _scene_label(scene)
    t = _SceneTelemetry(scene.get("Telemetry"), label)
    get = scene.get
    frame_count = _optional_count(get("FrameCount"), "FrameCount")
    frame_prefix = _optional_text(get("FramePrefix"), "FramePrefix")
    summaries = get("AttemptSummaries", [])
    if type(summaries) is not list:
        raise _NotPlain("AttemptSummaries")
    if not summaries:
        # No AttemptSummaries: the scene itself stands for its last attempt.
        number = _optional_count(get("AttemptsRun"), "AttemptsRun") or 1
        when = _clock(t.queue_end, run_time)
        out.append(f"[{when}] {_attempt_line(label, number, frame_count, t.duration, frame_prefix)}")
    last_position = len(summaries) - 1
    for position, attempt in enumerate(summaries):
        if type(attempt) is not dict:
            raise _NotPlain("AttemptSummaries")
        number = _optional_count(attempt.get("Attempt"), "Attempt", 1)
        inner = attempt.get("Telemetry")
        if inner is not None and type(inner) is not dict:
            raise _NotPlain("AttemptSummaries.Telemetry")
        duration = attempt.get("DurationSeconds")
        if duration is not None and not (_is_float(duration) and duration >= 0):
            raise _NotPlain("AttemptSummaries.DurationSeconds")
        prefix = _optional_text(attempt.get("FramePrefix"), "FramePrefix")
        when = _clock(
            _optional_text(attempt.get("QueueEnd"), "QueueEnd"),
            _optional_text(inner.get("QueueEnd"), "QueueEnd") if inner is not None else None,
            t.queue_end if position == last_position else None,
            run_time,
        )
        line = _attempt_line(
            label,
            number if number is not None else position + 1,
            _optional_count(attempt.get("FrameCount"), "FrameCount"),
            duration,
            prefix if prefix is not None else frame_prefix,
        )
        out.append(f"[{when}] {line}")
    scene_time = _clock(t.queue_end, run_time)
    out.append(f"[{scene_time}] {t.line}")
    floor = _optional_count(get("FrameFloor"), "FrameFloor")
    if frame_count is not None and floor is not None and frame_count < floor:
        out.append(f"[{scene_time}] {label} WARNING: {frame_floor_warning(frame_count, floor)}")
    if _optional_flag(get("HistoryRetrieved"), "HistoryRetrieved") is False:
        level = "ERROR" if _optional_flag(get("Success"), "Success") is False else "WARNING"
        detail = f"history not retrieved (HistoryExitReason={t.reason}, HistoryAttempts={t.attempts})"
        errors = _texts(scene, "HistoryErrors")
        if errors:
            detail += ": " + "; ".join(one_line(error) for error in errors)
        out.append(f"[{scene_time}] {label} HISTORY {level}: {detail}")


def _scene_json(scene: Scene) -> dict[str, Any]:
    return scene.model_dump(by_alias=True, exclude_none=True)


def telemetry_line(scene: Scene) -> str:
    """The ``[Scene <id>] Telemetry: ...`` line (without the time prefix) for ``scene``."""
    data = _scene_json(scene)
    return _SceneTelemetry(data.get("Telemetry"), _scene_label(data)).line


def _render(run: ArtifactMetadata, scenes: list[Any]) -> str:
    header_time = _clock(run.timestamp)
    lines = [
        f"Run summary: RunId={one_line(run.run_id or 'unknown')} Timestamp={one_line(run.timestamp or 'unknown')}",
        f"[{header_time}] {_queue_policy_line(run)}",
    ]
    llm = _llm_line(run)
    if llm is not None:
        lines.append(f"[{header_time}] {llm}")
    for worker in run.workers or ():
        if worker.failed:
            lines.append(
                f"[{header_time}] Worker failed: {one_line(worker.url)} ({one_line(worker.reason or 'no reason given')}); "
                f"its unfinished scenes were queued on the other workers"
            )
    for scene in scenes:
        _scene_lines(scene, run.timestamp, lines)
    return "\n".join(lines) + "\n"


def render_summary(metadata: ArtifactMetadata | Mapping[str, Any]) -> str:
    """The run-summary.txt text for a run.

    A mapping is read as it is: the run's own fields through ArtifactMetadata, each scene's shown fields checked as they
    are read. A scene field in any other form than the model would hold sends the whole run through
    ``ArtifactMetadata.model_validate`` first (which raises ValidationError for invalid metadata).
    """
    if isinstance(metadata, ArtifactMetadata):
        scenes: Any = [_scene_json(scene) for scene in metadata.scenes]
        run = metadata
    else:
        scenes = metadata.get("Scenes") if isinstance(metadata, Mapping) else None
        run = None
        if type(scenes) is list:
            run = ArtifactMetadata.model_validate({**metadata, "Scenes": []})
    if run is not None:
        try:
            return _render(run, scenes)
        except _NotPlain:
            pass
    run = ArtifactMetadata.model_validate(metadata)
    return _render(run, [_scene_json(scene) for scene in run.scenes])


# --- parsing --------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TelemetryLine:
    """A parsed ``[Scene <id>] Telemetry:`` line."""

    scene_id: str
    text: str
    fields: dict[str, str]
    notes: list[str]

    def has_note(self, note: str) -> bool:
        """Whether ``note`` (as rendered on one line) is on this line: among its notes, or anywhere in its text.

        Older helpers labelled notes (``| fallback=<note>``); a note counts as present when its text is on the line.
        """
        rendered = one_line(note)
        return rendered in self.notes or rendered in self.text


@dataclass
class ParsedSummary:
    """What the validator needs from a run-summary.txt."""

    title: str = ""
    lines: list[str] = field(default_factory=list)
    queue_policy: dict[str, str] | None = None
    telemetry: dict[str, TelemetryLine] = field(default_factory=dict)
    frame_floor_warnings: set[str] = field(default_factory=set)
    history_warnings: set[str] = field(default_factory=set)
    # (scene id, attempt number) -> (Frames text, Duration text without the unit), from the per-attempt lines.
    attempts: dict[tuple[str, int], tuple[str, str]] = field(default_factory=dict)


def _split_pairs(text: str, separator: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for part in text.split(separator):
        key, eq, value = part.partition("=")
        if eq:
            key = key.strip()
            if key not in pairs:
                pairs[key] = value.strip()
    return pairs


def parse_summary(text: str) -> ParsedSummary:
    """Parse run-summary.txt text; lines it does not know are kept in ``lines`` and otherwise ignored.

    When a scene has several Telemetry lines (one per attempt), the last one counts.
    """
    raw_lines = text.splitlines()
    # A summary may lack the title line; a timed first line is already content.
    has_title = bool(raw_lines) and not _TIME_PREFIX.match(raw_lines[0])
    parsed = ParsedSummary(title=raw_lines[0] if has_title else "")
    lines = parsed.lines
    for raw in raw_lines[1:] if has_title else raw_lines:
        content = raw[_TIME_PREFIX_LENGTH:] if _TIME_PREFIX.match(raw) else raw
        lines.append(content)
        if content.startswith(_QUEUE_POLICY):
            parsed.queue_policy = _split_pairs(content[len(_QUEUE_POLICY) :], ",")
        elif not content.startswith(_SCENE_PREFIX):
            continue
        # Each pattern is only tried on a line holding its fixed text (most scene lines are attempt lines).
        elif _ATTEMPT_TEXT in content and (match := _ATTEMPT.match(content)):
            parsed.attempts[(match["id"], int(match["n"]))] = (match["frames"], match["duration"])
        elif _TELEMETRY_TEXT in content and (match := _TELEMETRY.match(content)):
            body = match["body"]
            head, _, tail = body.partition(NOTE_SEPARATOR)
            notes = tail.split(NOTE_SEPARATOR) if tail or NOTE_SEPARATOR in body else []
            parsed.telemetry[match["id"]] = TelemetryLine(
                scene_id=match["id"], text=body, fields=_split_pairs(head, FIELD_SEPARATOR), notes=notes
            )
        elif _FRAME_FLOOR_TEXT in content and (match := _FRAME_FLOOR.match(content)):
            parsed.frame_floor_warnings.add(match["id"])
        elif _HISTORY_TEXT in content and (match := _HISTORY.match(content)):
            parsed.history_warnings.add(match["id"])
    return parsed
