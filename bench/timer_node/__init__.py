"""Bench-only ComfyUI package, linked into every bench server (with and without Run Telemetry) alike.

Its two do-nothing nodes, ``RTBenchPass`` and ``RTBenchOutput``, stand where TelemetryCapture and WriteDoneMarker
stand in a prompt, so ComfyUI's own cost of two more nodes is measured without the package. It times
``PromptExecutor.execute`` from the outside with ``perf_counter_ns`` and serves the figures:
``GET /rt_bench/timings`` (all of them), ``GET /rt_bench/gc`` (Python's garbage collections and their time, per
generation, from ``gc.callbacks``), ``GET /rt_bench/threads`` (Python's thread names by OS id) and ``GET /rt_bench/wait/{prompt_id}`` (blocks until that prompt's
``execute`` has returned, so the bench waits without polling the server while a prompt runs). ComfyUI's own clocks
are coarser (history timestamps are whole milliseconds, the "Prompt executed in" log line has two decimals) and
``execution_start`` is stamped inside the executor, after a prompt-level wrapper has already run. The wrapper is
installed at the first submission, when every custom node has been imported, so it is the outermost one and its
figure includes whatever other packages do around and inside a prompt.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any


class RTBenchPass:
    """A do-nothing pass-through with TelemetryCapture's widgets: ComfyUI's own cost of one more node."""

    CATEGORY = "rt_bench"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {"value": ("IMAGE",)},
            "optional": {
                "run_id": ("STRING", {"default": ""}),
                "scene_id": ("STRING", {"default": ""}),
                "label": ("STRING", {"default": "span"}),
            },
        }

    def run(self, value: Any, **_: Any) -> tuple[Any]:
        return (value,)


class RTBenchOutput:
    """A do-nothing output node with WriteDoneMarker's inputs and UI output: ComfyUI's own cost of an output node."""

    CATEGORY = "rt_bench"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"filename_prefix": ("STRING", {"default": "x"})}, "optional": {"images": ("IMAGE",)}}

    def run(self, filename_prefix: str, images: Any = None) -> dict[str, Any]:
        frames = int(images.shape[0]) if images is not None else None
        return {"ui": {"rt_bench_output": [{"prefix": filename_prefix, "state": "none", "frames": frames}]}}


NODE_CLASS_MAPPINGS: dict[str, type] = {"RTBenchPass": RTBenchPass, "RTBenchOutput": RTBenchOutput}
MARK = "__rt_bench_outer__"
_LOCK = threading.Lock()
_TIMINGS: dict[str, int] = {}
_WAITERS: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}


def _done(fut: asyncio.Future, value: int) -> None:
    if not fut.done():
        fut.set_result(value)


def _install() -> None:
    import execution  # ComfyUI's module

    cls = execution.PromptExecutor
    original = cls.execute
    if getattr(original, MARK, False):
        return

    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return original(self, *args, **kwargs)
        finally:
            elapsed = time.perf_counter_ns() - t0
            prompt_id = str(args[1] if len(args) > 1 else kwargs.get("prompt_id"))
            with _LOCK:
                _TIMINGS[prompt_id] = elapsed
                waiters = _WAITERS.pop(prompt_id, [])
            for loop, fut in waiters:
                loop.call_soon_threadsafe(_done, fut, elapsed)

    setattr(execute, MARK, True)
    cls.execute = execute


_FROZEN: list[bool] = []


def _on_prompt(json_data: Any) -> Any:
    with _LOCK:
        _install()
        if not _FROZEN:
            _FROZEN.append(True)
            import gc
            import os

            # Diagnostic (bench overhead --gc-freeze, every server alike): ComfyUI's start-up heap leaves the
            # collector's generations, so a full collection walks only what was made since.
            if os.environ.get("RT_BENCH_GC_FREEZE") == "1":
                gc.collect()
                gc.freeze()
    return json_data


_GC: dict[int, list[int]] = {0: [0, 0], 1: [0, 0], 2: [0, 0]}  # generation -> [collections, nanoseconds]
_GC_START: list[int] = [0]


def _gc_callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _GC_START[0] = time.perf_counter_ns()
    else:
        cell = _GC[int(info.get("generation", 2))]
        cell[0] += 1
        cell[1] += time.perf_counter_ns() - _GC_START[0]


def _register() -> None:
    import gc

    gc.callbacks.append(_gc_callback)  # Python's garbage collector: how often and how long, per generation
    from aiohttp import web
    from server import PromptServer

    server = PromptServer.instance
    server.add_on_prompt_handler(_on_prompt)

    @server.routes.get("/rt_bench/timings")
    async def rt_bench_timings(request: web.Request) -> web.Response:
        """Nanoseconds spent in PromptExecutor.execute, per prompt id."""
        with _LOCK:
            return web.json_response(dict(_TIMINGS))

    @server.routes.get("/rt_bench/gc")
    async def rt_bench_gc(request: web.Request) -> web.Response:
        """Collections and nanoseconds spent in Python's garbage collector, per generation, since start."""
        return web.json_response({str(g): list(v) for g, v in _GC.items()})

    @server.routes.get("/rt_bench/threads")
    async def rt_bench_threads(request: web.Request) -> web.Response:
        """Python's name and daemon flag of every thread, by OS thread id (Python does not name OS threads)."""
        return web.json_response(
            {str(t.native_id): {"name": t.name, "daemon": t.daemon} for t in threading.enumerate()}
        )

    @server.routes.get("/rt_bench/wait/{prompt_id}")
    async def rt_bench_wait(request: web.Request) -> web.Response:
        """Block until the prompt's execute has returned (or ``timeout`` s); answer its nanoseconds."""
        prompt_id = request.match_info["prompt_id"]
        timeout = float(request.query.get("timeout", "120"))
        loop = asyncio.get_running_loop()
        with _LOCK:
            if prompt_id in _TIMINGS:
                return web.json_response({"ns": _TIMINGS[prompt_id]})
            fut = loop.create_future()
            _WAITERS.setdefault(prompt_id, []).append((loop, fut))
        try:
            return web.json_response({"ns": await asyncio.wait_for(fut, timeout)})
        except asyncio.TimeoutError:
            return web.json_response({"ns": None}, status=504)


_register()
