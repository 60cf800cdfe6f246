"""When the recorder writes a prompt's running row and event, and what the worker-side path hands the writer."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from telemetry.recorder import Recorder
from telemetry.records import MarkerState, PromptRecord
from telemetry.store import Store
from telemetry.writer import Writer

SUCCESS = [["execution_start", {"timestamp": 1}], ["execution_success", {"timestamp": time.time() * 1000}]]


def snapshot() -> dict[str, Any]:
    dev = {"Name": "cpu", "Type": "cpu", "VramTotal": 8 << 30, "VramFree": 4 << 30}
    return {"Timestamp": "2026-11-24T00:00:00.000Z", "Source": "system-ram", "Device": dev, "Devices": [dev]}


def make(tmp_path: Path, delay: float) -> tuple[Recorder, Store, Writer, list[tuple[str, str]]]:
    store = Store(tmp_path / "t.sqlite3")
    writer = Writer()
    rec = Recorder(store, writer, snapshot, running_row_delay=delay)
    events: list[tuple[str, str]] = []
    rec.add_listener(lambda r: events.append((r.PromptId, r.Outcome)))
    return rec, store, writer, events


def test_a_prompt_running_past_the_delay_gets_its_running_row_and_event(tmp_path: Path) -> None:
    rec, store, writer, events = make(tmp_path, 0.05)
    stored: list[str | None] = []
    rec.add_listener(lambda r: stored.append((store.get(r.PromptId) or PromptRecord(PromptId="?")).Outcome))
    running = threading.Event()
    rec.add_listener(lambda r: running.set())
    t0 = time.monotonic()
    rec.started("long", {"1": {"class_type": "EmptyImage", "inputs": {}}}, {})
    assert running.wait(10)
    assert time.monotonic() - t0 >= 0.05
    assert events == [("long", "running")] and stored == ["running"]
    rec.ended("long", SUCCESS, {"outputs": {}})
    assert writer.flush(10)
    assert events[-1] == ("long", "success") and store.get("long").Outcome == "success"
    writer.stop()


def test_a_prompt_ending_before_the_delay_writes_only_its_final_row(tmp_path: Path) -> None:
    rec, store, writer, events = make(tmp_path, 3600)
    puts: list[str] = []
    original = store.put_json
    store.put_json = lambda *a, **kw: (puts.append(a[3]), original(*a, **kw))[1]  # type: ignore[method-assign]
    rec.started("quick", {}, {})
    rec.node_called("quick", "1", None, 0.001)
    rec.ended("quick", SUCCESS, {"outputs": {}})
    assert writer.flush(10)  # runs the delayed running-row job too: it finds the prompt ended and does nothing
    assert puts == ["success"]
    assert events == [("quick", "success")]
    writer.stop()


def test_markers_get_the_running_row_stored_before_they_are_written(tmp_path: Path) -> None:
    """A kill while the marker is written must leave a row for the next start to mark as cut off."""
    rec, store, writer, events = make(tmp_path, 3600)
    seen_by_marker_step: list[str | None] = []

    def marker_step(r: PromptRecord) -> None:
        row = store.get(r.PromptId)
        seen_by_marker_step.append(row.Outcome if row else None)

    rec.add_finisher("done marker", marker_step)
    rec.started("m", {}, {})
    rec.declare_marker("9", "frames/x", 1, False, prompt_id="m")
    rec.ended("m", SUCCESS, {"outputs": {}})
    assert writer.flush(10)
    assert seen_by_marker_step == ["running"]
    assert store.get("m").Outcome == "success" and store.get("m").Markers == [
        MarkerState(NodeId="9", Prefix="frames/x", FrameCount=1)
    ]
    assert events == [("m", "success")]  # the forced row publishes no stale running event
    writer.stop()


def test_node_timings_resolve_class_types_at_the_end(tmp_path: Path) -> None:
    rec, store, writer, _ = make(tmp_path, 3600)

    class Dyn:  # ComfyUI's DynamicPrompt: knows nodes a node expanded into
        def get_node(self, node_id: str) -> dict[str, Any]:
            return {"class_type": "Expanded"} if node_id == "5.0.1" else {}

    prompt = {"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "ImageInvert", "inputs": {}}}
    rec.started("n", prompt, {})
    for node_id, seconds in (("1", 0.25), ("5.0.1", 0.5), ("1", 0.125)):
        rec.node_called("n", node_id, None, seconds, Dyn())
    rec.ended("n", [["execution_cached", {"nodes": ["2"]}], *SUCCESS], {"outputs": {}})
    assert writer.flush(10)
    nodes = {n.NodeId: (n.ClassType, n.Seconds, n.Calls, n.Cached) for n in store.get("n").Nodes}
    assert nodes == {
        "1": ("EmptyImage", 0.375, 2, False),
        "5.0.1": ("Expanded", 0.5, 1, False),
        "2": ("ImageInvert", 0.0, 0, True),
    }
    writer.stop()


def test_the_websocket_event_is_sent_only_while_a_client_is_connected() -> None:
    from tests.pkg import load, sub

    load()
    send = sub("hooks")._send

    class Server:  # the two attributes of ComfyUI's PromptServer the event uses
        def __init__(self) -> None:
            self.sockets: dict[str, Any] = {}
            self.sent: list[str] = []

        def send_sync(self, event: str, data: Any) -> None:
            self.sent.append(event)

    server = Server()
    send(server, "telemetry.prompt", {})
    server.sockets["client-1"] = object()
    send(server, "telemetry.prompt", {})
    assert server.sent == ["telemetry.prompt"]


def test_final_bodies_read_from_the_store_are_kept_for_the_next_reader(tmp_path: Path) -> None:
    store = Store(tmp_path / "t.sqlite3")
    writer = Writer()
    rec = Recorder(store, writer, snapshot, recent_size=2)
    for pid in ("a", "b", "c"):
        rec.started(pid, {}, {})
        rec.ended(pid, SUCCESS, {"outputs": {}})
    assert writer.flush(10)
    reads: list[str] = []
    original = store.final_json
    store.final_json = lambda pid: (reads.append(pid), original(pid))[1]  # type: ignore[method-assign]
    first, second = rec.final_json("a"), rec.final_json("a")  # "a" fell out of memory: one store read
    assert first == second and PromptRecord.model_validate_json(first).Outcome == "success"
    assert reads == ["a"]
    rec.started("a", {}, {})  # the id is reused: the old final body is not the answer any more
    assert rec.final_json("a") is None
    writer.stop()


def test_rows_waiting_for_the_store_thread_go_in_one_transaction_in_order(tmp_path: Path) -> None:
    """A queue of prompts accepted at once: their rows wait while the store thread is busy and are then written
    together (one transaction, one commit), in the order they were made; each row's event follows its row."""
    store = Store(tmp_path / "t.sqlite3")
    writer, store_writer = Writer(), Writer("store")
    rec = Recorder(store, writer, snapshot, running_row_delay=3600, store_writer=store_writer)
    commits: list[int] = []
    original_many, original_one = store.put_json_many, store.put_json
    store.put_json_many = lambda rows: (commits.append(len(rows)), original_many(rows))[1]  # type: ignore[method-assign]
    store.put_json = lambda *a, **kw: (commits.append(1), original_one(*a, **kw))[1]  # type: ignore[method-assign]
    seen_stored: list[tuple[str, str | None]] = []
    rec.add_listener(lambda r: seen_stored.append((r.PromptId, (store.get(r.PromptId) or r).Outcome)))
    gate = threading.Event()
    store_writer.submit(lambda: gate.wait(10))  # the store thread is busy with an earlier write
    for i in range(5):
        rec.started(f"p{i}", {}, {})
        rec.ended(f"p{i}", SUCCESS, {"outputs": {}})
    assert writer.flush(10)  # every final row is handed over, none written yet
    assert commits == [] and store.get("p0") is None
    gate.set()
    assert store_writer.flush(10)
    assert commits == [5]
    assert [r.PromptId for r in store.recent(10)] == ["p4", "p3", "p2", "p1", "p0"]
    assert all(store.get(f"p{i}").Outcome == "success" for i in range(5))
    writer.stop()
    store_writer.stop()


