"""Webhooks from a real ComfyUI to real receivers on 127.0.0.1: signed, retried with one delivery id, never in the
way of prompts or markers, kept across a restart, bounded when a receiver never answers."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import psutil
import pytest

from harness.comfy import ComfyServer, free_port, wait_until
from telemetry.webhooks import verify
from telemetry.webhooks.events import schema_path
from tests.comfy import workflows as wf
from tests.conftest import PACKAGE_FOLDER, VERSIONS, make_server
from tests.receiver import Received, Receiver
from tests.reliability.helpers import package_tracebacks, wait_record

pytestmark = pytest.mark.comfy

SECRET = "env-secret-7f3a"
RUN_SECRET = "run-secret-91c2"


def uniq(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def ended(receiver: Receiver, prompt_id: str) -> list[Received]:
    """Requests of ``prompt.ended`` for ``prompt_id``."""
    return [r for r in receiver.events("prompt.ended") if r.json()["Data"]["PromptId"] == prompt_id]


def wait_ended(receiver: Receiver, prompt_id: str, *, answered: int | None = None, timeout: float = 60) -> Received:
    """The first ``prompt.ended`` request for the prompt (answered with ``answered``, if given)."""
    found: list[Received] = []

    def arrived() -> bool:
        found[:] = [r for r in ended(receiver, prompt_id) if answered is None or r.answered == answered]
        return bool(found)

    wait_until(arrived, timeout, what=f"prompt.ended of {prompt_id} at the receiver")
    return found[0]


def threads_of(pid: int) -> int:
    """Threads of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to ``port`` on 127.0.0.1."""
    conns = psutil.Process(pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"comfyui-{v}" for v in VERSIONS])
def hooked(request: pytest.FixtureRequest) -> Iterator[tuple[ComfyServer, Receiver]]:
    """ComfyUI with one good webhook URL (its own receiver), one bad one and an unknown event name."""
    receiver = Receiver().start()
    s = make_server(
        request.param,
        env={
            "RUN_TELEMETRY_WEBHOOK_URL": f"{receiver.url}, ftp://files.example/drop",
            "RUN_TELEMETRY_WEBHOOK_SECRET": SECRET,
            "RUN_TELEMETRY_WEBHOOK_EVENTS": "prompt.ended,run.finalized,health.changed,prompt.done",
            "RUN_TELEMETRY_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
            "RUN_TELEMETRY_WEBHOOK_TIMEOUT_SECONDS": "3",
            # No disk has 100 TB free: the health report's free_disk check is degraded from the start.
            "RUN_TELEMETRY_MIN_FREE_MB": "100000000",
        },
    )
    s.start()
    yield s, receiver
    s.stop()
    receiver.stop()
    assert package_tracebacks(s.log_text(), PACKAGE_FOLDER) == []
    if not os.environ.get("RT_KEEP_SERVERS"):
        shutil.rmtree(s.base_dir, ignore_errors=True)


@pytest.fixture
def server(hooked: tuple[ComfyServer, Receiver]) -> ComfyServer:
    return hooked[0]


@pytest.fixture
def receiver(hooked: tuple[ComfyServer, Receiver]) -> Iterator[Receiver]:
    """The server's environment receiver, answering 200 unless the test changes ``behaviour``."""
    hooked[1].behaviour = lambda _id, _n: (200, {})
    yield hooked[1]
    hooked[1].behaviour = lambda _id, _n: (200, {})


def test_bad_environment_is_noted_and_the_secret_never_shown(server: ComfyServer, receiver: Receiver) -> None:
    notes = server.get("/telemetry")["FallbackNotes"]
    assert any("'ftp://files.example/drop' is not an http(s) URL" in n for n in notes), notes
    assert any("'prompt.done'" in n and "RUN_TELEMETRY_WEBHOOK_EVENTS" in n for n in notes), notes
    status = server.get("/telemetry/webhooks")
    (endpoint,) = status["Config"]["Endpoints"]
    assert endpoint == {
        "Url": receiver.url,
        "Events": ["health.changed", "prompt.ended", "run.finalized"],
        "Signed": True,
        "Source": "environment",
    }
    for path in ("/telemetry/webhooks", "/telemetry", "/telemetry/openapi.json"):
        assert SECRET not in json.dumps(server.get(path))
    assert SECRET not in server.log_text()
    assert "/telemetry/webhooks" in server.get("/telemetry/openapi.json")["paths"]


