"""GET /telemetry/metrics: this worker's Prometheus exposition (``metrics_path: /telemetry/metrics`` in a scrape config).

``add_routes`` also builds the worker's TelemetryMetrics, feeds it from the recorder and attaches it as ``rt.metrics``,
so other route modules call ``rt.metrics.record_retry()`` without knowing how it was wired.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from .common import json_error
from .status import CachedSnapshot

logger = logging.getLogger("run_telemetry")


def add_routes(routes: web.RouteTableDef, rt: Any) -> None:
    """Register GET /telemetry/metrics and attach ``rt.metrics`` (fed by the recorder's listener)."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST

        from ..telemetry.metrics import TelemetryMetrics
    except ImportError as exc:
        # Every other route still works: only this one is missing its dependency.
        note = (
            f"GET /telemetry/metrics is off: prometheus_client is not installed ({exc}); "
            "install this package's requirements.txt into ComfyUI's Python and restart"
        )
        logger.warning("Run Telemetry: %s", note)
        if isinstance(getattr(rt, "notes", None), list):
            rt.notes.append(note)

        @routes.get("/telemetry/metrics")
        async def telemetry_metrics_unavailable(request: web.Request) -> web.Response:
            """503 naming the missing dependency."""
            return json_error(503, note)

        return

    health = getattr(rt, "health", None)
    store = getattr(rt, "store", None)
    metrics = TelemetryMetrics(
        snapshot=CachedSnapshot(rt.snapshot).get,
        version=str(getattr(rt, "version", "")),
        lookup=rt.recorder.get,
        health=health.evaluate if health is not None else None,
        store=(lambda: store.health().as_dict()) if hasattr(store, "health") else None,
    )
    metrics.record_crashed(len(getattr(rt, "cut_off", None) or ()))
    rt.recorder.add_listener(metrics.observe)
    if getattr(rt, "webhooks", None) is not None:
        metrics.watch_webhooks(rt.webhooks)
    rt.metrics = metrics

    @routes.get("/telemetry/metrics")
    async def telemetry_metrics(request: web.Request) -> web.Response:
        """Prometheus text exposition of the package's own registry."""
        # Off the event loop: a probe (nvidia-smi) may take up to its timeout when the cache is cold.
        body = await asyncio.get_running_loop().run_in_executor(None, metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
