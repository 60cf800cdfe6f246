"""GET /telemetry: the machine now (device, memory, source, fallback notes) and the most recent prompts."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..telemetry.recorder import RECORD_MAX_DEPTH
from ..telemetry.sanitize import clean_value
from .common import int_param

SNAPSHOT_TTL = 1.0
HEALTH_MAX_AGE = 2.0  # GET /telemetry shows a health report at most this old (GET /telemetry/health is always fresh)


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


def dumps(body: Any) -> bytes:
    """Strict JSON (no NaN, valid text); a value that cannot be written is escaped, never a 500 for every client."""
    try:
        return json.dumps(body, allow_nan=False).encode()
    except (ValueError, TypeError, RecursionError):
        return json.dumps(clean_value(body, max_depth=RECORD_MAX_DEPTH), allow_nan=False).encode()


def health_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The overall status and the failing checks of a health report (the sidebar's line)."""
    if report is None:
        return None
    failing = [c for c in report["Checks"] if c["Status"] != "ok"]
    return {"Status": report["Status"], "Failing": failing, "CheckedAt": report["CheckedAt"]}


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
        store = getattr(rt, "store", None)
        health = rt.health.evaluate(max_age=HEALTH_MAX_AGE) if hasattr(rt, "health") else None
        key = (
            rt.recorder.version,
            snap_at,
            len(rt.notes),
            hooks.version if hooks is not None else None,
            getattr(store, "health_version", 0),
            health["CheckedAt"] if health else None,
        )
        hit = bodies.get(limit)
        if hit is not None and hit[0] == key:
            return web.Response(body=hit[1], content_type="application/json")
        own = rt.notes_now() if hasattr(rt, "notes_now") else rt.notes
        notes = list(dict.fromkeys([*own, *(snap.get("FallbackNotes") or [])]))
        body = {
            "Package": "run-telemetry",
            "Version": rt.version,
            "Snapshot": snap,
            "FallbackNotes": notes,
            "Store": store.health().as_dict() if hasattr(store, "health") else None,
            "Health": health_summary(health),
            "ComfyUI": {"Version": getattr(rt, "comfyui_version", None), "Hooks": dict(getattr(rt, "hooks", {}))},
            "Policy": rt.policy_view() if hasattr(rt, "policy_view") else None,
            "Prompts": [r.summary() for r in rt.recorder.recent(limit)],
            "Webhooks": hooks.summary() if hooks is not None else None,
        }
        raw = dumps(body)
        if len(bodies) >= 32:
            bodies.clear()
        bodies[limit] = (key, raw)
        return web.Response(body=raw, content_type="application/json")
