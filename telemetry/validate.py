"""Validate a run folder: ``artifact-metadata.json`` against the contract and ``run-summary.txt`` against the metadata.

``python -m telemetry validate RUN_DIR`` exits 0 for a valid run and 2 otherwise, printing every failed check on its
own line, naming the scene and the field. Routes reuse :func:`validate_run_dir` and :func:`validate_run`.

Checks, per scene: ``Telemetry`` exists; ``DurationSeconds``, ``MaxWaitSeconds``, ``PollIntervalSeconds``,
``HistoryAttempts``, ``HistoryAttemptLimit``, ``PostExecutionTimeoutSeconds`` and ``SceneRetryBudget`` are numbers;
``HistoryExitReason`` is in the enum; ``ExecutionSuccessDetected`` is a boolean and ``ExecutionSuccessAt`` an ISO 8601
time when it is true; ``HistoryPostExecutionTimeoutReached`` is a boolean; ``GPU.Name`` is not blank; ``GPU.VramBeforeMB``,
``VramAfterMB`` and ``VramDeltaMB`` are numbers; ``System.FallbackNotes`` is a list; ``pollLimit``, when present, agrees
with ``HistoryAttemptLimit``.
Summary against metadata: a ``[Scene <id>] Telemetry:`` line per scene whose ``pollLimit``, ``SceneRetryBudget`` and
``DurationSeconds`` (to one decimal) match and which carries every fallback note; a ``Queue policy:`` line matching
``QueueConfig``; the frame-floor warning when FrameCount < FrameFloor and the history warning when HistoryRetrieved is
false. Finally the metadata must validate against the committed JSON Schema (its findings are listed unless a check
above already reported the same field).

Files are read as UTF-8 (with or without BOM) or UTF-16 with BOM, as Windows PowerShell writes them.

Finalize, which has just written the files from the metadata and summary it holds, uses
:func:`validate_written_run`: when the files hold exactly what was written, :func:`fast_check` judges the metadata in
memory with the committed schema compiled to pydantic-core (``schema.compile_schema``, which accepts nothing
jsonschema rejects) and the checks above. Anything but a clean pass (every broken run) goes through
:func:`validate_run_dir`, so the report and its wording are the same either way. The CLI always takes the full path.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
from pydantic import Field

from .models import HISTORY_EXIT_REASONS, ContractModel, is_number, parse_iso8601, poll_limit_text
from .schema import compiled_schema, load_schema
from .summary import ParsedSummary, iso_clock, one_line, parse_summary

__all__ = [
    "METADATA_FILE",
    "SUMMARY_FILE",
    "ValidationReport",
    "fast_check",
    "register",
    "validate_run",
    "validate_run_dir",
    "validate_written_run",
]

logger = logging.getLogger("run_telemetry.validate")

METADATA_FILE = "artifact-metadata.json"
SUMMARY_FILE = "run-summary.txt"

_NUMERIC_TELEMETRY = (
    "DurationSeconds",
    "MaxWaitSeconds",
    "PollIntervalSeconds",
    "HistoryAttempts",
    "HistoryAttemptLimit",
    "PostExecutionTimeoutSeconds",
    "SceneRetryBudget",
)
_NUMERIC_GPU = ("VramBeforeMB", "VramAfterMB", "VramDeltaMB")
_EXIT_REASONS = frozenset(HISTORY_EXIT_REASONS)
_BIG_INT = 1 << 1000  # below float's range: math.isfinite takes it
# Queue policy key in run-summary.txt → QueueConfig field.
_QUEUE_POLICY = (
    ("sceneRetries", "SceneRetryBudget"),
    ("historyMaxWait", "HistoryMaxWaitSeconds"),
    ("historyPollInterval", "HistoryPollIntervalSeconds"),
    ("historyMaxAttempts", "HistoryMaxAttempts"),
    ("postExecutionTimeout", "PostExecutionTimeoutSeconds"),
)
# The contract keeps one decimal of DurationSeconds in the summary; allow for either rounding rule.
_DURATION_TOLERANCE = 0.05 + 1e-6

FieldPath = tuple[Any, ...]


class ValidationReport(ContractModel):
    """The outcome of validating one run folder."""

    run_dir: str = Field(alias="RunDir")
    valid: bool = Field(alias="Valid")
    errors: list[str] = Field(default_factory=list, alias="Errors")
    scene_count: int | None = Field(default=None, alias="SceneCount")


class _Findings:
    """Messages in order, plus the (scene index, field path) pairs already reported, to keep schema echoes out."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.covered: set[tuple[int | None, FieldPath]] = set()

    def add(self, message: str, scene: int | None = None, path: FieldPath | None = None) -> None:
        """Record a failed check; ``path`` marks the field as reported."""
        self.messages.append(message)
        if path is not None:
            self.covered.add((scene, path))

    def is_covered(self, scene: int | None, path: FieldPath) -> bool:
        """Whether a check already reported this field or one that contains it."""
        return any((scene, path[:depth]) in self.covered for depth in range(len(path) + 1))


