"""`wait --server` and `fetch` against servers that are not there or not given right: clear errors, right exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness.comfy import REPO, free_port


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telemetry", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_wait_on_a_server_that_does_not_answer_times_out_with_the_reason() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = run("wait", "--server", url, "--prompt-id", "abc", "--timeout", "1.5")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    body = json.loads(proc.stdout)
    assert body["TimedOut"] is True and url in body["Problem"]


def test_wait_and_fetch_refuse_bad_input_naming_it(tmp_path: Path) -> None:
    proc = run("wait", "--server", "gpu-1:8188", "--prompt-id", "abc")
    assert proc.returncode == 2 and "--server 'gpu-1:8188' is not a server URL" in proc.stderr
    proc = run("wait", "--server", "http://127.0.0.1:1", "--prefix", "x")
    assert proc.returncode == 2 and "--prefix read a shared disk" in proc.stderr
    proc = run("wait", "--server", "http://127.0.0.1:1")
    assert proc.returncode == 2 and "--server needs --prompt-id" in proc.stderr
    proc = run("wait", "--prompt-id", "abc")
    assert proc.returncode == 2 and "--output-dir and --prefix" in proc.stderr
    proc = run("wait")
    assert proc.returncode == 2 and "--output-dir and --prefix" in proc.stderr
    proc = run("fetch", "--server", "http://127.0.0.1:1", "--run-id", "../x", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--run-id '../x' is not allowed" in proc.stderr
    proc = run("fetch", "--server", f"http://127.0.0.1:{free_port()}", "--run-id", "r1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "did not answer" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
