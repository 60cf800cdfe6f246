"""The writer thread: order, delayed jobs, flush, a failing job."""

from __future__ import annotations

import threading
import time

from telemetry.writer import Writer


def test_jobs_run_in_order_on_one_thread() -> None:
    w = Writer()
    seen: list[tuple[int, str]] = []
    for i in range(200):
        w.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    assert w.flush(10)
    assert [i for i, _ in seen] == list(range(200))
    assert {name for _, name in seen} == {"run-telemetry-writer"}
    w.stop()


def test_a_failing_job_does_not_stop_later_ones() -> None:
    w = Writer()
    seen: list[int] = []

    def boom() -> None:
        raise OSError("disk full")

    w.submit(boom)
    w.submit(lambda: seen.append(1))
    assert w.flush(10) and seen == [1]
    w.stop()


def test_a_delayed_job_waits_for_its_time_while_others_run() -> None:
    w = Writer()
    ran = threading.Event()
    order: list[str] = []
    t0 = time.monotonic()
    w.submit_after(0.2, lambda: (order.append("later"), ran.set()))
    w.submit(lambda: order.append("now"))
    assert ran.wait(10)
    assert time.monotonic() - t0 >= 0.2
    assert order == ["now", "later"]
    w.stop()


def test_flush_and_stop_run_delayed_jobs_at_once() -> None:
    w = Writer()
    order: list[str] = []
    w.submit_after(3600, lambda: order.append("b"))
    w.submit_after(1800, lambda: order.append("a"))
    w.submit(lambda: order.append("now"))
    assert w.flush(10)
    assert order == ["now", "a", "b"]  # due order, not submission order
    w.submit_after(3600, lambda: order.append("at stop"))
    w.stop()
    assert order[-1] == "at stop"


def test_delayed_jobs_keep_due_order_among_themselves() -> None:
    now = [0.0]
    w = Writer(clock=lambda: now[0])
    order: list[int] = []
    for i, delay in enumerate([5.0, 1.0, 3.0, 1.0]):
        w.submit_after(delay, lambda i=i: order.append(i))
    assert w.flush(10)
    assert order == [1, 3, 2, 0]  # equal times keep submission order
    w.stop()