def test_a_queued_row_is_stored_before_its_event(tmp_path: Path) -> None:
    """The queued row goes through the store thread's batch; listeners hear of it only once it is in the store."""
    from types import SimpleNamespace

    store = Store(tmp_path / "t.sqlite3")
    writer, store_writer = Writer(), Writer("store")
    rec = Recorder(store, writer, snapshot, running_row_delay=0.0, store_writer=store_writer)
    seen: list[tuple[str, str | None]] = []
    heard = threading.Event()

    def listener(r: PromptRecord) -> None:
        stored = store.get(r.PromptId)
        seen.append((r.Outcome, stored.Outcome if stored else None))
        heard.set()

    rec.add_listener(listener)
    rec.accepted(SimpleNamespace(number=1, prompt_id="q1", prompt={}, extra_data={}, outputs_to_execute=[]))
    assert heard.wait(10)
    assert seen == [("queued", "queued")]
    writer.stop()
    store_writer.stop()


def _accept(rec: Recorder, prompt_id: str) -> None:
    from types import SimpleNamespace

    rec.accepted(SimpleNamespace(number=1, prompt_id=prompt_id, prompt={}, extra_data={}, outputs_to_execute=[]))


def test_a_store_flush_writes_the_rows_its_delayed_jobs_hand_over(tmp_path: Path) -> None:
    """``flush`` promises every store write submitted so far: the delayed queued-row job runs at the flush and its
    row must be in the store when the flush returns, not in a batch job queued behind the flush."""
    store = Store(tmp_path / "t.sqlite3")
    writer, store_writer = Writer(), Writer("store")
    rec = Recorder(store, writer, snapshot, running_row_delay=3600, store_writer=store_writer)
    _accept(rec, "q1")
    assert writer.flush(10) and store_writer.flush(10)
    row = store.get("q1")
    assert row is not None and row.Outcome == "queued"
    writer.stop()
    store_writer.stop()


