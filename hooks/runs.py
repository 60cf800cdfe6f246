"""Runs inside ComfyUI: checks on POST /prompt, run information at start, and the scene retry budget."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ..telemetry.policy import apply_overrides
from ..telemetry.records import PromptRecord
from ..telemetry.runs import run_id_problem
from .runtime import Runtime

logger = logging.getLogger("run_telemetry")

PROMPT_PATHS = frozenset({"/prompt", "/api/prompt"})
PRIVATE_KEYS = ("attempt", "retry_of")


def telemetry_body_problem(body: Any) -> tuple[str, str] | None:
    """(parameter, message) for a bad ``extra_data.telemetry`` in a POST /prompt body, or ``None``."""
    if not isinstance(body, Mapping):
        return None
    extra = body.get("extra_data")
    if not isinstance(extra, Mapping) or "telemetry" not in extra:
        return None
    tags = extra["telemetry"]
    if not isinstance(tags, Mapping):
        return "extra_data.telemetry", 'extra_data.telemetry must be an object such as {"run_id": "story-42"}'
    for key in ("run_id", "scene_id"):
        if tags.get(key) not in (None, ""):
            problem = run_id_problem(tags[key], name=key)
            if problem:
                return f"extra_data.telemetry.{key}", problem
    if "frame_floor" in tags and tags["frame_floor"] is not None:
        floor = tags["frame_floor"]
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
            return "extra_data.telemetry.frame_floor", f"frame_floor must be a whole number >= 0, got {floor!r}"
    policy = tags.get("policy")
    if policy is not None:
        if not isinstance(policy, Mapping):
            return "extra_data.telemetry.policy", "extra_data.telemetry.policy must be an object"
        from ..telemetry.policy import QueuePolicy

        _, notes = apply_overrides(QueuePolicy(), policy)
        if notes:
            return "extra_data.telemetry.policy", "; ".join(notes)
    return None


def make_middleware() -> Any:
    """An aiohttp middleware refusing POST /prompt bodies whose run tags are unusable, with 400 and a reason."""

    @web.middleware
    async def run_telemetry_prompt_check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and request.path in PROMPT_PATHS:
            try:
                body = await request.json()  # aiohttp caches the body: ComfyUI's handler reads it again
            except (ValueError, UnicodeDecodeError, RecursionError):
                body = None  # ComfyUI's own handler answers malformed (or absurdly nested) JSON
            problem = telemetry_body_problem(body)
            if problem is not None:
                param, message = problem
                return web.json_response(
                    {"error": {"type": "invalid_telemetry", "message": message, "parameter": param}, "node_errors": {}},
                    status=400,
                )
        return await handler(request)

    return run_telemetry_prompt_check


def install_runs(rt: Runtime, server: Any) -> None:
    """Wire the middleware, the run-information start hook and the retry finisher."""
    server.app.middlewares.append(make_middleware())

    def remember_run(rec: PromptRecord, prompt: Mapping[str, Any]) -> None:
        if not rec.RunId:
            return
        attempt = rec.Tags.get("attempt")
        if isinstance(attempt, int) and attempt > 0:
            rec.Attempt = attempt
        if isinstance(rec.Tags.get("retry_of"), str):
            rec.RetryOf = rec.Tags["retry_of"]
        overrides = rec.Tags.get("policy")
        story = rec.Tags.get("story")
        run_id = rec.RunId

        def job() -> None:
            info = rt.store.run_info(run_id) or {}
            changed = False
            if isinstance(overrides, Mapping) and info.get("PolicyOverrides") != dict(overrides):
                info["PolicyOverrides"] = dict(overrides)
                changed = True
            if isinstance(story, Mapping) and not info.get("Story"):
                info["Story"] = dict(story)
                changed = True
            if changed or not info:
                rt.store.put_run(run_id, info)

        rt.writer.submit(job)

    rt.recorder.add_start_hook(remember_run)
    # First: when a retry follows, the marker step must not announce a .failed the retry may replace.
    rt.recorder.add_finisher("scene retry", lambda rec: retry_failed_scene(rt, server, rec), first=True)


def _base_url(server: Any) -> str:
    address = str(getattr(server, "address", "") or "127.0.0.1")
    if address in ("0.0.0.0", "::", ""):
        address = "127.0.0.1"
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    scheme = "http"
    try:
        from comfy.cli_args import args

        if getattr(args, "tls_keyfile", None) and getattr(args, "tls_certfile", None):
            scheme = "https"
    except Exception:
        pass
    return f"{scheme}://{address}:{server.port}"


def retry_failed_scene(rt: Runtime, server: Any, rec: PromptRecord) -> None:
    """Requeue a run's failed scene (not an interrupt) until it has had 1 + budget attempts."""
    if rec.Outcome != "error" or not rec.RunId or not rec.Workflow:
        return
    policy, _ = rt.run_policy(rec.RunId)
    scene = rec.SceneId or rec.PromptId
    earlier = {r.PromptId for r in rt.store.by_run(rec.RunId) if (r.SceneId or r.PromptId) == scene}
    attempts = len(earlier | {rec.PromptId})
    if attempts >= 1 + policy.scene_retry_budget:
        rec.FallbackNotes.append(f"scene {scene} failed after {attempts} attempt(s); retry budget exhausted")
        return
    tags = {k: v for k, v in rec.Tags.items() if k not in PRIVATE_KEYS}
    tags.update({"attempt": attempts + 1, "retry_of": rec.PromptId})
    body: dict[str, Any] = {"prompt": rec.Workflow, "extra_data": {"telemetry": tags}}
    if rec.ClientId:
        body["client_id"] = rec.ClientId
    req = urllib.request.Request(
        _base_url(server) + "/prompt",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read().decode())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        detail = exc.read().decode(errors="replace")[:300] if isinstance(exc, urllib.error.HTTPError) else ""
        rec.FallbackNotes.append(f"retry of scene {scene} could not be queued: {exc} {detail}".strip())
        return
    rec.RetriedBy = str(answer.get("prompt_id"))
    logger.info(
        "Run Telemetry: scene %s of run %s failed; queued attempt %d as %s",
        scene,
        rec.RunId,
        attempts + 1,
        rec.RetriedBy,
    )
    metrics = getattr(rt, "metrics", None)
    if metrics is not None and hasattr(metrics, "record_retry"):
        try:
            metrics.record_retry()
        except Exception:
            logger.debug("metrics.record_retry failed", exc_info=True)
