"""Shared pieces of the bench scripts: the machine, real servers with and without the package, statistics, output."""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from harness.comfy import ComfyServer, get_install, scratch_dir  # noqa: E402

TEST_NODES = REPO / "tests" / "comfy" / "rt_test_nodes"
TIMER_NODE = REPO / "bench" / "timer_node"
NULL_ROUTE = REPO / "bench" / "null_route"
PROFILE_NODE = REPO / "bench" / "profile_node"
RESULTS = REPO / "bench" / "results"
PACKAGE_FOLDER = "ComfyUI-Run-Telemetry"
DEFAULT_VERSION = "0.3.75"

Prompt = dict[str, Any]


# --- the machine ----------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float:
    """Total RAM in GiB from /proc/meminfo."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return float("nan")


def git_commit() -> str:
    """The checked-out commit (short), with '+dirty' when the tree has changes."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True).stdout
        return sha + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(comfy_version: str | None = None) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "ram_gib": ram_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": git_commit(),
    }
    if comfy_version:
        info["comfyui"] = comfy_version
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line describing the machine, as the README quotes it."""
    parts = [f"{info['nproc']} cores ({info['cpu']})", f"{info['ram_gib']:g} GiB RAM", f"Linux {info['kernel']}"]
    if info.get("comfyui"):
        parts.append(f"ComfyUI {info['comfyui']} --cpu")
    parts.append(f"Python {info['python']}")
    parts.append(f"commit {info['commit']}")
    return ", ".join(parts)


# --- statistics -----------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    data = sorted(values)
    k = (len(data) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    """The median (NaN for no values)."""
    return statistics.median(values) if values else float("nan")


def bootstrap_ratio_ci(
    base: Sequence[float], other: Sequence[float], *, n: int = 2000, seed: int = 7
) -> tuple[float, float]:
    """95 % bootstrap interval of median(other) / median(base), resampling each side independently."""
    rng = random.Random(seed)
    ratios = []
    for _ in range(n):
        a = median([rng.choice(base) for _ in base])
        b = median([rng.choice(other) for _ in other])
        ratios.append(b / a)
    return percentile(ratios, 2.5), percentile(ratios, 97.5)


# --- servers --------------------------------------------------------------------------------------------------------


def make_bench_server(
    version: str,
    *,
    with_package: bool,
    env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
    timer: bool = True,
    null_route: bool = False,
    extra_packages: dict[str, Path] | None = None,
) -> ComfyServer:
    """A not-yet-started ComfyUI with the test nodes (and the bench timer), with or without Run Telemetry."""
    packages: dict[str, Path] = {"rt_test_nodes": TEST_NODES}
    if timer:
        packages["rt_bench_timer"] = TIMER_NODE
    if null_route:
        packages["rt_bench_null_route"] = NULL_ROUTE
    if with_package:
        packages[PACKAGE_FOLDER] = REPO
    packages.update(extra_packages or {})
    label = "with" if with_package else "without"
    return ComfyServer(
        install=get_install(version),
        base_dir=scratch_dir(f"rt-bench-{label}-"),
        packages=packages,
        env=env or {},
        extra_args=list(extra_args),
    )


@contextmanager
def running(*servers: ComfyServer, keep: bool = False):
    """Start every server (one after the other), yield them, then stop them by pid and remove their folders."""
    started: list[ComfyServer] = []
    try:
        for s in servers:
            s.start()
            started.append(s)
        yield servers
    finally:
        for s in started:
            s.stop()
        if not keep and not os.environ.get("RT_KEEP_SERVERS"):
            for s in servers:
                shutil.rmtree(s.base_dir, ignore_errors=True)


def wait_history(server: ComfyServer, prompt_id: str, *, timeout: float = 120.0, interval: float = 0.005) -> dict:
    """Poll /history/{id} until the prompt has ended (condition with a deadline) and return its entry."""
    deadline = time.monotonic() + timeout
    while True:
        entry = server.history(prompt_id)
        if entry:
            return entry
        if time.monotonic() > deadline:
            raise TimeoutError(f"prompt {prompt_id} not in /history after {timeout:g} s")
        time.sleep(interval)


def history_ms(entry: dict) -> tuple[int | None, int | None]:
    """(execution_start, execution_success) millisecond timestamps from a /history entry's status messages."""
    start = success = None
    for event, data in (entry.get("status") or {}).get("messages") or []:
        if event == "execution_start":
            start = data.get("timestamp")
        elif event == "execution_success":
            success = data.get("timestamp")
    return start, success


def proc_times(pid: int) -> float:
    """utime + stime of a process in seconds (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_bytes(pid: int) -> int:
    """Resident set size of a process in bytes (VmRSS from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --- workflows (weight-free) ----------------------------------------------------------------------------------------


def chain(nodes: int, color: int, *, size: int = 64, prefix: str = "bench/chain") -> Prompt:
    """EmptyImage → (nodes − 2) cheap image nodes (ImageInvert, ImageBlur r=1 alternating) → SaveImage."""
    if nodes < 3:
        raise ValueError("a chain needs at least 3 nodes")
    p: Prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": color}}
    }
    prev = "1"
    for i in range(2, nodes):
        nid = str(i)
        if i % 2:
            p[nid] = {
                "class_type": "ImageBlur",
                "inputs": {"image": [prev, 0], "blur_radius": 1, "sigma": 1.0},
            }
        else:
            p[nid] = {"class_type": "ImageInvert", "inputs": {"image": [prev, 0]}}
        prev = nid
    p[str(nodes)] = {"class_type": "SaveImage", "inputs": {"images": [prev, 0], "filename_prefix": prefix}}
    return p


def three(color: int, *, size: int = 64, prefix: str = "bench/three") -> Prompt:
    """EmptyImage → ImageInvert → SaveImage."""
    return chain(3, color, size=size, prefix=prefix)


def frames_with_marker(prefix: str, color: int, *, count: int = 1, size: int = 16) -> Prompt:
    """EmptyImage → ImageInvert → SaveImage(prefix) + WriteDoneMarker(prefix)."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": count, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
        "4": {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": prefix, "images": ["2", 0]}},
    }


class Colors:
    """A different EmptyImage colour for every prompt, so ComfyUI's cache never skips a node."""

    def __init__(self, start: int = 0x101010) -> None:
        self._next = start

    def __call__(self) -> int:
        self._next = (self._next + 7919) % 0xFFFFFF
        return self._next


# --- output ---------------------------------------------------------------------------------------------------------


def header(title: str, info: dict[str, Any]) -> None:
    """Print the bench's title and the machine it runs on."""
    print(f"== {title}")
    print(f"machine: {machine_line(info)}")


def save(name: str, data: dict[str, Any]) -> Path:
    """Write the figures to bench/results/<name>-<UTC time>.json (git-ignored) and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def verdict(ok: bool) -> str:
    """'met' or 'NOT met'."""
    return "met" if ok else "NOT met"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out
