"""Overhead: what Run Telemetry costs a batch, in three variants measured in one run.

Variants (the workflow is the same chain of cheap image nodes, every prompt with a new EmptyImage colour so nothing
is cached, and its own filename prefix, as a story-to-video pipeline queues one prompt per scene):

- ``without``   a ComfyUI without the package (the baseline);
- ``null``      a second ComfyUI without the package, the same prompts: the cross-process noise floor;
- ``noop``      the ``without`` process, the marker variant's graph with two do-nothing nodes of the bench's own
                (``bench/timer_node``) where TelemetryCapture and WriteDoneMarker stand: ComfyUI's own cost of two
                more nodes, so ``marker`` / ``noop`` is what the package's two nodes and hooks cost beyond it;
- ``package``   a ComfyUI with the package, the plain chain (no node of the package in the prompt);
- ``marker``    the same process as ``package``: the chain ends in TelemetryCapture (run and scene tags) feeding
                SaveImage and a WriteDoneMarker with the same prefix (the shape of examples/workflow_api.json);
- ``package-2`` the same process and prompt as ``package``, in its own blocks: the in-process noise floor for the
                marker node's own cost (``marker`` / ``package``).

Every block queues N prompts at once (one ``POST /prompt`` after the other, no waiting) on one variant and then waits
for the last prompt's last file: its ``.done`` marker for ``marker``, its SaveImage PNG for the others (an inotify
watcher in this process, a thread blocked in ``read()``). Each block has its own output folder, as a pipeline has one
per scene (SaveImage lists its folder to number each file, so a shared folder would slow a process's later prompts,
and the package's process runs three variants). Per block:

(a) execution time per prompt: the median over the block of nanoseconds around ``PromptExecutor.execute``, taken by
    a bench-only package (``bench/timer_node``) linked into every server and installed outermost; in a batch it also
    carries whatever the package's writer thread does for the previous prompt while this one runs;
(b) batch wall time: from the first ``POST /prompt`` to the last prompt's last file on disk;
(c) CPU seconds per prompt: ``utime + stime`` of the ComfyUI process (all threads, ``/proc/<pid>/stat``) from just
    before the first submission until the process is quiet again (no CPU tick over 0.2 s), so the writer's deferred
    work is counted; and the same per thread (``/proc/<pid>/task/<tid>/stat``), named by the timer package.

Process-to-process bias: every round starts three fresh servers (their start order rotated), runs every variant's
blocks interleaved (each repetition a row of a Williams Latin square, so every variant follows every other equally
often: a block's leftovers never always land on the same variant), and stops them. A round gives one ratio per variant and
metric (the mean of its blocks against the mean of the ``without`` blocks); the printed ratio is the geometric mean
over rounds with a 95 % t-interval over rounds, so the spread between processes is inside the interval, and the
``null`` ratio beside it shows how large that spread is.

``--profile`` adds one round that is not counted: only the package's process, with a bench-only package
(``bench/profile_node``) that sums the CPU time (``thread_time``) of each of Run Telemetry's steps per thread, and
py-spy sampling it during the ``marker`` blocks (``--threads``): where each thread's samples fall in the package's own
code (the innermost frame that is the package's or ComfyUI's decides, so a wrapper does not own ComfyUI's work).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .common import (
    DEFAULT_VERSION,
    PROFILE_NODE,
    REPO,
    Colors,
    chain,
    header,
    machine,
    make_bench_server,
    proc_times,
    save,
    verdict,
)
from .inotify import IN_CLOSE_WRITE, IN_MOVED_TO, Watcher

TARGET_RATIO = 1.02
VARIANTS = ("without", "null", "noop", "package", "package-2", "marker")
HOST = {"without": "base", "null": "base2", "noop": "base", "package": "pkg", "package-2": "pkg", "marker": "pkg"}
PROFILED = ("marker",)
METRICS = ("exec_ms", "wall_s", "cpu_ms")
EXTRA = ("gc_ms", "gc2_per_100")  # Python's garbage collector per prompt: time (ms), full collections per 100
FOLDER = "bo"  # under it, a sub-folder per block (one inotify watch each)

# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (any statistics table).
_T95 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def t95(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``df`` degrees of freedom (1.96 beyond 30)."""
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


