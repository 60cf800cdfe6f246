"""The run telemetry contract: pydantic v2 models for ``artifact-metadata.json`` and the GPU/system snapshots.

Field names are fixed by the pipelines that already read these runs (an older PowerShell helper wrote them), so every
JSON key is an explicit alias: PascalCase, except the derived ``pollLimit``. Python code uses the snake_case names.

Compatibility rules, which the published JSON Schema (``telemetry/schemas/artifact-metadata.schema.json``) inherits:

- the fields the validator requires are required; everything else, including all this package adds, is optional;
- unknown fields are kept (``extra="allow"``), so runs carrying extra keys from the older helper still validate;
- times are ISO 8601 strings (UTC, ``Z`` suffix when this package writes them); see :func:`iso_utc`.

Dump with :meth:`ContractModel.to_json_dict` (aliases on, ``None`` fields left out) so files use the contract names.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

__all__ = [
    "HISTORY_EXIT_REASONS",
    "ArtifactMetadata",
    "AttemptSummary",
    "ContractModel",
    "DeviceInfo",
    "GpuBlock",
    "LLMHealthInfo",
    "QueueConfig",
    "Scene",
    "SnapshotSource",
    "Story",
    "SystemBlock",
    "SystemSnapshot",
    "Telemetry",
    "bytes_to_mib",
    "is_number",
    "iso_utc",
    "parse_iso8601",
    "poll_limit_text",
    "utc_now_iso",
]

HistoryExitReason = Literal["success", "maxWait", "attemptLimit", "postExecution", "unknown"]
HISTORY_EXIT_REASONS: tuple[str, ...] = ("success", "maxWait", "attemptLimit", "postExecution", "unknown")
SnapshotSource = Literal["nvml", "torch-cuda", "nvidia-smi", "system-ram"]

# A plain string in Python (the older helper wrote 7 fractional digits, which not every parser takes), published as
# an ISO 8601 date-time in the schema.
IsoTime = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]

_MIB = 1048576


class ContractModel(BaseModel):
    """Base for every contract record: PascalCase aliases, python names accepted, unknown fields kept."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_json_dict(self) -> dict[str, Any]:
        """This record as JSON-ready data under the contract's field names, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- snapshots (this package's shape for System.Before / System.After) ---------------------------------------------


class DeviceInfo(ContractModel):
    """One compute device as a probe saw it; for a CPU run the "VRAM" fields hold system RAM."""

    name: str = Field(alias="Name", description="Device name, e.g. 'NVIDIA GeForce RTX 4090' or 'cpu'.")
    type: str = Field(alias="Type", description="'cuda' for an NVIDIA GPU, 'cpu' when system RAM stands in.")
    index: int | None = Field(
        default=None, alias="Index", description="Index as the answering source numbers it (NVML/nvidia-smi: physical)."
    )
    cuda_index: int | None = Field(
        default=None, alias="CudaIndex", description="Index as CUDA/torch sees it after CUDA_VISIBLE_DEVICES."
    )
    vram_total: int | None = Field(default=None, alias="VramTotal", description="Total memory in bytes.")
    vram_free: int | None = Field(default=None, alias="VramFree", description="Free memory in bytes.")
    vram_used: int | None = Field(default=None, alias="VramUsed", description="Used memory in bytes, when reported.")
    uuid: str | None = Field(default=None, alias="Uuid")


class SystemSnapshot(ContractModel):
    """Memory state at one instant: the compute device, every device seen, system RAM, and how it was obtained."""

    timestamp: IsoTime = Field(alias="Timestamp", description="When the snapshot was taken (ISO 8601 UTC).")
    source: SnapshotSource = Field(alias="Source", description="The provider that answered.")
    device: DeviceInfo = Field(alias="Device", description="The device ComfyUI computes on.")
    devices: list[DeviceInfo] = Field(default_factory=list, alias="Devices", description="Every device seen.")
    ram_total: int | None = Field(default=None, alias="RamTotal", description="System RAM in bytes.")
    ram_free: int | None = Field(default=None, alias="RamFree", description="Available system RAM in bytes.")
    driver_version: str | None = Field(default=None, alias="DriverVersion")
    fallback_notes: list[str] = Field(
        default_factory=list, alias="FallbackNotes", description="One note per provider that failed before Source."
    )


# --- per-scene telemetry -------------------------------------------------------------------------------------------


class GpuBlock(ContractModel):
    """``Telemetry.GPU``: the compute device and its free memory before and after the scene's prompt."""

    name: str = Field(alias="Name", description="Never blank; 'cpu' for a CPU run.")
    type: str | None = Field(default=None, alias="Type")
    index: int | None = Field(default=None, alias="Index")
    vram_total: int | None = Field(default=None, alias="VramTotal", description="Bytes.")
    vram_free_before: int | None = Field(default=None, alias="VramFreeBefore", description="Free bytes before.")
    vram_free_after: int | None = Field(default=None, alias="VramFreeAfter", description="Free bytes after.")
    vram_before_mb: float = Field(alias="VramBeforeMB", description="Free MiB before (bytes / 1048576).")
    vram_after_mb: float = Field(alias="VramAfterMB", description="Free MiB after (bytes / 1048576).")
    vram_delta_mb: float = Field(
        alias="VramDeltaMB", description="VramAfterMB - VramBeforeMB; negative means memory was taken."
    )
    # Added by this package.
    source: str | None = Field(default=None, alias="Source", description="Probe that answered (before/after if mixed).")
    uuid: str | None = Field(default=None, alias="Uuid")
    driver_version: str | None = Field(default=None, alias="DriverVersion")
    peak_used_bytes: int | None = Field(default=None, alias="PeakVramUsed", description="Peak use in bytes, if known.")
    peak_used_mb: float | None = Field(default=None, alias="PeakVramMB", description="Peak use in MiB, if known.")
    peak_source: str | None = Field(default=None, alias="PeakSource", description="Where the peak figure came from.")


