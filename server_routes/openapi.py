"""The OpenAPI 3.0 document of the package's routes (kept beside the handlers; a test checks they match)."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "description": "Error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}, "parameter": {"type": "string"}},
            }
        }
    },
}
_OBJ = {"content": {"application/json": {"schema": {"type": "object"}}}}


def _ok(description: str) -> dict[str, Any]:
    return {"description": description, **_OBJ}


_NULLABLE_STR = {"type": "string", "nullable": True}
_WEBHOOK_ENDPOINT = {
    "type": "object",
    "properties": {
        "Url": {"type": "string", "description": "Without user info; a query shown as ?…"},
        "Source": {"type": "string", "enum": ["environment", "run", "stored"]},
        "Delivered": {"type": "integer"},
        "Pending": {"type": "integer"},
        "GivenUp": {"type": "integer"},
        "FailedTries": {"type": "integer"},
        "Failing": {"type": "boolean", "description": "The last try failed"},
        "LastError": _NULLABLE_STR,
        "LastErrorAt": _NULLABLE_STR,
        "LastDeliveredAt": _NULLABLE_STR,
    },
}
_WEBHOOKS = {
    "type": "object",
    "required": ["Config", "Delivered", "Pending", "GivenUp", "Endpoints", "RecentGivenUp", "Notes"],
    "properties": {
        "Config": {
            "type": "object",
            "properties": {
                "Endpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "Url": {"type": "string"},
                            "Events": {"type": "array", "items": {"type": "string"}},
                            "Signed": {"type": "boolean"},
                            "Source": {"type": "string"},
                        },
                    },
                },
                "Retry": {"type": "object"},
                "TimeoutSeconds": {"type": "number"},
                "OutboxMax": {"type": "integer"},
                "ConcurrencyPerEndpoint": {"type": "integer"},
            },
        },
        "Delivered": {"type": "integer"},
        "Pending": {"type": "integer"},
        "GivenUp": {"type": "integer"},
        "Endpoints": {"type": "array", "items": _WEBHOOK_ENDPOINT},
        "RecentGivenUp": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "DeliveryId": {"type": "string"},
                    "Event": {"type": "string"},
                    "Url": {"type": "string"},
                    "CreatedAt": _NULLABLE_STR,
                    "GivenUpAt": _NULLABLE_STR,
                    "Attempts": {"type": "integer"},
                    "Reason": _NULLABLE_STR,
                },
            },
        },
        "Notes": {"type": "array", "items": {"type": "string"}},
    },
}

HEALTH = {
    "type": "object",
    "required": ["Status", "Checks"],
    "properties": {
        "Status": {"type": "string", "enum": ["ok", "degraded", "down"]},
        "CheckedAt": {"type": "string"},
        "Checks": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["Name", "Status", "Detail"],
                "properties": {
                    "Name": {"type": "string"},
                    "Status": {"type": "string", "enum": ["ok", "degraded", "down"]},
                    "Detail": {"type": "string"},
                    "Since": {"type": "string", "nullable": True},
                },
            },
        },
        "Policy": {"type": "object"},
    },
}
PROMPT_ID = {"name": "prompt_id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}


def build_openapi(version: str) -> dict[str, Any]:
    """The document served at /telemetry/openapi.json."""
    paths: dict[str, Any] = {
        "/telemetry": {
            "get": {
                "summary": "Device snapshot now and the most recent prompts",
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}
                ],
                "responses": {"200": _ok("Snapshot and prompts"), "400": _ERROR},
            }
        },
        "/telemetry/prompts/{prompt_id}": {
            "get": {
                "summary": "The full record of one prompt",
                "parameters": [PROMPT_ID],
                "responses": {"200": _ok("Record"), "404": _ERROR},
            }
        },
        "/telemetry/prompts/{prompt_id}/wait": {
            "get": {
                "summary": "Wait until the prompt ends; 202 with the current state on timeout",
                "parameters": [
                    PROMPT_ID,
                    {
                        "name": "timeout",
                        "in": "query",
                        "schema": {"type": "number", "minimum": 0, "maximum": 3600},
                    },
                ],
                "responses": {"200": _ok("Final record"), "202": _ok("Still pending"), "400": _ERROR, "404": _ERROR},
            }
        },
        "/telemetry/runs": {
            "get": {
                "summary": "Every run with scene counts, status and last activity",
                "responses": {"200": _ok("Runs")},
            }
        },
        "/telemetry/runs/{run_id}": {
            "get": {
                "summary": "The run's artifact metadata, assembled now",
                "parameters": [RUN_ID],
                "responses": {"200": _ok("Artifact metadata"), "400": _ERROR, "404": _ERROR},
            }
        },
        "/telemetry/runs/{run_id}/finalize": {
            "post": {
                "summary": "Write artifact-metadata.json and run-summary.txt atomically and validate them",
                "parameters": [
                    RUN_ID,
                    {
                        "name": "replace",
                        "in": "query",
                        "required": False,
                        "description": "1: overwrite a run folder that holds another worker's attempts",
                        "schema": {"type": "string", "enum": ["0", "1", "true", "false"]},
                    },
                ],
                "responses": {
                    "200": _ok("Paths and validation"),
                    "400": _ERROR,
                    "404": _ERROR,
                    "409": _ERROR,
                    "507": _ERROR,
                },
            }
        },
        "/telemetry/runs/{run_id}/artifact-metadata.json": {
            "get": {
                "summary": "The finalized artifact-metadata.json",
                "parameters": [RUN_ID],
                "responses": {"200": _ok("File"), "400": _ERROR, "403": _ERROR, "404": _ERROR},
            }
        },
        "/telemetry/runs/{run_id}/run-summary.txt": {
            "get": {
                "summary": "The finalized run-summary.txt",
                "parameters": [RUN_ID],
                "responses": {
                    "200": {"description": "File", "content": {"text/plain": {"schema": {"type": "string"}}}},
                    "400": _ERROR,
                    "403": _ERROR,
                    "404": _ERROR,
                },
            }
        },
        "/telemetry/metrics": {
            "get": {
                "summary": "Prometheus text exposition of this worker's metrics (comfyui_telemetry_*)",
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "503": _ERROR,
                },
            }
        },
        "/telemetry/webhooks": {
            "get": {
                "summary": "Webhook endpoints (secrets never shown), delivered / pending / given-up counts, last error "
                "per endpoint, recent given-up deliveries",
                "description": "Event bodies (prompt.ended, run.finalized, health.changed) are described by the JSON "
                "Schemas telemetry/schemas/webhook-<event>.schema.json; each POST carries X-Run-Telemetry-Event, "
                "X-Run-Telemetry-Delivery, X-Run-Telemetry-Timestamp and X-Run-Telemetry-Signature "
                "(sha256=<hex HMAC-SHA256 of the raw body>).",
                "responses": {
                    "200": {
                        "description": "Webhook status",
                        "content": {"application/json": {"schema": _WEBHOOKS}},
                    },
                    "503": _ERROR,
                },
            }
        },
        "/telemetry/health": {
            "get": {
                "summary": "Readiness and liveness: store, marker writer, output folder, free disk, probe chain, "
                "ComfyUI's prompt worker",
                "responses": {
                    "200": {
                        "description": "ok or degraded (ComfyUI runs prompts)",
                        "content": {"application/json": {"schema": HEALTH}},
                    },
                    "503": {
                        "description": "down: ComfyUI's prompt worker has exited or is stuck",
                        "content": {"application/json": {"schema": HEALTH}},
                    },
                },
            }
        },
        "/telemetry/schema": {
            "get": {"summary": "JSON Schema of artifact-metadata.json", "responses": {"200": _ok("Schema")}}
        },
        "/telemetry/openapi.json": {"get": {"summary": "This document", "responses": {"200": _ok("OpenAPI")}}},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "Run Telemetry", "version": version},
        "paths": paths,
    }