def test_stopping_the_store_thread_keeps_the_rows_its_delayed_jobs_hand_over(tmp_path: Path) -> None:
    """Shutdown: ``stop`` runs the delayed row jobs at once; the rows they hand over are written before the thread
    ends (a queued prompt's row is what lets the next start report it ``lost``)."""
    store = Store(tmp_path / "t.sqlite3")
    writer, store_writer = Writer(), Writer("store")
    rec = Recorder(store, writer, snapshot, running_row_delay=3600, store_writer=store_writer)
    _accept(rec, "q1")
    rec.started("r1", {}, {})
    writer.stop()
    store_writer.stop()
    fresh = Store(tmp_path / "t.sqlite3")
    assert [r.PromptId for r in fresh.queued_records()] == ["q1"]
    assert fresh.get("r1") is not None and fresh.get("r1").Outcome == "running"


def test_a_running_row_handed_over_late_never_replaces_the_final_row(tmp_path: Path, monkeypatch: Any) -> None:
    """The store thread decides a prompt still runs and makes its running row; before it hands the row over, the
    prompt ends on the writer thread and hands over its final row. The store must keep the final row (a running
    row left there is reported ``crashed`` at the next start) and the last event must be the final one."""
    import telemetry.recorder as recorder_module

    at_handoff, go = threading.Event(), threading.Event()
    real_dump = recorder_module.dump_record

    def dump_then_pause(rec: PromptRecord) -> Any:
        # The narrowest seam: the store thread loses the GIL once it has serialized the running record.
        out = real_dump(rec)
        if rec.Outcome == "running" and threading.current_thread().name == "store" and not at_handoff.is_set():
            at_handoff.set()
            go.wait(10)
        return out

    monkeypatch.setattr(recorder_module, "dump_record", dump_then_pause)
    store = Store(tmp_path / "t.sqlite3")
    writer, store_writer = Writer(), Writer("store")
    rec = Recorder(store, writer, snapshot, running_row_delay=0.0, store_writer=store_writer)
    events: list[tuple[str, str]] = []
    rec.add_listener(lambda r: events.append((r.PromptId, r.Outcome)))
    rec.started("p", {}, {})
    assert at_handoff.wait(10)
    rec.ended("p", SUCCESS, {"outputs": {}})
    assert writer.flush(10)
    go.set()
    assert store_writer.flush(10)
    assert store.get("p").Outcome == "success"
    assert events[-1] == ("p", "success")
    writer.stop()
    store_writer.stop()
