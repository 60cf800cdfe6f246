"""Scale: run assembly and finalize for 100, 1,000 and 10,000 scenes, and the RSS of a real ComfyUI server after
10,000 prompts with the package against one without it, in the same run.

Assembly: a Store filled through its own API (``Store.put``) with PromptRecords shaped like the ones the recorder
stores (real probe snapshots before/after, node timings, three saved frames, a written done marker, the contract
Telemetry block, no API workflow; one scene in twenty has a failed first attempt and a retry), then what ``POST
/telemetry/runs/{id}/finalize`` does, with the same calls in the same order, all while the cyclic garbage collector
is paused (``gc_paused``): ``Store.by_run_raw`` → ``assemble_run`` → ``render_summary`` → ``finalize_files``, whose
steps are timed too: serialize the metadata; check it in memory (``fast_check``) while a thread writes both files
atomically (write, fsync, rename); wait for what is left of the writing; confirm the files hold what was written
(``validate_written_run``, which gives ``validate_run_dir``'s report) → free what was built. The total is the wall
time of all of it. Growth: seconds per scene at 10,000 scenes over seconds per scene at 1,000.

RSS: both servers get the same tiny prompts (EmptyImage 8×8 → ImageInvert → SaveImage, a new colour each) in
alternating batches; VmRSS after a warm-up of 200 prompts and after the measured prompts. ComfyUI keeps up to 10,000
history entries itself, so the server without the package grows too: the package's share is the difference.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from .common import (
    DEFAULT_VERSION,
    Colors,
    chain,
    header,
    machine,
    make_bench_server,
    rss_bytes,
    running,
    save,
    verdict,
    wait_history,
)

TARGET_SECONDS_10K = 1.0
TARGET_RSS_MB = 10.0
SIZES = (100, 1000, 10000)


# --- assembly -------------------------------------------------------------------------------------------------------


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_records(run_id: str, scenes: int, out_dir: Path) -> list[Any]:
    """PromptRecords like the recorder's, for ``scenes`` scenes (every 20th with a failed attempt and a retry)."""
    from telemetry.contract import telemetry_block
    from telemetry.policy import QueuePolicy
    from telemetry.probes import default_probe_chain
    from telemetry.records import MarkerState, NodeTiming, OutputRef, PromptError, PromptRecord

    probe = default_probe_chain(cpu_only=True)
    before, after = probe.snapshot().to_json_dict(), probe.snapshot().to_json_dict()
    policy = QueuePolicy()
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    records = []
    for s in range(1, scenes + 1):
        attempts = 2 if s % 20 == 0 else 1
        prev = None
        for a in range(1, attempts + 1):
            pid = str(uuid.uuid4())
            start = t0 + timedelta(seconds=(s * 3 + a) * 1.0)
            ok = a == attempts
            prefix = f"{run_id}/scene{s:05d}/frame"
            rec = PromptRecord(
                PromptId=pid,
                RunId=run_id,
                SceneId=str(s),
                Tags={"run_id": run_id, "scene_id": str(s), "title": f"Scene {s}", "prompt": "a harbour at dawn"},
                Outcome="success" if ok else "error",
                QueuedAt=_iso(start - timedelta(milliseconds=40)),
                StartedAt=_iso(start),
                EndedAt=_iso(start + timedelta(seconds=2.5)),
                ExecutionSuccessAt=_iso(start + timedelta(seconds=2.498)) if ok else None,
                QueueWaitSeconds=0.04,
                DurationSeconds=2.5,
                Before=before,
                After=after,
                Nodes=[
                    NodeTiming(NodeId="1", ClassType="EmptyImage", Seconds=0.001, Calls=1),
                    NodeTiming(NodeId="2", ClassType="ImageInvert", Seconds=0.002, Calls=1),
                    NodeTiming(NodeId="3", ClassType="SaveImage", Seconds=0.01, Calls=1),
                    NodeTiming(NodeId="4", ClassType="WriteDoneMarker", Seconds=0.0001, Calls=1),
                ],
                Outputs=[OutputRef(NodeId="3", Filename=f"frame_{i:05d}_.png", Subfolder=prefix) for i in (1, 2, 3)]
                if ok
                else [],
                Markers=[
                    MarkerState(
                        NodeId="4",
                        Prefix=prefix,
                        FrameCount=3 if ok else None,
                        State="written" if ok else "failed",
                        Path=str(out_dir / f"{prefix}.{'done' if ok else 'failed'}"),
                        WaitSeconds=0.003 if ok else None,
                    )
                ],
                Error=None if ok else PromptError(NodeId="3", NodeType="SaveImage", Message="disk hiccup"),
                RetryOf=prev,
                Attempt=a,
            )
            rec.Telemetry = telemetry_block(rec, policy, history_attempts=1)
            records.append(rec)
            prev = pid
    for earlier, later in zip(records, records[1:], strict=False):
        if later.RetryOf == earlier.PromptId:
            earlier.RetriedBy = later.PromptId
    return records