def geo_ci(ratios: list[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high): a 95 % t-interval on the log ratios (one ratio per round)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), float("nan"), float("nan")
    half = t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


# --- workflows ------------------------------------------------------------------------------------------------------


def plain_prompt(nodes: int, color: int, prefix: str) -> dict[str, Any]:
    """EmptyImage → (nodes − 2) ImageInvert/ImageBlur → SaveImage(prefix)."""
    return chain(nodes, color, prefix=prefix)


def marker_prompt(
    nodes: int, color: int, prefix: str, run_id: str, scene_id: str, *, classes: tuple[str, str] | None = None
) -> dict[str, Any]:
    """The same chain, its last image through TelemetryCapture into SaveImage(prefix) and WriteDoneMarker(prefix).

    ``classes`` puts other node classes in the two places (the bench's do-nothing pair for ``noop``).
    """
    capture, marker = classes or ("TelemetryCapture", "WriteDoneMarker")
    p = chain(nodes, color, prefix=prefix)
    save_id = str(nodes)
    cap_id, marker_id = str(nodes + 1), str(nodes + 2)
    last = p[save_id]["inputs"]["images"]
    p[cap_id] = {
        "class_type": capture,
        "inputs": {"value": last, "run_id": run_id, "scene_id": scene_id, "label": "render"},
    }
    p[save_id]["inputs"]["images"] = [cap_id, 0]
    p[marker_id] = {"class_type": marker, "inputs": {"filename_prefix": prefix, "images": [cap_id, 0]}}
    return p


def williams_order(variants: tuple[str, ...], row: int) -> list[str]:
    """Row ``row`` of a Williams Latin square: over n rows (n even) every variant comes right after every other once.

    So a variant never always follows the same one (a block right after another block on the same process, or after
    a block that left more deferred work, would bias it); rows repeat after n.
    """
    n = len(variants)
    base, lo, hi = [0], 1, n - 1
    while len(base) < n:
        base.append(lo)
        lo += 1
        if len(base) < n:
            base.append(hi)
            hi -= 1
    return [variants[(b + row) % n] for b in base]


# --- measuring ------------------------------------------------------------------------------------------------------


