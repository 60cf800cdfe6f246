"""Runner: scenes/hour of the same story sequentially (the old runner: queue, wait, queue the next), pipelined on one
worker (depth 2), and pipelined on two workers; plus the idle gap a worker has between two scenes.

Each scene sleeps ``--scene-seconds`` in RTTestSleep (standing for GPU time, which does not compete for this machine's
CPU) and saves two small frames with a done marker. Sequential is the same runner code with ``depth=1``, which is
what the old loop did. Idle gap: on one worker, the next scene's ``StartedAt`` minus the previous one's ``EndedAt``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from telemetry.runner import run_story

from .common import DEFAULT_VERSION, header, machine, make_bench_server, median, running, save


def _files(tmp: Path, scenes: int, seconds: float) -> tuple[Path, Path]:
    wf = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": "{{scene.seed}}"},
        },
        "2": {"class_type": "RTTestSleep", "inputs": {"image": ["1", 0], "seconds": "{{scene.sleep}}"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "{{scene.prefix}}"}},
        "4": {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": "{{scene.prefix}}", "images": ["2", 0]}},
    }
    story = {"id": "bench", "scenes": [{"id": str(i + 1), "sleep": seconds} for i in range(scenes)]}
    (tmp / "wf.json").write_text(json.dumps(wf))
    (tmp / "story.json").write_text(json.dumps(story))
    return tmp / "wf.json", tmp / "story.json"


def _t(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _gaps(meta: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[float]:
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for scene in meta["Scenes"]:
        for att in scene["AttemptSummaries"]:
            rec = records.get(att["PromptId"])
            if rec and rec.get("StartedAt") and rec.get("EndedAt"):
                by_worker.setdefault(rec["_worker"], []).append((_t(rec["StartedAt"]), _t(rec["EndedAt"])))
    gaps = []
    for spans in by_worker.values():
        spans.sort()
        gaps += [max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:], strict=False)]
    return gaps


def one(servers: list[Any], depth: int, scenes: int, seconds: float) -> dict[str, Any]:
    """Run the story once; scenes/hour and idle gaps."""
    with tempfile.TemporaryDirectory(prefix="rt-bench-runner-") as tmp:
        wf, st = _files(Path(tmp), scenes, seconds)
        run_id = f"bench-{uuid.uuid4().hex[:8]}"
        out = io.StringIO()
        t0 = time.perf_counter()
        result = run_story(
            server=[s.url for s in servers], workflow=wf, scenes=st, run_id=run_id, out=out, depth=depth,
            out_dir=Path(tmp) / "run",
        )  # fmt: skip
        wall = time.perf_counter() - t0
        if result.exit_code != 0:
            raise RuntimeError(out.getvalue())
        meta = json.loads((Path(tmp) / "run" / "artifact-metadata.json").read_text())
    records: dict[str, dict[str, Any]] = {}
    for s in servers:
        for scene in meta["Scenes"]:
            for att in scene["AttemptSummaries"]:
                status, rec = s.request("GET", f"/telemetry/prompts/{att['PromptId']}")
                if status == 200 and rec.get("StartedAt"):
                    rec["_worker"] = s.url
                    records[att["PromptId"]] = rec
    gaps = _gaps(meta, records)
    print("  gaps ms:", [round(g * 1000) for g in gaps])
    return {
        "workers": len(servers),
        "depth": depth,
        "wall_seconds": round(wall, 3),
        "scenes_per_hour": round(scenes * 3600 / wall, 1),
        "idle_gap_median_ms": round(median(gaps) * 1000, 1) if gaps else None,
        "idle_gap_max_ms": round(max(gaps) * 1000, 1) if gaps else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print the three set-ups."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenes", type=int, default=12)
    ap.add_argument("--scene-seconds", type=float, default=1.0)
    ap.add_argument("--version", default=DEFAULT_VERSION)
    args = ap.parse_args(argv)
    info = machine(args.version)
    header("runner: sequential vs pipelined, one vs two workers", info)
    a = make_bench_server(args.version, with_package=True, timer=False)
    b = make_bench_server(args.version, with_package=True, timer=False)
    rows = []
    with running(a, b):
        one([a], 1, 2, 0.1)  # warm-up: first prompt imports, caches
        one([b], 1, 2, 0.1)
        for label, servers, depth in (
            ("sequential, 1 worker (old runner)", [a], 1),
            ("pipelined, 1 worker (depth 2)", [a], 2),
            ("pipelined, 2 workers (depth 2)", [a, b], 2),
        ):
            row = one(servers, depth, args.scenes, args.scene_seconds)
            row["setup"] = label
            rows.append(row)
            print(
                f"{label:<36} {row['wall_seconds']:7.2f} s  {row['scenes_per_hour']:8.1f} scenes/h  "
                f"idle gap median {row['idle_gap_median_ms']} ms, max {row['idle_gap_max_ms']} ms"
            )
    base = rows[0]["scenes_per_hour"]
    for row in rows[1:]:
        print(f"{row['setup']}: x{row['scenes_per_hour'] / base:.2f} scenes/hour of the sequential runner")
    path = save("runner", {"machine": info, "scenes": args.scenes, "scene_seconds": args.scene_seconds, "rows": rows})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
