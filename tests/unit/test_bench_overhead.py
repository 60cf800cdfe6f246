"""The overhead bench's own arithmetic and attribution: intervals over rounds, the profile's owner rule, workflows."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from bench.common import REPO
from bench.overhead import geo_ci, marker_prompt, plain_prompt, summarize_profile, t95


def test_geo_ci_is_a_t_interval_on_log_ratios() -> None:
    """Geometric mean and 95 % t-interval of per-round ratios, computed by hand for 4 rounds (t(3) = 3.182)."""
    ratios = [1.01, 1.03, 0.99, 1.05]
    logs = [math.log(r) for r in ratios]
    half = 3.182 * statistics.stdev(logs) / 2
    g, lo, hi = geo_ci(ratios)
    assert math.isclose(g, math.exp(statistics.fmean(logs)))
    assert math.isclose(lo, math.exp(statistics.fmean(logs) - half))
    assert math.isclose(hi, math.exp(statistics.fmean(logs) + half))
    assert lo < g < hi
    assert t95(1) == 12.706 and t95(30) == 2.042 and t95(200) == 1.96


def test_geo_ci_of_identical_rounds_has_no_width() -> None:
    g, lo, hi = geo_ci([1.2, 1.2, 1.2])
    assert math.isclose(g, 1.2) and math.isclose(lo, 1.2) and math.isclose(hi, 1.2)


def test_profile_counts_a_sample_for_the_innermost_package_or_comfyui_frame(tmp_path: Path) -> None:
    """A node running under the package's wrapper is ComfyUI's time; library frames count for their caller."""
    comfy = "/cache/comfyui-0.3.75"
    pkg = "/tmp/rt-bench-with-x/custom_nodes/ComfyUI-Run-Telemetry"
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "\n".join(
            [
                # the package's per-node wrapper around ComfyUI's node: ComfyUI's
                f"thread (11): Thread-1 (prompt_worker);execute ({pkg}/hooks/executor.py:167);"
                f"invert ({comfy}/nodes.py:10);conv (/venv/lib/torch/x.py:3) 7",
                # ComfyUI calling the package's node, which reads a file through the standard library: the package's
                f"thread (11): Thread-1 (prompt_worker);execute ({comfy}/execution.py:5);"
                f"declare ({pkg}/nodes/marker.py:99);realpath (/usr/lib/python3.11/posixpath.py:1) 3",
                # the package's writer thread, in os.fsync (no Python frame below atomic_write)
                f"thread (12): run-telemetry-writer;_run ({REPO}/telemetry/writer.py:80);"
                f"atomic_write ({REPO}/telemetry/atomic.py:390) 5",
                "not a sample line",
            ]
        )
    )
    out = summarize_profile(raw, comfy)
    assert out["samples_per_thread"] == {"Thread-1 (prompt_worker)": 10, "run-telemetry-writer": 5}
    assert out["package_samples_per_thread"] == {"Thread-1 (prompt_worker)": 3, "run-telemetry-writer": 5}
    assert out["package_functions"]["Thread-1 (prompt_worker)"] == {"declare (nodes/marker.py)": 3}
    assert out["package_functions"]["run-telemetry-writer"] == {"atomic_write (telemetry/atomic.py)": 5}


def test_marker_prompt_is_the_plain_chain_plus_capture_and_marker_at_one_prefix() -> None:
    """The example workflow's shape: TelemetryCapture feeds SaveImage and WriteDoneMarker; the do-nothing pair too."""
    plain = plain_prompt(5, 123, "bo/p")
    with_marker = marker_prompt(5, 123, "bo/p", "run-1", "s1")
    assert set(with_marker) == set(plain) | {"6", "7"}
    assert with_marker["6"]["class_type"] == "TelemetryCapture"
    assert with_marker["6"]["inputs"]["value"] == plain["5"]["inputs"]["images"]
    assert with_marker["5"]["inputs"]["images"] == ["6", 0]
    assert with_marker["7"] == {
        "class_type": "WriteDoneMarker",
        "inputs": {"filename_prefix": "bo/p", "images": ["6", 0]},
    }
    noop = marker_prompt(5, 123, "bo/p", "run-1", "s1", classes=("RTBenchPass", "RTBenchOutput"))
    assert [noop["6"]["class_type"], noop["7"]["class_type"]] == ["RTBenchPass", "RTBenchOutput"]
    assert {k: v for k, v in noop.items() if k not in ("6", "7")} == {
        k: v for k, v in with_marker.items() if k not in ("6", "7")
    }


def test_williams_order_puts_every_variant_after_every_other_once() -> None:
    """Over the 6 rows each ordered pair (a right before b) occurs exactly once, and every row is a permutation."""
    from bench.overhead import VARIANTS, williams_order

    rows = [williams_order(VARIANTS, r) for r in range(len(VARIANTS))]
    assert all(sorted(row) == sorted(VARIANTS) for row in rows)
    pairs = [(a, b) for row in rows for a, b in zip(row, row[1:], strict=False)]
    assert len(pairs) == len(set(pairs)) == len(VARIANTS) * (len(VARIANTS) - 1)