def thread_times(pid: int) -> dict[int, float]:
    """utime + stime in seconds of every live thread of a process, by OS thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def wait_quiet(pid: int, *, quiet: float = 0.2, limit: float = 5.0) -> None:
    """Return once the process used no CPU tick for ``quiet`` seconds (or after ``limit``): its deferred work is done."""
    deadline = time.monotonic() + limit
    last, since = proc_times(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = proc_times(pid)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


class Round:
    """Three fresh servers, their output watchers, and the prompts' bookkeeping for one round."""

    def __init__(self, index: int, version: str, *, profile: bool = False) -> None:
        self.index = index
        self.variants = PROFILED if profile else VARIANTS
        if profile:  # only the package's process, with the step profiler
            self.servers = {
                "pkg": make_bench_server(version, with_package=True, extra_packages={"rt_bench_profile": PROFILE_NODE})
            }
        else:
            self.servers = {
                "base": make_bench_server(version, with_package=False),
                "base2": make_bench_server(version, with_package=False),
                "pkg": make_bench_server(version, with_package=True),
            }
        self.colors = Colors(0x101010 + 7919 * 1000 * index)
        self.block = 0
        self.spied: dict[str, Any] | None = None
        self.steps: dict[str, Any] = {}

    def start(self) -> None:
        order = list(self.servers)
        k = self.index % len(order)
        for name in order[k:] + order[:k]:  # the start order rotates with the round
            self.servers[name].start()

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
            if not os.environ.get("RT_KEEP_SERVERS"):
                shutil.rmtree(server.base_dir, ignore_errors=True)

    def run_block(self, variant: str, prompts: int, nodes: int) -> dict[str, Any]:
        """Queue ``prompts`` prompts of ``variant`` at once; wait for the last file; return the block's figures."""
        host = HOST[variant]
        server = self.servers[host]
        pid = server.proc.pid
        self.block += 1
        tag = f"r{self.index}b{self.block}"
        # A folder per block, as a pipeline keeps a folder per scene: SaveImage lists its folder to number each file
        # (folder_paths.get_save_image_path), so one shared folder would slow every later prompt of its process.
        sub = f"{FOLDER}/{tag}-{variant}"
        folder = server.output_dir / sub
        folder.mkdir(parents=True, exist_ok=True)
        built = []
        for i in range(prompts):
            prefix = f"{sub}/p{i:03d}"
            if variant == "marker":
                built.append(marker_prompt(nodes, self.colors(), prefix, f"bench-{tag}", f"s{i:03d}"))
            elif variant == "noop":
                classes = ("RTBenchPass", "RTBenchOutput")
                built.append(marker_prompt(nodes, self.colors(), prefix, f"bench-{tag}", f"s{i:03d}", classes=classes))
            else:
                built.append(plain_prompt(nodes, self.colors(), prefix))
        last_name = Path(built[-1][str(nodes)]["inputs"]["filename_prefix"]).name
        last_file = f"{last_name}.done" if variant == "marker" else f"{last_name}_00001_.png"
        watcher = Watcher(folder, IN_CLOSE_WRITE | IN_MOVED_TO)
        try:
            gc0 = server.get("/rt_bench/gc")
            cpu0, threads0 = proc_times(pid), thread_times(pid)
            t0 = time.time()
            ids = [server.queue(p) for p in built]
            t_last = watcher.wait_for(last_file, timeout=60 + prompts * 5)
        finally:
            watcher.close()
        wait_quiet(pid)
        cpu1, threads1 = proc_times(pid), thread_times(pid)
        gc1 = server.get("/rt_bench/gc")
        return {
            "variant": variant,
            "ids": ids,
            "wall_s": t_last - t0,
            "cpu_ms": (cpu1 - cpu0) * 1000 / prompts,
            "gc_ms": sum(gc1[g][1] - gc0[g][1] for g in gc1) / 1e6 / prompts,
            "gc2_per_100": (gc1["2"][0] - gc0["2"][0]) * 100 / prompts,
            "threads_ms": {tid: (threads1[tid] - threads0.get(tid, 0.0)) * 1000 / prompts for tid in threads1},
            "folder": sub,
            "files": [Path(p[str(nodes)]["inputs"]["filename_prefix"]).name for p in built],
        }

    def finish(self, blocks: list[dict[str, Any]], nodes: int) -> None:
        """Fill each block's execution times from the timer package; check every output and marker exists."""
        timings = {name: s.get("/rt_bench/timings") for name, s in self.servers.items()}
        names = {name: s.get("/rt_bench/threads") for name, s in self.servers.items()}
        for b in blocks:
            host = HOST[b["variant"]]
            ns = [timings[host].get(pid) for pid in b["ids"]]
            if any(v is None for v in ns):
                raise RuntimeError(f"round {self.index}: a {b['variant']} prompt has no execution time")
            b["exec_ms"] = statistics.median(ns) / 1e6
            b["threads_ms"] = _by_thread_kind(b["threads_ms"], names[host])
            folder = self.servers[host].output_dir / b.pop("folder")
            for name in b["files"]:
                if not (folder / f"{name}_00001_.png").exists():
                    raise RuntimeError(f"round {self.index}: {name}_00001_.png missing")
                if b["variant"] == "marker" and not (folder / f"{name}.done").exists():
                    raise RuntimeError(f"round {self.index}: {name}.done missing")
            b.pop("files")


