"""Webhooks inside ComfyUI: the service built from the environment, the secret taken out of POST /prompt bodies,
a run's endpoints registered at prompt start, ``prompt.ended`` from the recorder, and :func:`emit_health_changed`."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..telemetry.records import FINAL_OUTCOMES, PromptRecord
from ..telemetry.webhooks import (
    RunTargets,
    WebhookService,
    config_from_env,
    prompt_ended_data,
    run_webhook_problem,
    self_url_problem,
)
from ..telemetry.webhooks.config import display_url

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger("run_telemetry")

TAG = "webhook"
PROMPT_PATHS = frozenset({"/prompt", "/api/prompt"})
_SEEN_SIZE = 4096


def build_webhooks(rt: Runtime, env: Mapping[str, str]) -> tuple[WebhookService, RunTargets]:
    """The worker's webhook service (not started) and run-endpoint registry; bad settings become ``rt.notes``."""
    config, notes = config_from_env(env)
    rt.notes.extend(notes)

    def on_note(note: str) -> None:
        if note not in rt.notes:
            rt.notes.append(note)

    service = WebhookService(config, rt.store, version=rt.version, on_note=on_note)
    return service, RunTargets()


def webhook_body_problem(body: Any) -> tuple[str, str] | None:
    """(parameter, message) for a bad ``extra_data.telemetry.webhook`` in a POST /prompt body, or ``None``."""
    if not isinstance(body, Mapping):
        return None
    extra = body.get("extra_data")
    tags = extra.get("telemetry") if isinstance(extra, Mapping) else None
    if not isinstance(tags, Mapping) or tags.get(TAG) is None:
        return None
    return run_webhook_problem(tags[TAG])


def webhook_self_problem(body: Any, port: int, hosts: list[str]) -> tuple[str, str] | None:
    """(parameter, message) when a run webhook URL in a POST /prompt body is this ComfyUI itself, or ``None``."""
    if not isinstance(body, Mapping):
        return None
    extra = body.get("extra_data")
    tags = extra.get("telemetry") if isinstance(extra, Mapping) else None
    raw = tags.get(TAG) if isinstance(tags, Mapping) else None
    if not isinstance(raw, Mapping) or run_webhook_problem(raw) is not None:
        return None
    urls = raw.get("url")
    for url in urls.split(",") if isinstance(urls, str) else urls:
        problem = self_url_problem(url.strip(), port, hosts)
        if problem:
            return f"extra_data.telemetry.{TAG}.url", problem
    return None


def make_self_check_middleware() -> Any:
    """An aiohttp middleware answering 400 to a POST /prompt whose run webhook would call this ComfyUI itself."""
    from aiohttp import web

    @web.middleware
    async def run_telemetry_webhook_self_check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and request.path in PROMPT_PATHS:
            sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
            if isinstance(sockname, tuple) and len(sockname) >= 2:
                try:
                    body = await request.json()  # aiohttp caches the body: ComfyUI's handler reads it again
                except (ValueError, UnicodeDecodeError, RecursionError):
                    body = None
                hosts = [str(sockname[0]), request.url.host or ""]
                problem = webhook_self_problem(body, int(sockname[1]), hosts)
                if problem is not None:
                    param, message = problem
                    return web.json_response(
                        {
                            "error": {"type": "invalid_telemetry", "message": message, "parameter": param},
                            "node_errors": {},
                        },
                        status=400,
                    )
        return await handler(request)

    return run_telemetry_webhook_self_check


def take_secret(json_data: Any, targets: RunTargets) -> Any:
    """Submission handler: move a run's webhook secret (and its URLs' user info and queries) out of the body before
    ComfyUI queues (and keeps) it.

    ComfyUI shows ``extra_data`` in ``/queue`` and ``/history``; the secret is parked in memory under the prompt id,
    which this handler fixes (ComfyUI uses a ``prompt_id`` the body carries) when the client did not.
    """
    try:
        extra = json_data.get("extra_data") if isinstance(json_data, dict) else None
        tags = extra.get("telemetry") if isinstance(extra, dict) else None
        hook = tags.get(TAG) if isinstance(tags, dict) else None
        if isinstance(hook, dict) and "secret" in hook:
            secret = hook.pop("secret")
            if isinstance(secret, str) and secret:
                prompt_id = json_data.get("prompt_id") or str(uuid.uuid4())
                json_data["prompt_id"] = prompt_id
                targets.park_secret(str(prompt_id), secret)
        urls = hook.get("url") if isinstance(hook, dict) else None
        urls = [u.strip() for u in urls.split(",")] if isinstance(urls, str) else urls
        if isinstance(urls, list) and all(isinstance(u, str) for u in urls):
            urls = [u for u in urls if u]
            shown = [display_url(u) for u in urls]
            if shown != urls:  # user info or a query (either may carry a token): kept here, shown without
                prompt_id = json_data.get("prompt_id") or str(uuid.uuid4())
                json_data["prompt_id"] = prompt_id
                targets.park_urls(str(prompt_id), urls)
                hook["url"] = shown
    except Exception:
        logger.exception("Run Telemetry: webhook submission handler failed")
    return json_data


