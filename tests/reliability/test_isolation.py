"""Isolation (issue 13): nothing a client or a damaged disk does may switch the package off, and a zombie ComfyUI is
reported. Each test starts a real ComfyUI 0.3.75 (``--cpu``; the hostile-tags and worker tests also 0.3.52) with the package, injects the fault for real (bytes over
the store file, a read-only tmpfs, a full tmpfs, another process holding SQLite's lock, hostile JSON on POST /prompt, a
node raising ``SystemExit``) and checks that markers are written on time, that the problem is loud (``GET /telemetry``
note, ``GET /telemetry/health``, ``comfyui_telemetry_store_ok``, one warning line in the log), and that nothing of the
package raised.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.comfy import ComfyServer, wait_until
from telemetry.records import FINAL_OUTCOMES
from tests.conftest import PACKAGE_FOLDER, VERSIONS, make_server

from .helpers import check_done_marker, marker_prompt, package_tracebacks, uniq, wait_record
from .test_faults import fill, tmpfs

pytestmark = pytest.mark.comfy

STORE = "telemetry.sqlite3"
# How long after ComfyUI's execution_success a marker may appear while the store is in trouble (a marker on an idle
# 2-core machine appears within ~10 ms; the old code put a 10 s busy timeout in front of it).
MARKER_DEADLINE_S = 5.0


def metric(server: ComfyServer, name: str) -> float:
    """One sample of the package's Prometheus exposition (``name`` with its labels, as printed)."""
    status, text = server.request("GET", "/telemetry/metrics")
    assert status == 200, (status, text)
    for line in str(text).splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the exposition:\n{text}")


def health(server: ComfyServer) -> tuple[int, dict[str, Any]]:
    """GET /telemetry/health: (status, body)."""
    return server.request("GET", "/telemetry/health")


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in report["Checks"] if c["Name"] == name)


