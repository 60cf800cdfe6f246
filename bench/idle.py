"""Idle cost: CPU seconds of a ComfyUI process over 60 s of idleness, without and with the package, measured over
the same 60 s window, and every thread of each process with its own CPU time and wake-ups in that window.

Both servers (each with the bench timer package, whose only use here is naming Python threads) first run one prompt (so the package's writer thread exists and its recorder has worked), then wait
until their queues are empty. The window is a measurement, not a synchronisation: utime + stime from /proc/<pid>/stat
and, per thread, /proc/<pid>/task/<tid>/{comm,stat,status} (voluntary context switches count wake-ups: a polling
thread wakes on every tick of its loop, a thread blocked on a queue does not wake at all).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from .common import (
    DEFAULT_VERSION,
    Colors,
    frames_with_marker,
    header,
    machine,
    make_bench_server,
    proc_times,
    running,
    save,
    verdict,
    wait_history,
)

TICK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[int, dict[str, Any]]:
    """tid → name, CPU seconds so far and voluntary context switches so far."""
    out: dict[int, dict[str, Any]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended between listing and reading
        switches = 0
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                switches = int(line.split()[1])
        out[int(task.name)] = {
            "name": name,
            "cpu": (int(fields[11]) + int(fields[12])) / TICK,
            "wakeups": switches,
            "state": fields[0],
        }
    return out


def window(servers: dict[str, Any], seconds: float) -> dict[str, Any]:
    """CPU and per-thread figures of each server over one shared window of ``seconds``."""
    names = {label: s.get("/rt_bench/threads") for label, s in servers.items()}
    pids = {label: s.proc.pid for label, s in servers.items()}
    cpu0 = {label: proc_times(pid) for label, pid in pids.items()}
    th0 = {label: threads(pid) for label, pid in pids.items()}
    t0 = time.monotonic()
    time.sleep(seconds)  # the measurement window itself
    elapsed = time.monotonic() - t0
    cpu1 = {label: proc_times(pid) for label, pid in pids.items()}
    th1 = {label: threads(pid) for label, pid in pids.items()}
    out: dict[str, Any] = {"seconds": round(elapsed, 2)}
    for label in servers:
        rows = []
        for tid, end in sorted(th1[label].items()):
            start = th0[label].get(tid, {"cpu": 0.0, "wakeups": 0})
            rows.append(
                {
                    "tid": tid,
                    "name": names[label].get(str(tid), {}).get("name", f"{end['name']} (not a Python thread)"),
                    "state": end["state"],
                    "cpu_s": round(end["cpu"] - start["cpu"], 3),
                    "wakeups": end["wakeups"] - start["wakeups"],
                    "new_in_window": tid not in th0[label],
                }
            )
        out[label] = {"cpu_s": round(cpu1[label] - cpu0[label], 3), "threads": rows}
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: CPU seconds over the idle window, per server, and the thread lists."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the idle window (60)")
    ap.add_argument("--version", default=DEFAULT_VERSION, help=f"ComfyUI version ({DEFAULT_VERSION})")
    args = ap.parse_args(argv)
    info = machine(args.version)
    header(f"idle cost: CPU of ComfyUI over {args.seconds:g} s idle, without vs with the package", info)
    servers = {
        "without": make_bench_server(args.version, with_package=False, timer=True),
        "with": make_bench_server(args.version, with_package=True, timer=True),
    }
    colors = Colors(0x505050)
    with running(*servers.values()):
        for label, s in servers.items():
            if label == "with":
                pid = s.queue(frames_with_marker("idle/warm", colors()))
                status, _ = s.request("GET", f"/telemetry/prompts/{pid}/wait?timeout=60", timeout=70)
                if status != 200:
                    raise RuntimeError("the warm-up prompt did not finish")
            else:
                prompt = frames_with_marker("idle/warm", colors())
                del prompt["4"]
                pid = s.queue(prompt)
            wait_history(s, pid, timeout=60, interval=0.05)
        result = window(servers, args.seconds)
    ticks_per_s = 1.0 / TICK
    for label in servers:
        r = result[label]
        print(f"{label:>7} the package: {r['cpu_s']:.2f} CPU s in {result['seconds']:.0f} s; threads:")
        for t in r["threads"]:
            print(
                f"          {t['name']:<34} state {t['state']}  cpu {t['cpu_s']:.2f} s  wake-ups {t['wakeups']:>6}"
                + ("  (new)" if t["new_in_window"] else "")
            )
    names_without = sorted(t["name"] for t in result["without"]["threads"])
    names_with = sorted(t["name"] for t in result["with"]["threads"])
    extra = list(names_with)
    for n in names_without:
        if n in extra:
            extra.remove(n)
    ours = [t for t in result["with"]["threads"] if t["name"] in extra]
    diff = result["with"]["cpu_s"] - result["without"]["cpu_s"]
    # /proc counts CPU in clock ticks: a difference within two ticks is below what it can resolve.
    equal = abs(diff) <= 2 * ticks_per_s + 0.01 * max(result["without"]["cpu_s"], 0.0)
    quiet = all(t["cpu_s"] == 0 and t["wakeups"] <= 1 for t in ours)
    print(f"threads only the server with the package has: {extra or 'none'}")
    for t in ours:
        print(f"   {t['name']}: cpu {t['cpu_s']:.2f} s, wake-ups {t['wakeups']} in {result['seconds']:.0f} s")
    print(
        f"CPU difference {diff:+.2f} s over {result['seconds']:.0f} s (resolution {ticks_per_s:.2f} s): "
        f"equal {verdict(equal)}; no polling thread of the package {verdict(quiet)}"
    )
    result["extra_threads"] = extra
    path = save("idle", {"machine": info, "result": result})
    print(f"figures: {path}")
    return 0 if equal and quiet else 1


if __name__ == "__main__":
    sys.exit(main())
