"""Shared bits of the node adapters."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("run_telemetry")

CATEGORY = "Run Telemetry"


class AnyType(str):
    """A socket type that ComfyUI's validator and the frontend accept for any link (``"*"``)."""

    def __ne__(self, other: object) -> bool:  # validate_node_input compares with ``!=``
        return False

    __hash__ = str.__hash__


ANY = AnyType("*")


def get_runtime() -> Any:
    """The wired runtime, or ``None``: the nodes keep working (pass-through) when telemetry is broken."""
    try:
        from ..hooks import runtime

        return runtime.get()
    except Exception:
        logger.debug("Run Telemetry: runtime unavailable", exc_info=True)
        return None


def prefix_problem(prefix: str) -> str | None:
    """Why a marker prefix is refused, or ``None`` (also ``None`` when the check itself is unavailable)."""
    try:
        from ..hooks import runtime
    except Exception:
        return None
    return runtime.prefix_problem(prefix)
