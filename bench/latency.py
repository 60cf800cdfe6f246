"""Completion latency: from ComfyUI's ``execution_success`` to the done marker being visible and to the wait route
returning, against the way pipelines detect completion today, measured on the same prompts in the same run.

Per prompt (EmptyImage → ImageInvert → SaveImage + WriteDoneMarker, one at a time on a real ComfyUI with the package):

- marker visible: an inotify watcher in this process (a thread blocked in read()) timestamps the rename that makes
  ``<prefix>.done`` appear, with time.time();
- wait route: ``GET /telemetry/prompts/{id}/wait`` sent right after queueing; time.time() when its answer arrived;
- polling baseline: ``GET /history/{id}`` every 2 s (first poll at a random phase in [0, 2) s after queueing, as a
  pipeline's poll is not aligned with the prompt), and once the entry is there, a 2 s stability window and one more
  poll that must still show it; time.time() when that confirming poll answered.

With ``--disk-load`` the same server measures the same prompts twice in one run: once alone, once while another
process writes to the same disk with a sync per block (``dd oflag=dsync``, restarted until the phase ends), so the
marker's p95 with a busy disk is quoted against the one without.

All three are compared with the record's ``ExecutionSuccessAt`` (ComfyUI's own ``execution_success`` timestamp, whole
milliseconds, same machine clock), so each figure is "how long after ComfyUI said success did the client know".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import aiohttp

from .common import (
    DEFAULT_VERSION,
    Colors,
    frames_with_marker,
    header,
    machine,
    make_bench_server,
    median,
    percentile,
    running,
    save,
    verdict,
)
from .inotify import Watcher

TARGET_P95_MS = 25.0
TARGET_TIMES_SOONER = 100.0
POLL_INTERVAL = 2.0
STABILITY_WINDOW = 2.0


def parse_iso(value: str) -> float:
    """ISO 8601 (Z) to epoch seconds."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def poll_history(session: aiohttp.ClientSession, url: str, pid: str, phase: float) -> float:
    """The time.time() at which a 2 s /history poller with a 2 s stability window considers the prompt done."""
    await asyncio.sleep(phase)
    while True:
        async with session.get(f"{url}/history/{pid}") as r:
            seen = bool((await r.json()).get(pid))
        if seen:
            await asyncio.sleep(STABILITY_WINDOW)
            async with session.get(f"{url}/history/{pid}") as r:
                if (await r.json()).get(pid):
                    return time.time()
        await asyncio.sleep(POLL_INTERVAL)


@contextmanager
def disk_load(folder: Any):
    """A process writing 64 MiB at a time to ``folder`` with a sync per 1 MiB block (dd oflag=dsync), until exit."""
    target = folder / ".disk-load.bin"
    script = f'while :; do dd if=/dev/zero of="{target}" bs=1M count=64 oflag=dsync status=none; rm -f "{target}"; done'
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the shell and its dd, started here
        proc.wait(10)
        target.unlink(missing_ok=True)


async def measure(
    server: Any, prompts: int, warmup: int, seed: int, label: str = "p", poll: bool = True
) -> list[dict[str, float]]:
    """Queue prompts one at a time; return per prompt the three delays in ms after execution_success."""
    folder = server.output_dir / "latency"
    folder.mkdir(parents=True, exist_ok=True)
    watcher = Watcher(folder)
    rng = random.Random(seed)
    colors = Colors()
    rows: list[dict[str, float]] = []
    pollers: list[tuple[str, float, asyncio.Task[float]]] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for i in range(warmup + prompts):
                name = f"{label}{i:05d}"
                prompt = frames_with_marker(f"latency/{name}", colors())
                async with session.post(f"{server.url}/prompt", json={"prompt": prompt}) as r:
                    if r.status != 200:
                        raise RuntimeError(f"POST /prompt -> {r.status}: {await r.text()}")
                    pid = (await r.json())["prompt_id"]
                if i >= warmup and poll:
                    task = asyncio.create_task(poll_history(session, server.url, pid, rng.uniform(0, POLL_INTERVAL)))
                    pollers.append((pid, 0.0, task))
                async with session.get(f"{server.url}/telemetry/prompts/{pid}/wait?timeout=60") as r:
                    body = await r.json()
                    t_wait = time.time()
                if r.status != 200 or body.get("Outcome") != "success":
                    raise RuntimeError(f"prompt {pid}: wait route {r.status} {body}")
                t_marker = await asyncio.to_thread(watcher.wait_for, f"{name}.done", 30)
                if i < warmup:
                    continue
                success = parse_iso(body["ExecutionSuccessAt"])
                rows.append(
                    {
                        "prompt_id": pid,
                        "success_at": success,
                        "marker_ms": (t_marker - success) * 1000,
                        "wait_ms": (t_wait - success) * 1000,
                        "in_process_marker_ms": (body["Markers"][0].get("WaitSeconds") or 0.0) * 1000,
                    }
                )
            done = await asyncio.gather(*(task for _, _, task in pollers))
    finally:
        watcher.close()
    if poll:
        for row, t_poll in zip(rows, done, strict=True):
            row["poll_ms"] = (t_poll - row["success_at"]) * 1000
    return rows