def test_the_health_report_is_announced_as_health_changed(server: ComfyServer, receiver: Receiver) -> None:
    report = server.get("/telemetry/health")
    assert report["Status"] == "degraded", report
    wait_until(lambda: receiver.events("health.changed"), 60, what="health.changed at the receiver")
    # The first change is the first report (this one or a prompt's); a loaded machine may add later ones.
    req = receiver.events("health.changed")[0]
    assert verify(SECRET, req.body, req.headers["X-Run-Telemetry-Signature"])
    body = req.json()
    jsonschema.validate(body, json.loads(schema_path("health.changed").read_text()))
    data = body["Data"]
    assert data["State"] == "degraded" and data["Previous"] is None
    assert any(r.startswith("free_disk: ") and "under 100000000 MiB" in r for r in data["Reasons"]), data["Reasons"]
    assert {c["Name"] for c in data["Checks"]} == {c["Name"] for c in report["Checks"]}


def test_prompt_ended_is_signed_and_names_the_written_marker(server: ComfyServer, receiver: Receiver) -> None:
    prefix = uniq("hook") + "/frame"
    pid = server.queue(wf.frames(prefix, count=2, size=8), extra_data={"telemetry": {"run_id": uniq("r")}})
    rec = wait_record(server, pid)
    req = wait_ended(receiver, pid)
    assert req.headers["X-Run-Telemetry-Signature"].startswith("sha256=")
    assert verify(SECRET, req.body, req.headers["X-Run-Telemetry-Signature"])
    assert not verify(RUN_SECRET, req.body, req.headers["X-Run-Telemetry-Signature"])
    body = req.json()
    jsonschema.validate(body, json.loads(schema_path("prompt.ended").read_text()))
    data = body["Data"]
    assert data["Outcome"] == "success" and data["RunId"] == rec["RunId"]
    assert data["DurationSeconds"] == rec["DurationSeconds"]
    (marker,) = data["Markers"]
    assert marker["State"] == "written" and marker["Path"] == rec["Markers"][0]["Path"]
    assert Path(marker["Path"]).is_file()  # the marker was on disk before the notice went out
    assert int(req.headers["X-Run-Telemetry-Timestamp"]) > 0


def test_failed_prompt_carries_its_error(server: ComfyServer, receiver: Receiver) -> None:
    pid = server.queue(wf.with_raise(wf.frames(uniq("boom") + "/frame", count=1, size=8), "paint ran out"))
    wait_record(server, pid)
    data = wait_ended(receiver, pid).json()["Data"]
    assert data["Outcome"] == "error"
    assert data["Error"]["NodeType"] == "RTTestRaise" and "paint ran out" in data["Error"]["Message"]
    assert data["Markers"][0]["State"] == "failed" and data["Markers"][0]["Path"].endswith(".failed")


def test_a_receiver_answering_500_twice_gets_the_same_delivery_three_times(
    server: ComfyServer, receiver: Receiver
) -> None:
    receiver.behaviour = lambda _id, n: (500, {}) if n <= 2 else (200, {})
    before = server.get("/telemetry/webhooks")
    pid = server.queue(wf.frames(uniq("retry") + "/frame", count=1, size=8))
    wait_record(server, pid)
    wait_ended(receiver, pid, answered=200)
    tries = ended(receiver, pid)
    assert [r.answered for r in tries] == [500, 500, 200]
    assert len({r.delivery_id for r in tries}) == 1
    assert len({r.body for r in tries}) == 1
    assert all(verify(SECRET, r.body, r.headers["X-Run-Telemetry-Signature"]) for r in tries)
    after = server.get("/telemetry/webhooks")
    (ep,) = [e for e in after["Endpoints"] if e["Source"] == "environment"]
    (ep_before,) = [e for e in before["Endpoints"] if e["Source"] == "environment"]
    assert ep["FailedTries"] - ep_before["FailedTries"] == 2 and ep["LastError"] == "HTTP 500"
    metrics = server.request("GET", "/telemetry/metrics")[1]
    assert 'comfyui_telemetry_webhook_failed_tries_total{event="prompt.ended",reason="http_5xx"}' in metrics


