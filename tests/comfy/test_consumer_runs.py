"""The consumer CLI against real ComfyUI: a wait that names its prompt (M3), this render's files only (C1)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from harness.comfy import REPO, ComfyServer, wait_until
from tests.comfy import workflows as wf

pytestmark = pytest.mark.comfy


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "telemetry", *args]


def wait_record(server: ComfyServer, prompt_id: str, timeout: float = 120) -> dict:
    status, body = server.request("GET", f"/telemetry/prompts/{prompt_id}/wait?timeout={timeout}", timeout=timeout + 10)
    assert status == 200, (status, body)
    return body


class Waiter:
    """A running ``python -m telemetry wait`` whose stderr is read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            cli("wait", *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stderr is not None
        # Each read ends by the process's own --timeout at the latest.
        self.announcement = self.proc.stderr.readline()
        assert self.announcement.startswith("waiting for "), self.announcement + self.proc.stderr.read()

    def next_line(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.readline()

    def finish(self, timeout: float = 90) -> tuple[int, dict]:
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_wait_for_a_named_prompt_ignores_the_previous_render_of_its_prefix(comfy: ComfyServer, tmp_path: Path) -> None:
    """A rendered P; B for P is queued behind a slow prompt. ``wait --prompt-id B`` (and ``--newer-than``), with
    inotify and with polling, ignore A's .done and return B's once it lands; a wait naming nothing returns A's at once
    (the field case)."""
    prefix = f"m3-{uuid.uuid4().hex[:8]}/frame"
    out = str(comfy.output_dir)
    a = comfy.queue(wf.frames(prefix, count=2, color=0x111111))
    wait_record(comfy, a)
    assert json.loads((comfy.output_dir / f"{prefix}.done").read_text())["PromptId"] == a
    after_a = datetime.now(timezone.utc).isoformat()
    started = tmp_path / "slow-started"
    # The slow prompt holds the queue until the test interrupts it, however slowly the waiters start on a busy machine.
    slow_prompt = wf.with_sleep(wf.frames(f"m3-slow-{uuid.uuid4().hex[:8]}", count=1), 600.0, started_file=str(started))
    slow = comfy.queue(slow_prompt)
    b = str(uuid.uuid4())
    common = ["--output-dir", out, "--prefix", prefix, "--timeout", "120"]
    waiters: dict[str, Waiter] = {}
    try:
        wait_until(started.exists, 60, what="the slow prompt to start")
        for watcher in ("auto", "poll"):
            waiters[f"prompt-id/{watcher}"] = Waiter(*common, "--prompt-id", b, "--watcher", watcher)
            waiters[f"newer-than/{watcher}"] = Waiter(*common, "--newer-than", after_a, "--watcher", watcher)
        assert "watcher: inotify" in waiters["prompt-id/auto"].announcement
        assert "watcher: poll" in waiters["prompt-id/poll"].announcement
        for name, waiter in waiters.items():
            line = waiter.next_line()
            assert f"{prefix}.done: its" in line and line.endswith("; still waiting\n"), (name, line)
            assert (f"PromptId {a!r} is not {b!r}" if name.startswith("prompt-id") else "is older than") in line
        # The field case: a wait that cannot name its prompt takes A's marker.
        naive = subprocess.run(cli("wait", *common[:4], "--timeout", "5"), cwd=REPO, capture_output=True, text=True)
        assert json.loads(naive.stdout)["Marker"]["PromptId"] == a
        body = {"prompt": wf.frames(prefix, count=3, color=0x222222), "prompt_id": b}
        status, answer = comfy.request("POST", "/prompt", body)
        assert status == 200 and answer["prompt_id"] == b, answer
        queue = comfy.get("/queue")
        assert b in [item[1] for item in queue["queue_pending"]], "B must still be queued behind the slow prompt"
        assert slow in [item[1] for item in queue["queue_running"]]
        assert all(w.proc.poll() is None for w in waiters.values()), "a waiter returned while B was still queued"
        comfy.interrupt()
        assert wait_record(comfy, slow)["Outcome"] == "interrupted"
        rec_b = wait_record(comfy, b)
        assert rec_b["Outcome"] == "success"
        for name, waiter in waiters.items():
            code, report = waiter.finish()
            assert code == 0, (name, report)
            assert report["Marker"]["PromptId"] == b, name
            assert report["Marker"]["FrameCount"] == 3 and report["Verified"] is True, name
            assert any(a in text or "older than" in text for text in report["IgnoredMarkers"]), name
    finally:
        for waiter in waiters.values():
            waiter.kill()
        # Never leave the 600 s prompt holding the shared server's queue when an assertion failed early.
        if slow in [item[1] for item in comfy.get("/queue")["queue_running"]]:
            comfy.interrupt()


def test_write_marker_and_forced_copy_take_only_this_render(comfy: ComfyServer, tmp_path: Path) -> None:
    """Two renders of one prefix by SaveImage (ComfyUI's counter keeps the first take beside the second):
    ``write-marker --since`` lists only the second, ``wait --copy-to`` copies only those, and a forced copy with
    ``--newer-than`` skips the first take, saying so."""
    prefix = f"c1-{uuid.uuid4().hex[:8]}/frame"
    folder = comfy.output_dir / prefix.split("/")[0]
    first = comfy.queue(wf.frames(prefix, count=2, marker=False))
    comfy.wait_history(first)
    first_take = sorted(p.name for p in folder.iterdir())
    # mtimes are the kernel's clock: wait until a fresh file's mtime is past the first take's, then mark the time.
    newest = max(p.stat().st_mtime_ns for p in folder.iterdir())
    probe = tmp_path / "clock-probe"

    def clock_moved() -> bool:
        probe.write_bytes(b"x")
        return probe.stat().st_mtime_ns > newest

    wait_until(clock_moved, 10, what="the file-system clock to move past the first take", interval=0.01)
    since = f"{time.time():.6f}"
    second = comfy.queue(wf.frames(prefix, count=3, marker=False, color=0x445566))
    comfy.wait_history(second)
    second_take = sorted(set(p.name for p in folder.iterdir()) - set(first_take))
    assert len(first_take) == 2 and len(second_take) == 3, (first_take, second_take)

    written = subprocess.run(
        cli("write-marker", "--output-dir", str(comfy.output_dir), "--prefix", prefix, "--since", since,
            "--prompt-id", second),
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert written.returncode == 0, written.stderr
    result = json.loads(written.stdout)
    assert result["Listed"] == second_take
    assert sorted(item["File"] for item in result["LeftOut"]) == first_take
    marker = json.loads((comfy.output_dir / f"{prefix}.done").read_text())
    assert [o["Filename"] for o in marker["Outputs"]] == second_take and marker["FrameCount"] == 3

    copy_to = tmp_path / "copy"
    waited = subprocess.run(
        cli("wait", "--output-dir", str(comfy.output_dir), "--prefix", prefix, "--prompt-id", second,
            "--copy-to", str(copy_to), "--timeout", "10"),
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert sorted(p.name for p in (copy_to / prefix.split("/")[0]).iterdir()) == second_take

    # No marker for this prefix: the forced copy takes the second take only and lists the first as stale.
    (comfy.output_dir / f"{prefix}.done").unlink()
    forced_to = tmp_path / "forced"
    forced = subprocess.run(
        cli("wait", "--output-dir", str(comfy.output_dir), "--prefix", prefix, "--newer-than", since,
            "--copy-to", str(forced_to), "--timeout", "0.2", "--stability-seconds", "0.1"),
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert forced.returncode == 3, forced.stderr
    report = json.loads(forced.stdout)
    actions = {Path(e["Source"]).name: e["Action"] for e in report["ForcedCopyFiles"]}
    assert actions == {**{n: "skipped" for n in first_take}, **{n: "copied" for n in second_take}}
    assert sorted(p.name for p in (forced_to / prefix.split("/")[0]).iterdir()) == second_take
    debug = Path(report["ForcedCopyDebugPath"]).read_text()
    assert all(f"{n}: stale: modified" in debug for n in first_take), debug
