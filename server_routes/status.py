"""GET /telemetry: the machine now (device, memory, source, fallback notes) and the most recent prompts."""

from __future__ import annotations

import json
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
        return self.get_stamped()[0]

    def get_stamped(self) -> tuple[dict[str, Any], float]:
        """The snapshot and when it was read (monotonic), so callers can cache what they build from it."""
        now = time.monotonic()
        with self._lock:
            if self._value is None or now - self._at > self._ttl:
                self._value = self._snapshot()
                self._at = now
            return self._value, self._at


def add_routes(routes: web.RouteTableDef, rt: Any) -> None:
    """Register GET /telemetry."""
    cached = CachedSnapshot(rt.snapshot)
    bodies: dict[int, tuple[tuple[Any, ...], bytes]] = {}

    @routes.get("/telemetry")
    async def telemetry_status(request: web.Request) -> web.Response:
        """The current device snapshot and the most recent prompts (``?limit=``, default 20)."""
        limit = int_param(request, "limit", 20, 1, 1000)
        snap, snap_at = cached.get_stamped()
        # Same prompts (recorder version), same snapshot and notes: the same body, served without rebuilding it.
        hooks = getattr(rt, "webhooks", None)
        key = (rt.recorder.version, snap_at, len(rt.notes), hooks.version if hooks is not None else None)
        hit = bodies.get(limit)
        if hit is not None and hit[0] == key:
            return web.Response(body=hit[1], content_type="application/json")
        notes = list(dict.fromkeys([*rt.notes, *(snap.get("FallbackNotes") or [])]))
        body = {
            "Package": "run-telemetry",
            "Version": rt.version,
            "Snapshot": snap,
            "FallbackNotes": notes,
            "Policy": rt.policy_view() if hasattr(rt, "policy_view") else None,
            "Prompts": [r.summary() for r in rt.recorder.recent(limit)],
            "Webhooks": hooks.summary() if hooks is not None else None,
        }
        raw = json.dumps(body).encode()
        if len(bodies) >= 32:
            bodies.clear()
        bodies[limit] = (key, raw)
        return web.Response(body=raw, content_type="application/json")