def _scene_label(index: int, scene: Any) -> str:
    scene_id = scene.get("SceneId") if isinstance(scene, dict) else None
    if scene_id is None or (isinstance(scene_id, str) and not scene_id.strip()):
        return f"Scene #{index + 1}"
    return f"Scene {one_line(scene_id)}"


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_number(found: _Findings, index: int, label: str, obj: dict[str, Any], path: FieldPath) -> None:
    key = path[-1]
    dotted = ".".join(path)
    if key not in obj or obj[key] is None:
        found.add(f"{label}: {dotted} is missing", index, path)
    elif not is_number(obj[key]):
        found.add(f"{label}: {dotted} must be a number, found {_describe(obj[key])}", index, path)


def _check_bool(found: _Findings, index: int, label: str, obj: dict[str, Any], path: FieldPath) -> bool | None:
    key = path[-1]
    dotted = ".".join(path)
    if key not in obj or obj[key] is None:
        found.add(f"{label}: {dotted} is missing", index, path)
        return None
    if not isinstance(obj[key], bool):
        found.add(f"{label}: {dotted} must be true or false, found {_describe(obj[key])}", index, path)
        return None
    return bool(obj[key])


def _is_plain_number(value: Any) -> bool:
    # Implies is_number(value): a finite float, or an int small enough for math.isfinite.
    kind = type(value)
    return (kind is float and value - value == 0.0) or (kind is int and -_BIG_INT < value < _BIG_INT)


def _scene_passes(scene: Any) -> bool:
    """True only when _check_scene would report nothing for ``scene`` (the common case, checked without messages)."""
    if type(scene) is not dict:
        return False
    telemetry = scene.get("Telemetry")
    if type(telemetry) is not dict:
        return False
    for key in _NUMERIC_TELEMETRY:
        if not _is_plain_number(telemetry.get(key)):
            return False
    reason = telemetry.get("HistoryExitReason")
    if type(reason) is not str or reason not in _EXIT_REASONS:
        return False
    detected = telemetry.get("ExecutionSuccessDetected")
    if type(detected) is not bool or type(telemetry.get("HistoryPostExecutionTimeoutReached")) is not bool:
        return False
    if detected:
        at = telemetry.get("ExecutionSuccessAt")
        if type(at) is not str or iso_clock(at) is None:
            return False
    poll_limit = telemetry.get("pollLimit")
    if poll_limit is not None and str(poll_limit) != poll_limit_text(int(telemetry["HistoryAttemptLimit"])):
        return False
    gpu = telemetry.get("GPU")
    if type(gpu) is not dict:
        return False
    name = gpu.get("Name")
    if type(name) is not str or not name.strip():
        return False
    for key in _NUMERIC_GPU:
        if not _is_plain_number(gpu.get(key)):
            return False
    system = telemetry.get("System")
    return type(system) is dict and type(system.get("FallbackNotes")) is list


