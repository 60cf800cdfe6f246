"""Settle cost: how much later the done marker comes when a prompt's files come from an output node that is not
known to close them before returning, against ComfyUI's own SaveImage, on one server in one run.

Prompts, one at a time, alternating:

- ``core``: EmptyImage → SaveImage + WriteDoneMarker (ComfyUI's own save node: no settle wait);
- ``late-at-once``: EmptyImage → RTTestLateSave(delay 0) + WriteDoneMarker (a custom output node whose files are
  complete almost at once: the cost is the settle window);
- ``late-1s``: RTTestLateSave(delay 0.33): its two files are complete about 1 s after the node returned.

Figure: the record's marker ``WaitSeconds`` (``execution_success`` → marker written, in-process) per kind.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from typing import Any

from .common import DEFAULT_VERSION, Colors, header, machine, make_bench_server, median, percentile, running, save

KINDS = {"core": None, "late-at-once": 0.0, "late-1s": 0.33}


def prompt(kind: str, name: str, color: int) -> dict[str, Any]:
    """The workflow of one kind."""
    delay = KINDS[kind]
    p: dict[str, Any] = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": color}},
        "3": {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": f"settle/{name}", "images": ["1", 0]}},
    }
    if delay is None:
        p["2"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"settle/{name}"}}
    else:
        p["2"] = {
            "class_type": "RTTestLateSave",
            "inputs": {"images": ["1", 0], "filename_prefix": f"settle/{name}", "delay": delay},
        }
    return p


def call(url: str, method: str = "GET", body: Any = None, timeout: float = 120) -> Any:
    """One JSON request."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def main(argv: list[str] | None = None) -> int:
    """Command line: print the marker wait per kind and the settle cost."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20, help="measured prompts per kind (20)")
    ap.add_argument("--version", default=DEFAULT_VERSION, help=f"ComfyUI version ({DEFAULT_VERSION})")
    args = ap.parse_args(argv)
    info = machine(args.version)
    header("settle cost: marker wait after execution_success, ComfyUI's SaveImage vs a late-writing node", info)
    server = make_bench_server(args.version, with_package=True, timer=False)
    colors = Colors()
    waits: dict[str, list[float]] = {k: [] for k in KINDS}
    with running(server):
        for i in range(args.prompts + 1):
            for kind in KINDS:
                pid = call(f"{server.url}/prompt", "POST", {"prompt": prompt(kind, f"{kind}-{i}", colors())})
                rec = call(f"{server.url}/telemetry/prompts/{pid['prompt_id']}/wait?timeout=60")
                m = rec["Markers"][0]
                if m["State"] != "written":
                    raise RuntimeError(f"{kind}: marker {m}")
                if i:  # the first round warms up
                    waits[kind].append(m["WaitSeconds"] * 1000)
    summary = {k: {"p50": round(median(v), 1), "p95": round(percentile(v, 95), 1)} for k, v in waits.items()}
    for kind, v in summary.items():
        print(f"{kind:<14} marker written after execution_success: p50 {v['p50']:>8.1f} ms  p95 {v['p95']:>8.1f} ms")
    cost = summary["late-at-once"]["p50"] - summary["core"]["p50"]
    print(f"settle cost for files complete at once (p50 late-at-once - core): {cost:.1f} ms")
    path = save("settle", {"machine": info, "summary": summary, "waits": waits})
    print(f"figures: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
