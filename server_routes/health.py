"""GET /telemetry/health: readiness and liveness for load balancers and orchestrators (Kubernetes probes).

200 ``{"Status": "ok"|"degraded", "Checks": [...]}`` while ComfyUI can run prompts; 503 ``{"Status": "down", ...}``
when its prompt worker thread has exited or a queued prompt has waited while nothing ran for longer than the queue
policy's max wait. The checks and their facts are ``telemetry.health``'s; the same facts are Prometheus gauges.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web


def add_routes(routes: web.RouteTableDef, rt: Any) -> None:
    """Register GET /telemetry/health."""

    @routes.get("/telemetry/health")
    async def telemetry_health(request: web.Request) -> web.Response:
        """The health report: 200 when ok or degraded, 503 when ComfyUI will not run a queued prompt."""
        # Off the event loop: the checks touch the disk (a write probe) and the probe chain.
        report = await asyncio.get_running_loop().run_in_executor(None, rt.health.evaluate)
        return web.json_response(report, status=503 if report["Status"] == "down" else 200)