def _check_scene(found: _Findings, index: int, scene: Any) -> None:
    if _scene_passes(scene):
        return
    label = _scene_label(index, scene)
    if not isinstance(scene, dict):
        found.add(f"{label}: the scene must be a JSON object, found {_describe(scene)}", index, ())
        return
    telemetry = scene.get("Telemetry")
    if not isinstance(telemetry, dict):
        what = "is missing" if telemetry is None else f"must be an object, found {_describe(telemetry)}"
        found.add(f"{label}: Telemetry {what}", index, ("Telemetry",))
        return
    for key in _NUMERIC_TELEMETRY:
        _check_number(found, index, label, telemetry, ("Telemetry", key))

    reason = telemetry.get("HistoryExitReason")
    if reason is None:
        found.add(f"{label}: Telemetry.HistoryExitReason is missing", index, ("Telemetry", "HistoryExitReason"))
    elif reason not in HISTORY_EXIT_REASONS:
        found.add(
            f"{label}: Telemetry.HistoryExitReason {_describe(reason)} is not one of {', '.join(HISTORY_EXIT_REASONS)}",
            index,
            ("Telemetry", "HistoryExitReason"),
        )

    detected = _check_bool(found, index, label, telemetry, ("Telemetry", "ExecutionSuccessDetected"))
    if detected:
        at = telemetry.get("ExecutionSuccessAt")
        path = ("Telemetry", "ExecutionSuccessAt")
        if not isinstance(at, str) or not at.strip():
            found.add(
                f"{label}: Telemetry.ExecutionSuccessAt is not set although ExecutionSuccessDetected is true",
                index,
                path,
            )
        else:
            try:
                parse_iso8601(at)
            except ValueError:
                found.add(f"{label}: Telemetry.ExecutionSuccessAt {_describe(at)} is not an ISO 8601 time", index, path)
    _check_bool(found, index, label, telemetry, ("Telemetry", "HistoryPostExecutionTimeoutReached"))

    limit = telemetry.get("HistoryAttemptLimit")
    poll_limit = telemetry.get("pollLimit")
    if poll_limit is not None and is_number(limit) and str(poll_limit) != poll_limit_text(int(limit)):
        found.add(
            f"{label}: Telemetry.pollLimit {_describe(poll_limit)} does not match Telemetry.HistoryAttemptLimit={limit} "
            f"(expected {poll_limit_text(int(limit))!r})",
            index,
            ("Telemetry", "pollLimit"),
        )

    gpu = telemetry.get("GPU")
    if not isinstance(gpu, dict):
        what = "is missing" if gpu is None else f"must be an object, found {_describe(gpu)}"
        found.add(f"{label}: Telemetry.GPU {what}", index, ("Telemetry", "GPU"))
    else:
        name = gpu.get("Name")
        if not isinstance(name, str) or not name.strip():
            what = "is missing" if name is None else "is blank" if isinstance(name, str) else "must be text"
            found.add(f"{label}: Telemetry.GPU.Name {what}", index, ("Telemetry", "GPU", "Name"))
        for key in _NUMERIC_GPU:
            _check_number(found, index, label, gpu, ("Telemetry", "GPU", key))

    system = telemetry.get("System")
    if not isinstance(system, dict):
        what = "is missing" if system is None else f"must be an object, found {_describe(system)}"
        found.add(f"{label}: Telemetry.System {what}", index, ("Telemetry", "System"))
    elif not isinstance(system.get("FallbackNotes"), list):
        notes = system.get("FallbackNotes")
        what = "is missing" if notes is None else f"must be a list, found {_describe(notes)}"
        found.add(f"{label}: Telemetry.System.FallbackNotes {what}", index, ("Telemetry", "System", "FallbackNotes"))


def _summary_number(text: str | None, unit: str = "") -> float | None:
    if text is None:
        return None
    if unit and text.endswith(unit):
        text = text[: -len(unit)]
    try:
        return float(text)
    except ValueError:
        return None


def _check_queue_policy(found: _Findings, metadata: dict[str, Any], summary: ParsedSummary) -> None:
    config = metadata.get("QueueConfig")
    if not isinstance(config, dict):
        return  # reported by the metadata checks
    if summary.queue_policy is None:
        found.add("run-summary.txt has no 'Queue policy:' line (QueueConfig)")
        return
    for key, field_name in _QUEUE_POLICY:
        expected = config.get(field_name)
        if not is_number(expected):
            continue  # the schema reports it
        shown = summary.queue_policy.get(key)
        if shown is None:
            found.add(f"run-summary.txt Queue policy has no {key}= (QueueConfig.{field_name}={expected})")
            continue
        if key == "historyMaxAttempts":
            matches = shown == poll_limit_text(int(expected))
        else:
            number = _summary_number(shown, "s")
            matches = number is not None and abs(number - float(expected)) < 1e-9
        if not matches:
            found.add(f"run-summary.txt Queue policy {key}={shown} does not match QueueConfig.{field_name}={expected}")


