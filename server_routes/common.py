"""Helpers shared by the route modules: JSON errors and query-parameter parsing that names the parameter."""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web


class BadParameter(web.HTTPBadRequest):
    """400 with a JSON body naming the parameter and what is wrong."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(
            text=json.dumps({"error": message, "parameter": name}),
            content_type="application/json",
        )


def json_error(status: int, message: str, **extra: Any) -> web.Response:
    """A JSON error response."""
    return web.json_response({"error": message, **extra}, status=status)


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter in [lo, hi], or 400 naming it."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        val = int(raw)
    except ValueError:
        raise BadParameter(name, f"{name} must be a whole number from {lo} to {hi}, got {raw!r}") from None
    if not lo <= val <= hi:
        raise BadParameter(name, f"{name} must be from {lo} to {hi}, got {val}")
    return val


def float_param(request: web.Request, name: str, default: float, lo: float, hi: float) -> float:
    """A number query parameter in [lo, hi], or 400 naming it."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        val = float(raw)
    except ValueError:
        raise BadParameter(name, f"{name} must be a number of seconds from {lo:g} to {hi:g}, got {raw!r}") from None
    if math.isnan(val) or not lo <= val <= hi:
        raise BadParameter(name, f"{name} must be from {lo:g} to {hi:g} seconds, got {raw!r}")
    return val
