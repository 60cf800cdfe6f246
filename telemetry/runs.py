"""Runs: group prompt records into scenes and attempts and assemble a run's ``artifact-metadata.json``.

Assembly works on records as the store holds them (parsed JSON, see :meth:`Store.by_run_raw`) and builds the
contract's objects directly, in the key order and with the ``None`` fields left out exactly as
``ArtifactMetadata.model_validate(...).to_json_dict()`` would write them (a test keeps the two equal), so a 10,000-scene
run is not validated field by field on the way. What finalize writes is validated once, by :func:`finalize_files`.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydantic_core

from . import __version__
from .atomic import (
    READ_FLAGS,
    MarkerWriteError,
    UnsafePathError,
    atomic_write,
    open_file_under,
    open_folder,
    refuse_symlinked_file,
)
from .contract import telemetry_block
from .models import LLMHealthInfo, Story
from .paths import resolve_under
from .policy import QueuePolicy
from .records import FINAL_OUTCOMES, PromptRecord
from .summary import frame_floor_warning
from .validate import ValidationReport, fast_check, validate_written_run

METADATA_FILE = "artifact-metadata.json"
SUMMARY_FILE = "run-summary.txt"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

RawRecord = Mapping[str, Any]


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


# --- pausing the cyclic garbage collector --------------------------------------------------------------------------

_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a run is assembled, written and validated.

    A 10,000-scene run is millions of small dicts, lists and strings, all acyclic and freed by reference counting;
    left on, the collector walks every live object of the process again and again while they are created (in
    ComfyUI that is everything ComfyUI holds), which made parsing and validating them 2.5-4 times slower in the scale
    bench. Nested and concurrent pauses are counted; the collector is switched back on by the last one to end, and
    only if it was on before the first.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


# --- assembly --------------------------------------------------------------------------------------------------------


def _raw(rec: PromptRecord | RawRecord) -> RawRecord:
    # A PromptRecord in the form the store keeps it (its JSON, without the workflow).
    return rec.model_dump(mode="json", exclude={"Workflow"}) if isinstance(rec, PromptRecord) else rec


def _scene_key(rec: RawRecord) -> str:
    scene = rec.get("SceneId")
    return scene if scene not in (None, "") else rec["PromptId"]


def _scene_sort_key(scene_id: str) -> tuple[int, Any]:
    return (0, int(scene_id)) if scene_id.isdigit() else (1, scene_id)


def _frames(rec: RawRecord) -> int | None:
    for marker in rec.get("Markers") or ():
        if marker.get("FrameCount") is not None:
            return marker["FrameCount"]
    outcome = rec.get("Outcome", "queued")
    if outcome == "success":
        return len(rec.get("Outputs") or ())
    return 0 if outcome in FINAL_OUTCOMES else None


def _prefix(rec: RawRecord) -> str | None:
    markers = rec.get("Markers")
    if markers:
        return markers[0].get("Prefix")
    prefix = (rec.get("Tags") or {}).get("prefix")
    return str(prefix) if prefix is not None else None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _error_message(rec: RawRecord) -> str | None:
    error = rec.get("Error")
    return error.get("Message") if error else None


class _Context:
    """What every attempt's Telemetry block gets from the run: the policy's figures and the history waits."""

    def __init__(self, policy: QueuePolicy, waits: Mapping[str, int]) -> None:
        self.policy = policy
        self.waits = waits
        limit = policy.history_max_attempts
        # Keys the stored block already has (in the contract's order), so updating keeps that order.
        self.overrides = {
            "MaxWaitSeconds": policy.max_wait_seconds,
            "PollIntervalSeconds": policy.poll_interval_seconds,
            "HistoryAttemptLimit": limit,
            "pollLimit": "unbounded" if limit == 0 else str(limit),
            "PostExecutionTimeoutSeconds": policy.post_execution_timeout_seconds,
            "SceneRetryBudget": policy.scene_retry_budget,
        }

    def telemetry(self, rec: RawRecord) -> dict[str, Any]:
        """The attempt's ``Telemetry`` block: the stored one (or one built now) with the run's policy figures."""
        tel = rec.get("Telemetry")
        tel = dict(tel) if tel else telemetry_block(PromptRecord.model_validate(rec), self.policy)
        tel.update(self.overrides)
        attempts = tel["HistoryAttempts"] = int(self.waits.get(rec["PromptId"], 0))
        if rec.get("Outcome", "queued") not in FINAL_OUTCOMES:
            limit = self.policy.history_max_attempts
            tel["HistoryExitReason"] = "attemptLimit" if limit and attempts >= limit else "unknown"
        return tel


def _attempt_summary(number: int, rec: RawRecord, exit_reason: str) -> dict[str, Any]:
    # AttemptSummary's own fields first, then the extra ones, as the model dumps them; None fields left out.
    outcome = rec.get("Outcome", "queued")
    summary: dict[str, Any] = {"Attempt": number, "Success": outcome == "success"}
    frames = _frames(rec)
    if frames is not None:
        summary["FrameCount"] = frames
    summary["DurationSeconds"] = rec.get("DurationSeconds") or 0.0
    prefix = _prefix(rec)
    if prefix is not None:
        summary["FramePrefix"] = prefix
    summary["HistoryExitReason"] = exit_reason
    if rec.get("QueuedAt") is not None:
        summary["QueueStart"] = rec["QueuedAt"]
    if rec.get("EndedAt") is not None:
        summary["QueueEnd"] = rec["EndedAt"]
    summary["PromptId"] = rec["PromptId"]
    summary["Outcome"] = outcome
    error = _error_message(rec)
    if error is not None:
        summary["Error"] = error
    if rec.get("RetryOf"):
        summary["RetryOf"] = rec["RetryOf"]  # queued by the retry budget (not by hand)
    return summary


def _attempt_order(rec: RawRecord) -> tuple[int, int, str, str]:
    # The recorder's sequence number (never the wall clock); records of older versions, without one, come first.
    seq = rec.get("Seq")
    return (0 if seq is None else 1, seq or 0, rec.get("StartedAt") or rec.get("QueuedAt") or "", rec["PromptId"])


def _assemble_scene(scene_id: str, attempts: Sequence[RawRecord], ctx: _Context) -> dict[str, Any]:
    attempts = sorted(attempts, key=_attempt_order) if len(attempts) > 1 else attempts
    last = attempts[-1]
    last_outcome = last.get("Outcome", "queued")
    if len(attempts) == 1:
        tags = last.get("Tags") or {}
    else:
        tags = {k: v for r in attempts for k, v in (r.get("Tags") or {}).items()}
    frames = _frames(last)
    floor = _int_or_none(tags.get("frame_floor"))
    final = last_outcome in FINAL_OUTCOMES and last_outcome not in ("crashed", "lost")
    history_errors = []
    summaries = []
    errors = []
    telemetry: dict[str, Any] = {}
    for number, rec in enumerate(attempts, 1):
        outcome = rec.get("Outcome", "queued")
        message = _error_message(rec)
        if outcome not in ("success", "running", "queued"):
            history_errors.append(f"attempt {number}: {outcome}: {message or outcome}")
        if message:
            errors.append(message)
        telemetry = ctx.telemetry(rec)
        summaries.append(_attempt_summary(number, rec, telemetry["HistoryExitReason"]))
    if not final:
        history_errors.append(f"attempt {len(attempts)}: no final record ({last_outcome})")
    if len(attempts) == 1:
        warnings = list(dict.fromkeys(last.get("FallbackNotes") or ()))
    else:
        warnings = list(dict.fromkeys(n for r in attempts for n in r.get("FallbackNotes") or ()))
    if frames is not None and floor is not None and frames < floor:
        warnings.append(frame_floor_warning(frames, floor))  # the same words as the summary's WARNING line
    # Scene's fields in the model's order; None fields left out.
    scene: dict[str, Any] = {"SceneId": scene_id}
    for key, tag in (("Title", "title"), ("Prompt", "prompt"), ("NegativePrompt", "negative_prompt")):
        value = tags.get(tag)
        if value is not None:
            scene[key] = value
    if floor is not None:
        scene["FrameFloor"] = floor
    if frames is not None:
        scene["FrameCount"] = frames
    prefix = _prefix(last)
    if prefix is not None:
        scene["FramePrefix"] = prefix
    scene["Success"] = last_outcome == "success"
    scene["MeetsFrameFloor"] = (frames or 0) >= (floor or 0)
    scene["HistoryRetrieved"] = final
    scene["HistoryErrors"] = history_errors
    scene["Warnings"] = warnings
    scene["Errors"] = errors
    scene["AttemptsRun"] = len(attempts)
    # Requeued only when the retry budget queued an attempt; a scene queued again by hand is one more attempt.
    scene["Requeued"] = any(r.get("RetryOf") for r in attempts)
    scene["AttemptSummaries"] = summaries
    scene["Telemetry"] = telemetry  # the last attempt's
    return scene


def assemble_scene(
    scene_id: str,
    attempts: Sequence[PromptRecord | RawRecord],
    policy: QueuePolicy,
    waits: Mapping[str, int],
) -> dict[str, Any]:
    """One ``Scenes[]`` entry: its last attempt's telemetry, every attempt summarised."""
    return _assemble_scene(scene_id, [_raw(r) for r in attempts], _Context(policy, waits))