def _check_scene_summary(found: _Findings, index: int, scene: Any, summary: ParsedSummary) -> None:
    if not isinstance(scene, dict) or scene.get("SceneId") is None:
        return  # without an id no line can be attributed; the metadata checks report the scene
    scene_id = one_line(scene["SceneId"])
    telemetry = scene.get("Telemetry") if isinstance(scene.get("Telemetry"), dict) else None
    line = summary.telemetry.get(scene_id)

    def add(message: str) -> None:
        # The label is only worked out for a failed check.
        found.add(f"{_scene_label(index, scene)}: {message}")

    if line is None:
        add(f"run-summary.txt has no '[Scene {scene_id}] Telemetry:' line")
    elif telemetry is not None:
        fields = line.fields
        limit = telemetry.get("HistoryAttemptLimit")
        if is_number(limit):
            shown = fields.get("pollLimit")
            expected = poll_limit_text(int(limit))
            if shown is None:
                add("run-summary.txt Telemetry line has no pollLimit (Telemetry.HistoryAttemptLimit)")
            elif shown != expected:
                add(
                    f"run-summary.txt pollLimit={shown} does not match Telemetry.HistoryAttemptLimit={limit} "
                    f"(expected pollLimit={expected})"
                )
        budget = telemetry.get("SceneRetryBudget")
        if is_number(budget):
            shown = fields.get("SceneRetryBudget")
            number = _summary_number(shown)
            if shown is None:
                add("run-summary.txt Telemetry line has no SceneRetryBudget")
            elif number is None or number != float(budget):
                add(f"run-summary.txt SceneRetryBudget={shown} does not match Telemetry.SceneRetryBudget={budget}")
        duration = telemetry.get("DurationSeconds")
        if is_number(duration):
            shown = fields.get("DurationSeconds")
            number = _summary_number(shown, "s")
            if shown is None:
                add("run-summary.txt Telemetry line has no DurationSeconds")
            elif number is None or abs(number - float(duration)) > _DURATION_TOLERANCE:
                add(
                    f"run-summary.txt DurationSeconds={shown} does not match "
                    f"Telemetry.DurationSeconds={duration} to one decimal"
                )
        system = telemetry.get("System")
        notes = system.get("FallbackNotes") if isinstance(system, dict) else None
        for note in notes if isinstance(notes, list) else []:
            if not line.has_note(str(note)):
                add(
                    f"run-summary.txt Telemetry line lacks fallback note {_describe(str(note))} "
                    "(Telemetry.System.FallbackNotes)"
                )

    count, floor = scene.get("FrameCount"), scene.get("FrameFloor")
    if is_number(count) and is_number(floor) and count < floor and scene_id not in summary.frame_floor_warnings:
        add(
            "run-summary.txt has no 'WARNING: Frame count below floor' line although "
            f"FrameCount={count} < FrameFloor={floor}"
        )
    summaries = scene.get("AttemptSummaries")
    for position, attempt in enumerate(summaries if isinstance(summaries, list) else []):
        if not isinstance(attempt, dict):
            continue
        number = attempt.get("Attempt")
        number = number if isinstance(number, int) and not isinstance(number, bool) else position + 1
        shown = summary.attempts.get((scene_id, number))
        if shown is None:
            add(f"run-summary.txt has no '[Scene {scene_id}][Attempt {number}]' line (AttemptSummaries[{position}])")
            continue
        frames_text, duration_text = shown
        frames = attempt.get("FrameCount")
        if is_number(frames) and frames_text != str(frames):
            add(
                f"run-summary.txt [Attempt {number}] Frames={frames_text} does not match "
                f"AttemptSummaries[{position}].FrameCount={frames}"
            )
        duration = attempt.get("DurationSeconds")
        number_shown = _summary_number(duration_text)
        if is_number(duration) and (number_shown is None or abs(number_shown - float(duration)) > _DURATION_TOLERANCE):
            add(
                f"run-summary.txt [Attempt {number}] Duration={duration_text}s does not match "
                f"AttemptSummaries[{position}].DurationSeconds={duration} to one decimal"
            )
    if scene.get("HistoryRetrieved") is False and scene_id not in summary.history_warnings:
        add("run-summary.txt has no 'HISTORY WARNING' or 'HISTORY ERROR' line although HistoryRetrieved is false")


