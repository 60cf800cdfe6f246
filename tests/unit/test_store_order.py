"""The store's order and retention: a sequence number, not the wall clock; runs kept whole until finalized."""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest

from telemetry.policy import QueuePolicy
from telemetry.records import PromptError, PromptRecord
from telemetry.runs import assemble_run
from telemetry.store import DEFAULT_RETENTION, Store


def rec(pid: str, seq: int, *, run: str | None = None, scene: str | None = None, outcome: str = "success") -> str:
    r = PromptRecord(PromptId=pid, RunId=run, SceneId=scene, Outcome=outcome, Seq=seq)  # type: ignore[arg-type]
    if outcome == "error":
        r.Error = PromptError(Message="boom")
    return r.model_dump_json()


def test_a_clock_stepped_back_changes_no_order_or_outcome(tmp_path: Path) -> None:
    times = iter([5000.0, 1000.0, 900.0, 800.0])  # every write earlier than the one before
    store = Store(tmp_path / "s.sqlite3", clock=lambda: next(times))
    store.put_json("a1", "run", "1", "error", rec("a1", 1, run="run", scene="1", outcome="error"), seq=1)
    store.put_json("a2", "run", "1", "success", rec("a2", 2, run="run", scene="1"), seq=2)
    store.put_json("b1", "run", "2", "success", rec("b1", 3, run="run", scene="2"), seq=3)
    store.put_json("x", None, None, "success", rec("x", 4), seq=4)
    # The newest is the last accepted, not the last by the clock.
    assert [r.PromptId for r in store.recent(10)] == ["x", "b1", "a2", "a1"]
    [row] = store.runs()
    assert row["Succeeded"] == 2 and row["Failed"] == 0, row  # scene 1 judged by its latest attempt, a2
    meta = assemble_run("run", store.by_run_raw("run"), policy=QueuePolicy(), output_dir=tmp_path)
    scene1 = meta["Scenes"][0]
    assert scene1["Success"] is True and [a["PromptId"] for a in scene1["AttemptSummaries"]] == ["a1", "a2"]


def test_a_10000_scene_run_with_retries_survives_default_retention(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    assert store.retention == DEFAULT_RETENTION == 10_000
    seq = itertools.count(1)
    for i in range(300):  # older prompts without a run
        n = next(seq)
        store.put_json(f"old-{i}", None, None, "success", rec(f"old-{i}", n), seq=n)
    for i in range(10_000):
        n = next(seq)
        outcome = "error" if i % 50 == 0 else "success"
        store.put_json(
            f"s-{i}", "big", str(i), outcome, rec(f"s-{i}", n, run="big", scene=str(i), outcome=outcome), seq=n
        )
        if outcome == "error":  # its retry
            n = next(seq)
            store.put_json(f"r-{i}", "big", str(i), "success", rec(f"r-{i}", n, run="big", scene=str(i)), seq=n)
    for i in range(300):  # newer prompts without a run
        n = next(seq)
        store.put_json(f"new-{i}", None, None, "success", rec(f"new-{i}", n), seq=n)
    store.prune()
    records = store.by_run_raw("big")
    assert len(records) == 10_000 + 200
    meta = assemble_run("big", records, policy=QueuePolicy(), output_dir=tmp_path)
    assert len(meta["Scenes"]) == 10_000 and all(s["Success"] for s in meta["Scenes"])
    assert sum(s["AttemptsRun"] == 2 for s in meta["Scenes"]) == 200


def test_prune_takes_whole_runs_oldest_and_finalized_first(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3", retention=10)
    seq = itertools.count(1)

    def put_run(run: str, scenes: int, outcome: str = "success") -> None:
        for i in range(scenes):
            n = next(seq)
            store.put_json(f"{run}-{i}", run, str(i), outcome, rec(f"{run}-{i}", n, run=run, scene=str(i)), seq=n)

    put_run("oldest", 4)
    put_run("pending", 3, outcome="queued")
    put_run("finalized", 4)
    store.put_run("finalized", {"FinalizedAt": 1.0})
    put_run("newest", 6)
    store.prune()
    kept = {r["RunId"]: r["Prompts"] for r in store.runs()}
    # 17 > 10: the finalized run goes first, then the oldest; a run with queued prompts and the newest run stay.
    assert kept == {"newest": 6, "pending": 3}, kept


def test_put_json_many_writes_all_rows_in_order_or_none(tmp_path: Path) -> None:
    """Several rows in one transaction: a later row of a prompt replaces its earlier one; a row SQLite refuses
    leaves none of them written, and the store goes on writing."""
    store = Store(tmp_path / "t.sqlite3")
    rows = [
        ("a", None, None, "queued", '{"PromptId": "a", "Outcome": "queued"}', 1),
        ("b", None, None, "queued", '{"PromptId": "b", "Outcome": "queued"}', 2),
        ("a", None, None, "success", '{"PromptId": "a", "Outcome": "success"}', 3),
    ]
    store.put_json_many(rows)
    assert store.get("a").Outcome == "success" and store.get("b").Outcome == "queued"
    bad = [
        ("c", None, None, "queued", '{"PromptId": "c", "Outcome": "queued"}', 4),
        ("d", None, None, "queued", object(), 5),
    ]
    with pytest.raises(sqlite3.Error):
        store.put_json_many(bad)  # type: ignore[arg-type]
    assert store.get("c") is None
    store.put_json("e", None, None, "success", '{"PromptId": "e", "Outcome": "success"}', seq=6)
    assert store.get("e").Outcome == "success"
