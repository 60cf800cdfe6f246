"""Webhook event bodies (pydantic models, one committed JSON Schema per event) and their signature.

Every body is ``{"Event", "EventId", "OccurredAt", "Package", "Version", "Data"}``; ``Data`` is the event's own
model. The JSON Schemas live beside the contract's (``telemetry/schemas/webhook-<event>.schema.json``) and are
checked and rewritten with ``python -m telemetry schema --check`` / ``--write``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import GenerateJsonSchema

from ..records import PromptRecord, iso

__all__ = [
    "EVENT_MODELS",
    "HealthChanged",
    "PromptEnded",
    "RunFinalized",
    "event_body",
    "generate_event_schemas",
    "prompt_ended_data",
    "schema_path",
    "sign",
    "verify",
]

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class _Model(BaseModel):
    # Unknown fields are dropped, and the schemas do not forbid extra ones: receivers keep working when a later
    # version adds a field. Every field is always sent, so the schemas require them all.
    model_config = ConfigDict(extra="ignore", json_schema_serialization_defaults_required=True)


class _NoTitles(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        """Never: titles derived from PascalCase names ("Nodeid") say less than the keys themselves."""
        return False


class MarkerView(_Model):
    """A WriteDoneMarker of the prompt: its prefix, what became of it and where the file is."""

    NodeId: str
    Prefix: str
    State: Literal["pending", "written", "failed", "error", "skipped"]
    Path: str | None = Field(default=None, description="Absolute path of the .done/.failed file, when written.")
    Error: str | None = None


class ErrorView(_Model):
    """The failing node and message of a prompt that did not succeed."""

    NodeId: str | None = None
    NodeType: str | None = None
    ExceptionType: str | None = None
    Message: str | None = None


class PromptEndedData(_Model):
    """``prompt.ended``: one prompt reached a final outcome; its markers are on disk and its record is stored."""

    PromptId: str
    Outcome: Literal["success", "error", "interrupted", "crashed", "cancelled", "lost"] = Field(
        description="crashed: cut off by a stop while it ran; cancelled: removed from the queue before it ran; "
        "lost: still queued when ComfyUI stopped (crashed and lost are announced at the next start)."
    )
    RunId: str | None = None
    SceneId: str | None = None
    Attempt: int = Field(default=1, ge=1)
    RetryOf: str | None = None
    RetriedBy: str | None = Field(default=None, description="Prompt id queued to retry this failed attempt.")
    QueuedAt: str | None = Field(default=None, description="ISO 8601 UTC.")
    StartedAt: str | None = Field(default=None, description="ISO 8601 UTC.")
    EndedAt: str | None = Field(default=None, description="ISO 8601 UTC.")
    QueueWaitSeconds: float | None = None
    DurationSeconds: float | None = None
    Markers: list[MarkerView] = Field(default_factory=list)
    Error: ErrorView | None = None
    FallbackNotes: list[str] = Field(default_factory=list)


class RunFinalizedData(_Model):
    """``run.finalized``: what ``POST /telemetry/runs/{run_id}/finalize`` answered."""

    RunId: str
    RunDir: str
    MetadataPath: str
    SummaryPath: str
    Valid: bool
    Errors: list[str] = Field(default_factory=list)
    Problems: list[str] = Field(default_factory=list, description="Deprecated alias of Errors.")
    Scenes: int = Field(ge=0)


class HealthCheckView(_Model):
    """One check of the health report."""

    Name: str
    Status: str
    Detail: str | None = None
    Since: str | None = Field(default=None, description="When the check left ok, ISO 8601 UTC.")


class HealthChangedData(_Model):
    """``health.changed``: the worker's health state (as ``GET /telemetry/health`` reports it) changed."""

    State: str = Field(description="The new state, in the health route's words (ok, degraded, down).")
    Previous: str | None = Field(default=None, description="The state before, or null for the first report.")
    Reasons: list[str] = Field(default_factory=list, description="'<check>: <detail>' of every check not ok.")
    Checks: list[HealthCheckView] = Field(default_factory=list, description="Every check of the report.")


class _Envelope(_Model):
    EventId: str = Field(description="UUID of the event; the same for every endpoint it is sent to.")
    OccurredAt: str = Field(description="When the event happened, ISO 8601 UTC.")
    Package: Literal["run-telemetry"] = "run-telemetry"
    Version: str