def assemble_run(
    run_id: str,
    records: Sequence[PromptRecord | RawRecord],
    *,
    policy: QueuePolicy,
    output_dir: Path,
    run_info: Mapping[str, Any] | None = None,
    waits: Mapping[str, int] | None = None,
    llm: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's ``artifact-metadata.json`` content in the contract's shape.

    ``records`` are PromptRecords or, faster, the store's parsed JSON of them (:meth:`Store.by_run_raw`), oldest
    first.
    """
    info = dict(run_info or {})
    ctx = _Context(policy, waits or {})
    raws = [_raw(r) for r in records]
    by_scene: dict[str, list[RawRecord]] = {}
    for rec in raws:
        by_scene.setdefault(_scene_key(rec), []).append(rec)
    scenes = [_assemble_scene(sid, by_scene[sid], ctx) for sid in sorted(by_scene, key=_scene_sort_key)]
    notes = list(info.get("PolicyNotes") or [])
    if notes:
        for scene in scenes:
            tel = scene["Telemetry"]
            system = tel["System"] = dict(tel["System"])  # the record's own block stays as stored
            fallback = system["FallbackNotes"] = list(system.get("FallbackNotes") or [])
            fallback.extend(n for n in notes if n not in fallback)
    starts = [s for r in raws if (s := r.get("QueuedAt") or r.get("StartedAt"))]
    story = info.get("Story") or next((s for r in raws if (s := (r.get("Tags") or {}).get("story"))), None)
    # ArtifactMetadata's fields in the model's order; None fields left out.
    meta: dict[str, Any] = {"RunId": run_id}
    if starts:
        meta["Timestamp"] = min(starts)
    meta["RunDir"] = str(run_dir(output_dir, run_id))
    meta["QueueConfig"] = policy.queue_config()
    # No provider configured: no health check ran, so no LLMHealthInfo and no [LLM] line.
    if llm:
        meta["LLMHealthInfo"] = LLMHealthInfo.model_validate(dict(llm)).to_json_dict()
    if isinstance(story, Mapping):
        meta["Story"] = Story.model_validate(
            {
                "Id": story.get("id", story.get("Id")),
                "Logline": story.get("logline", story.get("Logline")),
                "DirectorsVision": story.get("directors_vision", story.get("DirectorsVision")),
            }
        ).to_json_dict()
    meta["Scenes"] = scenes
    meta["Generator"] = f"run-telemetry {__version__}"
    return meta


def foreign_scenes(existing: bytes | None, meta: Mapping[str, Any]) -> dict[str, list[str]]:
    """Scenes of an ``artifact-metadata.json`` already written (its bytes, ``existing``) that ``meta`` would drop:
    scene id -> the prompt ids of its attempts that ``meta`` does not hold (another worker's, on a shared output
    folder). Empty when there is no such file, it does not parse, or everything in it is in ``meta``.
    """
    if existing is None:
        return {}
    try:
        data = json.loads(existing)
    except ValueError:
        return {}
    ours = {a.get("PromptId") for s in meta.get("Scenes") or () for a in s.get("AttemptSummaries") or ()}
    found: dict[str, list[str]] = {}
    for scene in data.get("Scenes") or () if isinstance(data, dict) else ():
        if not isinstance(scene, dict):
            continue
        ids = [a.get("PromptId") for a in scene.get("AttemptSummaries") or () if isinstance(a, dict)]
        missing = [str(i) for i in ids if i and i not in ours]
        if missing:
            found[str(scene.get("SceneId"))] = missing
    return found


def metadata_json(meta: Mapping[str, Any]) -> bytes:
    """``artifact-metadata.json``'s bytes: compact JSON, ASCII only (other text as \\u escapes), a newline at the end.

    Compact because indenting a 10,000-scene run by 2 made the file 36 MB instead of 22 MB and finalize 0.2 s slower.
    pydantic-core's serializer writes what ``json.dumps(meta, separators=(",", ":"))`` would, only faster; exponents
    are spelled 1e-7 rather than 1e-07. Text it cannot encode (a lone surrogate) goes through json.dumps.
    """
    try:
        return pydantic_core.to_json(meta, ensure_ascii=True) + b"\n"
    except pydantic_core.PydanticSerializationError:
        return (json.dumps(meta, separators=(",", ":")) + "\n").encode()


def finalize_files(
    folder: Path,
    meta: Mapping[str, Any],
    summary: str,
    *,
    lap: Callable[[str], None] | None = None,
    output_dir: Path | None = None,
) -> ValidationReport:
    """Write ``artifact-metadata.json`` and ``run-summary.txt`` into ``folder`` atomically and validate them.

    With ``output_dir`` (``folder`` is then ``<output_dir>/telemetry/runs/<run_id>``) the folders below it are opened
    without following symlinks (:func:`telemetry.atomic.open_folder`) and both files are written in the opened run
    folder, so a ``telemetry``, ``runs`` or run folder that is (or becomes) a symlink leading out of the output folder
    is refused with :class:`~telemetry.atomic.UnsafePathError`, as is a run file that is a symlink; nothing is written
    outside. Raises :class:`MarkerWriteError` (an OSError) when a file cannot be written. The report is the one
    ``validate_run_dir(folder)`` gives, found without jsonschema when the files hold what was written (see
    :func:`telemetry.validate.validate_written_run`); the in-memory check runs while the files are written and synced.
    ``lap(step)``, when given, is called after each step.
    """
    folder = Path(folder)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)  # the configured root is trusted; below it is checked
        root, parts = resolve_under(output_dir, folder.relative_to(output_dir).parts)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        root, parts = folder, ()
    data = metadata_json(meta)
    if lap is not None:
        lap("serialize")
    with open_folder(root, parts, create=True) as fd:
        if fd is None:  # Windows: no dir_fd; the resolved path was checked above, write by path
            folder.mkdir(parents=True, exist_ok=True)
        for name in (METADATA_FILE, SUMMARY_FILE):
            refuse_symlinked_file(name, fd, folder / name)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-telemetry-finalize") as pool:
            # Writing and fsync wait on the disk without the GIL; the check needs only the CPU.
            writing = pool.submit(_write_files, folder, data, summary.encode(), fd)
            passed = fast_check(meta, summary)
            if lap is not None:
                lap("check (while writing)")
            writing.result()
        if lap is not None:
            lap("write files (rest)")
        if fd is not None:
            _same_folder(folder, fd)
        report = validate_written_run(folder, meta, data, summary, passed=passed)
    if lap is not None:
        lap("confirm files")
    return report


def _same_folder(folder: Path, fd: int) -> None:
    # The files were written in the opened folder; validation reads them back by path, so that path must still be it.
    try:
        by_path = os.stat(folder, follow_symlinks=False)
    except OSError as exc:
        raise UnsafePathError(exc.errno, f"{folder} vanished while it was finalized", folder) from exc
    opened = os.fstat(fd)
    if (by_path.st_dev, by_path.st_ino) != (opened.st_dev, opened.st_ino):
        raise UnsafePathError(
            errno.ELOOP, f"{folder} was replaced while it was finalized; the files were written, not validated", folder
        )


def _write_files(folder: Path, metadata: bytes, summary: bytes, dir_fd: int | None = None) -> None:
    atomic_write(folder / METADATA_FILE, metadata, dir_fd=dir_fd)
    atomic_write(folder / SUMMARY_FILE, summary, dir_fd=dir_fd)


def is_finalized(output_dir: Path, run_id: str) -> bool:
    """Whether the run's ``artifact-metadata.json`` is a regular file of one name inside the output folder (links not
    followed, hard links not taken: the file routes refuse them)."""
    folder = run_dir(output_dir, run_id)
    try:
        root, parts = resolve_under(output_dir, folder.relative_to(output_dir).parts)
        with open_file_under(root, Path(*parts, METADATA_FILE)) as handle:
            return os.fstat(handle.fileno()).st_nlink == 1  # finalize writes one name; a hard link is not served
    except (OSError, ValueError):
        return False


def read_run_file(output_dir: Path, run_id: str, name: str) -> bytes:
    """The bytes of a finalized run file (``artifact-metadata.json`` or ``run-summary.txt``), never an outside file.

    The run folder is opened below ``output_dir`` without following symlinks and the file with ``O_NOFOLLOW`` in it.
    Raises FileNotFoundError when it does not exist, :class:`~telemetry.atomic.UnsafePathError` when a folder on the
    way leads out of the output folder or the file is a symlink, not a regular file, or a hard link (more than one
    name: finalize writes a file of one, so another name may be a file outside the output folder).
    """
    if name not in (METADATA_FILE, SUMMARY_FILE):
        raise ValueError(f"{name!r} is not a run file")
    folder = run_dir(output_dir, run_id)
    root, parts = resolve_under(output_dir, folder.relative_to(output_dir).parts)
    try:
        with open_folder(root, parts, create=False) as fd:
            if fd is None:  # Windows: no dir_fd; the resolved folder was checked above
                refuse_symlinked_file(name, None, folder / name)
                return (folder / name).read_bytes()
            try:
                file_fd = os.open(name, READ_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EMLINK):
                    refuse_symlinked_file(name, fd, folder / name)
                raise
            with os.fdopen(file_fd, "rb") as handle:
                st = os.fstat(handle.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafePathError(errno.EISDIR, f"{folder / name} is not a regular file; not served", folder)
                if st.st_nlink > 1:
                    # Finalize writes these files by rename (one link); another name may be outside the output folder.
                    raise UnsafePathError(
                        errno.EMLINK,
                        f"{folder / name} is a hard link ({st.st_nlink} names; finalize writes one): not served; "
                        "finalize again to replace it",
                        folder,
                    )
                return handle.read()
    except MarkerWriteError as exc:
        if exc.errno == errno.ENOENT and not isinstance(exc, UnsafePathError):
            raise FileNotFoundError(errno.ENOENT, str(exc), str(folder)) from exc
        raise


def run_status(row: Mapping[str, Any]) -> str:
    """``running`` while any prompt is pending, ``failed`` when any failed, else ``complete``."""
    if row.get("Pending"):
        return "running"
    return "failed" if row.get("Failed") else "complete"
