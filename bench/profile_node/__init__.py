"""Bench-only ComfyUI package: CPU time of Run Telemetry's own steps, per thread, measured inside a real ComfyUI.

Linked only into the package's server of ``bench overhead --profile`` (an extra round, not counted in the ratios).
At the first submission, when every custom node is imported and the package is wired, it wraps the recorder's
lifecycle methods, every gate, finisher, accept hook, start hook and listener, the store's write, the plan steps
and the two nodes' functions with ``time.thread_time_ns`` (this thread's CPU, not wall time), and serves the sums:
``GET /rt_bench/profile`` -> ``{thread name: {step: [calls, CPU ns]}}``. Times are inclusive (a finisher that
writes a marker includes the write), and each wrapper adds ~1 µs of its own.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections import defaultdict
from typing import Any

NODE_CLASS_MAPPINGS: dict[str, type] = {}
_LOCK = threading.Lock()
_STATS: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
_INSTALLED: list[bool] = []


def _timed(name: str, fn: Any) -> Any:
    clock = time.thread_time_ns

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = clock() - t0
            thread = threading.current_thread().name
            with _LOCK:
                cell = _STATS[thread][name]
                cell[0] += 1
                cell[1] += spent

    return wrapper


def _module(suffix: str) -> Any:
    for name, mod in list(sys.modules.items()):
        if name.endswith(suffix) and "Run-Telemetry" in name:
            return mod
    raise LookupError(f"no module *{suffix} of the package loaded")


def _wrap_attr(obj: Any, attr: str, name: str) -> None:
    setattr(obj, attr, _timed(name, getattr(obj, attr)))


def _wrap_list(items: list, prefix: str) -> None:
    for i, item in enumerate(items):
        if isinstance(item, tuple):  # (name, fn)
            items[i] = (item[0], _timed(f"{prefix} {item[0]}", item[1]))
        else:
            items[i] = _timed(f"{prefix} {getattr(item, '__qualname__', item)}", item)


def _install() -> None:
    rt = _module(".hooks.runtime").get()
    rec = rt.recorder
    for attr in (
        "accepted",
        "started",
        "node_called",
        "declare_marker",
        "ended",
        "_persist_queued",
        "_persist_running",
        "_finish",
        "_running_row_before_markers",
        "_complete",
        "_finalize",
        "_publish",
        "_store_row",
    ):
        _wrap_attr(rec, attr, f"recorder.{attr}")
    _wrap_list(rec._gates, "gate")
    _wrap_list(rec._finishers, "finisher")
    _wrap_list(rec._accept_hooks, "accept hook")
    _wrap_list(rec._start_hooks, "start hook")
    _wrap_list(rec._listeners, "listener")
    _wrap_attr(rt.store, "put_json", "store.put_json")
    for attr in ("current_prompt_id", "span_start", "span_end", "declare_marker"):
        _wrap_attr(rt, attr, f"runtime.{attr}")
    finish = _module(".hooks.finish")
    for attr in (
        "describe_outputs",
        "write_done_marker",
        "resolve_prefix",
        "_listed",
        "_key",
        "_clear",
        "_declare",
        "clear_markers",
        "gpu_block",
        "telemetry_block",
        "expand_prefix",
    ):
        if hasattr(finish, attr):
            _wrap_attr(finish, attr, f"finish.{attr}")
    markers = _module(".telemetry.markers")
    for attr in (
        "atomic_write",
        "resolve_prefix",
        "open_folder",
        "sweep_stale_temps",
        "marker_bytes",
        "_remove",
        "_folder_parts",
        "open_file_under",
    ):
        if hasattr(markers, attr):
            _wrap_attr(markers, attr, f"markers.{attr}")
    atomic = _module(".telemetry.atomic")
    _wrap_attr(atomic, "_fsync_folder", "atomic._fsync_folder")
    _wrap_attr(rt, "run_policy", "runtime.run_policy")
    common = _module(".nodes.common")
    for attr in ("get_runtime", "prefix_problem", "expand_prefix", "id_problem"):
        if hasattr(common, attr):
            _wrap_attr(common, attr, f"nodes.common.{attr}")
    if rt.plans is not None:
        for attr in ("validated", "accepted", "started", "ended"):
            _wrap_attr(rt.plans, attr, f"plans.{attr}")
    nodes = _module(".nodes")
    mappings = getattr(nodes, "NODE_CLASS_MAPPINGS", {})
    for cls_name, method in (
        ("WriteDoneMarker", "declare"),
        ("TelemetryCapture", "capture"),
        ("TelemetryCapture", "check_lazy_status"),
    ):
        cls = mappings.get(cls_name)
        if cls is not None:
            setattr(cls, method, _timed(f"node {cls_name}.{method}", getattr(cls, method)))


def _on_prompt(json_data: Any) -> Any:
    with _LOCK:
        if _INSTALLED:
            return json_data
        _INSTALLED.append(True)
    try:
        _install()
    except Exception as exc:  # a bench tool: say so loudly in the figures
        with _LOCK:
            _STATS["install failed"][f"{type(exc).__name__}: {exc}"] = [0, 0]
    return json_data


def _register() -> None:
    from aiohttp import web
    from server import PromptServer

    server = PromptServer.instance
    server.add_on_prompt_handler(_on_prompt)

    @server.routes.get("/rt_bench/profile")
    async def rt_bench_profile(request: web.Request) -> web.Response:
        """{thread name: {step: [calls, CPU nanoseconds]}} since the first submission."""
        with _LOCK:
            return web.json_response({t: {k: list(v) for k, v in d.items()} for t, d in _STATS.items()})


_register()