class PromptEnded(_Envelope):
    """Body of a ``prompt.ended`` delivery."""

    Event: Literal["prompt.ended"] = "prompt.ended"
    Data: PromptEndedData


class RunFinalized(_Envelope):
    """Body of a ``run.finalized`` delivery."""

    Event: Literal["run.finalized"] = "run.finalized"
    Data: RunFinalizedData


class HealthChanged(_Envelope):
    """Body of a ``health.changed`` delivery."""

    Event: Literal["health.changed"] = "health.changed"
    Data: HealthChangedData


EVENT_MODELS: dict[str, type[_Envelope]] = {
    "prompt.ended": PromptEnded,
    "run.finalized": RunFinalized,
    "health.changed": HealthChanged,
}


def prompt_ended_data(rec: PromptRecord) -> dict[str, Any]:
    """``prompt.ended``'s ``Data`` from a final record (plain JSON types; validated when the body is built)."""
    return {
        "PromptId": rec.PromptId,
        "Outcome": rec.Outcome,
        "RunId": rec.RunId,
        "SceneId": rec.SceneId,
        "Attempt": rec.Attempt,
        "RetryOf": rec.RetryOf,
        "RetriedBy": rec.RetriedBy,
        "QueuedAt": rec.QueuedAt,
        "StartedAt": rec.StartedAt,
        "EndedAt": rec.EndedAt,
        "QueueWaitSeconds": rec.QueueWaitSeconds,
        "DurationSeconds": rec.DurationSeconds,
        "Markers": [m.model_dump(include={"NodeId", "Prefix", "State", "Path", "Error"}) for m in rec.Markers],
        "Error": rec.Error.model_dump(include={"NodeId", "NodeType", "ExceptionType", "Message"})
        if rec.Error
        else None,
        "FallbackNotes": list(rec.FallbackNotes),
    }


def event_body(event: str, data: Mapping[str, Any], *, version: str, occurred_at: float) -> bytes:
    """The JSON body of ``event`` (validated by its model; raises ``pydantic.ValidationError`` on bad data)."""
    model = EVENT_MODELS[event]
    body = model(EventId=str(uuid.uuid4()), OccurredAt=iso(occurred_at) or "", Version=version, Data=dict(data))
    return body.model_dump_json(by_alias=True).encode()


def sign(secret: str, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256 of body with secret>``: the ``X-Run-Telemetry-Signature`` header.

    The key is the secret's UTF-8 bytes; a secret read from an environment holding bytes that are not UTF-8 (Python
    keeps them as surrogate escapes) signs with those very bytes, as the receiver's copy of the variable holds them.
    """
    return "sha256=" + hmac.new(secret.encode("utf-8", "surrogateescape"), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is ``body``'s signature with ``secret`` (constant-time comparison)."""
    return bool(header) and hmac.compare_digest(sign(secret, body), str(header))


def schema_path(event: str) -> Path:
    """Where the committed JSON Schema of ``event``'s body lives."""
    return SCHEMA_DIR / f"webhook-{event}.schema.json"


def generate_event_schemas() -> dict[str, dict[str, Any]]:
    """Event name -> the JSON Schema (draft 2020-12) its model defines."""
    out = {}
    for event, model in EVENT_MODELS.items():
        body = model.model_json_schema(mode="serialization", schema_generator=_NoTitles)
        body["title"] = f"Run Telemetry webhook: {event}"
        out[event] = {"$schema": _DIALECT, "$id": f"urn:run-telemetry:webhook:{event}", **body}
    return out


def render_event_schema(event: str) -> str:
    """The exact text of ``event``'s committed schema file."""
    return json.dumps(generate_event_schemas()[event], indent=2, ensure_ascii=False) + "\n"


def event_schema_drift() -> list[str]:
    """One line per committed event schema that is missing or differs from what the models generate."""
    problems = []
    for event in EVENT_MODELS:
        path = schema_path(event)
        try:
            if path.read_text(encoding="utf-8") != render_event_schema(event):
                problems.append(f"{path} differs from the {event} model; run `python -m telemetry schema --write`.")
        except OSError as exc:
            problems.append(f"{path} cannot be read ({exc}); run `python -m telemetry schema --write`.")
    return problems


def write_event_schemas() -> list[Path]:
    """Rewrite every committed event schema; return the paths."""
    paths = []
    for event in EVENT_MODELS:
        path = schema_path(event)
        path.write_text(render_event_schema(event), encoding="utf-8", newline="\n")
        paths.append(path)
    return paths
