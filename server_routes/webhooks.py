"""GET /telemetry/webhooks: configured endpoints (never a secret), delivery counts, last errors, given-up deliveries."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .common import json_error


def add_routes(routes: web.RouteTableDef, rt: Any) -> None:
    """Register GET /telemetry/webhooks."""

    @routes.get("/telemetry/webhooks")
    async def telemetry_webhooks(request: web.Request) -> web.Response:
        """Endpoints, counts delivered / pending / given up, last error per endpoint, recent given-up deliveries."""
        service = getattr(rt, "webhooks", None)
        if service is None:
            return json_error(503, "webhooks are not wired in this process; see GET /telemetry notes")
        return web.json_response(service.status())