def seeded_store(folder: Path) -> Path:
    """A healthy store of this package's schema with one record, as a previous run leaves it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from telemetry.records import PromptRecord
    from telemetry.store import Store

    folder.mkdir(parents=True, exist_ok=True)
    store = Store(folder / STORE)
    for i in range(50):
        store.put(PromptRecord(PromptId=f"earlier-{i}", Outcome="success", FallbackNotes=["x" * 400]))
    store.close()
    con = sqlite3.connect(folder / STORE)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return folder / STORE


def marker_on_time(rec: dict[str, Any]) -> float:
    """Seconds from execution_success to the marker write (the record's own measure); fails past the deadline."""
    waits = [m["WaitSeconds"] for m in rec["Markers"]]
    assert waits and all(w is not None and w < MARKER_DEADLINE_S for w in waits), rec["Markers"]
    return max(waits)


def final(server: ComfyServer, prompt_id: str, timeout: float = 60) -> dict[str, Any]:
    """The record once final, read with GET /telemetry/prompts/{id} (no wait route: its timeout is the max wait)."""
    found: dict[str, Any] = {}

    def done() -> bool:
        status, body = server.request("GET", f"/telemetry/prompts/{prompt_id}")
        if status == 200 and body.get("Outcome") in FINAL_OUTCOMES:
            found.update(body)
            return True
        return False

    wait_until(done, timeout, what=f"prompt {prompt_id} to end")
    return found


def marker_ms(rec: dict[str, Any]) -> float:
    return round(marker_on_time(rec) * 1000, 1)


def store_rows(path: Path) -> set[str]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return {r[0] for r in con.execute("SELECT prompt_id FROM prompts")}
    finally:
        con.close()


def damage(path: Path, kind: str) -> bytes | None:
    """Damage the store file as ``kind`` says; return the damaged bytes (evidence that must be kept)."""
    if kind == "garbage":  # garbage over the first page: "file is not a database"
        with open(path, "r+b") as f:
            f.write(os.urandom(4096))
    elif kind == "truncated":  # cut in the middle of a page: "database disk image is malformed"
        os.truncate(path, path.stat().st_size // 2 + 100)
    elif kind == "folder":  # a folder where the file should be
        path.unlink()
        path.mkdir()
        (path / "evidence.txt").write_text("not a database")
        return None
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["garbage", "truncated", "folder"])
def test_damaged_store_is_moved_aside_and_markers_go_on(kind: str, tmp_path: Path) -> None:
    path = seeded_store(tmp_path / "store")
    evidence = damage(path, kind)
    server = make_server(env={"RUN_TELEMETRY_DIR": str(path.parent)})
    try:
        server.start()
        recs = [wait_record(server, server.queue(marker_prompt(f"damaged/{uniq(str(i))}", color=i))) for i in range(3)]
        for rec in recs:
            check_done_marker(server.output_dir, rec)
        print(f"damaged store ({kind}): marker after execution_success {[marker_ms(r) for r in recs]} ms")
        # The damaged store is kept as evidence, unchanged, beside a fresh one that holds the new records.
        kept = [p for p in path.parent.iterdir() if p.name.startswith(f"{STORE}.damaged-")]
        assert len(kept) == 1, list(path.parent.iterdir())
        if evidence is not None:
            assert kept[0].read_bytes() == evidence
        else:
            assert (kept[0] / "evidence.txt").read_text() == "not a database"
        wait_until(lambda: {r["PromptId"] for r in recs} <= store_rows(path), 30, what="the records in the fresh store")
        # Loud: the note names the problem and the file kept; health, metric and sidebar data agree; one log line.
        status = server.get("/telemetry")
        notes = " | ".join(status["FallbackNotes"])
        assert "damaged" in notes and kept[0].name in notes, notes
        assert status["Store"]["Ok"] is False and status["Store"]["KeptFile"] == str(kept[0])
        code, report = health(server)
        assert code == 200 and report["Status"] == "degraded", report
        assert check(report, "store")["Status"] == "degraded" and check(report, "store")["Since"]
        assert metric(server, "comfyui_telemetry_store_ok") == 0.0
        log = server.log_text()
        assert sum("Run Telemetry: telemetry store" in line for line in log.splitlines()) == 1, log[-3000:]
        assert package_tracebacks(log, PACKAGE_FOLDER) == []
    finally:
        server.stop()


def test_read_only_store_folder_runs_in_memory(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "store", "4m") as folder:
        seeded_store(folder)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        server = make_server(env={"RUN_TELEMETRY_DIR": str(folder)})
        try:
            server.start()
            ids = [server.queue(marker_prompt(f"ro-store/{uniq(str(i))}", color=i)) for i in range(3)]
            recs = [wait_record(server, pid) for pid in ids]
            for rec in recs:
                check_done_marker(server.output_dir, rec)
            print(f"read-only store: marker after execution_success {[marker_ms(r) for r in recs]} ms")
            status = server.get("/telemetry?limit=100")
            listed = {p["PromptId"] for p in status["Prompts"]}
            # In memory: the new prompts, and the earlier records copied from the read-only file.
            assert set(ids) <= listed and "earlier-0" in listed, listed
            assert status["Store"]["Mode"] == "memory" and status["Store"]["Ok"] is False
            notes = " | ".join(status["FallbackNotes"])
            assert "memory only" in notes and str(folder) in notes, notes
            assert metric(server, "comfyui_telemetry_store_ok") == 0.0
            assert check(health(server)[1], "store")["Status"] == "degraded"
            assert package_tracebacks(server.log_text(), PACKAGE_FOLDER) == []
        finally:
            server.stop()
            subprocess.run(["mount", "-o", "remount,rw", str(folder)], check=False)


def test_full_store_disk_while_running(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "store", "1m") as store:
        server = make_server(env={"RUN_TELEMETRY_DIR": str(store)})
        try:
            server.start()
            first = wait_record(server, server.queue(marker_prompt(f"store/{uniq('a')}")))
            check_done_marker(server.output_dir, first)
            assert metric(server, "comfyui_telemetry_store_ok") == 1.0
            fill(store)
            ids = [server.queue(marker_prompt(f"store/{uniq(str(i))}", color=i)) for i in range(5)]
            recs = [wait_record(server, pid) for pid in ids]
            for rec in recs:
                check_done_marker(server.output_dir, rec)
            print(f"full store disk: marker after execution_success {[marker_ms(r) for r in recs]} ms")
            wait_until(
                lambda: server.get("/telemetry")["Store"]["Mode"] == "memory", 30, what="the store to go to memory"
            )
            status = server.get("/telemetry?limit=50")
            assert set(ids) <= {p["PromptId"] for p in status["Prompts"]}
            assert first["PromptId"] in {p["PromptId"] for p in status["Prompts"]}
            notes = " | ".join(status["FallbackNotes"])
            assert "not writable" in notes and "memory only" in notes, notes
            assert metric(server, "comfyui_telemetry_store_ok") == 0.0
            log = server.log_text()
            assert package_tracebacks(log, PACKAGE_FOLDER) == []
            assert sum("Run Telemetry: telemetry store" in line for line in log.splitlines()) == 1
        finally:
            server.stop()


LOCKER = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
con.execute("BEGIN EXCLUSIVE")
con.execute("INSERT OR REPLACE INTO runs(run_id, created_at, updated_at, info) VALUES ('locker', 0, 0, '{}')")
open(sys.argv[2], "w").write("locked")
time.sleep(float(sys.argv[3]))
con.execute("COMMIT")
"""


def test_store_locked_by_another_process_for_20_s(tmp_path: Path) -> None:
    store = tmp_path / "store"
    server = make_server(env={"RUN_TELEMETRY_DIR": str(store)})
    locker = None
    try:
        server.start()
        check_done_marker(server.output_dir, wait_record(server, server.queue(marker_prompt(f"lock/{uniq('a')}"))))
        ready = tmp_path / "locked"
        locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(store / STORE), str(ready), "20"])
        wait_until(ready.exists, 20, what="the other process to hold the store's lock")
        t_locked = time.monotonic()
        waits, ids = [], []
        for i in range(4):
            pid = server.queue(marker_prompt(f"lock/{uniq(str(i))}", color=i))
            ids.append(pid)
            rec = wait_record(server, pid)
            check_done_marker(server.output_dir, rec)
            waits.append(marker_on_time(rec))
        assert time.monotonic() - t_locked < 15, "the prompts were held up by the lock"
        print(f"store locked: marker after execution_success {[round(w * 1000, 1) for w in waits]} ms")
        # Loud while it lasts: the store check names the lock.
        wait_until(
            lambda: "locked by another process" in check(health(server)[1], "store")["Detail"],
            30,
            what="the lock to be reported",
        )
        assert metric(server, "comfyui_telemetry_store_ok") == 0.0
        assert server.get("/telemetry")["Prompts"]  # routes answer (from memory) while readers are shut out
        locker.wait(60)
        # Nothing lost: once the lock is gone every record reaches the store, and the state is ok again.
        wait_until(lambda: set(ids) <= store_rows(store / STORE), 90, what="the held-up records in the store")
        wait_until(lambda: metric(server, "comfyui_telemetry_store_ok") == 1.0, 30, what="the store to be ok again")
        assert health(server)[1]["Status"] == "ok"
        assert package_tracebacks(server.log_text(), PACKAGE_FOLDER) == []
    finally:
        if locker is not None and locker.poll() is None:
            locker.kill()
            locker.wait(10)
        server.stop()


def raw_post(server: ComfyServer, body: str) -> tuple[int, Any]:
    """POST /prompt with a body written by hand (lone surrogate escapes, NaN: what json.dumps would not send)."""
    return server.request("POST", "/prompt", body.encode())


HOSTILE = [
    # (name, extra_data.telemetry as raw JSON text, field the 400 must name, words the message must hold)
    ("lone surrogate", '{"run_id": "r1", "title": "frame \\udcff"}', "extra_data.telemetry.title", "lone surrogate"),
    ("surrogate key", '{"notes": {"\\ud800x": 1}}', "extra_data.telemetry.notes", "lone surrogate"),
    ("400 levels", '{"deep": ' + "[" * 400 + "]" * 400 + "}", "extra_data.telemetry.deep", "32 levels"),
    ("NaN", '{"score": NaN}', "extra_data.telemetry.score", "finite"),
    ("Infinity", '{"score": -Infinity}', "extra_data.telemetry.score", "finite"),
    ("huge int", '{"seed": ' + "9" * 40 + "}", "extra_data.telemetry.seed", "64 bits"),
    ("2 MB", '{"blob": "' + "a" * 2_000_000 + '"}', "extra_data.telemetry", "1 MB"),
    ("story id object", '{"run_id": "r1", "story": {"id": {"x": 1}}}', "extra_data.telemetry.story.id", "text"),
    ("story logline number", '{"story": {"id": "s", "logline": 42}}', "extra_data.telemetry.story.logline", "text"),
    ("story list", '{"story": ["a"]}', "extra_data.telemetry.story", "object"),
    ("scene title", '{"title": {"t": 1}}', "extra_data.telemetry.title", "text"),
]


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"comfyui-{v}" for v in VERSIONS])
def plain_server(request: pytest.FixtureRequest) -> Iterator[ComfyServer]:
    """ComfyUI with its default upload limit (100 MB), so a 2 MB body reaches the package's check."""
    server = make_server(request.param)
    server.start()
    yield server
    server.stop()


def test_hostile_tags_are_refused_and_never_reach_other_clients(plain_server: ComfyServer) -> None:
    server = plain_server
    prompt = json.dumps(marker_prompt(f"hostile/{uniq('x')}"))
    for name, tags, field, words in HOSTILE:
        status, body = raw_post(server, f'{{"prompt": {prompt}, "extra_data": {{"telemetry": {tags}}}}}')
        assert status == 400, (name, status, str(body)[:300])
        err = body["error"]
        assert err["parameter"] == field and words in err["message"], (name, err)
    # A lone surrogate in a client-chosen prompt id and in a marker prefix: refused too, naming them.
    status, body = raw_post(server, f'{{"prompt": {prompt}, "prompt_id": "id-\\udcff"}}')
    assert status == 400 and body["error"]["parameter"] == "prompt_id", body
    bad_prefix = marker_prompt("hostile/x")
    del bad_prefix["3"]  # the marker is the only output node: refused, nothing runs
    bad_prefix["4"]["inputs"]["filename_prefix"] = "PREFIX"
    status, body = raw_post(server, json.dumps({"prompt": bad_prefix}).replace("PREFIX", "p-\\udcff"))
    assert status == 400 and "lone surrogate" in json.dumps(body["node_errors"]), body
    # Everyone else goes on: a good prompt gets its marker, and the refused ones left no record.
    good = wait_record(server, server.queue(marker_prompt(f"hostile/{uniq('ok')}"), extra_data={"telemetry": {}}))
    check_done_marker(server.output_dir, good)
    status, listing = server.request("GET", "/telemetry?limit=50")
    assert status == 200 and good["PromptId"] in {p["PromptId"] for p in listing["Prompts"]}
    assert server.request("GET", "/telemetry/health")[0] == 200
    assert package_tracebacks(server.log_text(), PACKAGE_FOLDER) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_dead_or_stuck_prompt_worker_is_reported_down(version: str, tmp_path: Path) -> None:
    server = make_server(version, env={"SCENE_MAX_WAIT_SECONDS": "3"})
    try:
        server.start()
        code, report = health(server)
        assert code == 200 and report["Status"] == "ok", [c for c in report["Checks"] if c["Status"] != "ok"]
        # Stuck: a prompt waits behind one whose node runs longer than the max wait (3 s) without anything returning.
        slow = server.queue(
            {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                "2": {"class_type": "RTTestSleep", "inputs": {"image": ["1", 0], "seconds": 8.0}},
                "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
            }
        )
        waiting = server.queue(marker_prompt(f"stuck/{uniq('w')}"))
        wait_until(lambda: health(server)[0] == 503, 20, what="the stuck worker to be reported")
        code, report = health(server)
        worker = check(report, "prompt_worker")
        assert report["Status"] == "down" and worker["Status"] == "down" and "stuck" in worker["Detail"], report
        assert worker["Since"]
        final(server, slow)
        check_done_marker(server.output_dir, final(server, waiting))
        wait_until(lambda: health(server)[0] == 200, 20, what="the worker to be ok again")

        # Dead: a node raises SystemExit; ComfyUI's worker thread ends while HTTP keeps answering.
        dying = marker_prompt(f"dead/{uniq('x')}")
        dying["10"] = {"class_type": "RTTestExit", "inputs": {"image": ["1", 0], "code": 3}}
        dying["2"]["inputs"]["image"] = ["10", 0]
        t0 = time.time()
        dead_id = server.queue(dying)
        wait_until(lambda: health(server)[0] == 503, 20, what="the dead worker to be reported")
        code, report = health(server)
        worker = check(report, "prompt_worker")
        assert report["Status"] == "down" and "exited" in worker["Detail"] and "SystemExit" in worker["Detail"]
        assert worker["Since"] and worker["Since"] >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t0 - 1))
        # The dying prompt's own record and marker say what happened.
        rec = final(server, dead_id)
        assert rec["Outcome"] == "error" and rec["Error"]["ExceptionType"] == "SystemExit", rec["Error"]
        assert rec["Markers"][0]["State"] == "failed"
        # The same facts as gauges and in GET /telemetry (the sidebar's line).
        assert metric(server, "comfyui_telemetry_prompt_worker_up") == 0.0
        assert metric(server, 'comfyui_telemetry_health_status{status="down"}') == 1.0
        assert metric(server, 'comfyui_telemetry_health_check_down{check="prompt_worker"}') == 1.0
        assert server.get("/telemetry")["Health"]["Status"] == "down"
        # Still down with a prompt queued behind it (nothing will run it), under /api too.
        server.queue(marker_prompt(f"dead/{uniq('after')}"))
        code, report = server.request("GET", "/api/telemetry/health")
        assert code == 503 and report["Status"] == "down"
        assert package_tracebacks(server.log_text(), PACKAGE_FOLDER) == []
    finally:
        server.stop()
