"""The package passes the Comfy Registry's own check (`comfy node validate` from comfy-cli)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from harness.provision import provision_comfy_cli

REPO = Path(__file__).resolve().parents[2]


def test_comfy_node_validate_passes() -> None:
    comfy = provision_comfy_cli()
    proc = subprocess.run(
        [str(comfy), "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "All validation checks passed" in out
