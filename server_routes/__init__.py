"""Route adapters: each module registers its handlers on a RouteTableDef with the runtime handed in.

ComfyUI serves every route of ``PromptServer.instance.routes`` again under ``/api``. Tests mount the same
modules on a bare ``aiohttp.web.Application``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import health, meta, metrics, prompts, runs, status, webhooks

MODULES = (status, prompts, meta, metrics, runs, webhooks, health)


def add_routes(routes: web.RouteTableDef, rt: Any) -> None:
    """Register every route module's handlers."""
    for module in MODULES:
        module.add_routes(routes, rt)
