"""Runs on real ComfyUI: retry budget, in-process assembly, finalize, policy from the environment, LLM health."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from harness.comfy import REPO, ComfyServer, free_port
from telemetry.models import ArtifactMetadata
from telemetry.runner import run_story
from telemetry.summary import render_summary
from telemetry.validate import validate_run_dir
from tests.conftest import make_server

pytestmark = pytest.mark.comfy

EXAMPLE_WORKFLOW = json.loads((REPO / "examples" / "workflow_api.json").read_text())


def flaky_workflow(tmp: Path) -> Path:
    """The example workflow with an RTTestFlaky node that fails ``{{scene.failures}}`` times per scene."""
    wf = json.loads(json.dumps(EXAMPLE_WORKFLOW))
    wf["9"] = {
        "class_type": "RTTestFlaky",
        "inputs": {"image": ["1", 0], "counter_file": "{{scene.counter}}", "failures": "{{scene.failures}}"},
    }
    wf["2"]["inputs"]["image"] = ["9", 0]
    path = tmp / "workflow_api.json"
    path.write_text(json.dumps(wf))
    return path


def story(tmp: Path, failures: list[int]) -> Path:
    scenes = [
        {
            "id": str(i + 1),
            "title": f"Scene {i + 1}",
            "prompt": f"prompt {i + 1}",
            "frames": 3,
            "frame_floor": 3 if i != 2 else 5,
            "color": 1000 * (i + 1),
            "failures": n,
            "counter": str(tmp / f"counter-{i + 1}"),
        }
        for i, n in enumerate(failures)
    ]
    path = tmp / "story.json"
    path.write_text(json.dumps({"id": "t", "logline": "a test story", "scenes": scenes}))
    return path


@pytest.mark.smoke
def test_three_scene_run_with_one_retry(comfy: ComfyServer, tmp_path: Path) -> None:
    run_id = f"retry-{uuid.uuid4().hex[:8]}"
    out = io.StringIO()
    result = run_story(
        server=comfy.url, workflow=flaky_workflow(tmp_path), scenes=story(tmp_path, [0, 1, 0]), run_id=run_id, out=out
    )
    assert result.exit_code == 0, out.getvalue()
    assert result.failed_scenes == []
    run_dir = Path(result.run_dir)
    report = validate_run_dir(run_dir)
    assert report.valid, report.errors
    meta = json.loads((run_dir / "artifact-metadata.json").read_text())
    ArtifactMetadata.model_validate(meta)
    scenes = {s["SceneId"]: s for s in meta["Scenes"]}
    assert list(scenes) == ["1", "2", "3"]
    assert [scenes[k]["AttemptsRun"] for k in "123"] == [1, 2, 1]
    assert [scenes[k]["Requeued"] for k in "123"] == [False, True, False]
    s2 = scenes["2"]
    assert [a["Success"] for a in s2["AttemptSummaries"]] == [False, True]
    assert "flaky failure 1 of 1" in s2["AttemptSummaries"][0]["Error"]
    assert s2["Success"] is True and s2["Telemetry"]["PromptId"] == s2["AttemptSummaries"][1]["PromptId"]
    # The failed attempt left no .failed marker (a retry followed); the retry wrote the .done.
    prefix = s2["FramePrefix"]
    assert (comfy.output_dir / f"{prefix}.done").exists()
    assert not (comfy.output_dir / f"{prefix}.failed").exists()
    assert all(s["FrameCount"] == 3 for s in meta["Scenes"])
    assert scenes["3"]["MeetsFrameFloor"] is False
    # Default policy in QueueConfig; the summary is exactly the renderer's output of the metadata.
    assert meta["QueueConfig"] == {
        "SceneRetryBudget": 1,
        "HistoryMaxWaitSeconds": 600,
        "HistoryMaxAttempts": 0,
        "HistoryPollIntervalSeconds": 2,
        "PostExecutionTimeoutSeconds": 30,
    }
    summary = (run_dir / "run-summary.txt").read_text()
    assert summary == render_summary(meta)
    lines = summary.splitlines()
    assert any(
        ln.endswith(
            "Queue policy: sceneRetries=1, historyMaxWait=600s, historyPollInterval=2s, "
            "historyMaxAttempts=unbounded, postExecutionTimeout=30s"
        )
        for ln in lines
    )
    assert sum("[Scene 2][Attempt" in ln for ln in lines) == 2
    assert any("[Scene 3] WARNING: Frame count below floor" in ln for ln in lines)
    assert all(re.match(r"^\[\d\d:\d\d:\d\d\] ", ln) for ln in lines[1:]), lines
    assert any(ln[11:].startswith("[Scene 1] Telemetry: DurationSeconds=") for ln in lines)
    # The in-process assembly route answers the same scenes; the files are served.
    status, live = comfy.request("GET", f"/telemetry/runs/{run_id}")
    assert status == 200 and [s["AttemptsRun"] for s in live["Scenes"]] == [1, 2, 1]
    status, text = comfy.request("GET", f"/telemetry/runs/{run_id}/run-summary.txt")
    assert status == 200 and text == summary
    runs = {r["RunId"]: r for r in comfy.get("/telemetry/runs")["Runs"]}
    assert runs[run_id]["Status"] == "complete" and runs[run_id]["Scenes"] == 3 and runs[run_id]["Prompts"] == 4


def test_scene_that_keeps_failing_exhausts_the_budget(comfy: ComfyServer, tmp_path: Path) -> None:
    run_id = f"exhaust-{uuid.uuid4().hex[:8]}"
    out = io.StringIO()
    result = run_story(
        server=comfy.url, workflow=flaky_workflow(tmp_path), scenes=story(tmp_path, [5]), run_id=run_id, out=out
    )
    assert result.exit_code == 1 and result.failed_scenes == ["1"]
    meta = json.loads((Path(result.run_dir) / "artifact-metadata.json").read_text())
    scene = meta["Scenes"][0]
    assert scene["AttemptsRun"] == 2 and scene["Success"] is False
    assert any("retry budget exhausted" in n for n in scene["Telemetry"]["System"]["FallbackNotes"])
    assert (comfy.output_dir / f"{scene['FramePrefix']}.failed").exists()
    assert validate_run_dir(Path(result.run_dir)).valid


@pytest.mark.parametrize(
    ("tags", "param"),
    [
        ({"run_id": "../escape"}, "extra_data.telemetry.run_id"),
        ({"run_id": "a/b"}, "extra_data.telemetry.run_id"),
        ({"run_id": "ok", "scene_id": "..\\x"}, "extra_data.telemetry.scene_id"),
        ({"run_id": "ok", "policy": {"scene_retry_budget": -1}}, "extra_data.telemetry.policy"),
        ({"run_id": "ok", "policy": {"max_wait_seconds": "soon"}}, "extra_data.telemetry.policy"),
        ({"run_id": "ok", "frame_floor": "many"}, "extra_data.telemetry.frame_floor"),
    ],
)
def test_bad_run_tags_are_refused_with_400(comfy: ComfyServer, tags: dict, param: str) -> None:
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}
    status, body = comfy.request("POST", "/api/prompt", {"prompt": prompt, "extra_data": {"telemetry": tags}})
    assert status == 400, body
    assert body["error"]["parameter"] == param and body["error"]["message"]


def test_unknown_and_bad_run_ids(comfy: ComfyServer) -> None:
    status, body = comfy.request("GET", "/telemetry/runs/never-ran")
    assert status == 404 and "never-ran" in body["error"]
    status, body = comfy.request("POST", "/telemetry/runs/never-ran/finalize", {})
    assert status == 404
    status, body = comfy.request("GET", "/telemetry/runs/bad..id")
    assert status == 400 and body["parameter"] == "run_id"


class FakeLLM:
    """An OpenAI-compatible /v1/models on loopback, in a thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self.hits = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _models(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response({"object": "list", "data": [{"id": "story-model-7b", "object": "model"}]})

    def _serve(self) -> None:
        import asyncio

        async def main() -> None:
            app = web.Application()
            app.router.add_get("/v1/models", self._models)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._stop = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        asyncio.run(main())

    def __enter__(self) -> FakeLLM:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def policy_server() -> Iterator[tuple[ComfyServer, FakeLLM]]:
    with FakeLLM() as llm:
        server = make_server(
            env={
                "SCENE_RETRY_BUDGET": "2",
                "SCENE_HISTORY_POLL_INTERVAL_SECONDS": "1",
                "SCENE_POST_EXECUTION_TIMEOUT_SECONDS": "12",
                "SCENE_MAX_WAIT_SECONDS": "soon",
                "SCENE_HISTORY_MAX_ATTEMPTS": "-3",
                "LOCAL_STORY_PROVIDER_URL": f"http://127.0.0.1:{llm.port}/v1/chat/completions",
            },
        )
        try:
            server.start()
            yield server, llm
        finally:
            server.stop()


def test_policy_from_environment_invalid_values_and_llm_health(policy_server, tmp_path: Path) -> None:
    server, llm = policy_server
    log = server.log_text()
    assert "SCENE_MAX_WAIT_SECONDS='soon'" in log and "SCENE_HISTORY_MAX_ATTEMPTS='-3'" in log
    notes = server.get("/telemetry")["FallbackNotes"]
    assert any("SCENE_MAX_WAIT_SECONDS" in n for n in notes) and any("SCENE_HISTORY_MAX_ATTEMPTS" in n for n in notes)
    run_id = f"policy-{uuid.uuid4().hex[:8]}"
    out = io.StringIO()
    result = run_story(
        server=server.url, workflow=flaky_workflow(tmp_path), scenes=story(tmp_path, [2, 0]), run_id=run_id, out=out
    )
    assert result.exit_code == 0, out.getvalue()
    meta = json.loads((Path(result.run_dir) / "artifact-metadata.json").read_text())
    assert meta["QueueConfig"] == {
        "SceneRetryBudget": 2,
        "HistoryMaxWaitSeconds": 600,
        "HistoryMaxAttempts": 0,
        "HistoryPollIntervalSeconds": 1,
        "PostExecutionTimeoutSeconds": 12,
    }
    assert meta["Scenes"][0]["AttemptsRun"] == 3
    for scene in meta["Scenes"]:
        fallback = scene["Telemetry"]["System"]["FallbackNotes"]
        assert any("SCENE_MAX_WAIT_SECONDS" in n for n in fallback)
    llm_info = meta["LLMHealthInfo"]
    assert llm_info["Status"] == "success" and llm_info["Models"] == ["story-model-7b"] and llm.hits >= 1
    assert llm_info["Url"] == f"http://127.0.0.1:{llm.port}/v1/models"
    summary = (Path(result.run_dir) / "run-summary.txt").read_text()
    assert (
        f"[LLM] Health check: success (url=http://127.0.0.1:{llm.port}/v1/models, models=1, override=default)"
        in summary
    )
    assert (
        "Queue policy: sceneRetries=2, historyMaxWait=600s, historyPollInterval=1s, historyMaxAttempts=unbounded, "
        "postExecutionTimeout=12s" in summary
    )
    assert validate_run_dir(Path(result.run_dir)).valid


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telemetry", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_runner_cli_errors_are_clear(comfy: ComfyServer, tmp_path: Path) -> None:
    wf = REPO / "examples" / "workflow_api.json"
    st = REPO / "examples" / "story.json"
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}}))
    cases = [
        (["--workflow", str(tmp_path / "missing.json"), "--scenes", str(st)], "does not exist"),
        (["--workflow", str(plain), "--scenes", str(st)], "has no placeholders"),
        (["--workflow", str(wf), "--scenes", str(st), "--run-id", "../x"], "not allowed"),
    ]
    for extra, words in cases:
        proc = run_cli("run", "--server", comfy.url, *extra)
        assert proc.returncode == 2, proc
        assert words in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("run", "--server", f"http://127.0.0.1:{free_port()}", "--workflow", str(wf), "--scenes", str(st))
    assert proc.returncode == 2 and "cannot reach ComfyUI" in proc.stderr and "Traceback" not in proc.stderr


def test_runner_cli_runs_the_example_story(comfy: ComfyServer) -> None:
    run_id = f"cli-{uuid.uuid4().hex[:8]}"
    proc = run_cli(
        "run",
        "--server",
        comfy.url,
        "--workflow",
        str(REPO / "examples" / "workflow_api.json"),
        "--scenes",
        str(REPO / "examples" / "story.json"),
        "--run-id",
        run_id,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Queue policy:" in proc.stdout and "[Scene 3] WARNING: Frame count below floor" in proc.stdout
    run_dir = comfy.output_dir / "telemetry" / "runs" / run_id
    assert validate_run_dir(run_dir).valid
    meta = json.loads((run_dir / "artifact-metadata.json").read_text())
    assert meta["Story"]["Id"] == "lighthouse" and [s["FrameCount"] for s in meta["Scenes"]] == [6, 8, 4]
    marker = json.loads((comfy.output_dir / f"{run_id}/scene-2/frame.done").read_text())
    assert marker["FrameCount"] == 8 and all(len(o["Sha256"]) == 64 for o in marker["Outputs"])
