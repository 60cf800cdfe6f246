"""Overhead: the same weight-free workflows on a ComfyUI without and with Run Telemetry, alternating A/B.

Both servers run at once; prompts go to one server at a time (A B B A …, so slow drifts cancel), each waited for
before the next, so the two never compete for the CPU. Every prompt's EmptyImage colour differs: nothing is cached.

Per-prompt execution time, primary: nanoseconds around ``PromptExecutor.execute``, taken by a bench-only package
(bench/timer_node) linked into BOTH servers and installed outermost, so the figure includes the package's own
prompt-level wrapper and its per-node wrapper. Cross-check: ComfyUI's ``execution_success − execution_start``
from /history (whole milliseconds, and stamped inside the executor, i.e. without the prompt-level wrapper).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import (
    DEFAULT_VERSION,
    Colors,
    bootstrap_ratio_ci,
    chain,
    header,
    history_ms,
    machine,
    make_bench_server,
    median,
    percentile,
    running,
    save,
    verdict,
    wait_history,
)

TARGET_RATIO = 1.02


def run_one(server: Any, prompt: dict[str, Any]) -> tuple[str, dict]:
    """Queue one prompt (no client id), block on the timer's wait route (no polling while it runs), read /history."""
    pid = server.queue(prompt)
    status, body = server.request("GET", f"/rt_bench/wait/{pid}?timeout=120", timeout=130)
    if status != 200:
        raise TimeoutError(f"prompt {pid} did not finish: {status} {body}")
    return pid, wait_history(server, pid)


def measure(prompts: int, warmup: int, version: str, nodes_list: list[int]) -> dict[str, Any]:
    """Run the alternating A/B series for every workflow size; return the figures."""
    base = make_bench_server(version, with_package=False)
    pkg = make_bench_server(version, with_package=True)
    colors = Colors()
    results: dict[str, Any] = {}
    with running(base, pkg):
        for nodes in nodes_list:
            ids: dict[str, list[str]] = {"without": [], "with": []}
            hist: dict[str, list[float]] = {"without": [], "with": []}
            servers = {"without": base, "with": pkg}
            for i in range(warmup + prompts):
                order = ("without", "with") if i % 2 == 0 else ("with", "without")
                for label in order:
                    pid, entry = run_one(servers[label], chain(nodes, colors(), prefix=f"bench/c{nodes}"))
                    status = (entry.get("status") or {}).get("status_str")
                    if status != "success":
                        raise RuntimeError(f"{label} prompt {pid} ended {status}: {entry.get('status')}")
                    if i >= warmup:
                        ids[label].append(pid)
                        start, success = history_ms(entry)
                        if start is not None and success is not None:
                            hist[label].append(float(success - start))
            timings = {label: servers[label].get("/rt_bench/timings") for label in servers}
            us = {label: [timings[label][pid] / 1000.0 for pid in ids[label]] for label in servers}
            m_base, m_pkg = median(us["without"]), median(us["with"])
            lo, hi = bootstrap_ratio_ci(us["without"], us["with"])
            results[str(nodes)] = {
                "nodes": nodes,
                "prompts_each": prompts,
                "median_us_without": round(m_base, 1),
                "median_us_with": round(m_pkg, 1),
                "p90_us_without": round(percentile(us["without"], 90), 1),
                "p90_us_with": round(percentile(us["with"], 90), 1),
                "ratio": round(m_pkg / m_base, 4),
                "ratio_ci95": [round(lo, 4), round(hi, 4)],
                "added_us_per_prompt": round(m_pkg - m_base, 1),
                "added_us_per_node": round((m_pkg - m_base) / nodes, 2),
                "history_median_ms_without": median(hist["without"]),
                "history_median_ms_with": median(hist["with"]),
                "history_mean_ms_without": round(sum(hist["without"]) / max(1, len(hist["without"])), 3),
                "history_mean_ms_with": round(sum(hist["with"]) / max(1, len(hist["with"])), 3),
            }
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line: print the ratio per workflow and whether the target is met."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=200, help="measured prompts per server and workflow (200)")
    ap.add_argument("--warmup", type=int, default=20, help="unmeasured prompts first (20)")
    ap.add_argument("--version", default=DEFAULT_VERSION, help=f"ComfyUI version ({DEFAULT_VERSION})")
    args = ap.parse_args(argv)
    info = machine(args.version)
    header("overhead: per-prompt execution time, without vs with Run Telemetry (alternating A/B)", info)
    results = measure(args.prompts, args.warmup, args.version, [40, 3])
    ok = True
    for r in results.values():
        met = r["ratio"] <= TARGET_RATIO
        ok &= met
        print(
            f"{r['nodes']:>2}-node chain, {r['prompts_each']} prompts each: median {r['median_us_without']:.0f} µs → "
            f"{r['median_us_with']:.0f} µs, ratio {r['ratio']:.4f} (95% CI {r['ratio_ci95'][0]:.4f}–"
            f"{r['ratio_ci95'][1]:.4f}), +{r['added_us_per_prompt']:.0f} µs/prompt = "
            f"+{r['added_us_per_node']:.1f} µs/node; target ≤ {TARGET_RATIO}: {verdict(met)}"
        )
        print(
            f"   cross-check /history (ms, inside the executor): median {r['history_median_ms_without']} → "
            f"{r['history_median_ms_with']} ms, mean {r['history_mean_ms_without']} → {r['history_mean_ms_with']} ms"
        )
    extra: dict[str, Any] = {}
    if "40" in results and "3" in results:
        big, small = results["40"], results["3"]
        # The fixed per-prompt cost cancels: what is left is the marginal cost of one more node.
        per_node = (big["added_us_per_prompt"] - small["added_us_per_prompt"]) / (big["nodes"] - small["nodes"])
        fixed = small["added_us_per_prompt"] - per_node * small["nodes"]
        extra = {"marginal_us_per_node": round(per_node, 1), "fixed_us_per_prompt": round(fixed, 1)}
        print(
            f"split of the added time (from the two chain lengths): ~{fixed:.0f} µs fixed per prompt + "
            f"~{per_node:.1f} µs per node (each added figure is a difference of medians: noisy)"
        )
    path = save("overhead", {"machine": info, "results": results, "split": extra, "target_ratio": TARGET_RATIO})
    print(f"figures: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
