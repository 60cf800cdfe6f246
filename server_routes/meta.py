"""GET /telemetry/schema (artifact-metadata.json's JSON Schema) and GET /telemetry/openapi.json (every route)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import telemetry
from .common import json_error
from .openapi import build_openapi


def add_routes(routes: web.RouteTableDef, rt: Any) -> None:
    """Register the schema and OpenAPI routes."""

    @routes.get("/telemetry/schema")
    async def telemetry_schema(request: web.Request) -> web.Response:
        """The JSON Schema of a run's artifact-metadata.json."""
        try:
            from ..telemetry.schema import load_schema
        except ImportError as exc:  # the contract module is part of the package; this is a broken install
            return json_error(500, f"schema unavailable: {exc}")
        return web.json_response(load_schema())

    @routes.get("/telemetry/openapi.json")
    async def telemetry_openapi(request: web.Request) -> web.Response:
        """OpenAPI 3 description of every route of the package."""
        return web.json_response(build_openapi(telemetry.__version__))
