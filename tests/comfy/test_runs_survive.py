"""Runs that survive, on real ComfyUI: retention never cuts an unfinalized run, concurrent finalizes agree, a cut-off
finalize leaves no temp file, TelemetryCapture works in API format and refuses a run id with path parts, and a run's
story is kept once."""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.comfy import ComfyServer
from telemetry.atomic import is_temp_name
from telemetry.validate import validate_run_dir
from tests.comfy.workflows import frames, with_capture
from tests.conftest import make_server

pytestmark = pytest.mark.comfy


def uniq(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def wait_final(server: ComfyServer, prompt_id: str, timeout: float = 60) -> dict[str, Any]:
    status, rec = server.request("GET", f"/telemetry/prompts/{prompt_id}/wait?timeout={timeout}", timeout=timeout + 10)
    assert status == 200, (prompt_id, status, rec)
    return rec


def tiny(color: int) -> dict[str, Any]:
    return frames(uniq("rs/f"), count=1, size=8, color=color, marker=False)


def store_bytes(server: ComfyServer) -> int:
    folder = server.user_dir / "telemetry"
    return sum(p.stat().st_size for p in folder.glob("telemetry.sqlite3*"))


@pytest.fixture(scope="module")
def small_retention() -> Iterator[ComfyServer]:
    server = make_server(env={"RUN_TELEMETRY_RETENTION": "30"})
    server.start()
    yield server
    server.stop()


def test_retention_never_cuts_an_unfinalized_run(small_retention: ComfyServer) -> None:
    server = small_retention
    run_id = uniq("kept")
    ids = [server.queue(tiny(i), extra_data={"telemetry": {"run_id": run_id, "scene_id": str(i)}}) for i in range(40)]
    for pid in ids:
        wait_final(server, pid)
    # Well over 100 store writes after the run (the store prunes every 100 writes), none of them of the run.
    others = [server.queue(tiny(1000 + i)) for i in range(130)]
    for pid in others:
        wait_final(server, pid)
    status, fin = server.request("POST", f"/telemetry/runs/{run_id}/finalize", {})
    assert status == 200 and fin["Valid"], fin
    assert fin["Scenes"] == 40
    db = server.user_dir / "telemetry" / "telemetry.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        stored = conn.execute("SELECT COUNT(*) FROM prompts").fetchone()[0]
    assert stored < 170  # the retention did prune: prompts of no run


def test_a_run_story_is_stored_once(small_retention: ComfyServer) -> None:
    server = small_retention
    run_id = uniq("story")
    story = {"id": "big", "logline": "x" * 2_000_000, "directors_vision": "a long story"}
    before = store_bytes(server)
    ids = [
        server.queue(tiny(i), extra_data={"telemetry": {"run_id": run_id, "scene_id": str(i), "story": story}})
        for i in range(10)
    ]
    recs = [wait_final(server, pid) for pid in ids]
    assert all("story" not in r["Tags"] for r in recs)
    grown = store_bytes(server) - before
    assert grown < 3 * 2_000_000, f"store grew by {grown} bytes for 10 prompts sharing one 2 MB story"
    status, meta = server.request("GET", f"/telemetry/runs/{run_id}")
    assert status == 200 and meta["Story"]["Id"] == "big" and len(meta["Story"]["Logline"]) == 2_000_000


def test_a_cut_off_finalize_leaves_no_temp_file_after_restart(small_retention: ComfyServer) -> None:
    server = small_retention
    run_id = uniq("cut")
    wait_final(server, server.queue(tiny(5), extra_data={"telemetry": {"run_id": run_id, "scene_id": "1"}}))
    status, fin = server.request("POST", f"/telemetry/runs/{run_id}/finalize", {})
    assert status == 200
    folder = Path(fin["RunDir"])
    pid = server.proc.pid
    server.kill9()
    # What a kill inside the atomic write of a finalize leaves: a partial temp file named after the dead writer.
    for name in ("artifact-metadata.json", "run-summary.txt"):
        (folder / f".{name}.{pid}.0badf00d.tmp").write_bytes(b'{"RunId": "cu')
    assert [p for p in folder.iterdir() if is_temp_name(p.name)]
    server.start()
    assert [p.name for p in folder.iterdir() if is_temp_name(p.name)] == []
    assert validate_run_dir(folder).valid


def test_concurrent_finalizes_of_a_run_agree(comfy: ComfyServer) -> None:
    run_id = uniq("concurrent")
    ids = [
        comfy.queue(tiny(i), extra_data={"telemetry": {"run_id": run_id, "scene_id": str(i), "title": f"Scene {i}"}})
        for i in range(20)
    ]
    for pid in ids:
        wait_final(comfy, pid)
    for _ in range(3):
        answers: list[tuple[int, Any]] = []

        def finalize(answers: list[tuple[int, Any]] = answers) -> None:
            answers.append(comfy.request("POST", f"/telemetry/runs/{run_id}/finalize", {}, timeout=120))

        threads = [threading.Thread(target=finalize) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert len(answers) == 6
        assert [s for s, _ in answers] == [200] * 6, answers
        assert [b["Valid"] for _, b in answers] == [True] * 6, [b["Problems"] for _, b in answers]
    folder = Path(answers[0][1]["RunDir"])
    assert validate_run_dir(folder).valid
    assert [p.name for p in folder.iterdir() if is_temp_name(p.name)] == []


def test_capture_in_api_format_with_inputs_left_out(comfy: ComfyServer) -> None:
    prompt = with_capture(frames(uniq("api/f"), count=1, marker=False))
    prompt["12"]["inputs"] = {"value": ["2", 0]}  # run_id, scene_id, label and frame_floor left out
    rec = wait_final(comfy, comfy.queue(prompt))
    assert rec["Outcome"] == "success" and rec["RunId"] is None
    assert [s["Label"] for s in rec["Spans"]] == ["span"]


@pytest.mark.parametrize("bad", ["../escape", "a/b", "..", "x" * 200])
def test_capture_run_id_with_path_parts_is_refused_and_never_breaks_runs(comfy: ComfyServer, bad: str) -> None:
    prompt = with_capture(frames(uniq("bad/f"), count=1, marker=False), run_id=bad)
    status, body = comfy.request("POST", "/prompt", {"prompt": prompt})
    assert status == 400, body
    assert "run_id" in json.dumps(body["node_errors"]), body
    # A capture node on no output's path is not validated by ComfyUI: its widget must not tag the prompt either.
    dangling = frames(uniq("bad/d"), count=1, marker=False)
    dangling["12"] = {
        "class_type": "TelemetryCapture",
        "inputs": {"value": ["1", 0], "run_id": bad, "scene_id": "../s", "label": "x", "frame_floor": 0},
    }
    rec = wait_final(comfy, comfy.queue(dangling))
    assert rec["Outcome"] == "success" and rec["RunId"] is None and rec["SceneId"] is None
    status, runs = comfy.request("GET", "/telemetry/runs")
    assert status == 200 and bad not in {r["RunId"] for r in runs["Runs"]}
