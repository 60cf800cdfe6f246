"""Late-file settle and per-prefix marker order: the pure pieces, on a real file system and real threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from telemetry.policy import QueuePolicy, apply_overrides, policy_from_env
from telemetry.prefix_order import PrefixOrder
from telemetry.settle import Settle

OLD_NS = 10**18  # an mtime long ago (2001)


def test_a_file_settles_only_after_a_window_without_change(tmp_path: Path) -> None:
    path = tmp_path / "frame.png"
    check = Settle.of([path], window=1.0, deadline=100.0)
    assert check.poll(0.0)[0] == "waiting"  # missing
    path.write_bytes(b"half")
    verdict, delay = check.poll(0.5)
    assert verdict == "waiting" and delay == 1.0  # first sight: one window from now
    with path.open("ab") as fh:
        fh.write(b" and the rest")
    os.utime(path, ns=(OLD_NS, OLD_NS))  # a different mtime, as a writer would leave
    assert check.poll(1.6)[0] == "waiting"  # changed: the window starts again
    verdict, delay = check.poll(2.0)
    assert verdict == "waiting" and abs(delay - 0.6) < 1e-9
    assert check.poll(2.6) == ("settled", 0.0)


def test_a_writer_pausing_one_window_is_not_taken_for_finished(tmp_path: Path) -> None:
    """mtime must be a quarter window older than one window: the chunk written right after the pause is seen."""
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"first chunk")
    written = os.stat(path).st_mtime_ns / 1e9
    wall = [written]
    check = Settle.of([path], window=1.0, deadline=100.0)
    check.wall = lambda: wall[0]
    assert check.poll(0.0)[0] == "waiting"
    wall[0] = written + 1.0
    verdict, delay = check.poll(1.0)  # one window later, unchanged: not yet, the next chunk may be due
    assert verdict == "waiting" and abs(delay - 0.25) < 1e-6
    wall[0] = written + 1.25
    assert check.poll(1.25) == ("settled", 0.0)
    # A file server's clock far ahead: never more than two windows of observed stability.
    ahead = Settle.of([path], window=1.0, deadline=100.0)
    ahead.wall = lambda: written - 3600
    ahead.poll(0.0)
    assert ahead.poll(1.5)[0] == "waiting" and ahead.poll(2.0)[0] == "settled"


def test_unsettled_files_time_out_at_the_deadline(tmp_path: Path) -> None:
    present, missing = tmp_path / "a.png", tmp_path / "b.png"
    present.write_bytes(b"x")
    os.utime(present, ns=(OLD_NS, OLD_NS))
    check = Settle.of([present, missing, missing], window=0.5, deadline=3.0)
    assert check.poll(0.0)[0] == "waiting"
    assert check.poll(0.6)[0] == "waiting"  # a.png settled, b.png still missing
    assert check.pending() == [missing]
    assert check.poll(3.0) == ("timeout", 0.0)


def test_settle_window_is_a_fractional_policy_knob() -> None:
    policy, notes = policy_from_env({"RUN_TELEMETRY_OUTPUT_SETTLE_SECONDS": "0.25"})
    assert policy.output_settle_seconds == 0.25 and notes == []
    assert QueuePolicy().output_settle_seconds == 1.0
    bad, notes = policy_from_env({"RUN_TELEMETRY_OUTPUT_SETTLE_SECONDS": "-1"})
    assert bad.output_settle_seconds == 1.0 and "RUN_TELEMETRY_OUTPUT_SETTLE_SECONDS" in notes[0]
    over, notes = apply_overrides(QueuePolicy(), {"output_settle_seconds": 2.5})
    assert over.output_settle_seconds == 2.5 and notes == []
    whole, notes = apply_overrides(QueuePolicy(), {"scene_retry_budget": 1.5})
    assert whole.scene_retry_budget == 1 and "whole number" in notes[0]


def test_a_later_clear_waits_for_the_earlier_write() -> None:
    order, events = PrefixOrder(), []
    assert order.claim("P", "A", lambda: events.append("clear A")) is True
    assert order.claim("P", "B", lambda: events.append("clear B")) is False  # A has not written yet
    assert events == ["clear A"]
    order.ended("A")
    assert order.must_wait("P", "B") is True and order.must_wait("P", "A") is False
    order.write("P", "A", lambda: events.append("write A"))
    assert events == ["clear A", "write A", "clear B"]
    assert order.must_wait("P", "B") is False
    order.write("P", "B", lambda: events.append("write B"))
    assert events[-1] == "write B" and order.open_claims() == 0


def test_a_prompt_that_writes_first_drops_its_own_pending_clear() -> None:
    """B (queued at the front) ends before A ran: B writes, and A's later write is not followed by B's clear."""
    order, events = PrefixOrder(), []
    order.claim("P", "A", lambda: events.append("clear A"))
    order.claim("P", "B", lambda: events.append("clear B"))
    order.ended("B")
    assert order.must_wait("P", "B") is False  # A has not ended: B does not wait for a prompt still queued
    order.write("P", "B", lambda: events.append("write B"))
    order.write("P", "A", lambda: events.append("write A"))
    assert events == ["clear A", "write B", "write A"]


def test_release_runs_the_clears_now_due_and_order_is_kept_across_threads() -> None:
    order, events, lock = PrefixOrder(), [], threading.Lock()

    def log(what: str) -> None:
        with lock:
            events.append(what)

    for pid in ("A", "B", "C"):
        order.claim("P", pid, lambda pid=pid: log(f"clear {pid}"))
    releaser = threading.Thread(target=order.release, args=("A",))
    releaser.start()
    releaser.join()
    assert events == ["clear A", "clear B"]
    order.release("B")
    order.release("C")
    assert events == ["clear A", "clear B", "clear C"] and order.open_claims() == 0