def test_run_webhook_gets_its_prompts_and_the_finalize_and_its_secret_stays_hidden(
    server: ComfyServer, receiver: Receiver
) -> None:
    mine = Receiver().start()
    try:
        run = uniq("run")
        tags = {
            "run_id": run,
            "scene_id": "1",
            "webhook": {"url": mine.url, "secret": RUN_SECRET, "events": ["prompt.ended", "run.finalized"]},
        }
        pid = server.queue(wf.frames(uniq("runhook") + "/frame", count=1, size=8), extra_data={"telemetry": tags})
        wait_record(server, pid)
        req = wait_ended(mine, pid)
        assert verify(RUN_SECRET, req.body, req.headers["X-Run-Telemetry-Signature"])
        wait_ended(receiver, pid)  # the environment's receiver gets it too
        status, result = server.request("POST", f"/telemetry/runs/{run}/finalize")
        assert status == 200, result
        wait_until(lambda: mine.events("run.finalized"), 60, what="run.finalized at the run's receiver")
        (fin,) = mine.events("run.finalized")
        assert verify(RUN_SECRET, fin.body, fin.headers["X-Run-Telemetry-Signature"])
        assert fin.json()["Data"] == result
        wait_until(
            lambda: any(r.json()["Data"]["RunId"] == run for r in receiver.events("run.finalized")),
            60,
            what="run.finalized at the environment's receiver",
        )
        # The run's secret went nowhere ComfyUI or the package shows.
        for path in (f"/history/{pid}", f"/telemetry/prompts/{pid}", "/telemetry/webhooks", "/telemetry", "/queue"):
            text = json.dumps(server.get(path))
            assert RUN_SECRET not in text, path
        assert RUN_SECRET not in server.log_text()
        shown = [e for e in server.get("/telemetry/webhooks")["Endpoints"] if e["Url"] == mine.url]
        assert shown and shown[0]["Source"] == "run" and shown[0]["Delivered"] == 2
    finally:
        mine.stop()


def test_a_retried_scene_reaches_the_run_webhook_once_per_attempt(server: ComfyServer) -> None:
    mine = Receiver().start()
    try:
        run = uniq("retried")
        tags = {"run_id": run, "scene_id": "1", "webhook": {"url": mine.url, "secret": RUN_SECRET}}
        first = server.queue(
            wf.with_raise(wf.frames(uniq("again") + "/frame", count=1, size=8), "flaky"), extra_data={"telemetry": tags}
        )
        rec = wait_record(server, first)
        assert rec["RetriedBy"], rec  # the default budget requeues once
        second = wait_record(server, rec["RetriedBy"])
        a, b = wait_ended(mine, first), wait_ended(mine, second["PromptId"])
        assert a.json()["Data"]["RetriedBy"] == second["PromptId"]
        assert b.json()["Data"]["Attempt"] == 2 and b.json()["Data"]["RetryOf"] == first
        for req in (a, b):
            assert verify(RUN_SECRET, req.body, req.headers["X-Run-Telemetry-Signature"])
        assert len(mine.events("prompt.ended")) == 2  # one delivery per attempt, no unsigned twin
    finally:
        mine.stop()


