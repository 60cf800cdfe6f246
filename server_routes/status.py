"""GET /telemetry: the machine now (device, memory, source, fallback notes) and the most recent prompts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .common import int_param

SNAPSHOT_TTL = 1.0


class CachedSnapshot:
    """The probe snapshot, re-read at most once a ``ttl`` so busy clients cost the GPU driver nothing."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], ttl: float = SNAPSHOT_TTL) -> None:
        self._snapshot = snapshot
        self._ttl = ttl
        self._lock = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._at = -1e9

    def get(self) -> dict[str, Any]:
        """A snapshot no older than ``ttl``."""
        now = time.monotonic()
        with self._lock:
            if self._value is None or now - self._at > self._ttl:
                self._value = self._snapshot()
                self._at = now
            return self._value


def add_routes(routes: web.RouteTableDef, rt: Any) -> None:
    """Register GET /telemetry."""
    cached = CachedSnapshot(rt.snapshot)

    @routes.get("/telemetry")
    async def telemetry_status(request: web.Request) -> web.Response:
        """The current device snapshot and the most recent prompts (``?limit=``, default 20)."""
        limit = int_param(request, "limit", 20, 1, 1000)
        snap = cached.get()
        notes = list(dict.fromkeys([*rt.notes, *(snap.get("FallbackNotes") or [])]))
        body = {
            "Package": "run-telemetry",
            "Version": rt.version,
            "Snapshot": snap,
            "FallbackNotes": notes,
            "Policy": rt.policy_view() if hasattr(rt, "policy_view") else None,
            "Prompts": [r.summary() for r in rt.recorder.recent(limit)],
        }
        return web.json_response(body)
