"""Run assembly and finalize from a real store: the contract's exact form without re-validation, the files as
validate_run_dir and jsonschema judge them, and the run routes on a bare aiohttp app."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web

from telemetry import validate
from telemetry.atomic import MarkerWriteError
from telemetry.contract import telemetry_block
from telemetry.models import ArtifactMetadata
from telemetry.policy import QueuePolicy
from telemetry.records import MarkerState, OutputRef, PromptError, PromptRecord
from telemetry.runs import METADATA_FILE, SUMMARY_FILE, assemble_run, finalize_files, gc_paused, metadata_json
from telemetry.schema import load_schema
from telemetry.store import Store
from telemetry.summary import render_summary
from telemetry.validate import validate_run_dir
from tests.pkg import sub

GIB = 1 << 30


def snapshot(at: str, free: int, notes: list[str] | None = None) -> dict[str, Any]:
    device = {"Name": "NVIDIA RTX A6000", "Type": "cuda", "Index": 0, "CudaIndex": 0, "VramTotal": 48 * GIB}
    return {
        "Timestamp": at,
        "Source": "nvml",
        "Device": {**device, "VramFree": free},
        "Devices": [{**device, "VramFree": free}],
        "RamTotal": 64 * GIB,
        "FallbackNotes": notes or [],
    }


def record(run_id: str, scene: str | None, n: int, *, outcome: str = "success", **fields: Any) -> PromptRecord:
    """A record as the recorder stores it: snapshots, a marker, outputs and the contract Telemetry block."""
    start = f"2026-01-01T00:{n // 60:02d}:{n % 60:02d}.000Z"
    ok = outcome == "success"
    prefix = f"{run_id}/scene-{scene or n}/frame"
    rec = PromptRecord(
        PromptId=f"p-{n:03d}",
        RunId=run_id,
        SceneId=scene,
        Tags={"run_id": run_id, "title": f"Shot {scene}", "prompt": "a harbour at dawn"},
        Outcome=outcome,
        QueuedAt=start,
        StartedAt=start,
        EndedAt=start.replace(".000Z", ".750Z") if outcome != "running" else None,
        ExecutionSuccessAt=start.replace(".000Z", ".700Z") if ok else None,
        QueueWaitSeconds=0.01,
        DurationSeconds=0.75 if outcome != "running" else None,
        Before=snapshot(start, 40 * GIB, ["nvml slow"]),
        After=snapshot(start, 38 * GIB + 123456),
        Outputs=[OutputRef(NodeId="3", Filename=f"f_{i}.png", Subfolder=prefix) for i in (1, 2)] if ok else [],
        Markers=[
            MarkerState(NodeId="4", Prefix=prefix, FrameCount=2 if ok else None, State="written" if ok else "failed")
        ],
        Error=None if ok or outcome == "running" else PromptError(NodeType="SaveImage", Message="disk hiccup"),
        **fields,
    )
    if outcome not in ("running", "queued", "crashed"):
        rec.Telemetry = telemetry_block(rec, QueuePolicy(), history_attempts=1)
    return rec


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A store holding one run with a retried scene, a running one, a crashed one, one without scene id and tags."""
    s = Store(tmp_path / "store.sqlite3")
    recs = [
        record("run-1", "2", 1),
        record("run-1", "1", 2, outcome="error"),
        record("run-1", "1", 3, RetryOf="p-002", Attempt=2),
        record("run-1", "10", 4, outcome="running"),
        record("run-1", "3", 5, outcome="crashed", FallbackNotes=["cut off by a restart"]),
        record("run-1", None, 6),
        record("run-1", "4", 7, outcome="interrupted"),
        record("other", "1", 8),
    ]
    recs[0].Tags.update({"frame_floor": 5, "negative_prompt": "blurry", "story": {"id": "s-1", "logline": "a test"}})
    recs[6].Error = PromptError(Message=None)
    recs[5].Markers = []
    recs[5].Tags["prefix"] = "loose/prefix"
    for rec in recs:
        s.put(rec)
    s.put(recs[0])  # stored again later: it sorts after the others now
    yield s
    s.close()


POLICY = QueuePolicy(history_max_attempts=3)