def disk_load_main(args: argparse.Namespace, info: dict[str, Any]) -> int:
    """``--disk-load``: the marker's latency without, then with, a concurrent syncing writer on the same disk."""
    header("marker latency after execution_success, without and with a dd (oflag=dsync) writer on the same disk", info)
    server = make_bench_server(args.version, with_package=True, timer=False)
    phases: dict[str, list[dict[str, float]]] = {}
    with running(server):
        phases["idle disk"] = asyncio.run(measure(server, args.prompts, args.warmup, args.seed, "a", poll=False))
        with disk_load(server.output_dir):
            phases["dd writing"] = asyncio.run(measure(server, args.prompts, args.warmup, args.seed, "b", poll=False))
    out: dict[str, Any] = {}
    for phase, rows in phases.items():
        out[phase] = {}
        for key, label in (
            ("marker_ms", "marker visible (inotify)"),
            ("in_process_marker_ms", "marker written (WaitSeconds)"),
            ("wait_ms", "wait route returned"),
        ):
            vals = [r[key] for r in rows]
            v = out[phase][key] = {
                "p50": round(median(vals), 2),
                "p95": round(percentile(vals, 95), 2),
                "max": round(max(vals), 2),
            }
            print(f"{phase:<11} {label:<32} p50 {v['p50']:>8.2f} ms  p95 {v['p95']:>8.2f} ms  max {v['max']:>8.2f} ms")
    base, loaded = out["idle disk"]["marker_ms"]["p95"], out["dd writing"]["marker_ms"]["p95"]
    print(f"{args.prompts} prompts per phase. marker p95: {base:.2f} ms idle disk, {loaded:.2f} ms with dd writing")
    path = save("latency-disk-load", {"machine": info, "summary": out, "rows": phases})
    print(f"figures: {path}")
    return 0


def summarize(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Percentiles per method and the polling / marker ratios."""
    out: dict[str, Any] = {"prompts": len(rows)}
    for key in ("marker_ms", "wait_ms", "in_process_marker_ms", "poll_ms"):
        vals = [r[key] for r in rows]
        out[key] = {
            "p50": round(median(vals), 2),
            "p95": round(percentile(vals, 95), 2),
            "p99": round(percentile(vals, 99), 2),
            "max": round(max(vals), 2),
            "min": round(min(vals), 2),
        }
    # A marker is never "seen" before success by more than the 1 ms truncation of ComfyUI's timestamp.
    floor = 1.0
    for key in ("marker_ms", "wait_ms"):
        out[f"times_sooner_{key.split('_')[0]}_p50"] = round(out["poll_ms"]["p50"] / max(out[key]["p50"], floor), 1)
        out[f"times_sooner_{key.split('_')[0]}_p95"] = round(out["poll_ms"]["p95"] / max(out[key]["p95"], floor), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: print the latency percentiles and the ratio to polling."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=200, help="measured prompts (200)")
    ap.add_argument("--warmup", type=int, default=10, help="unmeasured prompts first (10)")
    ap.add_argument("--version", default=DEFAULT_VERSION, help=f"ComfyUI version ({DEFAULT_VERSION})")
    ap.add_argument("--seed", type=int, default=1, help="seed of the pollers' random phase (1)")
    ap.add_argument(
        "--disk-load",
        action="store_true",
        help="measure the marker without, then with, a dd writer syncing to the same disk (no /history polling)",
    )
    args = ap.parse_args(argv)
    info = machine(args.version)
    if args.disk_load:
        return disk_load_main(args, info)
    header("completion latency after execution_success: done marker, wait route, /history polling", info)
    server = make_bench_server(args.version, with_package=True, timer=False)
    with running(server):
        rows = asyncio.run(measure(server, args.prompts, args.warmup, args.seed))
    s = summarize(rows)
    for key, label in (
        ("marker_ms", "marker visible (inotify)"),
        ("wait_ms", "wait route returned"),
        ("in_process_marker_ms", "marker written (in-process WaitSeconds)"),
        ("poll_ms", f"/history every {POLL_INTERVAL:g} s + {STABILITY_WINDOW:g} s window"),
    ):
        v = s[key]
        print(
            f"{label:<45} p50 {v['p50']:>8.2f} ms  p95 {v['p95']:>8.2f} ms  p99 {v['p99']:>8.2f} ms  max {v['max']:>8.2f} ms"
        )
    met_p95 = s["marker_ms"]["p95"] <= TARGET_P95_MS and s["wait_ms"]["p95"] <= TARGET_P95_MS
    met_ratio = min(s["times_sooner_marker_p50"], s["times_sooner_wait_p50"]) >= TARGET_TIMES_SOONER
    print(
        f"{s['prompts']} prompts. p95 ≤ {TARGET_P95_MS:g} ms (marker {s['marker_ms']['p95']:.2f}, wait route "
        f"{s['wait_ms']['p95']:.2f}): {verdict(met_p95)}"
    )
    print(
        f"sooner than polling (median): marker {s['times_sooner_marker_p50']:g}×, wait route "
        f"{s['times_sooner_wait_p50']:g}× (p95: {s['times_sooner_marker_p95']:g}×, {s['times_sooner_wait_p95']:g}×); "
        f"≥ {TARGET_TIMES_SOONER:g}×: {verdict(met_ratio)}"
    )
    path = save("latency", {"machine": info, "summary": s, "rows": rows})
    print(f"figures: {path}")
    return 0 if met_p95 and met_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