def finalize_timings(scenes: int, work: Path) -> dict[str, Any]:
    """Fill a store with ``scenes`` scenes, then time each step of finalize, as the route runs them."""
    from telemetry.policy import QueuePolicy
    from telemetry.runs import METADATA_FILE, assemble_run, finalize_files, gc_paused
    from telemetry.store import Store
    from telemetry.summary import render_summary

    run_id = f"bench-{scenes}"
    out_dir = work / f"output-{scenes}"
    records = make_records(run_id, scenes, out_dir)
    store = Store(work / f"store-{scenes}.sqlite3", retention=len(records) + 1)
    t = time.perf_counter()
    for rec in records:
        store.put(rec)
    fill = time.perf_counter() - t
    record_count = len(records)
    del records  # the finalize route does not hold them either
    gc.collect()
    steps: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        steps[name] = now - clock[0]
        clock[0] = now

    # The route's finalize(): the same calls under gc_paused; the total includes freeing what they built.
    start = clock[0] = time.perf_counter()
    with gc_paused():
        got = store.by_run_raw(run_id)
        lap("store.by_run_raw")
        meta = assemble_run(run_id, got, policy=QueuePolicy(), output_dir=out_dir, run_info={}, waits={})
        lap("assemble_run")
        summary = render_summary(meta)
        lap("render_summary")
        folder = Path(meta["RunDir"])
        report = finalize_files(folder, meta, summary, lap=lap)
        assembled = len(meta["Scenes"])
        del got, meta, summary
        lap("free")
    total = time.perf_counter() - start
    store.close()
    if not report.valid:
        raise RuntimeError(f"the {scenes}-scene run does not validate: {report.errors[:5]}")
    if assembled != scenes or report.scene_count != scenes:
        raise RuntimeError(f"assembled {assembled} scenes ({report.scene_count} validated), expected {scenes}")
    return {
        "scenes": scenes,
        "records": record_count,
        "fill_seconds": round(fill, 3),
        "steps_seconds": {k: round(v, 4) for k, v in steps.items()},
        "total_seconds": round(total, 4),
        "ms_per_scene": round(total / scenes * 1000, 4),
        "metadata_bytes": (folder / METADATA_FILE).stat().st_size,
    }


# --- RSS ------------------------------------------------------------------------------------------------------------


def run_batch(server: Any, count: int, colors: Colors, tag: str) -> None:
    """Queue ``count`` tiny prompts and wait for the last one in /history."""
    last = ""
    for _ in range(count):
        last = server.queue(chain(3, colors(), size=8, prefix=f"rss/{tag}"))
    wait_history(server, last, timeout=600, interval=0.05)