@pytest.mark.parametrize(
    "info",
    [{}, {"PolicyNotes": ["note a", "note a", "note b"], "Story": {"Id": 7, "DirectorsVision": "slow"}}],
    ids=["plain", "notes-and-story"],
)
@pytest.mark.parametrize(
    "llm", [None, {"Status": "success", "Url": "u", "Models": ["m"], "Skipped": False, "Error": None}]
)
def test_assembly_is_exactly_what_the_contract_model_writes(
    store: Store, tmp_path: Path, info: dict[str, Any], llm: dict[str, Any] | None
) -> None:
    waits = {"p-004": 3, "p-001": 2}
    raw = store.by_run_raw("run-1")
    meta = assemble_run("run-1", raw, policy=POLICY, output_dir=tmp_path, run_info=info, waits=waits, llm=llm)
    canonical = ArtifactMetadata.model_validate(meta).to_json_dict()
    assert json.dumps(meta) == json.dumps(canonical)  # same values, same key order, no None fields
    again = assemble_run("run-1", raw, policy=POLICY, output_dir=tmp_path, run_info=info, waits=waits, llm=llm)
    assert again == meta  # the stored records were not changed by the first assembly
    models = store.by_run("run-1")
    from_models = assemble_run("run-1", models, policy=POLICY, output_dir=tmp_path, run_info=info, waits=waits, llm=llm)
    assert from_models == meta


def test_assembled_scenes(store: Store, tmp_path: Path) -> None:
    info = {"PolicyNotes": ["note a", "note a", "note b"]}
    meta = assemble_run(
        "run-1", store.by_run_raw("run-1"), policy=POLICY, output_dir=tmp_path, run_info=info, waits={"p-004": 3}
    )
    scenes = {s["SceneId"]: s for s in meta["Scenes"]}
    assert list(scenes) == ["1", "2", "3", "4", "10", "p-006"]  # numeric ids in number order, then the others
    retried = scenes["1"]
    assert [a["PromptId"] for a in retried["AttemptSummaries"]] == ["p-002", "p-003"]
    assert retried["Requeued"] and retried["AttemptsRun"] == 2 and retried["Errors"] == ["disk hiccup"]
    assert retried["HistoryErrors"] == ["attempt 1: error: disk hiccup"] and retried["Telemetry"]["PromptId"] == "p-003"
    first = scenes["2"]
    assert (first["FrameFloor"], first["NegativePrompt"], first["MeetsFrameFloor"]) == (5, "blurry", False)
    running = scenes["10"]["Telemetry"]
    assert (running["HistoryExitReason"], running["HistoryAttempts"], running["pollLimit"]) == ("attemptLimit", 3, "3")
    assert scenes["3"]["HistoryRetrieved"] is False and "cut off by a restart" in scenes["3"]["Warnings"]
    assert "Error" not in scenes["4"]["AttemptSummaries"][0] and scenes["4"]["Errors"] == []
    assert scenes["p-006"]["FramePrefix"] == "loose/prefix"
    for scene in meta["Scenes"]:
        assert scene["Telemetry"]["System"]["FallbackNotes"][-2:] == ["note a", "note b"]
    assert meta["Story"] == {"Id": "s-1", "Logline": "a test"} and meta["Timestamp"] == "2026-01-01T00:00:01.000Z"
    # The records keep their own notes: PolicyNotes went into copies.
    assert all(
        "note a" not in (r["Telemetry"] or {}).get("System", {}).get("FallbackNotes", [])
        for r in store.by_run_raw("run-1")
    )


def test_raw_records_are_the_stored_json_in_store_order(store: Store) -> None:
    models = store.by_run("run-1")
    raw = store.by_run_raw("run-1")
    assert [r["PromptId"] for r in raw] == [m.PromptId for m in models]
    assert [r["PromptId"] for r in raw][-1] == "p-001"  # put again last: updated_at decides, then insertion
    assert raw == [m.model_dump(mode="json", exclude={"Workflow"}) for m in models]


def test_metadata_bytes(tmp_path: Path) -> None:
    data = {"A": [1, 2.5, -0.0, None, True, 2**70], "B": {"é": "snow ☃ 😀", "n": float("inf")}, "C": "x\ny"}
    written = metadata_json(data)
    assert written == (json.dumps(data, separators=(",", ":")) + "\n").encode()
    assert written.isascii() and json.loads(written) == data
    odd = {"A": "\ud800"}  # a lone surrogate pydantic-core will not encode: json.dumps writes it as before
    assert json.loads(metadata_json(odd)) == odd


