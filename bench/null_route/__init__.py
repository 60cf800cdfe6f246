"""Bench-only ComfyUI package: ``GET /rt_bench/null`` answers a constant two-byte JSON body.

The routes bench measures it beside the package's routes, on the same server under the same load: no handler on
this server can answer faster than this route, so its latency is the floor set by aiohttp, ComfyUI's middlewares,
the event loop and the prompt worker's share of the GIL, not by any route's own work.
"""

from __future__ import annotations

NODE_CLASS_MAPPINGS: dict[str, type] = {}
BODY = b"{}"


def _register() -> None:
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/rt_bench/null")
    async def rt_bench_null(request: web.Request) -> web.Response:
        """A constant body: the cheapest possible handler."""
        return web.Response(body=BODY, content_type="application/json")


_register()
