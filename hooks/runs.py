"""Runs inside ComfyUI: checks on POST /prompt, run information at start, and the scene retry budget."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from ..telemetry.policy import apply_overrides
from ..telemetry.records import PromptRecord
from ..telemetry.runs import run_id_problem
from ..telemetry.sanitize import tags_problem, text_problem
from .runtime import Runtime
from .webhooks import webhook_body_problem

logger = logging.getLogger("run_telemetry")

PROMPT_PATHS = frozenset({"/prompt", "/api/prompt"})
INTERRUPT_PATHS = frozenset({"/interrupt", "/api/interrupt"})
PRIVATE_KEYS = ("attempt", "retry_of")
# extra_data keys ComfyUI (or this package) stamps at submission: a retry gets fresh ones.
STAMPED_KEYS = ("create_time", "run_telemetry_queued_ms")

# Scene and story fields a run's artifact-metadata.json takes from the tags: each must be text (or absent).
TEXT_TAGS = ("title", "prompt", "negative_prompt", "prefix")
STORY_TEXT = ("logline", "directors_vision", "title")

Problem = tuple[str, str]  # (parameter, message)
BodyCheck = Any  # Callable[[Mapping[str, Any]], Problem | None]


def _tags(body: Mapping[str, Any]) -> Any:
    extra = body.get("extra_data")
    if not isinstance(extra, Mapping) or "telemetry" not in extra:
        return None
    return extra["telemetry"]


def prompt_id_problem(body: Mapping[str, Any]) -> Problem | None:
    """A client-chosen ``prompt_id`` must be valid text (it names the record, the marker and the routes)."""
    pid = body.get("prompt_id")
    if isinstance(pid, str):
        bad = text_problem(pid)
        if bad:
            return "prompt_id", f"prompt_id {bad}"
    return None


def tag_values_problem(body: Mapping[str, Any]) -> Problem | None:
    """Every tag value must be storable: valid text, finite numbers, bounded nesting and size (``sanitize``)."""
    tags = _tags(body)
    return tags_problem(tags) if tags is not None else None


def story_problem(body: Mapping[str, Any]) -> Problem | None:
    """``story`` must be an object whose ``id`` is text or a whole number and whose other fields are text; scene
    fields (``title``, ``prompt``, ``negative_prompt``, ``prefix``) must be text: a run with anything else could not be
    finalized later."""
    tags = _tags(body)
    if not isinstance(tags, Mapping):
        return None
    for key in TEXT_TAGS:
        val = tags.get(key)
        if val is not None and not isinstance(val, str):
            return f"extra_data.telemetry.{key}", f"extra_data.telemetry.{key} must be text, not {type(val).__name__}"
    story = tags.get("story")
    if story is None:
        return None
    if not isinstance(story, Mapping):
        return "extra_data.telemetry.story", (
            f'extra_data.telemetry.story must be an object such as {{"id": "lighthouse", "logline": "…"}}, '
            f"not {type(story).__name__}"
        )
    for key in ("id", "Id"):
        val = story.get(key)
        if val is not None and (isinstance(val, bool) or not isinstance(val, str | int)):
            return f"extra_data.telemetry.story.{key}", (
                f"extra_data.telemetry.story.{key} must be text or a whole number, not {type(val).__name__}"
            )
    for key in (*STORY_TEXT, "Logline", "DirectorsVision"):
        val = story.get(key)
        if val is not None and not isinstance(val, str):
            return f"extra_data.telemetry.story.{key}", (
                f"extra_data.telemetry.story.{key} must be text, not {type(val).__name__}"
            )
    scenes = story.get("scenes")
    if scenes is not None and not isinstance(scenes, list):
        return "extra_data.telemetry.story.scenes", "extra_data.telemetry.story.scenes must be a list of objects"
    for i, scene in enumerate(scenes or []):
        name = f"extra_data.telemetry.story.scenes[{i}]"
        if not isinstance(scene, Mapping):
            return name, f"{name} must be an object, not {type(scene).__name__}"
        sid = scene.get("id")
        if sid is not None and (isinstance(sid, bool) or not isinstance(sid, str | int)):
            return f"{name}.id", f"{name}.id must be text or a whole number, not {type(sid).__name__}"
        for key in ("title", "prompt", "negative_prompt"):
            val = scene.get(key)
            if val is not None and not isinstance(val, str):
                return f"{name}.{key}", f"{name}.{key} must be text, not {type(val).__name__}"
    return None


def run_tags_problem(body: Mapping[str, Any]) -> Problem | None:
    """Run and scene ids, the frame floor and the policy overrides of ``extra_data.telemetry``."""
    tags = _tags(body)
    if tags is None:
        return None
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


# Checks of a POST /prompt body, in order; the first problem found is the answer (400). Others add theirs here.
PROMPT_CHECKS: list[BodyCheck] = [prompt_id_problem, tag_values_problem, run_tags_problem, story_problem]


def telemetry_body_problem(body: Any, checks: list[BodyCheck] | None = None) -> Problem | None:
    """(parameter, message) for the first problem of a POST /prompt body (``PROMPT_CHECKS``), or ``None``."""
    if not isinstance(body, Mapping):
        return None
    for check in PROMPT_CHECKS if checks is None else checks:
        problem = check(body)
        if problem is not None:
            return problem
    return None


def duplicate_prompt_problem(body: Any, known: Callable[[str], bool]) -> str | None:
    """The message for a POST /prompt body whose client-chosen ``prompt_id`` was already recorded, or ``None``."""
    if not isinstance(body, Mapping) or "prompt_id" not in body:
        return None
    prompt_id = str(body["prompt_id"])
    if not known(prompt_id):
        return None
    return (
        f"prompt_id {prompt_id!r} was already recorded (queued, running or finished): one prompt id is one execution. "
        "Leave prompt_id out to get a new one, or send a new id to run the workflow again"
    )


Check = Callable[[web.Request, Any], Awaitable[web.StreamResponse | None]]


def make_middleware(known: Callable[[str], bool] | None = None) -> Any:
    """An aiohttp middleware refusing unusable POST /prompt bodies: 400 for bad run tags, 409 for a reused prompt id.

    Each check gets the request and the parsed body and answers a response to refuse it, or ``None``.
    """

    async def check_tags(request: web.Request, body: Any) -> web.StreamResponse | None:
        problem = telemetry_body_problem(body) or webhook_body_problem(body)
        if problem is None:
            return None
        param, message = problem
        return web.json_response(
            {"error": {"type": "invalid_telemetry", "message": message, "parameter": param}, "node_errors": {}},
            status=400,
        )

    async def check_duplicate(request: web.Request, body: Any) -> web.StreamResponse | None:
        if known is None:
            return None
        message = duplicate_prompt_problem(body, known)
        if message is None:
            return None
        return web.json_response(
            {
                "error": {
                    "type": "duplicate_prompt_id",
                    "message": message,
                    "parameter": "prompt_id",
                    "prompt_id": str(body["prompt_id"]),
                },
                "node_errors": {},
            },
            status=409,
        )

    checks: list[Check] = [check_tags, check_duplicate]

    @web.middleware
    async def run_telemetry_prompt_check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and request.path in PROMPT_PATHS:
            try:
                body = await request.json()  # aiohttp caches the body: ComfyUI's handler reads it again
            except (ValueError, UnicodeDecodeError, RecursionError):
                body = None  # ComfyUI's own handler answers malformed (or absurdly nested) JSON
            for check in checks:
                refused = await check(request, body)
                if refused is not None:
                    return refused
        return await handler(request)

    return run_telemetry_prompt_check


def make_interrupt_middleware(on_interrupt: Callable[[], None], count: Callable[[], int | None] = lambda: None) -> Any:
    """An aiohttp middleware calling ``on_interrupt()`` after ComfyUI handled POST /interrupt, if it interrupted.

    ``count()`` is the number of interrupts ComfyUI was asked to make so far (``None``: unknown, every POST counts):
    ComfyUI 0.3.6x+ skips ``{"prompt_id": X}`` when X is not running, and that must not cancel anyone's retries.
    """

    @web.middleware
    async def run_telemetry_interrupt(request: web.Request, handler: Any) -> web.StreamResponse:
        watched = request.method == "POST" and request.path in INTERRUPT_PATHS
        before = count() if watched else None
        response = await handler(request)
        if watched and (before is None or count() != before):
            try:
                on_interrupt()
            except Exception:
                logger.exception("Run Telemetry: cancelling pending retries after an interrupt failed")
        return response

    return run_telemetry_interrupt


def install_runs(rt: Runtime, server: Any) -> None:
    """Wire the middlewares, the attempt accounting, the run-information start hook and the retry finisher."""
    server.app.middlewares.append(make_middleware(rt.recorder.known))
    server.app.middlewares.append(
        make_interrupt_middleware(lambda: cancel_pending_retries(rt, server), lambda: interrupts_made(rt))
    )
    book = rt.retries

    def cleared(items: list[Any], how: str) -> None:
        if how == "clear":  # the queue was cleared: attempts running now are not retried either
            book.cancel()

    rt.queue_events.on_dequeue(cleared)
    stored_story: set[str] = set()

    def keep_story_once(rec: PromptRecord, item: Any) -> None:
        """Accept hook: a run's story is kept once, in the run's information, not in every prompt record."""
        story = rec.Tags.pop("story", None)
        run_id = rec.RunId
        if not run_id or not isinstance(story, Mapping) or run_id in stored_story:
            return
        stored_story.add(run_id)

        def job() -> None:
            info = rt.store.run_info(run_id) or {}
            if not info.get("Story"):
                info["Story"] = dict(story)
                rt.store.put_run(run_id, info)

        getattr(rt, "store_writer", rt.writer).submit(job)  # a store write: never in front of a marker

    rt.recorder.add_accept_hook(keep_story_once)

    def remember_run(rec: PromptRecord, prompt: Mapping[str, Any]) -> None:
        if not rec.RunId:
            return
        scene = book.scene_of(rec.PromptId, rec.SceneId)
        rec.Attempt = book.started(rec.RunId, scene, rec.PromptId)
        planned = book.planned(rec.PromptId)
        # Only the budget's own retries are requeues; attempt/retry_of tags a client sends are not trusted.
        rec.RetryOf = planned.retry_of if planned is not None else None
        if "story" in rec.Tags:  # not seen accepted through the queue hook: kept once all the same
            keep_story_once(rec, None)
        overrides = rec.Tags.get("policy")
        if not isinstance(overrides, Mapping):
            return
        run_id = rec.RunId

        def job() -> None:
            info = rt.store.run_info(run_id) or {}
            if info.get("PolicyOverrides") != dict(overrides):
                info["PolicyOverrides"] = dict(overrides)
                rt.store.put_run(run_id, info)

        getattr(rt, "store_writer", rt.writer).submit(job)  # a store write: never in front of a marker

    rt.recorder.add_start_hook(remember_run)
    # First: when a retry follows, the marker step must not announce a .failed the retry may replace.
    rt.recorder.add_finisher("scene retry", lambda rec: retry_failed_scene(rt, server, rec), first=True)


def interrupts_made(rt: Runtime) -> int | None:
    """Interrupts ComfyUI was asked to make (counted by the ``interrupt attribution`` wrapper), or ``None``."""
    try:
        import comfy.model_management as mm

        from .plan import WRAPPED

        if rt.plans is None or not getattr(mm.interrupt_current_processing, WRAPPED, False):
            return None
    except Exception:
        return None
    return rt.plans.interrupts


def cancel_pending_retries(rt: Runtime, server: Any) -> list[str]:
    """After an interrupt: no attempt running now is retried, and retries the budget queued leave the queue."""
    pending = set(rt.retries.cancel())
    removed = 0
    if pending:
        queue = server.prompt_queue
        # One item per call (ComfyUI's delete_queue_item); each goes through the dequeue hooks: cancelled.
        while removed < len(pending) and queue.delete_queue_item(lambda item: len(item) > 1 and item[1] in pending):
            removed += 1
    if removed:
        logger.info("Run Telemetry: interrupt: %d pending retry prompt(s) removed from the queue", removed)
    return sorted(pending)


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


def retry_body(rec: PromptRecord, tags: Mapping[str, Any], prompt_id: str) -> dict[str, Any]:
    """The POST /prompt body of a retry: the same workflow, every key of extra_data, client id, outputs to execute."""
    sub = rec.Submission or {}
    extra = {k: v for k, v in (sub.get("extra_data") or {}).items() if k not in STAMPED_KEYS}
    extra.update(sub.get("sensitive") or {})  # ComfyUI took these out of extra_data at acceptance
    extra["telemetry"] = dict(tags)
    body: dict[str, Any] = {"prompt": rec.Workflow, "prompt_id": prompt_id, "extra_data": extra}
    client = extra.get("client_id") or rec.ClientId
    if client:
        body["client_id"] = client
    outputs = sub.get("outputs_to_execute")
    if outputs:
        body["partial_execution_targets"] = list(outputs)
    return body


def retry_failed_scene(rt: Runtime, server: Any, rec: PromptRecord) -> None:
    """Requeue a run's failed scene (not an interrupt) until it has had 1 + budget attempts, whatever its tags.

    Attempts are counted in memory (``rt.retries``), and in the store when it can be read: a full or read-only store
    never resets the count. A scene without a scene id is named by its first prompt's id, carried by every retry.
    """
    if rec.Outcome != "error" or not rec.RunId or not rec.Workflow:
        return
    book = rt.retries
    try:
        policy, _ = rt.run_policy(rec.RunId)
    except Exception as exc:  # the store cannot be read: the environment's policy
        policy = rt.policy
        rec.FallbackNotes.append(f"retry budget from the environment: the run's policy could not be read ({exc})")
    scene = book.scene_of(rec.PromptId, rec.SceneId)
    ids = book.executions(rec.RunId, scene) | {rec.PromptId}
    try:
        ids |= rt.store.scene_prompt_ids(rec.RunId, scene)
    except Exception as exc:
        logger.warning("Run Telemetry: earlier attempts of scene %s not read from the store: %s", scene, exc)
    attempts = max(len(ids), rec.Attempt)
    # `run-telemetry run` tags the attempt number of a scene it moved from a dead worker, which this process never
    # saw: counted here only, so the budget holds across workers. A tag can only spend the budget sooner; it never
    # adds a retry, and Attempt/RetryOf stay this process's own.
    tagged = rec.Tags.get("attempt")
    if isinstance(tagged, int) and not isinstance(tagged, bool) and tagged > attempts:
        attempts = tagged
    # run_policy caps a run's budget at SCENE_RETRY_BUDGET; min() keeps the ceiling if that ever changes.
    budget = min(policy.scene_retry_budget, rt.policy.scene_retry_budget)
    if attempts >= 1 + budget:
        rec.FallbackNotes.append(f"scene {scene} failed after {attempts} attempt(s); retry budget exhausted")
        return
    if book.stale(rec.PromptId):
        rec.FallbackNotes.append(
            f"scene {scene} not retried: the queue was cleared or ComfyUI interrupted while attempt {attempts} ran"
        )
        return
    tags = {k: v for k, v in rec.Tags.items() if k not in PRIVATE_KEYS}
    tags.update({"scene_id": scene, "attempt": attempts + 1, "retry_of": rec.PromptId})
    new_id = str(uuid.uuid4())
    book.plan(new_id, rec.RunId, scene, attempts + 1, rec.PromptId)
    req = urllib.request.Request(
        _base_url(server) + "/prompt",
        data=json.dumps(retry_body(rec, tags, new_id)).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read().decode())
    except (urllib.error.URLError, OSError, ValueError, TypeError) as exc:
        detail = exc.read().decode(errors="replace")[:300] if isinstance(exc, urllib.error.HTTPError) else ""
        rec.FallbackNotes.append(f"retry of scene {scene} could not be queued: {exc} {detail}".strip())
        return
    queued_id = str(answer.get("prompt_id") or new_id)
    if book.stale(queued_id):  # cleared or interrupted while the retry was being queued: take it out again
        server.prompt_queue.delete_queue_item(lambda item: len(item) > 1 and item[1] == queued_id)
        rec.FallbackNotes.append(f"scene {scene} not retried: the queue was cleared or ComfyUI interrupted")
        return
    rec.RetriedBy = queued_id
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
