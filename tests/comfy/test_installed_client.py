"""`pip install <repo>` in a fresh venv: `run-telemetry` from another folder, no ComfyUI, no torch; the HTTP wait."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.comfy import REPO, ComfyServer
from tests.comfy.workflows import frames, with_raise, with_sleep

pytestmark = pytest.mark.comfy

SKIP = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".ruff_cache", "test-artifacts")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the project installed from a copy of this tree (so no build/ lands in the repo)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=SKIP, symlinks=True)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    yield venv


def run(venv: Path, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "run-telemetry"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_installed_command_runs_elsewhere_without_comfyui_or_torch(installed: Path, tmp_path: Path) -> None:
    py = str(installed / "bin" / "python")
    probe = subprocess.run(
        [
            py,
            "-c",
            "import importlib.util as u, json, run_telemetry, run_telemetry.runner, run_telemetry.remote;"
            "from run_telemetry import run_story, wait_http, fetch_run, validate_run_dir, render_summary;"
            "print(json.dumps({m: u.find_spec(m) is not None for m in ('torch', 'comfy', 'telemetry', 'nodes')}));"
            "print(run_telemetry.__file__)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    found, location = probe.stdout.splitlines()
    assert json.loads(found) == {"torch": False, "comfy": False, "telemetry": False, "nodes": False}
    installed_pkg = Path(location).parent
    # The same files as telemetry/, mapped, not a copy that could drift.
    for source in (REPO / "telemetry").glob("*.py"):
        assert (installed_pkg / source.name).read_bytes() == source.read_bytes(), source.name
    assert (installed_pkg / "schemas" / "artifact-metadata.schema.json").is_file()

    helped = run(installed, "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "usage: run-telemetry" in helped.stdout
    for command in ("run", "wait", "fetch", "validate"):
        assert command in helped.stdout
    # A real command from another folder: write a marker for a script's outputs, then wait for it on the disk.
    out = tmp_path / "output"
    (out / "shots").mkdir(parents=True)
    (out / "shots" / "a_00001_.png").write_bytes(b"x" * 10)
    wrote = run(installed, "write-marker", "--output-dir", str(out), "--prefix", "shots/a", cwd=tmp_path)
    assert wrote.returncode == 0, wrote.stderr
    waited = run(installed, "wait", "--output-dir", str(out), "--prefix", "shots/a", "--timeout", "5", cwd=tmp_path)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert json.loads(waited.stdout)["Status"] == "done"
    assert run(installed, "schema", "--check", cwd=tmp_path).returncode == 0


def test_http_wait_and_fetch_from_the_installed_command(installed: Path, comfy: ComfyServer, tmp_path: Path) -> None:
    prefix = f"remote/{uuid.uuid4().hex[:8]}"
    good = comfy.queue(frames(prefix, count=2))
    bad = comfy.queue(with_raise(frames(prefix + "-bad", count=1), "no frames today"))
    args = ["wait", "--server", comfy.url, "--timeout", "120"]
    ok = run(installed, *args, "--prompt-id", good, cwd=tmp_path, timeout=180)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    record = json.loads(ok.stdout)
    assert record["PromptId"] == good and record["Outcome"] == "success"
    failed = run(installed, *args, "--prompt-id", bad, cwd=tmp_path, timeout=180)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert json.loads(failed.stdout)["Error"]["Message"].strip().endswith("no frames today")
    unknown = run(installed, *args, "--prompt-id", str(uuid.uuid4()), cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown prompt" in unknown.stderr
    slow = comfy.queue(with_sleep(frames(prefix + "-slow", count=1), 4.0))
    timed = run(installed, "wait", "--server", comfy.url, "--prompt-id", slow, "--timeout", "0.5", cwd=tmp_path)
    assert timed.returncode == 3, timed.stdout + timed.stderr
    body = json.loads(timed.stdout)
    assert body["TimedOut"] is True and body["Outcome"] in ("queued", "running")
    # fetch: a finalized run's two files, validated where they land.
    run_id = f"fetch-{uuid.uuid4().hex[:8]}"
    pid = comfy.queue(frames(f"{run_id}/s1", count=2), extra_data={"telemetry": {"run_id": run_id, "scene_id": "1"}})
    assert run(installed, *args, "--prompt-id", pid, cwd=tmp_path, timeout=180).returncode == 0
    early = run(
        installed, "fetch", "--server", comfy.url, "--run-id", run_id, "--out", str(tmp_path / "f"), cwd=tmp_path
    )
    assert early.returncode == 1 and "404" in early.stderr
    status, _ = comfy.request("POST", f"/telemetry/runs/{run_id}/finalize", {})
    assert status == 200
    got = run(installed, "fetch", "--server", comfy.url, "--run-id", run_id, "--out", str(tmp_path / "f"), cwd=tmp_path)
    assert got.returncode == 0, got.stdout + got.stderr
    report = json.loads(got.stdout)
    assert report["Valid"] is True and report["Errors"] == []
    served = comfy.request("GET", f"/telemetry/runs/{run_id}/run-summary.txt")[1]
    assert (tmp_path / "f" / "run-summary.txt").read_text() == served
    missing = run(installed, "wait", "--server", comfy.url, cwd=tmp_path)
    assert missing.returncode == 2 and "--prompt-id" in missing.stderr