def test_a_prompt_cancelled_in_the_queue_is_announced(server: ComfyServer, receiver: Receiver, tmp_path: Path) -> None:
    started = tmp_path / "started"
    blocker = server.queue(
        wf.with_sleep(wf.frames(uniq("blocker"), count=1, size=8, marker=False), 120, started_file=str(started))
    )
    wait_until(started.exists, 60, what="the blocking prompt to start", interval=0.02)
    try:
        hook = {"webhook": {"url": receiver.url, "secret": RUN_SECRET}}
        pid = server.queue(wf.frames(uniq("cancel") + "/frame", count=1, size=8), extra_data={"telemetry": hook})
        queued = server.get(f"/telemetry/prompts/{pid}")
        assert queued["Outcome"] == "queued"
        assert "webhook" not in queued.get("Tags", {}) and RUN_SECRET not in json.dumps(queued)
        server.request("POST", "/queue", {"delete": [pid]})
        data = wait_ended(receiver, pid).json()["Data"]
        assert data["Outcome"] == "cancelled"
        # Once per receiver: the run's URL is the environment's here, each with its own secret.
        signatures = {r.headers["X-Run-Telemetry-Signature"]: r for r in ended(receiver, pid)}
        assert {verify(RUN_SECRET, r.body, sig) or verify(SECRET, r.body, sig) for sig, r in signatures.items()} == {
            True
        }
    finally:
        server.interrupt()
        wait_record(server, blocker)


@pytest.mark.parametrize(
    ("hook", "parameter"),
    [
        ({"url": "ftp://x.example/in"}, "extra_data.telemetry.webhook.url"),
        ({"url": "http://127.0.0.1:9/in", "events": ["prompt.started"]}, "extra_data.telemetry.webhook.events"),
        ({"url": "http://127.0.0.1:9/in", "secret": 42}, "extra_data.telemetry.webhook.secret"),
        # A lone surrogate has no UTF-8 bytes to sign with (was: accepted, then the run's deliveries lost silently).
        ({"url": "http://127.0.0.1:9/in", "secret": "key\ud800"}, "extra_data.telemetry.webhook.secret"),
        ("http://127.0.0.1:9/in", "extra_data.telemetry.webhook"),
    ],
)
def test_bad_run_webhook_is_refused_naming_the_field(server: ComfyServer, hook: Any, parameter: str) -> None:
    body = {
        "prompt": wf.frames(uniq("bad") + "/frame", count=1, size=8),
        "extra_data": {"telemetry": {"webhook": hook}},
    }
    status, answer = server.request("POST", "/prompt", body)
    assert status == 400, answer
    assert answer["error"]["parameter"] == parameter, answer
    assert "42" not in answer["error"]["message"] or parameter.endswith("secret")


def test_a_run_webhook_urls_credentials_stay_out_of_comfyuis_queue_and_history(server: ComfyServer) -> None:
    """A run webhook URL with user info and a query token: the receiver is called with them (Basic auth from the user
    info), and neither appears in ComfyUI's /queue or /history nor in the package's routes. (Before: the URL stayed in
    extra_data as given, so any client of ComfyUI read the credentials in /history.)"""
    import base64

    mine = Receiver().start()
    try:
        url = mine.url.replace("http://", "http://hookuser:pa55-tok3n@") + "?key=qu3ry-tok3n"
        hook = {"url": url, "events": ["prompt.ended"]}
        blocker = server.queue(wf.with_sleep(wf.frames(uniq("hold") + "/frame", count=1, size=8), 2))
        pid = server.queue(
            wf.frames(uniq("cred") + "/frame", count=1, size=8), extra_data={"telemetry": {"webhook": hook}}
        )
        queued = json.dumps(server.get("/queue"))
        wait_record(server, blocker)
        wait_record(server, pid)
        req = wait_ended(mine, pid)
        assert req.headers["Authorization"] == "Basic " + base64.b64encode(b"hookuser:pa55-tok3n").decode()
        shown = [queued] + [
            json.dumps(server.get(p)) for p in (f"/history/{pid}", f"/telemetry/prompts/{pid}", "/telemetry/webhooks")
        ]
        for text in shown:
            assert "pa55-tok3n" not in text and "qu3ry-tok3n" not in text, text[:2000]
    finally:
        mine.stop()


