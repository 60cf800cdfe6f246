"""Recorder and routes without a server: real ComfyUI status messages (shared fixtures) through a bare aiohttp app."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.pkg import load, sub

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "comfyui-0.3.75" / "history-examples.json"


def snapshot_factory() -> Any:
    free = iter(range(10_000_000_000, 0, -100 * 1048576))

    def snap() -> dict[str, Any]:
        dev = {"Name": "cpu", "Type": "cpu", "VramTotal": 20_000_000_000, "VramFree": next(free)}
        return {"Timestamp": "2026-11-24T00:00:00.000Z", "Source": "system-ram", "Device": dev, "Devices": [dev]}

    return snap


@pytest.fixture
def runtime(tmp_path: Path) -> Any:
    load()
    rt = sub("hooks.runtime").Runtime(
        user_dir=tmp_path / "user", output_dir=lambda: tmp_path / "output", snapshot=snapshot_factory(), env={}
    )
    sub("hooks.finish").install_finishers(rt)
    yield rt
    rt.writer.stop()


@pytest.fixture
def history() -> dict[str, Any]:
    return json.loads(FIXTURES.read_text())


def replay(rt: Any, entry: dict[str, Any]) -> str:
    """Drive the recorder with one real /history entry: start, then end with its status messages and outputs."""
    _, pid, prompt, extra, _ = entry["prompt"][:5]
    rt.recorder.started(pid, prompt, extra)
    rt.recorder.ended(pid, entry["status"]["messages"], {"outputs": entry["outputs"]})
    assert rt.flush(10)
    return pid


@pytest.mark.parametrize(
    ("key", "outcome", "error_type"),
    [
        ("p1", "success", None),
        ("p2", "success", None),
        ("p3", "error", "ProbeNode"),
        ("p4", "interrupted", "ProbeNode"),
    ],
)
def test_outcomes_from_real_status_messages(runtime: Any, history: dict, key: str, outcome: str, error_type) -> None:
    pid = replay(runtime, history[key])
    rec = runtime.recorder.get(pid)
    assert rec.Outcome == outcome
    assert (rec.Error.NodeType if rec.Error else None) == error_type
    assert rec.Telemetry["ExecutionSuccessDetected"] is (outcome == "success")
    # Each snapshot reads 100 MiB less free: the delta is negative, after - before.
    assert rec.Telemetry["GPU"]["VramDeltaMB"] == pytest.approx(-100.0)
    stored = runtime.store.get(pid)
    assert stored is not None and stored.Outcome == outcome


def test_cached_prompt_marks_every_node_cached(runtime: Any, history: dict) -> None:
    rec = runtime.recorder.get(replay(runtime, history["p2"]))
    assert {n.NodeId for n in rec.Nodes} == {"1", "2", "3"} and all(n.Cached for n in rec.Nodes)
    assert rec.Outputs == []


def test_outputs_and_queue_wait_from_history(runtime: Any, history: dict) -> None:
    rec = runtime.recorder.get(replay(runtime, history["p1"]))
    assert [(o.Subfolder, o.Filename) for o in rec.Outputs] == [
        ("scene", "frame_00001_.png"),
        ("scene", "frame_00002_.png"),
    ]
    assert rec.QueuedAt.startswith("2026-") and rec.QueueWaitSeconds is not None


async def test_routes_on_a_bare_app(aiohttp_client: Any, runtime: Any, history: dict) -> None:
    routes = web.RouteTableDef()
    sub("server_routes").add_routes(routes, runtime)
    app = web.Application()
    app.add_routes(routes)
    client = await aiohttp_client(app)
    pid = await asyncio.to_thread(replay, runtime, history["p3"])
    resp = await client.get(f"/telemetry/prompts/{pid}")
    assert resp.status == 200 and (await resp.json())["Outcome"] == "error"
    resp = await client.get("/telemetry?limit=5")
    body = await resp.json()
    assert resp.status == 200 and body["Prompts"][0]["PromptId"] == pid
    resp = await client.get("/telemetry/prompts/unknown")
    assert resp.status == 404 and "unknown" in (await resp.json())["error"]
    resp = await client.get("/telemetry?limit=0")
    assert resp.status == 400 and (await resp.json())["parameter"] == "limit"


async def test_wait_route_returns_when_the_prompt_ends(aiohttp_client: Any, runtime: Any, history: dict) -> None:
    routes = web.RouteTableDef()
    sub("server_routes").add_routes(routes, runtime)
    pending = {"p1"}
    runtime.pending = lambda pid: pid in pending
    app = web.Application()
    app.add_routes(routes)
    client = await aiohttp_client(app)
    waiting = asyncio.ensure_future(client.get("/telemetry/prompts/p1/wait?timeout=30"))
    async with asyncio.timeout(10):  # the server counts the wait when the request arrives
        while runtime.waits().get("p1") != 1:
            await asyncio.sleep(0.005)
    assert not waiting.done()  # it is really waiting: the prompt has not ended
    await asyncio.to_thread(replay, runtime, history["p1"])
    resp = await asyncio.wait_for(waiting, 10)
    assert resp.status == 200 and (await resp.json())["Outcome"] == "success"


def test_openapi_lists_exactly_the_registered_routes(runtime: Any) -> None:
    routes = web.RouteTableDef()
    sub("server_routes").add_routes(routes, runtime)
    registered = {(r.method.lower(), r.path) for r in routes}
    doc = sub("server_routes.openapi").build_openapi("test")
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert registered == documented


async def test_cached_final_body_never_hides_a_rerun_of_the_same_id(aiohttp_client: Any, runtime: Any, history) -> None:
    routes = web.RouteTableDef()
    sub("server_routes").add_routes(routes, runtime)
    app = web.Application()
    app.add_routes(routes)
    client = await aiohttp_client(app)
    pid = await asyncio.to_thread(replay, runtime, history["p1"])
    first = await (await client.get(f"/telemetry/prompts/{pid}")).json()
    assert first["Outcome"] == "success"
    before = runtime.recorder.version
    _, _, prompt, extra, _ = history["p3"]["prompt"][:5]
    runtime.recorder.started(pid, prompt, extra)  # a client reused the prompt id
    assert runtime.recorder.version > before
    again = await (await client.get(f"/telemetry/prompts/{pid}")).json()
    assert again["Outcome"] == "running"
    listed = await (await client.get("/telemetry?limit=5")).json()
    assert listed["Prompts"][0]["PromptId"] == pid and listed["Prompts"][0]["Outcome"] == "running"
    runtime.recorder.ended(pid, history["p3"]["status"]["messages"], {"outputs": {}})
    assert await asyncio.to_thread(runtime.flush, 10)
    final = await (await client.get(f"/telemetry/prompts/{pid}")).json()
    assert final["Outcome"] == "error"


async def test_finalize_right_after_the_wait_finds_the_final_record(
    aiohttp_client: Any, runtime: Any, history: dict, tmp_path: Path
) -> None:
    """The store thread lags behind the wait route: a finalize right after the last wait still has the record."""
    routes = web.RouteTableDef()
    sub("server_routes").add_routes(routes, runtime)
    app = web.Application()
    app.add_routes(routes)
    client = await aiohttp_client(app)
    entry = json.loads(json.dumps(history["p1"]))
    extra = entry["prompt"][3]
    extra["telemetry"] = {"run_id": "lagging-store", "scene_id": "1"}
    held = __import__("threading").Event()
    runtime.store_writer.submit(lambda: held.wait(30))  # the store's thread is busy (a slow disk, a lock)
    _, pid, prompt, _, _ = entry["prompt"][:5]
    runtime.recorder.started(pid, prompt, extra)
    runtime.recorder.ended(pid, entry["status"]["messages"], {"outputs": entry["outputs"]})
    assert runtime.writer.flush(10)
    resp = await client.get(f"/telemetry/prompts/{pid}/wait?timeout=5")
    assert resp.status == 200 and (await resp.json())["Outcome"] == "success"
    asyncio.get_running_loop().call_later(0.3, held.set)  # the store catches up a moment later
    resp = await client.post("/telemetry/runs/lagging-store/finalize")
    body = await resp.json()
    assert resp.status == 200, body
    assert body["Scenes"] == 1 and body["Valid"] is True, body


def test_run_policy_is_read_once_per_run_and_again_after_a_change(runtime: Any) -> None:
    """The writer asks a run's policy twice per prompt: one store read per run, until the run's information
    changes (put_run) or the store's database does; a changed override is never served stale."""
    rt = runtime
    reads: list[str] = []
    original = rt.store.run_info
    rt.store.run_info = lambda run_id: (reads.append(run_id), original(run_id))[1]
    rt.store.put_run("r1", {"PolicyOverrides": {"output_settle_seconds": 2}})
    first = rt.run_policy("r1")[0].output_settle_seconds
    again = rt.run_policy("r1")[0].output_settle_seconds
    assert (first, again, reads) == (2.0, 2.0, ["r1"])
    rt.store.put_run("r1", {"PolicyOverrides": {"output_settle_seconds": 5}})
    assert rt.run_policy("r1")[0].output_settle_seconds == 5.0
    assert reads == ["r1", "r1"]
    notes = rt.run_policy("r1")[1]
    notes.append("a caller's own note")
    assert "a caller's own note" not in rt.run_policy("r1")[1]


def test_run_policy_read_while_the_store_is_locked_is_not_kept(runtime: Any) -> None:
    """Another process holds the store's lock for a moment: the run's overrides cannot be read, the environment's
    policy is the answer for now, but it must not be kept as the run's policy once the store answers again."""
    import sqlite3

    rt = runtime
    rt.store.put_run("r1", {"PolicyOverrides": {"output_settle_seconds": 2}})
    rt.store.close()  # this thread's connection: the other process below takes the file for itself
    other = sqlite3.connect(rt.store.path, isolation_level=None)
    other.execute("PRAGMA locking_mode=EXCLUSIVE")
    other.execute("BEGIN EXCLUSIVE")
    try:
        assert rt.run_policy("r1")[0].output_settle_seconds != 2.0  # the run's information cannot be read now
    finally:
        other.execute("COMMIT")
        other.close()
    assert rt.store.run_info("r1") == {"PolicyOverrides": {"output_settle_seconds": 2}}
    assert rt.run_policy("r1")[0].output_settle_seconds == 2.0
