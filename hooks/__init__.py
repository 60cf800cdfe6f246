"""ComfyUI adapters that are not nodes: the runtime, the executor hooks, the submission handler, the routes."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from . import runtime

logger = logging.getLogger("run_telemetry")

_INSTALL_LOCK = threading.Lock()
QUEUED_KEY = "run_telemetry_queued_ms"


def install() -> runtime.Runtime | None:
    """Wire the package into the running ComfyUI once; later calls return the same runtime."""
    with _INSTALL_LOCK:
        rt = runtime.get()
        if rt is not None:
            return rt
        if "execution" not in sys.modules or "server" not in sys.modules:
            # Imported outside ComfyUI (tests, tools): ComfyUI loads both before any custom node.
            logger.debug("Run Telemetry: not inside ComfyUI; nothing to wire")
            return None
        import execution  # ComfyUI's modules: only present inside ComfyUI
        import folder_paths
        from server import PromptServer

        from .gpu import build_peak_meter, build_snapshot

        server = PromptServer.instance
        rt = runtime.Runtime(
            user_dir=folder_paths.get_user_directory(),
            output_dir=runtime.output_directory,
            snapshot=build_snapshot(),
            pending=lambda pid: _is_pending(server, pid),
            queue_counts=lambda: _queue_counts(server),
            send=lambda event, data: _send(server, event, data),
            peak=build_peak_meter(),
        )
        rt.folder_roots = runtime.folder_roots
        rt.plans = _make_plans(rt)
        runtime.set_runtime(rt)
        rt.comfyui_version = comfyui_version()
        for name, how, fn in (
            ("prompt executor", "wraps PromptExecutor.execute", lambda: _wrap_executor(execution, rt)),
            ("node timings", "wraps execution.execute", lambda: _wrap_nodes(execution, rt)),
            ("prompt validation", "wraps execution.validate_prompt", lambda: _wrap_validation(execution, rt)),
            (
                "interrupt attribution",
                "wraps model_management.interrupt_current_processing",
                lambda: _wrap_interrupt(rt),
            ),
            (
                "submission handler",
                "PromptServer.add_on_prompt_handler",
                lambda: server.add_on_prompt_handler(on_prompt),
            ),
            ("queue events", "wraps PromptServer.prompt_queue", lambda: rt.queue_events.wrap(server.prompt_queue)),
            ("routes", "PromptServer.routes", lambda: _add_routes(server, rt)),
            ("finishers", "the package's writer thread", lambda: _add_finishers(rt)),
            ("runs", "aiohttp middleware on POST /prompt", lambda: _add_runs(rt, server)),
            ("webhooks", "the package's delivery thread", lambda: _add_webhooks(rt, server)),
            # Last: the finishers, runs and routes (waiters, metrics) must see these records end.
            ("lost prompts", "the store, at start", rt.finish_lost),
        ):
            try:
                fn()
                rt.hooks[name] = how
            except Exception as exc:
                note = (
                    f"{name} not installed on ComfyUI {rt.comfyui_version or 'of unknown version'} "
                    f"({type(exc).__name__}: {exc}); that part of telemetry is off"
                )
                logger.warning("Run Telemetry: %s", note)
                rt.notes.append(note)
                rt.hooks[name] = f"degraded: {type(exc).__name__}: {exc}"
        rt.hooks["queued time"] = _queued_time_source(server)
        return rt


def _make_plans(rt: runtime.Runtime) -> Any:
    import nodes  # ComfyUI's module: the node class mapping

    from .plan import Plans

    return Plans(classes=lambda: nodes.NODE_CLASS_MAPPINGS, output_dir=rt.output_dir)


def comfyui_version() -> str | None:
    """ComfyUI's ``__version__`` (its ``comfyui_version.py``), or None when it has none."""
    try:
        import comfyui_version  # ComfyUI's own module, beside main.py

        return str(comfyui_version.__version__)
    except Exception:
        return None


def _queued_time_source(server: Any) -> str:
    """Where a prompt's queued time comes from: ComfyUI's own ``create_time`` where POST /prompt sets it (0.3.6x and
    later), else the package's stamp from the submission handler (0.3.52)."""
    try:
        import inspect

        if "create_time" in inspect.getsource(type(server)):
            return "ComfyUI's extra_data.create_time"
    except Exception:
        logger.debug("Run Telemetry: could not read PromptServer's source", exc_info=True)
    return "the package's submission stamp (this ComfyUI sets no create_time)"


def _wrap_executor(execution: Any, rt: runtime.Runtime) -> None:
    from .executor import wrap_prompt_executor

    wrap_prompt_executor(execution, rt.recorder, rt.plans, on_worker_exit=rt.worker_exiting)


def _wrap_nodes(execution: Any, rt: runtime.Runtime) -> None:
    from .executor import wrap_node_execute

    wrap_node_execute(execution, rt.recorder, rt.plans)


def _wrap_validation(execution: Any, rt: runtime.Runtime) -> None:
    from .plan import wrap_validate_prompt

    wrap_validate_prompt(execution, rt.plans)
    plans = rt.plans
    rt.queue_events.on_accept(lambda item: plans.accepted(item.prompt_id, item.prompt))


def _wrap_interrupt(rt: runtime.Runtime) -> None:
    import comfy.model_management as mm  # ComfyUI's module

    from .plan import wrap_interrupt

    wrap_interrupt(mm, rt.plans)


def _add_routes(server: Any, rt: runtime.Runtime) -> None:
    from ..server_routes import add_routes

    add_routes(server.routes, rt)


def _add_finishers(rt: runtime.Runtime) -> None:
    from .finish import install_finishers

    install_finishers(rt)


def _add_runs(rt: runtime.Runtime, server: Any) -> None:
    from .runs import install_runs

    install_runs(rt, server)


def _add_webhooks(rt: runtime.Runtime, server: Any) -> None:
    from .webhooks import install_webhooks

    install_webhooks(rt, server)


def on_prompt(json_data: Any) -> Any:
    """Submission handler: stamp the queued time into ``extra_data`` (ComfyUI 0.3.52 has no ``create_time``)."""
    try:
        if isinstance(json_data, dict):
            extra = json_data.get("extra_data")
            if extra is None:
                extra = json_data["extra_data"] = {}
            if isinstance(extra, dict):
                extra.setdefault(QUEUED_KEY, int(time.time() * 1000))
    except Exception:
        logger.exception("Run Telemetry: submission handler failed")
    return json_data


def _send(server: Any, event: str, data: Any) -> None:
    """Broadcast a websocket event, unless no client is connected (every send wakes the server's event loop)."""
    if getattr(server, "sockets", None) == {}:
        return
    server.send_sync(event, data)


def _is_pending(server: Any, prompt_id: str) -> bool:
    """Whether ComfyUI's queue holds ``prompt_id`` (running or waiting)."""
    running, queued = server.prompt_queue.get_current_queue_volatile()
    return any(len(item) > 1 and item[1] == prompt_id for item in (*running, *queued))


def _queue_counts(server: Any) -> tuple[int, int]:
    """(running, queued) in ComfyUI's queue."""
    running, queued = server.prompt_queue.get_current_queue_volatile()
    return len(running), len(queued)