def test_a_run_webhook_aimed_at_this_comfyui_is_refused(server: ComfyServer) -> None:
    """A run webhook whose URL is this ComfyUI (its port on a loopback or its own address, with or without /api) is
    refused with 400 naming the URL. (Before: accepted, and each of the run's prompt.ended POSTed to ComfyUI's own
    /interrupt, interrupting whatever prompt ran next, another client's included.)"""
    port = int(server.url.rsplit(":", 1)[1])
    for url in (f"http://127.0.0.1:{port}/interrupt", f"http://localhost:{port}/api/interrupt", f"{server.url}/queue"):
        body = {
            "prompt": wf.frames(uniq("self") + "/frame", count=1, size=8),
            "extra_data": {"telemetry": {"run_id": uniq("r"), "webhook": {"url": url}}},
        }
        status, answer = server.request("POST", "/prompt", body)
        if status == 200:  # show what the worker then does to the next prompt, another client's, queued behind it
            victim = server.queue(wf.with_sleep(wf.frames(uniq("victim") + "/frame", count=1, size=8), 3))
            outcome = wait_record(server, victim)["Outcome"]
            assert outcome == "success", f"a run webhook to {url} made ComfyUI's prompt end {outcome!r}"
        assert status == 400, (url, answer)
        assert answer["error"]["parameter"] == "extra_data.telemetry.webhook.url", answer
        assert "this ComfyUI" in answer["error"]["message"], answer


def test_a_receiver_sleeping_10_s_does_not_delay_done_markers(server: ComfyServer) -> None:
    # A first prompt on a fresh server takes 1-3 s from execution_success to its marker with or without webhooks
    # (warm-up on this shared 2-core machine): not what this test measures.
    wait_record(server, server.queue(wf.frames(uniq("warm") + "/frame", count=1, size=8)))
    slow = Receiver(sleep=10.0).start()
    try:
        prefixes = [uniq("slow") + "/frame" for _ in range(4)]
        hook = {"webhook": {"url": slow.url}}
        ids = [server.queue(wf.frames(p, count=1, size=8), extra_data={"telemetry": hook}) for p in prefixes]
        records = [wait_record(server, pid) for pid in ids]
        # Every marker is on disk and every record final while the receiver still holds the first notices.
        assert all((server.output_dir / f"{p}.done").is_file() for p in prefixes)
        wait_until(lambda: len(slow.requests) >= 1, 30, what="the slow receiver's first request")
        assert any(r.answered is None for r in slow.requests), "a notice came back before the markers were checked"
        waits = [r["Markers"][0]["WaitSeconds"] for r in records]
        print(f"marker waits with a 10 s receiver: {waits}")
        assert max(waits) < 5.0, waits  # execution_success -> .done: had it waited on a notice, >= 10 s
    finally:
        slow.stop()


# --- restart and a receiver that never answers: a server of their own --------------------------------------------


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"comfyui-{v}" for v in VERSIONS])
def lone(request: pytest.FixtureRequest) -> Iterator[tuple[ComfyServer, int]]:
    """ComfyUI whose environment's receiver is not listening yet (its port is returned), with a small outbox."""
    port = free_port()
    s = make_server(
        request.param,
        env={
            "RUN_TELEMETRY_WEBHOOK_URL": f"http://127.0.0.1:{port}/hook",
            "RUN_TELEMETRY_WEBHOOK_SECRET": SECRET,
            "RUN_TELEMETRY_WEBHOOK_EVENTS": "prompt.ended",  # one notice per prompt, nothing else in the outbox
            "RUN_TELEMETRY_WEBHOOK_RETRY_BASE_SECONDS": "0.5",
            "RUN_TELEMETRY_WEBHOOK_TIMEOUT_SECONDS": "2",
            "RUN_TELEMETRY_WEBHOOK_OUTBOX_MAX": "20",
        },
    )
    s.start()
    yield s, port
    s.stop()
    assert package_tracebacks(s.log_text(), PACKAGE_FOLDER) == []
    if not os.environ.get("RT_KEEP_SERVERS"):
        shutil.rmtree(s.base_dir, ignore_errors=True)


