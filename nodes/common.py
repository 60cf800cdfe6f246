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


def items(value: Any) -> list[Any]:
    """The items of an input that may arrive as a ComfyUI list (``INPUT_IS_LIST``) or as one value."""
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def first(value: Any) -> Any:
    """The first item of an input that may arrive as a ComfyUI list, or ``None``."""
    found = items(value)
    return found[0] if found else None


def expand_prefix(prefix: str, *, width: int = 0, height: int = 0) -> str:
    """``prefix`` with ComfyUI's save-path tokens expanded as SaveImage does; unchanged outside ComfyUI."""
    if "%" not in prefix:
        return prefix
    try:
        from ..hooks import runtime
    except Exception:
        return prefix
    return runtime.expand_prefix(prefix, width=width, height=height)


def id_problem(value: Any, name: str) -> str | None:
    """Why a run or scene id is not usable (``telemetry.runs.run_id_problem``), or ``None``."""
    try:
        from ..telemetry.runs import run_id_problem
    except Exception:
        return None
    return run_id_problem(value, name=name)