def settle(server: Any, with_package: bool, last_id: str | None) -> None:
    """Wait until the server has nothing queued (and, with the package, the last record is final)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        q = server.get("/queue")
        if not q.get("queue_running") and not q.get("queue_pending"):
            break
        time.sleep(0.05)
    if with_package and last_id:
        server.request("GET", f"/telemetry/prompts/{last_id}/wait?timeout=60", timeout=70)


def rss_growth(prompts: int, warmup: int, batch: int, version: str) -> dict[str, Any]:
    """RSS before/after ``prompts`` tiny prompts on a server without and one with the package."""
    servers = {
        "without": make_bench_server(version, with_package=False, timer=False),
        "with": make_bench_server(version, with_package=True, timer=False),
    }
    colors = Colors(0x404040)
    out: dict[str, Any] = {"prompts": prompts, "warmup": warmup}
    with running(*servers.values()):
        for label, s in servers.items():
            run_batch(s, warmup, colors, label)
            settle(s, label == "with", None)
        before = {label: rss_bytes(s.proc.pid) for label, s in servers.items()}
        t0 = time.perf_counter()
        done = 0
        while done < prompts:
            n = min(batch, prompts - done)
            for label, s in servers.items():
                run_batch(s, n, colors, label)
            done += n
        elapsed = time.perf_counter() - t0
        for label, s in servers.items():
            hist = s.get("/history?max_items=1")
            last = next(iter(hist), None)
            settle(s, label == "with", last)
        after = {label: rss_bytes(s.proc.pid) for label, s in servers.items()}
        db = servers["with"].user_dir / "telemetry" / "telemetry.sqlite3"
        out["store_bytes"] = sum(p.stat().st_size for p in db.parent.glob("telemetry.sqlite3*")) if db.exists() else 0
        out["records_kept"] = len(servers["with"].get("/telemetry?limit=1000")["Prompts"])
    mib = 1024 * 1024
    for label in servers:
        out[label] = {
            "rss_before_mb": round(before[label] / mib, 1),
            "rss_after_mb": round(after[label] / mib, 1),
            "growth_mb": round((after[label] - before[label]) / mib, 1),
        }
    out["package_growth_mb"] = round(out["with"]["growth_mb"] - out["without"]["growth_mb"], 1)
    out["seconds_both_servers"] = round(elapsed, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: finalize timings per size, growth, and RSS growth with vs without the package."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=10000, help="measured prompts per server for RSS (10000)")
    ap.add_argument("--warmup", type=int, default=200, help="prompts per server before the first RSS reading (200)")
    ap.add_argument("--batch", type=int, default=500, help="prompts per server per alternation (500)")
    ap.add_argument("--skip-rss", action="store_true", help="only the assembly figures (no ComfyUI)")
    ap.add_argument("--skip-assembly", action="store_true", help="only the RSS figures")
    ap.add_argument("--version", default=DEFAULT_VERSION, help=f"ComfyUI version ({DEFAULT_VERSION})")
    args = ap.parse_args(argv)
    info = machine(None if args.skip_rss else args.version)
    header("scale: run assembly + finalize for 100 / 1,000 / 10,000 scenes; RSS after many prompts", info)
    work = Path(tempfile.mkdtemp(prefix="rt-bench-scale-"))
    ok = True
    try:
        sizes = [] if args.skip_assembly else [finalize_timings(n, work) for n in SIZES]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result: dict[str, Any] = {"machine": info, "assembly": sizes}
    for r in sizes:
        steps = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in r["steps_seconds"].items())
        print(
            f"{r['scenes']:>6} scenes ({r['records']} records): {r['total_seconds']:.3f} s = "
            f"{r['ms_per_scene']:.3f} ms/scene [{steps}]"
        )
    if sizes:
        by = {r["scenes"]: r for r in sizes}
        growth = by[10000]["ms_per_scene"] / by[1000]["ms_per_scene"]
        met_time = by[10000]["total_seconds"] <= TARGET_SECONDS_10K
        met_linear = growth <= 1.25
        ok &= met_time and met_linear
        result["growth_10k_over_1k"] = round(growth, 3)
        print(
            f"10,000 scenes in {by[10000]['total_seconds']:.3f} s (target ≤ {TARGET_SECONDS_10K:g} s): "
            f"{verdict(met_time)}; per-scene time at 10,000 / at 1,000 = {growth:.2f} (linear ≈ 1; target ≤ 1.25): "
            f"{verdict(met_linear)}"
        )
    if not args.skip_rss:
        rss = rss_growth(args.prompts, args.warmup, args.batch, args.version)
        result["rss"] = rss
        met_rss = rss["package_growth_mb"] <= TARGET_RSS_MB
        ok &= met_rss
        print(
            f"RSS after {rss['prompts']} prompts each ({rss['seconds_both_servers']:.0f} s for both): without the "
            f"package {rss['without']['rss_before_mb']} → {rss['without']['rss_after_mb']} MB "
            f"(+{rss['without']['growth_mb']}), with {rss['with']['rss_before_mb']} → {rss['with']['rss_after_mb']} MB "
            f"(+{rss['with']['growth_mb']}); the package's share +{rss['package_growth_mb']} MB "
            f"(target ≤ {TARGET_RSS_MB:g} MB): {verdict(met_rss)}"
        )
        print(f"   store on disk: {rss['store_bytes'] / 1024 / 1024:.1f} MB")
    path = save("scale", result)
    print(f"figures: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
