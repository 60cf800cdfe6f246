"""Prompt records: GET /telemetry/prompts/{prompt_id} and the wait route that replaces polling /history."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web

from ..telemetry.records import FINAL_OUTCOMES, PromptRecord
from .common import float_param, json_error

MAX_WAIT_SECONDS = 3600.0


class Waiters:
    """Futures of wait-route requests, resolved from whichever thread publishes a finished record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[PromptRecord]]]] = {}

    def add(self, prompt_id: str) -> asyncio.Future[PromptRecord]:
        """A future resolved with the prompt's final record."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[PromptRecord] = loop.create_future()
        with self._lock:
            self._by_id.setdefault(prompt_id, []).append((loop, fut))
        return fut

    def discard(self, prompt_id: str, fut: asyncio.Future[PromptRecord]) -> None:
        """Forget a future (its request ended)."""
        with self._lock:
            items = [w for w in self._by_id.get(prompt_id, []) if w[1] is not fut]
            if items:
                self._by_id[prompt_id] = items
            else:
                self._by_id.pop(prompt_id, None)

    def publish(self, rec: PromptRecord) -> None:
        """Recorder listener: resolve the waiters of a finished prompt."""
        if rec.Outcome not in FINAL_OUTCOMES:
            return
        with self._lock:
            items = self._by_id.pop(rec.PromptId, [])
        for loop, fut in items:
            loop.call_soon_threadsafe(_resolve, fut, rec)


def _resolve(fut: asyncio.Future[PromptRecord], rec: PromptRecord) -> None:
    if not fut.done():
        fut.set_result(rec)


def add_routes(routes: web.RouteTableDef, rt: Any) -> None:
    """Register the prompt routes."""
    waiters = Waiters()
    rt.recorder.add_listener(waiters.publish)
    max_wait = float(getattr(rt, "max_wait_seconds", MAX_WAIT_SECONDS))

    def unknown(prompt_id: str) -> web.Response:
        return json_error(404, f"unknown prompt id {prompt_id!r}: not recorded and not in ComfyUI's queue")

    @routes.get("/telemetry/prompts/{prompt_id}")
    async def telemetry_prompt(request: web.Request) -> web.Response:
        """The full record of one prompt; 404 for an unknown id."""
        prompt_id = request.match_info["prompt_id"]
        cached = rt.recorder.final_json(prompt_id)
        if cached is not None:
            return web.Response(body=cached, content_type="application/json")
        rec = rt.recorder.get(prompt_id)
        if rec is None:
            if rt.pending(prompt_id):
                return web.json_response({"PromptId": prompt_id, "Outcome": "queued"})
            rec = rt.recorder.get(prompt_id)  # it may have started and ended between the two looks
            if rec is None:
                return unknown(prompt_id)
        return web.json_response(rec.model_dump(mode="json", exclude={"Workflow"}))

    @routes.get("/telemetry/prompts/{prompt_id}/wait")
    async def telemetry_prompt_wait(request: web.Request) -> web.Response:
        """Return the record as soon as the prompt ends (200), or its current state after ``timeout`` (202)."""
        prompt_id = request.match_info["prompt_id"]
        timeout = float_param(request, "timeout", 30.0, 0.0, max_wait)
        fut = waiters.add(prompt_id)  # removed in the finally below: an unknown id leaves nothing behind
        try:
            cached = rt.recorder.final_json(prompt_id)  # ended already: its body, without parsing the record
            if cached is not None:
                if hasattr(rt, "count_wait"):
                    rt.count_wait(prompt_id)
                return web.Response(body=cached, content_type="application/json")
            rec = rt.recorder.get(prompt_id)  # after add(): a finish between the two cannot be missed
            if rec is None and not rt.pending(prompt_id):
                # A quick prompt can start and end between the two looks: the recorder has it before ComfyUI's
                # queue lets go of it, so a second look cannot miss it.
                rec = rt.recorder.get(prompt_id)
                if rec is None:
                    return unknown(prompt_id)
            if hasattr(rt, "count_wait"):
                rt.count_wait(prompt_id)  # only ids that exist are counted: per-id memory is bounded by real prompts
            if rec is None or rec.Outcome not in FINAL_OUTCOMES:
                try:
                    rec = await asyncio.wait_for(asyncio.shield(fut), timeout)
                except asyncio.TimeoutError:
                    rec = rt.recorder.get(prompt_id)
                    state = rec.Outcome if rec is not None else "queued"
                    return web.json_response(
                        {"PromptId": prompt_id, "Outcome": state, "TimedOut": True, "TimeoutSeconds": timeout},
                        status=202,
                    )
            cached = rt.recorder.final_json(prompt_id)
            if cached is not None:
                return web.Response(body=cached, content_type="application/json")
            return web.json_response(rec.model_dump(mode="json", exclude={"Workflow"}))
        finally:
            waiters.discard(prompt_id, fut)