@lru_cache(maxsize=1)
def _schema_validator() -> jsonschema.protocols.Validator:
    schema = load_schema()
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def _schema_message(error: jsonschema.ValidationError) -> str:
    # For an optional field pydantic emits anyOf[<type>, null]; the branch that is not "null" says what is wrong.
    if error.validator in ("anyOf", "oneOf") and error.context:
        useful = [e for e in error.context if not (e.validator == "type" and e.validator_value == "null")]
        if len(useful) == 1:
            return useful[0].message
    return error.message


def _required_name(error: jsonschema.ValidationError) -> str | None:
    match = re.match(r"^'(.+)' is a required property$", error.message)
    return match[1] if match else None


def _dotted(path: Iterable[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _check_schema(found: _Findings, metadata: dict[str, Any]) -> None:
    errors = sorted(
        _schema_validator().iter_errors(metadata),
        key=lambda e: ([str(p) for p in e.absolute_path], e.message),
    )
    for error in errors:
        path: list[Any] = list(error.absolute_path)
        if error.validator == "required" and (name := _required_name(error)) is not None:
            path.append(name)
        scene: int | None = None
        prefix = "artifact-metadata.json"
        if len(path) >= 2 and path[0] == "Scenes" and isinstance(path[1], int):
            scene = path[1]
            scenes = metadata.get("Scenes")
            prefix = _scene_label(scene, scenes[scene] if isinstance(scenes, list) and scene < len(scenes) else None)
            rest = tuple(path[2:])
        else:
            rest = tuple(path)
        if found.is_covered(scene, rest):
            continue
        where = _dotted(rest) or "(top level)"
        found.add(f"{prefix}: {where}: {_schema_message(error)} (JSON Schema)", scene, rest)


def validate_run(metadata: Any, summary_text: str) -> list[str]:
    """Every failed check for a run's parsed metadata and its summary text; empty when the run is valid."""
    return _failed_checks(metadata, summary_text, schema=True)


def _failed_checks(metadata: Any, summary_text: str, *, schema: bool) -> list[str]:
    if not isinstance(metadata, dict):
        return [f"{METADATA_FILE}: the top level must be a JSON object, found {type(metadata).__name__}"]
    found = _Findings()
    scenes = metadata.get("Scenes")
    if not isinstance(scenes, list):
        what = "is missing" if scenes is None else f"must be a list, found {_describe(scenes)}"
        found.add(f"{METADATA_FILE}: Scenes {what}", None, ("Scenes",))
        scenes = []
    if not isinstance(metadata.get("QueueConfig"), dict):
        config = metadata.get("QueueConfig")
        what = "is missing" if config is None else f"must be an object, found {_describe(config)}"
        found.add(f"{METADATA_FILE}: QueueConfig {what}", None, ("QueueConfig",))
    run_id = metadata.get("RunId")
    if not isinstance(run_id, str) or not run_id.strip():
        what = "is missing" if run_id is None else f"must be non-blank text, found {_describe(run_id)}"
        found.add(f"{METADATA_FILE}: RunId {what}", None, ("RunId",))
    if isinstance(metadata.get("Scenes"), list) and not scenes:
        found.add(f"{METADATA_FILE}: Scenes is empty: a run has at least one scene", None, ("Scenes",))
    for index, scene in enumerate(scenes):
        _check_scene(found, index, scene)

    summary = parse_summary(summary_text)
    _check_queue_policy(found, metadata, summary)
    for index, scene in enumerate(scenes):
        _check_scene_summary(found, index, scene, summary)

    if schema:
        _check_schema(found, metadata)
    return found.messages


def _read_text(path: Path) -> tuple[str | None, str | None]:
    """(text, None) or (None, one sentence saying what is wrong with the file)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"{path.name} is missing from {path.parent}."
    except IsADirectoryError:
        return None, f"{path} is a folder, not a file."
    except OSError as exc:
        return None, f"{path} cannot be read: {exc.strerror or exc}."
    try:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            return data.decode("utf-16"), None
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        return None, f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start} does not decode)."


def fast_check(metadata: Any, summary_text: str) -> int | None:
    """The scene count when ``validate_run(metadata, summary_text)`` would find nothing, else ``None``.

    For metadata this package has just written (see ``runs.finalize_files``), checked without jsonschema: the
    committed schema compiled to pydantic-core (``schema.compile_schema``) accepts only what jsonschema accepts, and
    the other checks run unchanged. ``None`` says nothing either way: then validate_run decides and words the findings.
    """
    try:
        compiled_schema().validate_python(metadata)
    except ValueError:
        return None
    if _failed_checks(metadata, summary_text, schema=False):
        return None
    return len(metadata["Scenes"])


def validate_run_dir(path: str | Path) -> ValidationReport:
    """Read RUN_DIR's artifact-metadata.json and run-summary.txt and validate them; never raises for bad input."""
    run_dir = Path(path)
    problems: list[str] = []
    if not run_dir.exists():
        problems.append(f"Run folder {run_dir} does not exist.")
    elif not run_dir.is_dir():
        problems.append(
            f"{run_dir} is not a folder; pass the run folder that holds {METADATA_FILE} and {SUMMARY_FILE}."
        )
    if problems:
        return ValidationReport(run_dir=str(run_dir), valid=False, errors=problems)

    metadata: Any = None
    metadata_text, problem = _read_text(run_dir / METADATA_FILE)
    if problem:
        problems.append(problem)
    elif metadata_text is not None:
        try:
            metadata = json.loads(metadata_text)
        except json.JSONDecodeError as exc:
            problems.append(
                f"{run_dir / METADATA_FILE} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
            )
        except RecursionError:
            problems.append(f"{run_dir / METADATA_FILE} is nested too deeply to be a run's metadata.")
    summary_text, problem = _read_text(run_dir / SUMMARY_FILE)
    if problem:
        problems.append(problem)
    if problems:
        return ValidationReport(run_dir=str(run_dir), valid=False, errors=problems)

    errors = validate_run(metadata, summary_text or "")
    scenes = metadata.get("Scenes") if isinstance(metadata, dict) else None
    return ValidationReport(
        run_dir=str(run_dir),
        valid=not errors,
        errors=errors,
        scene_count=len(scenes) if isinstance(scenes, list) else None,
    )


_UNCHECKED: Any = object()


def validate_written_run(
    path: str | Path, metadata: Any, metadata_bytes: bytes, summary_text: str, *, passed: int | None = _UNCHECKED
) -> ValidationReport:
    """:func:`validate_run_dir` for a run this package has just written from ``metadata``: the same report, sooner.

    ``metadata_bytes`` must be what was written for ``metadata`` (``runs.metadata_json``, JSON that reads back as
    ``metadata``) and ``summary_text`` the summary written; ``passed``, when given, what
    ``fast_check(metadata, summary_text)`` returned (finalize works it out while the files are being written). When
    artifact-metadata.json holds exactly those bytes and run-summary.txt reads as that text, the fast check stands for
    the files; otherwise, or when it is not a clean pass, validate_run_dir reads both files and reports as usual.
    """
    run_dir = Path(path)
    try:
        as_written = (run_dir / METADATA_FILE).read_bytes() == metadata_bytes
    except OSError:
        as_written = False
    if as_written and _read_text(run_dir / SUMMARY_FILE)[0] == summary_text:
        scenes = fast_check(metadata, summary_text) if passed is _UNCHECKED else passed
        if scenes is not None:
            return ValidationReport(run_dir=str(run_dir), valid=True, errors=[], scene_count=scenes)
    return validate_run_dir(run_dir)


def _handle(args: argparse.Namespace) -> int:
    """Validate one run folder; exit 0 when valid, 2 otherwise."""
    try:
        report = validate_run_dir(args.run_dir)
    except Exception as exc:  # a bug here must still end in one readable line, not a traceback
        logger.debug("validation crashed", exc_info=True)
        report = ValidationReport(
            run_dir=str(args.run_dir), valid=False, errors=[f"Validating {args.run_dir} failed unexpectedly: {exc!r}"]
        )
    if args.json:
        print(json.dumps(report.to_json_dict(), indent=2, ensure_ascii=False))
    elif report.valid:
        print(f"OK: {report.run_dir} is a valid run ({report.scene_count} scenes).")
    else:
        for error in report.errors:
            print(error)
        print(f"{len(report.errors)} problem(s) in {report.run_dir}", file=sys.stderr)
    return 0 if report.valid else 2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``validate`` sub-command."""
    parser = subparsers.add_parser(
        "validate",
        help="validate a run folder (artifact-metadata.json + run-summary.txt)",
        description="Validate RUN_DIR's artifact-metadata.json and run-summary.txt; exit 0 when valid, 2 otherwise.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="folder holding artifact-metadata.json and run-summary.txt")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_handle)
