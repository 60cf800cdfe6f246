"""A real HTTP webhook receiver on 127.0.0.1 for the tests: an aiohttp app on a thread of its own.

``behaviour(delivery_id, nth)`` decides each answer (``nth`` counts that delivery's requests from 1) and returns
``(status, headers)`` or ``None`` to hang (never answer) until the receiver stops.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from harness.comfy import free_port

Answer = tuple[int, dict[str, str]] | None


@dataclass
class Received:
    """One request as the receiver saw it."""

    headers: dict[str, str]
    body: bytes
    at: float
    nth: int
    answered: int | None = None

    @property
    def delivery_id(self) -> str:
        return self.headers.get("X-Run-Telemetry-Delivery", "")

    @property
    def event(self) -> str:
        return self.headers.get("X-Run-Telemetry-Event", "")

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Start with :meth:`start`, stop with :meth:`stop`; ``requests`` lists what arrived, in order."""

    behaviour: Callable[[str, int], Answer] = lambda _id, _n: (200, {})
    sleep: float = 0.0
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        with self._lock:
            did = request.headers.get("X-Run-Telemetry-Delivery", "")
            nth = 1 + sum(1 for r in self.requests if r.delivery_id == did)
            rec = Received(dict(request.headers), body, time.time(), nth)
            self.requests.append(rec)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            answer = self.behaviour(did, nth)
            if self.sleep:
                await asyncio.sleep(self.sleep)
            if answer is None:
                assert self._stop is not None
                await self._stop.wait()
                return web.Response(status=503)
            status, headers = answer
            rec.answered = status
            return web.Response(status=status, headers=headers, text="ok" if status < 300 else "no")
        finally:
            with self._lock:
                self.in_flight -= 1

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        # Handlers are cancelled when the client goes away, so ``in_flight`` counts open connections.
        runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True)
        loop.run_until_complete(runner.setup())
        if not self.port:
            self.port = free_port()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        loop.run_until_complete(site.start())
        self._ready.set()
        loop.run_until_complete(self._stop.wait())
        loop.run_until_complete(runner.cleanup())
        loop.close()

    def start(self) -> Receiver:
        """Listen (on ``port`` if set, else a free one)."""
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="test-receiver", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the receiver did not start"
        return self

    def stop(self) -> None:
        """Stop listening (hanging requests are released with 503)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        self._thread = None

    def of(self, delivery_id: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.delivery_id == delivery_id]

    def events(self, event: str) -> list[Received]:
        with self._lock:
            return [r for r in self.requests if r.event == event]
