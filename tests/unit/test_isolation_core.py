"""The pure core of issue 13 on real files and real processes: the store's fault handling (every kind of damage, a
read-only folder, a lock held by another process, a file that becomes usable again), the tag checks and reduction,
records that cannot be serialised, the health monitor, and waits on unknown prompt ids."""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from harness.comfy import wait_until
from telemetry.health import HealthMonitor, HealthPolicy, WorkerFacts
from telemetry.recorder import Recorder, dump_record
from telemetry.records import PromptRecord
from telemetry.sanitize import clean_value, tags_problem
from telemetry.store import Store, classify
from telemetry.writer import Writer

SUCCESS = [["execution_start", {"timestamp": 1}], ["execution_success", {"timestamp": time.time() * 1000}]]


def seeded(path: Path, n: int = 200) -> Store:
    store = Store(path)
    for i in range(n):
        store.put(PromptRecord(PromptId=f"p{i}", Outcome="success", FallbackNotes=["x" * 300]))
    return store


def checkpoint(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def kept_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if ".damaged-" in p.name)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "zeroed page 2", "folder", "dangling link"])
def test_damaged_store_is_moved_aside_once_and_a_fresh_one_used(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    seeded(path).close()
    checkpoint(path)
    if kind == "garbage":
        path.write_bytes(os.urandom(8192))
    elif kind == "truncated":
        os.truncate(path, path.stat().st_size // 2 + 17)
    elif kind == "zeroed page 2":
        with open(path, "r+b") as f:
            f.seek(4096)
            f.write(b"\xff" * 4096)
    elif kind == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.unlink()
        path.symlink_to(tmp_path / "gone" / "nowhere.sqlite3")
    store = Store(path)
    h = store.health()
    assert not h.Ok and h.Mode == "file" and "damaged" in (h.Problem or ""), h
    assert h.KeptFile and Path(h.KeptFile).name.startswith("t.sqlite3.damaged-")
    assert kept_files(tmp_path) == [Path(h.KeptFile)]
    store.put(PromptRecord(PromptId="new", Outcome="success"))
    assert store.get("new") is not None and store.count() == 1
    note = h.note() or ""
    assert h.KeptFile in note and "damaged" in note
    # Damaged again: a second kept file, the first never overwritten.
    store.close()
    path.write_bytes(b"garbage" * 2000)
    Store(path)
    assert len(kept_files(tmp_path)) == 2


def test_garbage_wal_is_ignored_by_sqlite_and_the_records_stay(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    seeded(path, 20).close()
    checkpoint(path)
    Path(str(path) + "-wal").write_bytes(os.urandom(20000))
    store = Store(path)
    assert store.health().Ok and store.count() == 20


def test_damage_met_by_a_reader_is_repaired_by_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    store = seeded(path, 300)
    checkpoint(path)
    with open(path, "r+b") as f:  # damage under a running store
        f.seek(8192)
        f.write(b"\x07" * 16384)
    store.close()
    store.recent(500)  # a reader meets the damage: answers what it can, never raises
    store.count()
    store.put(PromptRecord(PromptId="after", Outcome="success"))
    assert store.get("after") is not None


def test_unwritable_folder_goes_to_memory_with_a_copy_and_returns_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    seeded(path, 5).close()
    store = Store(path, file_retry=0.0)
    real_probe = store._probe_folder
    store._probe_folder = lambda: (_ for _ in ()).throw(OSError(30, "Read-only file system"))  # type: ignore[method-assign]
    # Writes fail as SQLite says on a read-only disk: the store goes to memory with what the file had.
    store._to_memory("not writable (attempt to write a readonly database)", copy=True)
    assert store.mode == "memory" and store.count() == 5 and not store.health().Ok
    store.put(PromptRecord(PromptId="mem", Outcome="success"))
    assert store.get("mem") is not None
    # The folder is writable again: the next write copies memory onto the file and uses it.
    store._probe_folder = real_probe  # type: ignore[method-assign]
    store.put(PromptRecord(PromptId="back", Outcome="success"))
    assert store.mode == "file" and store.health().Ok
    assert {r.PromptId for r in Store(path).recent(100)} >= {"mem", "back", "p0"}


LOCKER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
con.execute("BEGIN EXCLUSIVE")
con.execute("DELETE FROM runs WHERE run_id = 'none'")
open(sys.argv[2], "w").write("x")
time.sleep(float(sys.argv[3]))
con.execute("COMMIT")
"""


def test_a_lock_held_by_another_process_delays_writes_never_readers_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    store = seeded(path, 3)
    ready = tmp_path / "ready"
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(path), str(ready), "4"])
    try:
        wait_until(ready.exists, 20, what="the lock")
        t0 = time.monotonic()
        assert store.get("p1") is not None  # WAL: readers are not blocked by the other writer
        assert time.monotonic() - t0 < 1.0
        done = threading.Event()
        threading.Thread(target=lambda: (store.put(PromptRecord(PromptId="held")), done.set())).start()
        wait_until(lambda: not store.health().Ok, 10, what="the lock to be reported")
        assert "locked by another process" in (store.health().Problem or "")
        assert done.wait(30)
    finally:
        locker.wait(30)
    assert store.health().Ok and store.get("held") is not None


def test_classify_names_the_kind() -> None:
    assert classify(sqlite3.OperationalError("database is locked")) == "busy"
    assert classify(sqlite3.DatabaseError("file is not a database")) == "damaged"
    assert classify(sqlite3.OperationalError("database or disk is full")) == "unwritable"
    assert classify(sqlite3.OperationalError("attempt to write a readonly database")) == "unwritable"
    assert classify(OSError(28, "No space left on device")) == "unwritable"
    assert classify(sqlite3.IntegrityError("UNIQUE constraint failed")) == "other"


@pytest.mark.parametrize(
    ("tags", "field", "words"),
    [
        ({"title": "a\udcff"}, "extra_data.telemetry.title", "lone surrogate"),
        ({"\udc80": 1}, "extra_data.telemetry", "key"),
        ({1: "x"}, "extra_data.telemetry", "not text"),
        ({"deep": {"a": [[[[]]]]}}, None, None),
        ({"n": math.nan}, "extra_data.telemetry.n", "finite"),
        ({"n": 10**30}, "extra_data.telemetry.n", "64 bits"),
        ({"b": b"x"}, "extra_data.telemetry.b", "JSON"),
        ({"s": "é" * 600_000}, "extra_data.telemetry", "1 MB"),
    ],
)
def test_tag_checks_name_the_field_and_the_limit(tags: Any, field: str | None, words: str | None) -> None:
    problem = tags_problem(tags)
    if field is None:
        assert problem is None
        return
    assert problem is not None and problem[0] == field and words in problem[1], problem


def test_depth_beyond_32_is_refused_at_any_depth_without_recursion() -> None:
    deep: Any = "leaf"
    for _ in range(100_000):
        deep = [deep]
    problem = tags_problem({"deep": deep})
    assert problem is not None and problem[0] == "extra_data.telemetry.deep" and "32 levels" in problem[1]
    ok: Any = "leaf"
    for _ in range(31):
        ok = [ok]
    assert tags_problem({"ok": ok}) is None


def test_clean_value_makes_anything_serialisable() -> None:
    import json

    deep: Any = 1
    for _ in range(200):
        deep = {"a": deep}
    value = {"s": "x\udcff", 3: math.inf, "big": 10**5000, "deep": deep, "obj": object()}
    cleaned = clean_value(value)
    text = json.dumps(cleaned, allow_nan=False)
    assert "\\\\udcff" in text and '"3"' in text and "bits" in text


def test_a_record_that_cannot_be_serialised_is_stored_reduced_and_others_go_on(tmp_path: Path) -> None:
    store = Store(tmp_path / "t.sqlite3")
    writer, store_writer = Writer(), Writer("store")
    rec = Recorder(store, writer, lambda: {}, store_writer=store_writer)
    events: list[str] = []
    rec.add_listener(lambda r: events.append(r.PromptId))
    rec.add_finisher("poison", lambda r: r.FallbackNotes.append("bad \udcff note") if r.PromptId == "bad" else None)
    for pid in ("bad", "good"):
        rec.started(pid, {}, {"telemetry": {"title": "ok"}})
        rec.ended(pid, SUCCESS, {"outputs": {}})
    assert writer.flush(10) and store_writer.flush(10)
    bad = store.get("bad")
    assert bad is not None and any(n.startswith("record reduced for storage") for n in bad.FallbackNotes)
    assert store.get("good") is not None and events == ["bad", "good"]
    assert [r.PromptId for r in rec.recent(10)] == ["good", "bad"]
    # Tags that got past the submission checks (another way in) are reduced at the start, with a note.
    rec.started("tags", {}, {"telemetry": {"title": "t\udcff", "n": math.nan}})
    live = rec.get("tags")
    assert live is not None and any("tags reduced" in n for n in live.FallbackNotes)
    dump_record(live)  # serialises
    writer.stop()
    store_writer.stop()


def test_markers_do_not_wait_on_a_stuck_store_thread(tmp_path: Path) -> None:
    store = Store(tmp_path / "t.sqlite3")
    writer, store_writer = Writer(), Writer("store")
    rec = Recorder(store, writer, lambda: {}, store_writer=store_writer, running_row_delay=3600)
    marker_at: list[float] = []
    rec.add_finisher("done marker", lambda r: marker_at.append(time.monotonic()))
    release = threading.Event()
    store_writer.submit(lambda: release.wait(30))  # the store's thread is stuck on a write
    t0 = time.monotonic()
    for pid in ("a", "b", "c"):
        rec.started(pid, {}, {})
        rec.declare_marker("9", "x/y", 1, False, prompt_id=pid)
        rec.ended(pid, SUCCESS, {"outputs": {}})
    assert writer.flush(10)
    assert len(marker_at) == 3 and max(marker_at) - t0 < 0.5, [m - t0 for m in marker_at]
    release.set()
    assert store_writer.flush(10)
    assert all(store.get(p).Outcome == "success" for p in ("a", "b", "c"))  # type: ignore[union-attr]
    writer.stop()
    store_writer.stop()


def test_health_reports_down_stuck_and_changes_to_listeners(tmp_path: Path) -> None:
    facts = {"w": WorkerFacts(found=True, alive=True, running=1, queued=1)}
    activity = [time.monotonic()]
    mon = HealthMonitor(
        policy=HealthPolicy(stuck_after_seconds=5),
        worker=lambda: facts["w"],
        last_activity=lambda: activity[0],
        output_dir=lambda: tmp_path,
        store_dir=tmp_path,
    )
    heard: list[tuple[str | None, str]] = []
    mon.listeners.append(lambda prev, new: heard.append((prev["Status"] if prev else None, new["Status"])))
    assert mon.evaluate()["Status"] == "ok"
    activity[0] -= 10  # nothing ran for 10 s with a prompt waiting
    report = mon.evaluate()
    worker = next(c for c in report["Checks"] if c["Name"] == "prompt_worker")
    assert report["Status"] == "down" and "stuck" in worker["Detail"] and worker["Since"]
    facts["w"] = WorkerFacts(found=True, alive=False, exit_reason="SystemExit: 3", exit_at=time.time(), queued=2)
    report = mon.evaluate()
    assert "SystemExit: 3" in next(c for c in report["Checks"] if c["Name"] == "prompt_worker")["Detail"]
    activity[0] = time.monotonic()
    facts["w"] = WorkerFacts(found=True, alive=True)
    assert mon.evaluate()["Status"] == "ok"
    assert heard == [("ok", "down"), ("down", "ok")]  # the starting state (all ok) is not a change


def test_waits_on_unknown_ids_leave_nothing_behind(tmp_path: Path) -> None:
    from tests.pkg import load, sub

    load()
    rt = sub("hooks.runtime").Runtime(user_dir=tmp_path, output_dir=lambda: tmp_path, snapshot=lambda: {}, env={})

    async def run() -> None:
        app = web.Application()
        routes = web.RouteTableDef()
        sub("server_routes.prompts").add_routes(routes, rt)
        app.add_routes(routes)
        async with TestClient(TestServer(app)) as client:
            for i in range(2000):
                r = await client.get(f"/telemetry/prompts/never-{i}/wait?timeout=0")
                assert r.status == 404

    asyncio.run(run())
    assert rt.waits() == {}
    rt.writer.stop()
    rt.store_writer.stop()


@pytest.mark.parametrize("how", ["removed", "folder", "other file"])
def test_store_file_removed_or_replaced_while_running_keeps_its_records(how: str, tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite3"
    store = seeded(path, 30)
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    if how == "folder":
        path.mkdir()
    elif how == "other file":
        path.write_bytes(b"someone else's file")
    store.put(PromptRecord(PromptId="after", Outcome="success"))
    h = store.health()
    assert not h.Ok and "while running" in (h.Problem or ""), h
    assert path.is_file() and store.mode == "file"
    fresh = Store(path)
    assert fresh.count() == 31 and fresh.get("p7") is not None and fresh.get("after") is not None
    if how != "removed":
        assert h.KeptFile and Path(h.KeptFile).exists()
