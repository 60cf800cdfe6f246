"""The README's demo command works: it provisions, runs the example story, and leaves a valid run folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness.comfy import REPO
from telemetry.validate import validate_run_dir

pytestmark = pytest.mark.comfy


def test_demo_runs_the_example_story(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "harness.demo", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Queue policy: sceneRetries=1" in proc.stdout
    assert proc.stdout.count("marker written") == 3
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("demo-")
    assert validate_run_dir(runs[0]).valid
    assert "ComfyUI stopped" in proc.stdout