class SystemBlock(ContractModel):
    """``Telemetry.System``: snapshots around the prompt and the notes of every probe fallback taken."""

    # Older runs hold their own snapshot shape here; this package writes a SystemSnapshot.
    before: SystemSnapshot | dict[str, Any] | None = Field(default=None, alias="Before")
    after: SystemSnapshot | dict[str, Any] | None = Field(default=None, alias="After")
    fallback_notes: list[str] = Field(alias="FallbackNotes", description="May be empty, never missing.")


class Telemetry(ContractModel):
    """Telemetry of one scene attempt (on a scene: its last attempt)."""

    duration_seconds: float = Field(alias="DurationSeconds", ge=0)
    queue_start: IsoTime | None = Field(default=None, alias="QueueStart")
    queue_end: IsoTime | None = Field(default=None, alias="QueueEnd")
    max_wait_seconds: int = Field(alias="MaxWaitSeconds")
    poll_interval_seconds: int = Field(alias="PollIntervalSeconds")
    history_attempts: int = Field(alias="HistoryAttempts", ge=0)
    history_attempt_limit: int = Field(alias="HistoryAttemptLimit", ge=0, description="0 means unbounded.")
    poll_limit: str | int | None = Field(
        default=None, alias="pollLimit", description="Derived: 'unbounded' or HistoryAttemptLimit as text."
    )
    history_exit_reason: HistoryExitReason = Field(alias="HistoryExitReason")
    execution_success_detected: bool = Field(alias="ExecutionSuccessDetected")
    execution_success_at: IsoTime | None = Field(
        default=None, alias="ExecutionSuccessAt", description="Required when ExecutionSuccessDetected is true."
    )
    post_execution_timeout_seconds: int = Field(alias="PostExecutionTimeoutSeconds")
    history_post_execution_timeout_reached: bool = Field(alias="HistoryPostExecutionTimeoutReached")
    scene_retry_budget: int = Field(alias="SceneRetryBudget")
    gpu: GpuBlock = Field(alias="GPU")
    system: SystemBlock = Field(alias="System")
    done_marker_detected: bool | None = Field(default=None, alias="DoneMarkerDetected")
    done_marker_wait_seconds: float | None = Field(default=None, alias="DoneMarkerWaitSeconds")
    done_marker_path: str | None = Field(default=None, alias="DoneMarkerPath")
    forced_copy_triggered: bool | None = Field(default=None, alias="ForcedCopyTriggered")
    forced_copy_debug_path: str | None = Field(default=None, alias="ForcedCopyDebugPath")
    # Optional pipeline fields.
    flf2v_enabled: bool | None = Field(default=None, alias="FLF2VEnabled")
    flf2v_source: Literal["keyframe", "last-frame"] | None = Field(default=None, alias="FLF2VSource")
    flf2v_fallback: bool | str | None = Field(default=None, alias="FLF2VFallback")
    interpolation_elapsed: float | None = Field(default=None, alias="InterpolationElapsed", description="Milliseconds.")
    upscale_method: str | None = Field(default=None, alias="UpscaleMethod")
    final_fps: float | None = Field(default=None, alias="FinalFPS")
    final_resolution: str | None = Field(default=None, alias="FinalResolution")
    # Added by this package.
    prompt_id: str | None = Field(default=None, alias="PromptId", description="ComfyUI prompt id of the attempt.")
    execution_started_at: IsoTime | None = Field(default=None, alias="ExecutionStartedAt")
    queue_wait_seconds: float | None = Field(
        default=None, alias="QueueWaitSeconds", description="Seconds between queueing and execution start."
    )

    @model_validator(mode="after")
    def _derive_poll_limit(self) -> Telemetry:
        # pollLimit is derived text; fill it so every run this package writes carries it.
        if self.poll_limit is None:
            self.poll_limit = poll_limit_text(self.history_attempt_limit)
        return self


