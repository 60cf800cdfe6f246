"""Routes under load: Debian's ``wrk`` with 64 connections for 30 s against ``/telemetry``,
``/telemetry/prompts/{id}`` and ComfyUI's own ``/system_stats``, one after the other in the same run, on a real
ComfyUI with the package while prompts execute (a driver thread keeps two small prompts with done markers queued).

wrk gives requests/s and errors. Its latency percentiles are not used: on this machine they contradict its own
request count (mean latency × requests exceeds the run's length several times over), so latency comes from a
client of our own that timestamps every request with perf_counter: an aiohttp client with the same 64 connections
(15 s per route), and a single keep-alive connection (10 s per route) for the latency without queueing.

The floor: ``GET /rt_bench/null`` (bench/null_route, a constant two-byte body) is measured the same way on the same
server. No handler can answer faster than it, so where it misses the p99 target, the target is out of reach for any
route on this server and machine; the package's routes are then judged by their ratio to that floor.

The machine has 2 cores: wrk (one thread) competes with the server (one Python process whose event loop serves every
route, while its prompt worker thread executes) for them, so absolute figures are lower than on a bigger machine;
the ratio between routes measured under the same conditions is the figure that carries over.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from .common import (
    DEFAULT_VERSION,
    Colors,
    frames_with_marker,
    header,
    machine,
    make_bench_server,
    percentile,
    running,
    save,
    three,
    verdict,
    wait_history,
)

TARGET_P99_MS = 10.0
FLOOR = "floor: /rt_bench/null"
ROUTES = ("/telemetry", "/telemetry/prompts/{id}")  # the package's routes, judged against the target
UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def to_ms(text: str) -> float:
    """'812.00us' / '4.12ms' / '1.02s' → milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unexpected wrk time {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, latency percentiles, request count and every kind of error from ``wrk --latency`` output."""
    res: dict[str, Any] = {"non_2xx": 0, "socket_errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else float("nan")
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        res[f"p{pct}_ms"] = to_ms(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["non_2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = sum(int(g) for g in m.groups())
    return res


class PromptDriver:
    """Keeps ``depth`` small prompts with done markers queued until stopped; counts what finished."""

    def __init__(self, server: Any, depth: int = 2, *, timer: bool = False) -> None:
        """``timer``: queue plain 3-node prompts and wait on the bench timer's route (a server without the package)."""
        self.server = server
        self.depth = depth
        self.timer = timer
        self.stop = threading.Event()
        self.finished: list[str] = []
        self.errors: list[str] = []
        self._colors = Colors(0x202020)
        self._thread = threading.Thread(target=self._run, name="prompt-driver", daemon=True)

    def _run(self) -> None:
        pending: list[str] = []
        n = 0
        while not self.stop.is_set():
            while len(pending) < self.depth:
                n += 1
                if self.timer:
                    pending.append(self.server.queue(three(self._colors(), prefix=f"load/t{n:05d}")))
                else:
                    pending.append(self.server.queue(frames_with_marker(f"load/p{n:05d}", self._colors())))
            pid = pending.pop(0)
            if self.timer:
                status, body = self.server.request("GET", f"/rt_bench/wait/{pid}?timeout=60", timeout=70)
                ok = status == 200 and body.get("ns") is not None
            else:
                status, body = self.server.request("GET", f"/telemetry/prompts/{pid}/wait?timeout=60", timeout=70)
                ok = status == 200 and body.get("Outcome") == "success"
            if not ok:
                self.errors.append(f"{pid}: {status} {body}")
            self.finished.append(pid)

    def __enter__(self) -> PromptDriver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(120)


def timed_load(url: str, connections: int, seconds: float) -> dict[str, Any]:
    """Our own client: ``connections`` aiohttp connections for ``seconds``; every request timed with perf_counter."""
    import aiohttp

    async def go() -> dict[str, Any]:
        lat: list[float] = []
        errors = 0
        deadline = time.monotonic() + seconds
        conn = aiohttp.TCPConnector(limit=connections, force_close=False)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=10)) as session:

            async def worker() -> None:
                nonlocal errors
                while time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    try:
                        async with session.get(url) as r:
                            await r.read()
                            if r.status != 200:
                                errors += 1
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        errors += 1
                    lat.append((time.perf_counter() - t0) * 1000)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            elapsed = time.perf_counter() - t0
        return {"requests": len(lat), "rps": len(lat) / elapsed, "errors": errors, "lat": lat}

    res = asyncio.run(go())
    lat = res.pop("lat")
    res.update({f"p{p}_ms": round(percentile(lat, p), 3) for p in (50, 90, 99)})
    res["max_ms"] = round(max(lat), 1)
    return res


