"""The runner on real ComfyUI workers: two workers with one killed mid-run, Ctrl-C and --resume, a deleted prompt."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.comfy import REPO, ComfyServer, wait_until
from telemetry.runner import run_story
from telemetry.summary import render_summary
from telemetry.validate import validate_run_dir
from tests.conftest import VERSIONS, make_server

pytestmark = pytest.mark.comfy

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$")


def slow_workflow(tmp: Path) -> Path:
    """EmptyImage -> RTTestSleep({{scene.sleep}}, writes {{scene.started}}) -> SaveImage + WriteDoneMarker."""
    wf = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 7}},
        "2": {
            "class_type": "RTTestSleep",
            "inputs": {"image": ["1", 0], "seconds": "{{scene.sleep}}", "started_file": "{{scene.started}}"},
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "{{scene.prefix}}"}},
        "4": {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": "{{scene.prefix}}", "images": ["2", 0]}},
    }
    path = tmp / "slow_workflow.json"
    path.write_text(json.dumps(wf))
    return path


def slow_story(tmp: Path, n: int, sleep: float) -> Path:
    scenes = [
        {"id": str(i + 1), "title": f"Shot {i + 1}", "sleep": sleep, "started": str(tmp / f"started-{i + 1}")}
        for i in range(n)
    ]
    path = tmp / "story.json"
    path.write_text(json.dumps({"id": "farm", "logline": "a slow story", "scenes": scenes}))
    return path


@pytest.fixture(params=VERSIONS, ids=[f"comfyui-{v}" for v in VERSIONS])
def two_workers(request: pytest.FixtureRequest) -> Iterator[tuple[ComfyServer, ComfyServer]]:
    """Two fresh ComfyUI workers of one version, started side by side, stopped by pid."""
    servers = [make_server(request.param), make_server(request.param)]
    errors: list[BaseException] = []

    def start(s: ComfyServer) -> None:
        try:
            s.start()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield servers[0], servers[1]
    finally:
        for s in servers:
            s.stop()
            shutil.rmtree(s.base_dir, ignore_errors=True)


def test_two_workers_one_killed_mid_run(two_workers: tuple[ComfyServer, ComfyServer], tmp_path: Path) -> None:
    a, b = two_workers
    run_id = f"farm-{uuid.uuid4().hex[:8]}"
    out_dir = tmp_path / "run"
    log = io.StringIO()
    result_box: dict = {}

    def drive() -> None:
        result_box["r"] = run_story(
            server=[a.url, b.url],
            workflow=slow_workflow(tmp_path),
            scenes=slow_story(tmp_path, 6, 1.5),
            run_id=run_id,
            out=log,
            out_dir=out_dir,
            worker_grace=3.0,
        )

    runner = threading.Thread(target=drive)
    runner.start()
    b_pid = str(b.proc.pid)
    started = [tmp_path / f"started-{i}" for i in range(1, 7)]
    # B is running one of this run's scenes (its started file holds B's pid): kill it now, as a crash would.
    wait_until(
        lambda: any(p.exists() and p.read_text() == b_pid for p in started), 120, what="a scene running on worker B"
    )
    b.kill9()
    runner.join(300)
    assert not runner.is_alive(), log.getvalue()
    result = result_box["r"]
    text = log.getvalue()
    # The run went on: every scene succeeded, the lost ones on A, and the summary names the failed worker.
    assert result.exit_code == 0, text
    assert result.failed_scenes == [] and list(result.failed_workers) == [b.url], text
    assert f"Worker failed: {b.url}" in text
    report = validate_run_dir(out_dir)
    assert report.valid, report.errors
    meta = json.loads((out_dir / "artifact-metadata.json").read_text())
    assert (out_dir / "run-summary.txt").read_text() == render_summary(meta)
    # The run's own files name the failed worker: Workers[] and a summary line.
    workers = {w["Url"]: w for w in meta["Workers"]}
    assert workers[b.url]["Failed"] is True and "no answer" in workers[b.url]["Reason"]
    assert workers[a.url]["Failed"] is False and workers[a.url]["Attempts"] >= 4
    assert f"Worker failed: {b.url} (no answer" in (out_dir / "run-summary.txt").read_text()
    assert [s["SceneId"] for s in meta["Scenes"]] == ["1", "2", "3", "4", "5", "6"]
    assert all(s["Success"] for s in meta["Scenes"])
    moved = [s for s in meta["Scenes"] if s["AttemptsRun"] == 2]
    assert moved, "no scene was on B when it died"
    for scene in moved:
        first, second = scene["AttemptSummaries"]
        assert first["Outcome"] == "crashed" and b.url in first["Error"]
        assert second["Success"] is True
        # The retry ran on A: its marker is in A's output folder.
        assert (a.output_dir / f"{scene['FramePrefix']}.done").exists()
    assert all(s["AttemptsRun"] <= 2 for s in meta["Scenes"])  # within the default budget (1 retry)
    ids = [att["PromptId"] for s in meta["Scenes"] for att in s["AttemptSummaries"]]
    assert len(set(ids)) == len(ids) and all(UUID_RE.match(i) for i in ids)
    # Both workers had work before B died; A kept two of this run's prompts in its queue at a time.
    assert any(re.search(rf"queued on {re.escape(b.url)}", ln) for ln in text.splitlines())
    # --resume with only A left: nothing to queue, and B's attempts (only in the runner's records now) are kept.
    again = io.StringIO()
    resumed = run_story(
        server=[a.url],
        workflow=slow_workflow(tmp_path),
        scenes=slow_story(tmp_path, 6, 1.5),
        run_id=run_id,
        out=again,
        out_dir=out_dir,
        resume=True,
    )
    assert resumed.exit_code == 0, again.getvalue()
    assert "6 scene(s) already succeeded, 0 to run" in again.getvalue() and "queued on" not in again.getvalue()
    kept = json.loads((out_dir / "artifact-metadata.json").read_text())
    assert [s["AttemptsRun"] for s in kept["Scenes"]] == [s["AttemptsRun"] for s in meta["Scenes"]]
    assert validate_run_dir(out_dir).valid
    # Plain lines (not a terminal): one final line per scene, each naming its scene once, its worker and attempt.
    finals = [ln for ln in text.splitlines() if re.search(r"success after \d+\.\ds(, marker \S+)?$", ln)]
    assert len(finals) == 6 and all(re.match(r"^\[scene \d/6 \d\] attempt \d on http://", ln) for ln in finals), finals


def test_ctrl_c_cancels_and_resume_runs_only_the_rest(comfy: ComfyServer, tmp_path: Path) -> None:
    run_id = f"resume-{uuid.uuid4().hex[:8]}"
    out_dir = tmp_path / "run"
    wf, st = slow_workflow(tmp_path), slow_story(tmp_path, 4, 1.0)
    args = ["run", "--server", comfy.url, "--workflow", str(wf), "--scenes", str(st), "--run-id", run_id]
    args += ["--out", str(out_dir)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "telemetry", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        done_marker = comfy.output_dir / run_id / "scene-1" / "frame.done"
        wait_until(done_marker.exists, 120, what="scene 1 of the run to finish")
        wait_until(lambda: (tmp_path / "started-3").exists(), 60, what="scene 3 to start")
        os.kill(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stdout + stderr
    assert "Resume with:" in stdout and f"--resume --run-id {run_id}" in stdout, stdout
    journal = json.loads((out_dir / "runner-records.json").read_text())["Records"]
    assert {r["SceneId"] for r in journal} >= {"1", "2", "3"}  # what the runner had collected, kept for --resume
    # Nothing of this run is left in the worker's queue.
    queue = comfy.get("/queue")
    ours = {json.dumps(item) for item in queue["queue_running"] + queue["queue_pending"] if run_id in json.dumps(item)}
    assert not ours
    scene1_done = done_marker.stat().st_mtime_ns

    log = io.StringIO()
    result = run_story(server=comfy.url, workflow=wf, scenes=st, run_id=run_id, out=log, out_dir=out_dir, resume=True)
    text = log.getvalue()
    assert result.exit_code == 0, text
    assert "Resuming run" in text and "queued on" in text
    assert "[scene 1/4 1] attempt" not in text  # scene 1 had succeeded: not queued again
    meta = json.loads((out_dir / "artifact-metadata.json").read_text())
    assert validate_run_dir(out_dir).valid
    assert [s["SceneId"] for s in meta["Scenes"]] == ["1", "2", "3", "4"] and all(s["Success"] for s in meta["Scenes"])
    scene1 = meta["Scenes"][0]
    assert scene1["AttemptsRun"] == 1
    # The earlier (interrupted) attempt of scene 3 is kept beside its new one.
    scene3 = meta["Scenes"][2]
    assert scene3["AttemptsRun"] >= 2 and scene3["AttemptSummaries"][0]["Outcome"] == "interrupted"
    assert done_marker.stat().st_mtime_ns == scene1_done  # scene 1 was not rendered again


def test_a_prompt_deleted_from_the_queue_fails_its_scene_and_the_run_goes_on(
    comfy: ComfyServer, tmp_path: Path
) -> None:
    run_id = f"r3-{uuid.uuid4().hex[:8]}"
    log = io.StringIO()
    box: dict = {}

    def drive() -> None:
        box["r"] = run_story(
            server=comfy.url,
            workflow=slow_workflow(tmp_path),
            scenes=slow_story(tmp_path, 3, 1.5),
            run_id=run_id,
            out=log,
            out_dir=tmp_path / "run",
        )

    runner = threading.Thread(target=drive)
    runner.start()
    # Scene 2 waits in the queue behind scene 1 (depth 2): the operator deletes it.
    pending: list[str] = []

    def scene_two_queued() -> bool:
        queue = comfy.get("/queue")
        pending[:] = [item[1] for item in queue["queue_pending"] if f"{run_id}/scene-2" in json.dumps(item)]
        return bool(pending)

    wait_until(scene_two_queued, 60, what="scene 2 waiting in the queue")
    status, _ = comfy.request("POST", "/queue", {"delete": pending})
    assert status == 200
    runner.join(300)
    assert not runner.is_alive()
    result, text = box["r"], log.getvalue()
    meta = json.loads((tmp_path / "run" / "artifact-metadata.json").read_text())
    scenes = {s["SceneId"]: s for s in meta["Scenes"]}
    # The run went on to scene 3 and was assembled; scene 2's deleted attempt is recorded as a failed one.
    assert scenes["1"]["Success"] and scenes["3"]["Success"], text
    assert scenes["2"]["AttemptSummaries"][0]["PromptId"] == pending[0]
    assert scenes["2"]["AttemptSummaries"][0]["Success"] is False
    assert validate_run_dir(tmp_path / "run").valid
    assert result.exit_code in (0, 1)


def test_run_routes_speak_iso_times_and_name_unknown_runs(comfy: ComfyServer) -> None:
    run_id = f"iso-{uuid.uuid4().hex[:8]}"
    pid = comfy.queue(
        {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"{run_id}/a"}},
        },
        extra_data={"telemetry": {"run_id": run_id, "scene_id": "1"}},
    )
    comfy.request("GET", f"/telemetry/prompts/{pid}/wait?timeout=60", timeout=90)
    runs: dict = {}

    def listed() -> bool:  # the store gets the record on its own thread, just after the wait route answers
        runs.update({r["RunId"]: r for r in comfy.get("/telemetry/runs")["Runs"]})
        return run_id in runs

    wait_until(listed, 30, what=f"run {run_id} in GET /telemetry/runs")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", runs[run_id]["LastActivity"])
    status, body = comfy.request("GET", "/telemetry/runs/never-seen-run/run-summary.txt")
    assert status == 404 and "unknown run" in body["error"]
    status, body = comfy.request("GET", f"/telemetry/runs/{run_id}/run-summary.txt")
    assert status == 404 and "finalize first" in body["error"]
    status, fin = comfy.request("POST", f"/telemetry/runs/{run_id}/finalize", {})
    assert status == 200 and fin["Errors"] == [] and fin["Valid"] is True


@pytest.fixture
def shared_output_workers(tmp_path: Path) -> Iterator[tuple[ComfyServer, ComfyServer, Path]]:
    """Two 0.3.75 workers writing into one output folder (a render farm's shared disk)."""
    shared = tmp_path / "shared-output"
    shared.mkdir()
    servers = [make_server("0.3.75", extra_args=["--output-directory", str(shared)]) for _ in range(2)]
    threads = [threading.Thread(target=s.start) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert all(s.proc is not None for s in servers)
        yield servers[0], servers[1], shared
    finally:
        for s in servers:
            s.stop()
            shutil.rmtree(s.base_dir, ignore_errors=True)


def test_finalize_on_a_shared_output_folder_never_drops_another_workers_scenes(
    shared_output_workers: tuple[ComfyServer, ComfyServer, Path],
) -> None:
    a, b, shared = shared_output_workers
    run_id = f"shared-{uuid.uuid4().hex[:8]}"

    def scene(server: ComfyServer, sid: str) -> str:
        pid = server.queue(
            {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"{run_id}/{sid}"}},
            },
            extra_data={"telemetry": {"run_id": run_id, "scene_id": sid}},
        )
        server.request("GET", f"/telemetry/prompts/{pid}/wait?timeout=60", timeout=90)
        return pid

    pid_a, _ = scene(a, "1"), scene(b, "2")
    status, fin = a.request("POST", f"/telemetry/runs/{run_id}/finalize", {})
    assert status == 200 and fin["Scenes"] == 1
    meta_path = shared / "telemetry" / "runs" / run_id / "artifact-metadata.json"
    written = meta_path.read_bytes()
    status, body = b.request("POST", f"/telemetry/runs/{run_id}/finalize", {})
    assert status == 409, body
    assert body["ForeignScenes"] == {"1": [pid_a]} and "run-telemetry run --out" in body["error"]
    assert meta_path.read_bytes() == written  # nothing of A's run was dropped
    # The same worker finalizing again is not refused.
    assert a.request("POST", f"/telemetry/runs/{run_id}/finalize", {})[0] == 200


