"""Run Telemetry's pure core: contract models, GPU probes, recorder, store, markers, run assembly, CLI.

Imports nothing from ComfyUI; runs as ``python -m telemetry`` from the package folder.
"""

from __future__ import annotations

__version__ = "0.1.0"