class AttemptSummary(ContractModel):
    """One attempt of a scene, as listed in ``AttemptSummaries``."""

    attempt: int | None = Field(default=None, alias="Attempt", ge=1)
    success: bool | None = Field(default=None, alias="Success")
    frame_count: int | None = Field(default=None, alias="FrameCount", ge=0)
    duration_seconds: float | None = Field(default=None, alias="DurationSeconds", ge=0)
    frame_prefix: str | None = Field(default=None, alias="FramePrefix")
    history_exit_reason: HistoryExitReason | None = Field(default=None, alias="HistoryExitReason")
    queue_start: IsoTime | None = Field(default=None, alias="QueueStart")
    queue_end: IsoTime | None = Field(default=None, alias="QueueEnd")
    telemetry: Telemetry | None = Field(default=None, alias="Telemetry")


class Scene(ContractModel):
    """One scene of a run and the telemetry of its last attempt."""

    scene_id: str | int = Field(alias="SceneId")
    title: str | None = Field(default=None, alias="Title")
    prompt: str | None = Field(default=None, alias="Prompt")
    negative_prompt: str | None = Field(default=None, alias="NegativePrompt")
    frame_floor: int | None = Field(default=None, alias="FrameFloor", ge=0)
    frame_count: int | None = Field(default=None, alias="FrameCount", ge=0)
    frame_prefix: str | None = Field(default=None, alias="FramePrefix")
    success: bool | None = Field(default=None, alias="Success")
    meets_frame_floor: bool | None = Field(default=None, alias="MeetsFrameFloor")
    history_retrieved: bool | None = Field(default=None, alias="HistoryRetrieved")
    history_errors: list[str] = Field(default_factory=list, alias="HistoryErrors")
    warnings: list[str] = Field(default_factory=list, alias="Warnings")
    errors: list[str] = Field(default_factory=list, alias="Errors")
    attempts_run: int | None = Field(default=None, alias="AttemptsRun", ge=0)
    requeued: bool | None = Field(default=None, alias="Requeued")
    attempt_summaries: list[AttemptSummary] = Field(default_factory=list, alias="AttemptSummaries")
    telemetry: Telemetry = Field(alias="Telemetry")


class QueueConfig(ContractModel):
    """The queue policy a run used; 0 attempts means unbounded."""

    scene_retry_budget: int = Field(alias="SceneRetryBudget", ge=0)
    history_max_wait_seconds: int = Field(alias="HistoryMaxWaitSeconds", ge=0)
    history_max_attempts: int = Field(alias="HistoryMaxAttempts", ge=0, description="0 means unbounded.")
    history_poll_interval_seconds: int = Field(alias="HistoryPollIntervalSeconds", ge=0)
    post_execution_timeout_seconds: int = Field(alias="PostExecutionTimeoutSeconds", ge=0)


