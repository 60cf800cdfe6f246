"""Run Telemetry's pure core: contract models, GPU probes, recorder, store, markers, run assembly, CLI.

Imports nothing from ComfyUI; runs as ``python -m telemetry`` from the package folder, and is what
``pip install <repository>`` installs as ``run_telemetry`` (command ``run-telemetry``). The public surface for
pipelines, imported on first use (so ComfyUI loading the node package pays nothing for it):

- ``run_story(server=URL | [URLs], workflow=Path, scenes=Path, run_id=None, out_dir=None, resume=False, depth=2,
  worker_grace=30.0, max_wait=None) -> RunResult`` (``exit_code``, ``run_id``, ``run_dir``, ``failed_scenes``,
  ``failed_workers``, ``valid``, ``problems``, ``summary``); raises ``RunnerError`` for input the user can fix.
- ``wait_http(server, prompt_id, timeout_seconds) -> (exit code 0/1/2/3, record or state dict)`` (a coroutine).
- ``fetch_run(server, run_id, out_dir) -> (exit code 0/1, report dict)`` (a coroutine; raises ``ServerUnreachable``).
- ``validate_run_dir(path) -> ValidationReport`` (``valid``, ``errors``, ``scene_count``); never raises.
- ``render_summary(metadata) -> str``: the run-summary.txt text of an artifact-metadata.json mapping.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run_story": "runner",
    "RunResult": "runner",
    "RunnerError": "story",
    "wait_http": "remote",
    "fetch_run": "remote",
    "ServerUnreachable": "remote",
    "validate_run_dir": "validate",
    "ValidationReport": "validate",
    "render_summary": "summary",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """The public names above, imported from their module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)