def test_finalized_files_are_valid_by_jsonschema_and_the_full_validator(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta = assemble_run("run-1", store.by_run_raw("run-1"), policy=POLICY, output_dir=tmp_path, waits={"p-004": 3})
    folder = Path(meta["RunDir"])
    full: list[Path] = []
    monkeypatch.setattr(validate, "validate_run_dir", lambda path: full.append(path) or validate_run_dir(path))
    report = finalize_files(folder, meta, render_summary(meta))
    assert report.valid and report.scene_count == 6
    assert full == []  # the fast path decided
    assert report == validate_run_dir(folder)
    written = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    jsonschema.validate(written, load_schema())
    assert written == meta and (folder / SUMMARY_FILE).read_text(encoding="utf-8") == render_summary(meta)


def test_a_run_that_is_not_valid_is_reported_not_hidden(store: Store, tmp_path: Path) -> None:
    meta = assemble_run("run-1", store.by_run_raw("run-1"), policy=POLICY, output_dir=tmp_path)
    meta["Scenes"][0]["Title"] = 5  # a tag that is not text: the contract wants a string
    folder = Path(meta["RunDir"])
    report = finalize_files(folder, meta, render_summary(meta))
    assert not report.valid
    assert report.errors == ["Scene 1: Title: 5 is not of type 'string' (JSON Schema)"]
    assert report == validate_run_dir(folder)


def test_finalize_into_an_unwritable_place_raises(store: Store, tmp_path: Path) -> None:
    meta = assemble_run("run-1", store.by_run_raw("run-1"), policy=POLICY, output_dir=tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        finalize_files(blocker / "run", meta, render_summary(meta))
    folder = tmp_path / "taken"
    (folder / METADATA_FILE).mkdir(parents=True)  # a folder where the file should go
    with pytest.raises(MarkerWriteError, match=METADATA_FILE):
        finalize_files(folder, meta, render_summary(meta))


def test_gc_paused_restores_the_collector() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause is still on
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()


# --- the run routes on a bare aiohttp app ----------------------------------------------------------------------------

HISTORY = Path(__file__).resolve().parents[1] / "fixtures" / "comfyui-0.3.75" / "history-examples.json"


@pytest.fixture
def runtime(tmp_path: Path) -> Any:
    from .test_recorder_routes import snapshot_factory

    rt = sub("hooks.runtime").Runtime(
        user_dir=tmp_path / "user", output_dir=lambda: tmp_path / "output", snapshot=snapshot_factory(), env={}
    )
    sub("hooks.finish").install_finishers(rt)
    yield rt
    rt.writer.stop()


def replay_tagged(rt: Any, entry: dict[str, Any], run_id: str, scene: str) -> str:
    _, pid, prompt, extra, _ = entry["prompt"][:5]
    rt.recorder.started(pid, prompt, {**extra, "telemetry": {"run_id": run_id, "scene_id": scene}})
    rt.recorder.ended(pid, entry["status"]["messages"], {"outputs": entry["outputs"]})
    assert rt.flush(10)
    return pid


async def test_run_routes_assemble_finalize_and_serve(aiohttp_client: Any, runtime: Any, monkeypatch: Any) -> None:
    for name in ("LOCAL_STORY_PROVIDER_URL", "LOCAL_LLM_HEALTHCHECK_URL", "LOCAL_LLM_SKIP_HEALTHCHECK"):
        monkeypatch.delenv(name, raising=False)
    history = json.loads(HISTORY.read_text())
    routes = web.RouteTableDef()
    sub("server_routes").add_routes(routes, runtime)
    app = web.Application()
    app.add_routes(routes)
    client = await aiohttp_client(app)
    for scene, key in (("1", "p1"), ("2", "p3")):
        await asyncio.to_thread(replay_tagged, runtime, history[key], "story-7", scene)

    resp = await client.get("/telemetry/runs/story-7")
    assert resp.status == 200 and resp.content_type == "application/json"
    live = await resp.json()
    assert [s["SceneId"] for s in live["Scenes"]] == ["1", "2"]
    assert [s["Success"] for s in live["Scenes"]] == [True, False]
    assert live == ArtifactMetadata.model_validate(live).to_json_dict()

    resp = await client.post("/telemetry/runs/story-7/finalize")
    body = await resp.json()
    assert resp.status == 200, body
    assert body["Valid"] is True and body["Problems"] == [] and body["Scenes"] == 2
    folder = Path(body["RunDir"])
    assert validate_run_dir(folder).valid
    on_disk = json.loads((folder / METADATA_FILE).read_text())
    assert on_disk == live
    jsonschema.validate(on_disk, load_schema())
    resp = await client.get("/telemetry/runs/story-7/run-summary.txt")
    assert resp.status == 200 and await resp.text() == (folder / SUMMARY_FILE).read_text()

    assert (await client.get("/telemetry/runs/nobody")).status == 404
    assert (await client.post("/telemetry/runs/nobody/finalize")).status == 404
    assert (await client.get("/telemetry/runs/..%2Fx")).status in (400, 404)