class LLMHealthInfo(ContractModel):
    """Result of the LLM health check a run did (or skipped) before queueing."""

    url: str | None = Field(default=None, alias="Url")
    status: str | None = Field(default=None, alias="Status")
    models: list[str] | int | None = Field(default=None, alias="Models", description="Model names, or their count.")
    skipped: bool | None = Field(default=None, alias="Skipped")
    error: str | None = Field(default=None, alias="Error")
    override: str | None = Field(default=None, alias="Override", description="Model override in force, if any.")


class WorkerInfo(ContractModel):
    """One ComfyUI worker a runner used for the run (written by ``run-telemetry run``, not by a server's finalize)."""

    url: str = Field(alias="Url", description="The worker's base URL, as given to --server.")
    attempts: int = Field(alias="Attempts", ge=0, description="Attempts the runner queued on it (this invocation).")
    failed: bool = Field(alias="Failed", description="True when it stopped answering or died during the run.")
    reason: str | None = Field(default=None, alias="Reason", description="Why it counts as failed.")


class Story(ContractModel):
    """The story a run renders; more fields may follow."""

    id: str | int | None = Field(default=None, alias="Id")
    logline: str | None = Field(default=None, alias="Logline")
    directors_vision: str | None = Field(default=None, alias="DirectorsVision")


class ArtifactMetadata(ContractModel):
    """A whole run: the content of ``artifact-metadata.json``."""

    run_id: str | None = Field(default=None, alias="RunId")
    timestamp: IsoTime | None = Field(default=None, alias="Timestamp", description="When the run started (UTC).")
    run_dir: str | None = Field(default=None, alias="RunDir")
    queue_config: QueueConfig = Field(alias="QueueConfig")
    llm_health_info: LLMHealthInfo | None = Field(default=None, alias="LLMHealthInfo")
    story: Story | None = Field(default=None, alias="Story")
    scenes: list[Scene] = Field(alias="Scenes")
    # Added by this package.
    generator: str | None = Field(default=None, alias="Generator", description="Writer and version of this file.")
    workers: list[WorkerInfo] | None = Field(
        default=None, alias="Workers", description="The workers a runner spread the run over (runner's --out only)."
    )


# --- helpers shared by the recorder, the renderer and the validator -------------------------------------------------


def poll_limit_text(history_attempt_limit: int) -> str:
    """The contract's ``pollLimit`` text: 'unbounded' for 0, else the limit."""
    return "unbounded" if history_attempt_limit == 0 else str(history_attempt_limit)


def bytes_to_mib(value: int | float) -> float:
    """Bytes as MiB (bytes / 1048576) rounded to one decimal, the precision the contract's MB fields carry."""
    return round(value / _MIB, 1)


def iso_utc(moment: datetime) -> str:
    """``moment`` as ISO 8601 UTC with millisecond precision and a ``Z`` suffix; naive times are taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now_iso() -> str:
    """The current time as :func:`iso_utc` text."""
    return iso_utc(datetime.now(timezone.utc))


_ISO_RE = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[T ](?P<time>\d{2}:\d{2}(?::\d{2})?)(?:[.,](?P<frac>\d+))?"
    r"\s*(?P<tz>Z|z|[+-]\d{2}:?\d{2})?$"
)


def parse_iso8601(text: str) -> datetime:
    """Parse an ISO 8601 date-time into an aware UTC datetime; raises ValueError when ``text`` is not one.

    Accepts what both writers produce: any number of fractional digits (.NET writes 7), ``Z`` or an offset, and a
    missing offset, which is taken as UTC because the contract stores UTC.
    """
    match = _ISO_RE.match(text.strip())
    if match is None:
        raise ValueError(f"not an ISO 8601 date-time: {text!r}")
    time_part = match["time"] if match["time"].count(":") == 2 else match["time"] + ":00"
    moment = datetime.fromisoformat(f"{match['date']}T{time_part}")
    if match["frac"]:
        # Beyond microseconds the digits carry nothing a Python datetime can hold.
        moment += timedelta(microseconds=int((match["frac"] + "000000")[:6]))
    tz = match["tz"]
    if tz is None or tz in ("Z", "z"):
        return moment.replace(tzinfo=timezone.utc)
    sign = 1 if tz[0] == "+" else -1
    digits = tz[1:].replace(":", "")
    offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return moment.replace(tzinfo=timezone(sign * offset)).astimezone(timezone.utc)


def is_number(value: Any) -> bool:
    """True for a finite int or float that is not a bool (JSON true/false are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)