def test_a_worker_counts_the_attempt_a_runner_tagged_against_the_budget(comfy: ComfyServer) -> None:
    """A scene the runner moved from a dead worker arrives as attempt 2: the default budget (1 retry) is spent."""
    run_id = f"moved-{uuid.uuid4().hex[:8]}"
    failing = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 1}},
        "2": {"class_type": "RTTestRaise", "inputs": {"image": ["1", 0], "message": "still broken"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": f"{run_id}/a"}},
    }
    moved = comfy.queue(failing, extra_data={"telemetry": {"run_id": run_id, "scene_id": "1", "attempt": 2}})
    status, rec = comfy.request("GET", f"/telemetry/prompts/{moved}/wait?timeout=60", timeout=90)
    assert status == 200 and rec["Outcome"] == "error"
    assert rec["RetriedBy"] is None
    assert any("failed after 2 attempt(s); retry budget exhausted" in n for n in rec["FallbackNotes"])
    # Without the tag the same failure is retried once, as before.
    first = comfy.queue(failing, extra_data={"telemetry": {"run_id": run_id + "-b", "scene_id": "1"}})
    status, rec = comfy.request("GET", f"/telemetry/prompts/{first}/wait?timeout=60", timeout=90)
    assert status == 200 and rec["RetriedBy"]
    comfy.request("GET", f"/telemetry/prompts/{rec['RetriedBy']}/wait?timeout=60", timeout=90)