def install_webhooks(rt: Runtime, server: Any) -> None:
    """Wire the submission handler, the start hook and the ``prompt.ended`` listener; start the delivery thread."""
    service: WebhookService = rt.webhooks
    targets: RunTargets = rt.webhook_targets
    server.add_on_prompt_handler(lambda json_data: take_secret(json_data, targets))
    server.app.middlewares.append(make_self_check_middleware())

    def register_run_endpoints(rec: PromptRecord, *_: Any) -> None:
        """Take the ``webhook`` tag out of the record (it is stored and shown); remember its endpoints.

        At acceptance (aiohttp's thread), and at start (prompt worker) when the queue hook is off.
        """
        raw = rec.Tags.pop(TAG, None)
        if raw is not None:
            targets.register(rec.PromptId, rec.RunId, raw)

    if hasattr(rt.recorder, "add_accept_hook"):
        rt.recorder.add_accept_hook(register_run_endpoints)
    rt.recorder.add_start_hook(register_run_endpoints)
    seen: dict[tuple[str, str | None], None] = {}

    def prompt_ended(rec: PromptRecord) -> None:
        """Recorder listener (writer thread, after markers and the store write): queue ``prompt.ended``."""
        if rec.Outcome not in FINAL_OUTCOMES:
            return
        key = (rec.PromptId, rec.EndedAt)
        if key in seen:
            return
        seen[key] = None
        if len(seen) > _SEEN_SIZE:
            del seen[next(iter(seen))]
        extra = targets.for_prompt(rec.PromptId, rec.RunId)
        if service.endpoints_for("prompt.ended", extra):
            service.emit("prompt.ended", prompt_ended_data(rec), extra=extra)

    rt.recorder.add_listener(prompt_ended)
    health = getattr(rt, "health_listeners", None)  # the health monitor's listeners, where the runtime has one
    if isinstance(health, list):
        health.append(health_listener(rt))
    if service.config.endpoints or _outbox_has_rows(rt):
        service.start()
    cut_off = list(getattr(rt, "cut_off", None) or ())
    if cut_off and service.endpoints_for("prompt.ended"):

        def announce_cut_off() -> None:
            for prompt_id in cut_off:
                rec = rt.store.get(prompt_id)
                if rec is not None:
                    prompt_ended(rec)

        rt.writer.submit(announce_cut_off)


def _outbox_has_rows(rt: Runtime) -> bool:
    try:
        return bool(rt.store.outbox_pending(1))
    except Exception as exc:  # the service notes store trouble itself once it runs
        logger.debug("webhook outbox check failed: %s", exc)
        return True


def emit_health_changed(
    rt: Any,
    state: str,
    previous: str | None,
    reasons: list[str] | None = None,
    checks: list[Mapping[str, Any]] | None = None,
) -> int:
    """Queue ``health.changed`` (call it when the health state changes); returns how many endpoints it goes to."""
    service: WebhookService | None = getattr(rt, "webhooks", None)
    if service is None:
        return 0
    data = {"State": state, "Previous": previous, "Reasons": list(reasons or []), "Checks": list(checks or [])}
    return service.emit("health.changed", data)


def health_listener(rt: Any) -> Any:
    """A health listener ``fn(previous report or None, report)`` sending ``health.changed``.

    Reports are ``{"Status", "Checks": [{"Name", "Status", "Detail", "Since"}], ...}`` (GET /telemetry/health).
    """

    def on_health(previous: Mapping[str, Any] | None, report: Mapping[str, Any]) -> None:
        checks = [dict(c) for c in report.get("Checks") or [] if isinstance(c, Mapping)]
        reasons = [f"{c.get('Name')}: {c.get('Detail')}" for c in checks if c.get("Status") != "ok"]
        before = previous.get("Status") if isinstance(previous, Mapping) else None
        emit_health_changed(rt, str(report.get("Status")), before, reasons, checks)

    return on_health