def outbox_rows(server: ComfyServer) -> list[tuple[str, str, int]]:
    """(delivery id, state, attempts) of every outbox row, read-only from the store."""
    db = server.user_dir / "telemetry" / "telemetry.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute("SELECT delivery_id, state, attempts FROM webhook_outbox").fetchall()


@pytest.mark.parametrize("stop", ["sigterm", "kill9"])
def test_a_delivery_pending_at_stop_arrives_after_the_next_start(lone: tuple[ComfyServer, int], stop: str) -> None:
    server, port = lone
    pid = server.queue(wf.frames(uniq("restart") + "/frame", count=1, size=8))
    wait_record(server, pid)
    wait_until(lambda: server.get("/telemetry/webhooks")["Endpoints"][0]["FailedTries"] >= 1, 60, what="a refused try")
    assert server.get("/telemetry/webhooks")["Pending"] == 1
    summary = server.get("/telemetry")["Webhooks"]
    assert summary["Pending"] == 1 and summary["Failing"][0]["LastError"]
    if stop == "sigterm":
        server.stop()  # by pid: SIGTERM, as a service manager stops it
    else:
        server.kill9()  # by pid: SIGKILL, as a crash or the OOM killer does
    ((delivery_id, state, attempts),) = outbox_rows(server)
    assert state == "pending" and attempts >= 1
    receiver = Receiver(port=port).start()
    try:
        server.start()
        req = wait_ended(receiver, pid, timeout=120)
        assert req.delivery_id == delivery_id
        assert verify(SECRET, req.body, req.headers["X-Run-Telemetry-Signature"])
        wait_until(lambda: server.get("/telemetry/webhooks")["Delivered"] == 1, 30, what="the delivered count")
        assert outbox_rows(server) == []
        assert len(ended(receiver, pid)) == 1
    finally:
        receiver.stop()


def test_a_receiver_that_never_answers_leaves_threads_and_outbox_bounded(lone: tuple[ComfyServer, int]) -> None:
    server, _ = lone
    silent = Receiver(behaviour=lambda _id, _n: None).start()
    try:
        hook = {"webhook": {"url": silent.url}}
        pid0 = server.queue(wf.frames(uniq("silent") + "/frame", count=1, size=8), extra_data={"telemetry": hook})
        wait_record(server, pid0)
        wait_until(lambda: silent.requests, 30, what="the first request at the silent receiver")
        pid = server.proc.pid
        threads_before, rss_before = threads_of(pid), rss_mb(pid)
        sockets: list[int] = []
        figures = []
        for round_ in range(3):
            ids = [
                server.queue(wf.frames(uniq("silent") + "/frame", count=1, size=8), extra_data={"telemetry": hook})
                for _ in range(30)
            ]
            for prompt_id in ids:
                wait_record(server, prompt_id)
                sockets.append(connections_to(pid, silent.port))
            mine = [e for e in server.get("/telemetry/webhooks")["Endpoints"] if e["Url"] == silent.url][0]
            figures.append((round_, threads_of(pid), round(rss_mb(pid), 1), mine["Pending"], mine["GivenUp"]))
            assert mine["Pending"] <= 20, mine
            assert server.get("/telemetry/webhooks")["Pending"] <= 20
        print(
            f"threads before {threads_before}, RSS before {rss_before:.1f} MB; (round, threads, RSS, pending, given up): {figures}; connections at most {max(sockets)}"
        )
        assert all(f[1] <= threads_before + 2 for f in figures), (threads_before, figures)
        assert figures[-1][2] - figures[0][2] < 30, figures  # MB over 60 prompts in steady state (no leak per try)
        assert figures[-1][4] >= 90 - 20  # the oldest were given up to keep the bound
        # ComfyUI's open connections to the receiver, sampled after every prompt (the receiver's own count lags
        # when a given-up try is cancelled and the next one connects at once).
        assert max(sockets) <= 4 and max(sockets) >= 1, sockets
        notes = server.get("/telemetry")["FallbackNotes"]
        assert any("webhook outbox full (20 pending)" in n for n in notes), notes
        assert len([r for r in outbox_rows(server) if r[1] == "pending"]) <= 20
    finally:
        silent.stop()
