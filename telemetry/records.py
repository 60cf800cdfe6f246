"""The per-prompt record: what the recorder captures, the store keeps, and the routes serve (PascalCase JSON)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

OutcomeName = Literal["queued", "running", "success", "error", "interrupted", "crashed", "cancelled", "lost"]
# cancelled: removed from ComfyUI's queue before it ran (POST /queue delete or clear, the jobs cancel route).
# lost: still queued when ComfyUI stopped (ComfyUI does not restore its queue); marked so at the next start.
FINAL_OUTCOMES: frozenset[str] = frozenset({"success", "error", "interrupted", "crashed", "cancelled", "lost"})
# Final outcomes of prompts that never ran: no node timings, snapshots or outputs, and never retried.
UNRUN_OUTCOMES: frozenset[str] = frozenset({"cancelled", "lost"})


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds (``None`` stays ``None``)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class NodeTiming(_Model):
    """How long one node took in one prompt (summed over ComfyUI's calls, which repeat for lazy inputs)."""

    NodeId: str
    ClassType: str = ""
    Seconds: float = 0.0
    Calls: int = 0
    Cached: bool = False


class Span(_Model):
    """A TelemetryCapture span: VRAM and time around what feeds the node."""

    Label: str
    NodeId: str
    Seconds: float | None = None
    VramBeforeMB: float | None = None
    VramAfterMB: float | None = None
    VramDeltaMB: float | None = None
    Source: str | None = None


class PromptError(_Model):
    """The failing node and message of a prompt that ended in error or was interrupted."""

    NodeId: str | None = None
    NodeType: str | None = None
    ExceptionType: str | None = None
    Message: str | None = None


class OutputRef(_Model):
    """A file an output node reported (ComfyUI's UI output entry)."""

    NodeId: str
    Filename: str
    Subfolder: str = ""
    Type: str = "output"


class MarkerState(_Model):
    """A WriteDoneMarker of the prompt and what became of it."""

    NodeId: str
    Prefix: str
    FrameCount: int | None = None
    Sha256: bool = False
    State: Literal["pending", "written", "failed", "error", "skipped"] = "pending"
    Outcome: str | None = Field(default=None, description="The .failed marker's Outcome (error, validation ...).")
    Path: str | None = None
    WaitSeconds: float | None = None
    Error: str | None = None


class PeakVramInfo(_Model):
    """Peak VRAM during the prompt, and how it was measured (or why it was not)."""

    Bytes: int | None = None
    MB: float | None = None
    Method: str = "unavailable"


class PromptRecord(_Model):
    """Everything recorded about one prompt."""

    PromptId: str
    RunId: str | None = None
    SceneId: str | None = None
    Tags: dict[str, Any] = Field(default_factory=dict)
    ClientId: str | None = None
    Outcome: OutcomeName = "queued"
    Error: PromptError | None = None
    QueuedAt: str | None = None
    StartedAt: str | None = None
    EndedAt: str | None = None
    ExecutionSuccessAt: str | None = None
    QueueWaitSeconds: float | None = None
    DurationSeconds: float | None = None
    Before: dict[str, Any] | None = None
    After: dict[str, Any] | None = None
    PeakVram: PeakVramInfo = Field(default_factory=PeakVramInfo)
    Nodes: list[NodeTiming] = Field(default_factory=list)
    Spans: list[Span] = Field(default_factory=list)
    Outputs: list[OutputRef] = Field(default_factory=list)
    Markers: list[MarkerState] = Field(default_factory=list)
    FallbackNotes: list[str] = Field(default_factory=list)
    RetryOf: str | None = Field(default=None, description="Prompt id of the failed attempt this one retries.")
    RetriedBy: str | None = Field(default=None, description="Prompt id queued to retry this failed attempt.")
    Attempt: int = 1
    Seq: int | None = Field(
        default=None, description="Order of acceptance (monotonic; never the wall clock): newest is highest."
    )
    Telemetry: dict[str, Any] | None = None
    Workflow: dict[str, Any] | None = Field(default=None, description="The API prompt, kept for retries.")
    # The rest of the submission, for a retry that keeps it whole: extra_data (every key), outputs to execute and
    # ComfyUI's sensitive extra_data. In memory only, until the finishing steps ran: never serialized.
    Submission: dict[str, Any] | None = Field(default=None, exclude=True)

    def summary(self) -> dict[str, Any]:
        """The small form sent over the websocket and listed by ``GET /telemetry``."""
        gpu = (self.Telemetry or {}).get("GPU", {}) if self.Telemetry else {}
        return {
            "PromptId": self.PromptId,
            "RunId": self.RunId,
            "SceneId": self.SceneId,
            "Outcome": self.Outcome,
            "QueuedAt": self.QueuedAt,
            "StartedAt": self.StartedAt,
            "EndedAt": self.EndedAt,
            "QueueWaitSeconds": self.QueueWaitSeconds,
            "DurationSeconds": self.DurationSeconds,
            "VramBeforeMB": gpu.get("VramBeforeMB"),
            "VramAfterMB": gpu.get("VramAfterMB"),
            "VramDeltaMB": gpu.get("VramDeltaMB"),
            "Gpu": gpu.get("Name"),
            "Error": self.Error.model_dump() if self.Error else None,
            "Markers": [m.model_dump(include={"NodeId", "Prefix", "State", "Path", "Error"}) for m in self.Markers],
            "Spans": [s.model_dump() for s in self.Spans],
            "FallbackNotes": list(self.FallbackNotes),
            "Attempt": self.Attempt,
            "RetriedBy": self.RetriedBy,
        }
