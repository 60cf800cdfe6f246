"""Run Telemetry for ComfyUI: exports the nodes and web folder, registers /telemetry routes, installs the hooks.

Only wiring lives here. Any failure while wiring is logged and degrades the package; it never makes ComfyUI
report an IMPORT FAILED or stops ComfyUI from starting.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("run_telemetry")

WEB_DIRECTORY = "./web"
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except Exception:  # a broken node module must not take ComfyUI's start-up with it
    logger.exception("Run Telemetry: the nodes could not be loaded; the package is disabled")

try:
    from .hooks import install

    install()
except Exception:
    logger.exception("Run Telemetry: wiring into ComfyUI failed; nodes load, telemetry is degraded")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