def _by_thread_kind(per_tid: dict[int, float], names: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Sum per-thread CPU into kinds: HTTP (the asyncio main thread), prompt worker, writer, other Python, native."""
    out: Counter[str] = Counter()
    for tid, ms in per_tid.items():
        name = (names.get(str(tid)) or {}).get("name")
        if name is None:
            kind = "native (torch, libraries)"
        elif name == "MainThread":
            kind = "HTTP (event loop)"
        elif "prompt_worker" in name:
            kind = "prompt worker"
        elif name.startswith("run-telemetry"):
            kind = "package writer"
        else:
            kind = "other Python threads"
        out[kind] += ms
    return dict(out)


# --- profile (py-spy) -----------------------------------------------------------------------------------------------


def py_spy() -> str | None:
    """The py-spy executable beside this Python (requirements-dev.txt), or on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Profile:
    """py-spy sampling one process (``record --format raw --threads``), started and stopped around chosen blocks."""

    def __init__(self, pid: int, out: Path, rate: int = 500) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed: pip install -r requirements-dev.txt")
        self.out = out
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--threads",
                "--rate",
                str(rate),
                "--nonblocking",
                "--full-filenames",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def stop(self) -> str:
        """Stop sampling (SIGINT makes py-spy write its file) and return its stderr."""
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        return err.decode(errors="replace")


def _frame_owner(frame: str, comfy_dir: str) -> str | None:
    """'package', 'comfyui' (ComfyUI's tree or another custom node) or None (the standard library, site-packages)."""
    where = frame.rsplit(" (", 1)[-1]
    if "/custom_nodes/ComfyUI-Run-Telemetry/" in where or where.startswith(str(REPO) + "/"):
        return "package"
    if where.startswith(comfy_dir) or "/custom_nodes/" in where:
        return "comfyui"
    return None


def summarize_profile(path: Path, comfy_dir: str, top: int = 14) -> dict[str, Any]:
    """Samples per thread, and how many were the package's own: the innermost frame that is the package's or
    ComfyUI's decides (library frames count for whoever called them), so a wrapper around a ComfyUI node does not
    count the node's time as the package's."""
    per_thread: Counter[str] = Counter()
    package: Counter[str] = Counter()
    functions: dict[str, Counter[str]] = defaultdict(Counter)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or ";" not in stack:
            continue
        head, *frames = stack.split(";")
        thread = head.split(": ", 1)[-1]
        n = int(count)
        per_thread[thread] += n
        for frame in reversed(frames):
            owner = _frame_owner(frame, comfy_dir)
            if owner is None:
                continue
            if owner == "package":
                package[thread] += n
                name, _, where = frame.rpartition(" (")
                short = where.rstrip(")").split("/ComfyUI-Run-Telemetry/")[-1].replace(str(REPO) + "/", "")
                functions[thread][f"{name} ({short.split(':')[0]})"] += n
            break
    return {
        "samples_per_thread": dict(per_thread.most_common()),
        "package_samples_per_thread": dict(package),
        "package_functions": {t: dict(c.most_common(top)) for t, c in functions.items()},
    }


# --- the run --------------------------------------------------------------------------------------------------------


def run_round(rnd: Round, args: argparse.Namespace, spy_on: str | None = None) -> list[dict[str, Any]]:
    """Start the round's servers, warm every variant up, run the interleaved blocks, stop; return the blocks.

    With ``spy_on``, py-spy samples the package's process during that variant's blocks (``rnd.spied`` gets the
    summary).
    """
    variants = rnd.variants
    try:
        rnd.start()
        for v in variants:  # warm-up: torch, ComfyUI's caches, the package's first records; not measured
            rnd.run_block(v, args.warmup, args.nodes)
        blocks: list[dict[str, Any]] = []
        for rep in range(args.blocks):
            for v in williams_order(variants, rep + rnd.index):
                spy = None
                if v == spy_on:
                    pkg = rnd.servers["pkg"]
                    spy = Profile(pkg.proc.pid, Path(pkg.base_dir) / f"pyspy-{len(blocks)}.txt")
                blocks.append(rnd.run_block(v, args.prompts, args.nodes))
                if spy is not None:
                    spy.stop()
                    rnd.spied = _merge_profile(rnd.spied, summarize_profile(spy.out, str(pkg.install.dir)))
        rnd.finish(blocks, args.nodes)
        if spy_on is not None:
            rnd.steps = rnd.servers["pkg"].get("/rt_bench/profile")
    finally:
        rnd.stop()
    return blocks


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every round; return each round's per-variant means, and the profile round's figures when asked."""
    rounds: list[dict[str, Any]] = []
    for r in range(0 if args.profile_only else args.rounds):
        rnd = Round(r, args.version)
        t_round = time.monotonic()
        blocks = run_round(rnd, args)
        means = {
            v: {m: statistics.fmean(b[m] for b in blocks if b["variant"] == v) for m in METRICS + EXTRA}
            for v in VARIANTS
        }
        threads = {v: _mean_dicts([b["threads_ms"] for b in blocks if b["variant"] == v]) for v in VARIANTS}
        rounds.append({"means": means, "threads_ms": threads})
        ratio = {v: means[v]["exec_ms"] / means["without"]["exec_ms"] for v in VARIANTS}
        print(
            f"  round {r + 1}/{args.rounds} ({time.monotonic() - t_round:.0f} s): execution ms "
            + ", ".join(f"{v} {means[v]['exec_ms']:.2f}" for v in VARIANTS)
            + f"; marker/without {ratio['marker']:.3f}, null {ratio['null']:.3f}",
            flush=True,
        )
    profile = None
    if args.profile:
        rnd = Round(args.rounds, args.version, profile=True)
        blocks = run_round(rnd, args, spy_on="marker")
        per_variant = {v: [b for b in blocks if b["variant"] == v] for v in PROFILED}
        prompts = {v: len(bs) * args.prompts for v, bs in per_variant.items()}
        profile = {
            "samples": rnd.spied,
            "steps": rnd.steps,
            "prompts": prompts,
            "threads_ms": {v: _mean_dicts([b["threads_ms"] for b in bs]) for v, bs in per_variant.items()},
        }
    return {"rounds": rounds, "profile": profile}


def _mean_dicts(items: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in items for k in d}
    return {k: statistics.fmean(d.get(k, 0.0) for d in items) for k in sorted(keys)}


def _merge_profile(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    if a is None:
        return b
    threads, package = Counter(a["samples_per_thread"]), Counter(a["package_samples_per_thread"])
    threads.update(b["samples_per_thread"])
    package.update(b["package_samples_per_thread"])
    functions: dict[str, Counter[str]] = defaultdict(Counter)
    for src in (a, b):
        for t, c in src["package_functions"].items():
            functions[t].update(c)
    return {
        "samples_per_thread": dict(threads.most_common()),
        "package_samples_per_thread": dict(package),
        "package_functions": {t: dict(c.most_common(14)) for t, c in functions.items()},
    }


def ratios(rounds: list[dict[str, Any]], variant: str, base: str, metric: str) -> tuple[float, float, float]:
    """Geometric mean and 95 % interval over rounds of mean(variant) / mean(base) for one metric."""
    return geo_ci([r["means"][variant][metric] / r["means"][base][metric] for r in rounds])


def report(data: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """Print the table; return the summary and whether every with-marker ratio is ≤ the target."""
    rounds = data["rounds"]
    labels = {
        "exec_ms": "execution / prompt",
        "wall_s": f"batch of {args.prompts} to last file",
        "cpu_ms": "CPU / prompt",
    }
    units = {"exec_ms": ("ms", 2), "wall_s": ("s", 3), "cpu_ms": ("ms", 2)}
    summary: dict[str, Any] = {"absolute": {}, "ratios": {}, "in_process": {}}
    print()
    print(f"{'':38}" + "".join(f"{labels[m]:>32}" for m in METRICS))
    base_cells = []
    for m in METRICS:
        vals = [r["means"]["without"][m] for r in rounds]
        unit, digits = units[m]
        base_cells.append(f"{statistics.fmean(vals):.{digits}f} {unit}")
        summary["absolute"][m] = {v: statistics.fmean(r["means"][v][m] for r in rounds) for v in VARIANTS}
    print(f"{'without the package (baseline)':38}" + "".join(f"{c:>32}" for c in base_cells))
    names = {
        "null": "null: 2nd process without (noise)",
        "noop": "without + 2 do-nothing nodes",
        "package": "package, no node of it in the prompt",
        "marker": "package + TelemetryCapture + marker",
    }
    ok = True
    for v in ("null", "noop", "package", "marker"):
        cells = []
        summary["ratios"][v] = {}
        for m in METRICS:
            g, lo, hi = ratios(rounds, v, "without", m)
            summary["ratios"][v][m] = [round(g, 4), round(lo, 4), round(hi, 4)]
            cells.append(f"×{g:.3f} [{lo:.3f}–{hi:.3f}]")
            if v == "marker":
                ok &= g <= TARGET_RATIO
        print(f"{names[v]:38}" + "".join(f"{c:>32}" for c in cells))
    cells = []
    summary["ratios"]["marker/noop"] = {}
    for m in METRICS:
        g, lo, hi = ratios(rounds, "marker", "noop", m)
        summary["ratios"]["marker/noop"][m] = [round(g, 4), round(lo, 4), round(hi, 4)]
        cells.append(f"×{g:.3f} [{lo:.3f}–{hi:.3f}]")
    print(f"{'marker / the do-nothing pair (same graph)':38}" + "".join(f"{c:>32}" for c in cells))
    print()
    print("in the package's process (marker node's own cost, no process bias):")
    for v, label in (("marker", "marker prompt / plain prompt"), ("package-2", "null: plain / plain")):
        cells = []
        summary["in_process"][v] = {}
        for m in METRICS:
            g, lo, hi = ratios(rounds, v, "package", m)
            summary["in_process"][v][m] = [round(g, 4), round(lo, 4), round(hi, 4)]
            cells.append(f"×{g:.3f} [{lo:.3f}–{hi:.3f}]")
        print(f"  {label:36}" + "".join(f"{c:>32}" for c in cells))
    print()
    print("Python's garbage collector per prompt (mean over rounds; in every thread, mostly the prompt worker's):")
    summary["gc"] = {}
    print(f"  {'':36}" + "".join(f"{v:>12}" for v in VARIANTS))
    for m, label in (("gc_ms", "time in gc (ms)"), ("gc2_per_100", "full collections per 100 prompts")):
        vals = {v: statistics.fmean(r["means"][v][m] for r in rounds) for v in VARIANTS}
        summary["gc"][m] = {v: round(x, 3) for v, x in vals.items()}
        print(f"  {label:36}" + "".join(f"{vals[v]:>12.3f}" for v in VARIANTS))
    print()
    print("CPU per prompt by thread (ms, mean over rounds):")
    kinds = sorted({k for r in rounds for v in VARIANTS for k in r["threads_ms"][v]})
    summary["threads_ms"] = {}
    print(f"  {'':36}" + "".join(f"{v:>12}" for v in VARIANTS))
    for k in kinds:
        vals = {v: statistics.fmean(r["threads_ms"][v].get(k, 0.0) for r in rounds) for v in VARIANTS}
        summary["threads_ms"][k] = {v: round(x, 3) for v, x in vals.items()}
        print(f"  {k:36}" + "".join(f"{vals[v]:>12.3f}" for v in VARIANTS))
    if data.get("profile"):
        summary["profile"] = print_profile(data["profile"])
    print()
    print(
        f"target: with-marker ratios (execution, batch, CPU) ≤ {TARGET_RATIO}: {verdict(ok)} "
        f"({len(rounds)} rounds × {args.blocks} blocks × {args.prompts} prompts per variant, {args.nodes}-node chain; "
        "intervals are 95 % over rounds)"
    )
    return summary, ok


def print_profile(prof: dict[str, Any]) -> dict[str, Any]:
    """Print the profile round: CPU per step and thread (µs per prompt), then py-spy's package functions."""
    steps = prof["steps"]
    prompts = max(1, sum(c[0] for t in steps.values() for k, c in t.items() if k == "recorder.ended"))
    print()
    print(
        f"profile round (not counted above; {prompts} marker prompts, one process): CPU µs per prompt by thread "
        "and step (thread_time, inclusive)"
    )
    table: dict[str, dict[str, float]] = {}
    for thread, cells in sorted(steps.items()):
        rows = sorted(cells.items(), key=lambda kv: -kv[1][1])
        print(f"  {thread}:")
        table[thread] = {}
        for step, (calls, ns) in rows:
            per = ns / 1000 / prompts
            table[thread][step] = round(per, 1)
            print(f"      {per:>8.1f} µs  {step}  ({calls} calls)")
    print(
        "  thread CPU per prompt in that round (ms): "
        + ", ".join(f"{k} {v:.2f}" for k, v in prof["threads_ms"]["marker"].items())
    )
    samples = prof.get("samples") or {}
    if samples:
        print("  py-spy samples during its marker blocks, the package's own share per thread:")
        for thread, n in samples["samples_per_thread"].items():
            own = samples["package_samples_per_thread"].get(thread, 0)
            print(f"    {thread}: {n} samples, {own} in the package's own code ({100 * own / n:.1f} %)")
            for fn, k in (samples["package_functions"].get(thread) or {}).items():
                print(f"      {k:>6}  {fn}")
    return {"steps_us_per_prompt": table, "samples": samples, "threads_ms": prof["threads_ms"]}


def main(argv: list[str] | None = None) -> int:
    """Command line: print the three variants' ratios and whether the with-marker target is met."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="rounds, each with three fresh servers (6)")
    ap.add_argument("--blocks", type=int, default=6, help="measured blocks per variant and round (6)")
    ap.add_argument("--prompts", type=int, default=20, help="prompts queued at once per block (20)")
    ap.add_argument("--warmup", type=int, default=10, help="unmeasured prompts per variant at each round's start (10)")
    ap.add_argument("--nodes", type=int, default=40, help="nodes in the chain (40)")
    ap.add_argument("--version", default=DEFAULT_VERSION, help=f"ComfyUI version ({DEFAULT_VERSION})")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="one more round, not counted: CPU per step of the package and py-spy samples",
    )
    ap.add_argument("--profile-only", action="store_true", help="only the profile round (no ratios)")
    ap.add_argument(
        "--gc-freeze",
        action="store_true",
        help="diagnostic: every server calls gc.freeze() at its first prompt (Python's full collections then skip "
        "ComfyUI's start-up heap), to show how much of the cost is the package's share of those collections",
    )
    args = ap.parse_args(argv)
    args.profile |= args.profile_only
    if args.gc_freeze:
        os.environ["RT_BENCH_GC_FREEZE"] = "1"  # inherited by every server this run starts
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (the interval is over rounds)")
    info = machine(args.version)
    header("overhead: a batch without the package, with it, and with a WriteDoneMarker + TelemetryCapture", info)
    data = measure(args)
    if args.profile_only:
        print_profile(data["profile"])
        return 0
    summary, ok = report(data, args)
    path = save(
        "overhead",
        {
            "machine": info,
            "args": vars(args),
            "summary": summary,
            "target_ratio": TARGET_RATIO,
            "rounds": [{"means": r["means"], "threads_ms": r["threads_ms"]} for r in data["rounds"]],
        },
    )
    print(f"figures: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