def single_connection(host: str, port: int, path: str, seconds: float) -> dict[str, Any]:
    """One keep-alive connection, requests back to back for ``seconds``; every request timed with perf_counter."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    lat: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            lat.append((time.perf_counter() - t0) * 1000)
            errors += r.status != 200
    finally:
        conn.close()
    return {
        "requests": len(lat),
        "rps": len(lat) / seconds,
        "errors": errors,
        "p50_ms": round(percentile(lat, 50), 3),
        "p90_ms": round(percentile(lat, 90), 3),
        "p99_ms": round(percentile(lat, 99), 3),
        "max_ms": round(max(lat), 1),
        "over_50ms": sum(v > 50 for v in lat),
    }


def floor_with_and_without(version: str, connections: int, seconds: float) -> dict[str, Any]:
    """The floor route on a server without the package and on one with it, under the same plain 3-node prompts.

    Both servers carry the bench timer (prompts are waited for on its route, no polling) and the floor route; they run
    one after the other, never at the same time. Tells whether the package raises the floor every route stands on.
    """
    out: dict[str, Any] = {}
    for label, with_package in (("without", False), ("with", True)):
        server = make_bench_server(version, with_package=with_package, timer=True, null_route=True)
        with running(server):
            warm = [server.queue(three(0x100 + i, prefix="warm/t")) for i in range(10)]
            server.request("GET", f"/rt_bench/wait/{warm[-1]}?timeout=60", timeout=70)
            with PromptDriver(server, timer=True) as driver:
                r = timed_load(server.url + "/rt_bench/null", connections, seconds)
            r["prompts_executed"] = len(driver.finished)
            r["prompt_errors"] = driver.errors
            out[label] = r
    out["p99_ratio_with_to_without"] = round(out["with"]["p99_ms"] / out["without"]["p99_ms"], 3)
    out["rps_ratio_with_to_without"] = round(out["with"]["rps"] / out["without"]["rps"], 3)
    return out


def run_wrk(url: str, connections: int, seconds: int, threads: int) -> dict[str, Any]:
    """One wrk run; returns the parsed figures and the raw output."""
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s", url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res = parse_wrk(out)
    res["raw"] = out
    return res


def main(argv: list[str] | None = None) -> int:
    """Command line: requests/s (wrk), p50/p99 (own client) per route, and the ratios to /system_stats."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=64, help="connections (64)")
    ap.add_argument("--seconds", type=int, default=30, help="wrk seconds per route (30)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (1: leaves the other core to the server)")
    ap.add_argument("--latency-seconds", type=float, default=15, help="own 64-connection client per route (15)")
    ap.add_argument("--single-seconds", type=float, default=10, help="one connection per route (10; 0: skip)")
    ap.add_argument(
        "--floor-seconds",
        type=float,
        default=15,
        help="floor route on a server without vs with the package, own client (15; 0: skip)",
    )
    ap.add_argument("--version", default=DEFAULT_VERSION, help=f"ComfyUI version ({DEFAULT_VERSION})")
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk (scripts/dev.sh bench routes does it)", file=sys.stderr)
        return 2
    info = machine(args.version)
    header(
        f"routes under load while prompts execute: wrk -t{args.threads} -c{args.connections} -d{args.seconds}s "
        f"(req/s, errors), own client {args.connections} connections × {args.latency_seconds:g} s and 1 connection × "
        f"{args.single_seconds:g} s (latency)",
        info,
    )
    server = make_bench_server(args.version, with_package=True, timer=False, null_route=True)
    results: dict[str, Any] = {}
    with running(server):
        colors = Colors(0x303030)
        ids = [server.queue(frames_with_marker(f"warm/p{i:03d}", colors())) for i in range(25)]
        wait_history(server, ids[-1], timeout=120, interval=0.05)
        status, rec = server.request("GET", f"/telemetry/prompts/{ids[-1]}/wait?timeout=60")
        if status != 200:
            raise RuntimeError(f"warm-up prompt did not finish: {status} {rec}")
        routes = {
            "/system_stats": "/system_stats",
            "floor: /rt_bench/null": "/rt_bench/null",
            "/telemetry": "/telemetry",
            "/telemetry/prompts/{id}": f"/telemetry/prompts/{ids[-1]}",
        }
        with PromptDriver(server) as driver:
            for name, path in routes.items():
                r: dict[str, Any] = {"wrk": run_wrk(server.url + path, args.connections, args.seconds, args.threads)}
                r["load"] = timed_load(server.url + path, args.connections, args.latency_seconds)
                if args.single_seconds > 0:
                    r["single"] = single_connection("127.0.0.1", server.port, path, args.single_seconds)
                r["prompts_finished_so_far"] = len(driver.finished)
                results[name] = r
        results["prompts_executed_during_load"] = len(driver.finished)
        results["prompt_errors"] = driver.errors
    base = results["/system_stats"]
    ok = not results["prompt_errors"]
    print(
        f"{'route':<24} {'wrk req/s':>10} {'errors':>6} | {'own client: req/s':>17} {'p50':>8} {'p99':>8} {'errors':>6}"
        f" | {'1 connection: p50':>17} {'p99':>8}"
    )
    for name in routes:
        r = results[name]
        wrk_errors = r["wrk"]["non_2xx"] + r["wrk"]["socket_errors"]
        single = r.get("single") or {"p50_ms": float("nan"), "p99_ms": float("nan"), "errors": 0}
        errors = wrk_errors + r["load"]["errors"] + single["errors"]
        ok &= errors == 0
        r["rps_ratio_to_system_stats"] = round(r["wrk"]["rps"] / base["wrk"]["rps"], 3)
        r["p99_ratio_to_system_stats"] = round(r["load"]["p99_ms"] / base["load"]["p99_ms"], 3)
        print(
            f"{name:<24} {r['wrk']['rps']:>10.0f} {wrk_errors:>6} | {r['load']['rps']:>17.0f} "
            f"{r['load']['p50_ms']:>6.2f}ms {r['load']['p99_ms']:>6.2f}ms {r['load']['errors']:>6} | "
            f"{single['p50_ms']:>15.2f}ms {single['p99_ms']:>6.2f}ms"
        )
    floor = results[FLOOR]
    for name in ROUTES:
        r = results[name]
        r["rps_ratio_to_floor"] = round(r["wrk"]["rps"] / floor["wrk"]["rps"], 3)
        r["p99_ratio_to_floor"] = round(r["load"]["p99_ms"] / floor["load"]["p99_ms"], 3)
        print(
            f"{name}: req/s ×{r['rps_ratio_to_system_stats']:.2f} of /system_stats (wrk), "
            f"p99 ×{r['p99_ratio_to_system_stats']:.2f} of /system_stats (own client, "
            f"{args.connections} connections); against the floor: req/s ×{r['rps_ratio_to_floor']:.2f}, "
            f"p99 ×{r['p99_ratio_to_floor']:.2f}"
        )
    little = args.connections / max(results["/telemetry"]["wrk"]["rps"], 1e-9) * 1000
    print(
        f"queueing floor at {args.connections} connections for /telemetry (Little's law, connections / req/s): "
        f"{little:.1f} ms mean latency; prompts executed during the load: {results['prompts_executed_during_load']}"
    )
    fast = all(
        results[n]["wrk"]["rps"] >= base["wrk"]["rps"] and results[n]["load"]["p99_ms"] <= base["load"]["p99_ms"]
        for n in ROUTES
    )
    p99_ok = all(results[n]["load"]["p99_ms"] <= TARGET_P99_MS for n in ROUTES)
    floor_ok = floor["load"]["p99_ms"] <= TARGET_P99_MS
    single_ok = all(results[n].get("single", {}).get("p99_ms", float("inf")) <= TARGET_P99_MS for n in ROUTES)
    print(
        f"zero errors: {verdict(ok)}; at least as fast as /system_stats: {verdict(fast)}; p99 ≤ {TARGET_P99_MS:g} ms "
        f"at {args.connections} connections: {verdict(p99_ok)} (the floor route itself: {verdict(floor_ok)}, "
        f"p99 {floor['load']['p99_ms']:.2f} ms); at 1 connection: {verdict(single_ok)}"
    )
    if args.floor_seconds > 0:
        ab = floor_with_and_without(args.version, args.connections, args.floor_seconds)
        results["floor_without_vs_with_package"] = ab
        ok &= not ab["without"]["prompt_errors"] and not ab["with"]["prompt_errors"]
        ok &= ab["without"]["errors"] == 0 and ab["with"]["errors"] == 0
        print(
            f"floor route, same plain prompts, {args.connections} connections × {args.floor_seconds:g} s: without the "
            f"package p50 {ab['without']['p50_ms']:.2f} ms p99 {ab['without']['p99_ms']:.2f} ms "
            f"{ab['without']['rps']:.0f} req/s ({ab['without']['prompts_executed']} prompts); with it p50 "
            f"{ab['with']['p50_ms']:.2f} ms p99 {ab['with']['p99_ms']:.2f} ms {ab['with']['rps']:.0f} req/s "
            f"({ab['with']['prompts_executed']} prompts): p99 ×{ab['p99_ratio_with_to_without']:.2f}, "
            f"req/s ×{ab['rps_ratio_with_to_without']:.2f}"
        )
    path = save("routes", {"machine": info, "args": vars(args), "results": results})
    print(f"figures: {path}")
    return 0 if ok and fast and p99_ok else 1


if __name__ == "__main__":
    sys.exit(main())
