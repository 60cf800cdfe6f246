"""Webhooks without ComfyUI: config, schedule, bodies, and the delivery service against a real receiver on 127.0.0.1."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web

from harness.comfy import free_port, wait_until
from telemetry.records import MarkerState, PromptError, PromptRecord
from telemetry.store import Store
from telemetry.webhooks import (
    RunTargets,
    WebhookService,
    config_from_env,
    prompt_ended_data,
    run_webhook_problem,
    verify,
)
from telemetry.webhooks.config import RetryPolicy, WebhookConfig
from telemetry.webhooks.events import EVENT_MODELS, event_body, event_schema_drift, schema_path, sign
from telemetry.webhooks.outbox import parse_retry_after, retry_delay
from tests.pkg import sub
from tests.receiver import Receiver

SECRET = "s3cret-\u00e9"


def record(prompt_id: str = "p1", outcome: str = "success") -> PromptRecord:
    rec = PromptRecord(PromptId=prompt_id, RunId="run-1", SceneId="2", Outcome=outcome, DurationSeconds=1.5)
    rec.EndedAt = "2026-11-29T18:00:00.000Z"
    rec.Markers = [MarkerState(NodeId="4", Prefix="a/frame", State="written", Path="/out/a/frame.done")]
    if outcome != "success":
        rec.Error = PromptError(NodeId="3", NodeType="RTTestRaise", ExceptionType="RuntimeError", Message="boom")
    return rec


def config(url: str, **kw: Any) -> WebhookConfig:
    env = {"RUN_TELEMETRY_WEBHOOK_URL": url, "RUN_TELEMETRY_WEBHOOK_SECRET": SECRET}
    env.update(kw)
    cfg, notes = config_from_env(env)
    assert notes == []
    return cfg


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
def services() -> Iterator[list[WebhookService]]:
    made: list[WebhookService] = []
    yield made
    for s in made:
        s.stop()


def service(made: list[WebhookService], cfg: WebhookConfig, store: Any = None) -> WebhookService:
    s = WebhookService(cfg, store, version="test")
    s.start(wait=10)
    made.append(s)
    return s


# --- configuration ----------------------------------------------------------------------------------------------


def test_env_config_drops_bad_entries_with_notes_and_never_shows_the_secret() -> None:
    cfg, notes = config_from_env(
        {
            "RUN_TELEMETRY_WEBHOOK_URL": "ftp://files.example/x, https://user:pw@hooks.example/in?token=abc,http://",
            "RUN_TELEMETRY_WEBHOOK_SECRET": SECRET,
            "RUN_TELEMETRY_WEBHOOK_EVENTS": "prompt.ended,prompt.finished",
            "RUN_TELEMETRY_WEBHOOK_RETRY_BASE_SECONDS": "-1",
        }
    )
    assert [e.url for e in cfg.endpoints] == ["https://user:pw@hooks.example/in?token=abc"]
    assert cfg.endpoints[0].events == frozenset({"prompt.ended"})
    assert cfg.retry.base_seconds == 10.0
    text = "\n".join(notes)
    assert "'ftp://files.example/x' is not an http(s) URL" in text
    assert "'http://' has no host" in text
    assert "'prompt.finished'" in text and "RUN_TELEMETRY_WEBHOOK_EVENTS" in text
    assert "RUN_TELEMETRY_WEBHOOK_RETRY_BASE_SECONDS" in text
    view = json.dumps(cfg.view())
    assert SECRET not in view and "pw" not in view and "token" not in view
    assert cfg.view()["Endpoints"][0]["Url"] == "https://hooks.example/in?\u2026"
    assert cfg.view()["Endpoints"][0]["Signed"] is True


def test_env_without_secret_is_noted_and_without_url_is_silent() -> None:
    _, notes = config_from_env({"RUN_TELEMETRY_WEBHOOK_URL": "http://127.0.0.1:9/x"})
    assert any("RUN_TELEMETRY_WEBHOOK_SECRET is not set" in n for n in notes)
    cfg, notes = config_from_env({})
    assert cfg.endpoints == () and notes == []


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("http://x", "extra_data.telemetry.webhook"),
        ({"url": "gopher://x"}, "extra_data.telemetry.webhook.url"),
        ({}, "extra_data.telemetry.webhook.url"),
        ({"url": "http://x", "secret": ""}, "extra_data.telemetry.webhook.secret"),
        ({"url": "http://x", "events": "prompt.ended,health.changed"}, "extra_data.telemetry.webhook.events"),
        ({"url": "http://x", "sekret": "a"}, "extra_data.telemetry.webhook.sekret"),
    ],
)
def test_run_webhook_problems_name_the_field(raw: Any, field: str) -> None:
    problem = run_webhook_problem(raw)
    assert problem is not None and problem[0] == field, problem


def test_a_run_keeps_one_endpoint_per_url_and_its_secret() -> None:
    targets = RunTargets()
    targets.park_secret("p1", "k1")
    targets.register("p1", "run", {"url": "http://a/x, http://b/y"})
    targets.register("p2", "run", {"url": "http://a/x"})  # a later prompt of the run, no secret
    targets.register("p3", None, {"url": "http://c/z"})
    by_url = {e.url: e for e in targets.for_run("run")}
    assert sorted(by_url) == ["http://a/x", "http://b/y"] and by_url["http://a/x"].secret == "k1"
    assert targets.for_prompt("p2", "run") == targets.for_run("run")
    assert [e.url for e in targets.for_prompt("p3", None)] == ["http://c/z"]
    assert targets.for_prompt("p3", None)[0].secret is None and targets.for_run("other") == ()


def test_run_webhook_accepts_lists_and_comma_separated_text() -> None:
    assert run_webhook_problem({"url": ["http://a/x", "https://b/y"], "events": ["run.finalized"]}) is None
    assert run_webhook_problem({"url": "http://a/x, https://b/y", "secret": "k", "events": "prompt.ended"}) is None


# --- schedule ---------------------------------------------------------------------------------------------------


def test_default_schedule_is_at_least_8_tries_over_at_least_30_minutes() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts >= 8
    for seed in range(200):
        rng = random.Random(seed)
        waits = [retry_delay(policy, n, rng) for n in range(1, policy.max_attempts)]
        assert sum(waits) >= 30 * 60, (seed, waits)
        assert all(b > a / 2 for a, b in zip(waits, waits[1:], strict=False)), waits  # growing, jitter aside


def test_retry_after_is_honoured_and_capped() -> None:
    policy = RetryPolicy(base_seconds=0.01)
    rng = random.Random(1)
    assert retry_delay(policy, 1, rng, retry_after=120) >= 120
    assert retry_delay(policy, 1, rng, retry_after=10**9) == policy.max_delay_seconds
    now = time.time()
    assert parse_retry_after("7", now) == 7
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 60))
    assert 55 <= parse_retry_after(date, now) <= 61
    assert parse_retry_after("soon", now) is None


# --- bodies -----------------------------------------------------------------------------------------------------


def test_committed_event_schemas_match_the_models_and_accept_the_bodies() -> None:
    assert event_schema_drift() == []
    samples = {
        "prompt.ended": prompt_ended_data(record(outcome="error")),
        "run.finalized": {
            "RunId": "r",
            "RunDir": "/o/r",
            "MetadataPath": "/o/r/a.json",
            "SummaryPath": "/o/r/s.txt",
            "Valid": True,
            "Problems": [],
            "Scenes": 2,
        },
        "health.changed": {"State": "degraded", "Previous": "ok", "Reasons": ["store is memory-only"]},
    }
    for event in EVENT_MODELS:
        schema = json.loads(schema_path(event).read_text())
        body = json.loads(event_body(event, samples[event], version="t", occurred_at=time.time()))
        jsonschema.validate(body, schema)
        assert body["Event"] == event and body["Data"]


# --- the service against a real receiver ------------------------------------------------------------------------


def test_delivery_is_signed_and_carries_the_headers(receiver: Receiver, services: list, tmp_path: Path) -> None:
    store = Store(tmp_path / "t.sqlite3")
    svc = service(services, config(receiver.url), store)
    assert svc.emit("prompt.ended", prompt_ended_data(record())) == 1
    wait_until(lambda: svc.status()["Delivered"] == 1, 20, what="the delivery")
    (req,) = receiver.requests
    assert req.headers["Content-Type"] == "application/json"
    assert req.event == "prompt.ended"
    assert len(req.delivery_id) == 36
    assert abs(int(req.headers["X-Run-Telemetry-Timestamp"]) - time.time()) < 60
    assert verify(SECRET, req.body, req.headers["X-Run-Telemetry-Signature"])
    assert not verify("other", req.body, req.headers["X-Run-Telemetry-Signature"])
    body = req.json()
    assert body["Data"]["PromptId"] == "p1" and body["Data"]["Markers"][0]["Path"] == "/out/a/frame.done"
    assert store.outbox_pending(10) == []  # delivered rows leave the outbox


def test_500_twice_then_200_is_one_delivery_tried_three_times(services: list, tmp_path: Path) -> None:
    rec = Receiver(behaviour=lambda _id, n: (500, {}) if n <= 2 else (200, {})).start()
    try:
        svc = service(services, config(rec.url, RUN_TELEMETRY_WEBHOOK_RETRY_BASE_SECONDS="0.05"), Store(tmp_path / "t"))
        svc.emit("prompt.ended", prompt_ended_data(record()))
        wait_until(lambda: svc.status()["Delivered"] == 1, 20, what="the third try")
        ids = {r.delivery_id for r in rec.requests}
        assert len(rec.requests) == 3 and len(ids) == 1
        assert len({r.body for r in rec.requests}) == 1
        assert len({r.headers["X-Run-Telemetry-Signature"] for r in rec.requests}) == 1
        (ep,) = svc.status()["Endpoints"]
        assert ep["FailedTries"] == 2 and ep["LastError"] == "HTTP 500" and ep["Failing"] is False
    finally:
        rec.stop()


def test_4xx_is_given_up_at_once_and_shown(services: list) -> None:
    rec = Receiver(behaviour=lambda _id, _n: (410, {})).start()
    try:
        svc = service(services, config(rec.url, RUN_TELEMETRY_WEBHOOK_RETRY_BASE_SECONDS="0.05"))
        svc.emit("prompt.ended", prompt_ended_data(record()))
        wait_until(lambda: svc.status()["GivenUp"] == 1, 20, what="the delivery to be given up")
        status = svc.status()
        assert len(rec.requests) == 1
        assert (
            "HTTP 410" in status["RecentGivenUp"][0]["Reason"] and "not retried" in status["RecentGivenUp"][0]["Reason"]
        )
        assert status["Endpoints"][0]["Failing"] is True and svc.summary()["Failing"]
    finally:
        rec.stop()


def test_429_waits_for_retry_after(services: list) -> None:
    rec = Receiver(behaviour=lambda _id, n: (429, {"Retry-After": "1"}) if n == 1 else (204, {})).start()
    try:
        svc = service(services, config(rec.url, RUN_TELEMETRY_WEBHOOK_RETRY_BASE_SECONDS="0.01"))
        svc.emit("prompt.ended", prompt_ended_data(record()))
        wait_until(lambda: svc.status()["Delivered"] == 1, 20, what="the second try")
        first, second = rec.requests
        assert second.at - first.at >= 0.95
    finally:
        rec.stop()


def test_every_try_failing_gives_up_after_max_attempts(services: list) -> None:
    rec = Receiver(behaviour=lambda _id, _n: (503, {})).start()
    try:
        svc = service(services, config(rec.url, RUN_TELEMETRY_WEBHOOK_RETRY_BASE_SECONDS="0.002"))
        svc.emit("prompt.ended", prompt_ended_data(record()))
        wait_until(lambda: svc.status()["GivenUp"] == 1, 30, what="the delivery to be given up")
        assert len(rec.requests) == RetryPolicy().max_attempts
        assert "given up after 10 tries" in svc.status()["RecentGivenUp"][0]["Reason"]
    finally:
        rec.stop()


class BrokenStore(Store):
    """A store whose outbox writes fail, as a damaged or read-only database does."""

    def outbox_add(self, row: dict[str, Any]) -> None:
        raise sqlite3.OperationalError("attempt to write a readonly database")


def test_a_failing_store_keeps_the_delivery_in_memory_with_a_note(
    receiver: Receiver, services: list, tmp_path: Path
) -> None:
    notes: list[str] = []
    svc = WebhookService(config(receiver.url), BrokenStore(tmp_path / "t"), version="t", on_note=notes.append)
    services.append(svc)
    svc.emit("prompt.ended", prompt_ended_data(record()))
    wait_until(lambda: svc.status()["Delivered"] == 1, 20, what="the delivery")
    assert any("readonly database" in n and "kept in memory" in n for n in notes)
    assert svc.status()["Notes"] == notes


def test_outbox_is_bounded_oldest_given_up_first(services: list, tmp_path: Path) -> None:
    rec = Receiver(behaviour=lambda _id, _n: None).start()  # never answers
    try:
        cfg = config(rec.url, RUN_TELEMETRY_WEBHOOK_OUTBOX_MAX="5", RUN_TELEMETRY_WEBHOOK_TIMEOUT_SECONDS="60")
        store = Store(tmp_path / "t")
        svc = service(services, cfg, store)
        for i in range(20):
            svc.emit("prompt.ended", prompt_ended_data(record(f"p{i}")))
        wait_until(lambda: svc.status()["GivenUp"] == 15, 20, what="15 deliveries given up")
        status = svc.status()
        assert status["Pending"] == svc.pending_count() == 5
        assert len(store.outbox_pending(100)) == 5
        assert any("outbox full" in n for n in status["Notes"])
        wait_until(lambda: rec.max_in_flight == cfg.concurrency_per_endpoint, 20, what="connections")
        assert rec.max_in_flight == cfg.concurrency_per_endpoint  # never more connections than the bound
        kept = {json.loads(r["body"])["Data"]["PromptId"] for r in store.outbox_pending(100)}
        assert kept == {f"p{i}" for i in range(15, 20)}  # the newest stay
        for i in range(500):  # a flood: what the service holds stays bounded by the outbox, not by the events
            svc.emit("prompt.ended", prompt_ended_data(record(f"q{i}")))
        wait_until(lambda: svc.status()["GivenUp"] == 515, 30, what="the flood to be given up but 5")
        assert svc.pending_count() == 5
        wait_until(lambda: len(svc._tasks) <= 5, 10, what="the given-up deliveries' tasks to end")
        assert len(svc._heap) <= 2 * cfg.outbox_max + 64 and len(svc._sems) == 1
        assert rec.max_in_flight == cfg.concurrency_per_endpoint
    finally:
        rec.stop()


def test_a_pending_delivery_survives_a_restart(services: list, tmp_path: Path) -> None:
    port = free_port()
    cfg = config(f"http://127.0.0.1:{port}/hook", RUN_TELEMETRY_WEBHOOK_RETRY_BASE_SECONDS="0.2")
    first = service(services, cfg, Store(tmp_path / "t"))
    first.emit("prompt.ended", prompt_ended_data(record()))
    wait_until(lambda: first.status()["Endpoints"][0]["FailedTries"] >= 1, 20, what="a refused try")
    first.stop()
    (row,) = Store(tmp_path / "t").outbox_pending(10)
    rec = Receiver(port=port).start()
    try:
        second = service(services, cfg, Store(tmp_path / "t"))
        wait_until(lambda: second.status()["Delivered"] == 1, 20, what="the resumed delivery")
        assert [r.delivery_id for r in rec.requests] == [row["delivery_id"]]
        assert verify(SECRET, rec.requests[0].body, rec.requests[0].headers["X-Run-Telemetry-Signature"])
    finally:
        rec.stop()


def test_a_health_report_change_becomes_health_changed(receiver: Receiver, services: list) -> None:
    hooks = sub("hooks.webhooks")
    svc = service(services, config(receiver.url))

    class Rt:
        webhooks = svc

    report = {
        "Status": "degraded",
        "Checks": [
            {
                "Name": "store",
                "Status": "degraded",
                "Detail": "memory only: disk full",
                "Since": "2026-11-29T18:00:00Z",
            },
            {"Name": "prompt_worker", "Status": "ok", "Detail": "alive", "Since": None},
        ],
        "CheckedAt": "2026-11-29T18:00:01Z",
    }
    hooks.health_listener(Rt())({"Status": "ok", "Checks": []}, report)
    wait_until(lambda: receiver.events("health.changed"), 20, what="health.changed")
    (req,) = receiver.events("health.changed")
    body = req.json()
    jsonschema.validate(body, json.loads(schema_path("health.changed").read_text()))
    assert body["Data"]["State"] == "degraded" and body["Data"]["Previous"] == "ok"
    assert body["Data"]["Reasons"] == ["store: memory only: disk full"]
    assert [c["Name"] for c in body["Data"]["Checks"]] == ["store", "prompt_worker"]
    assert verify(SECRET, req.body, req.headers["X-Run-Telemetry-Signature"])


# --- the adapter and the route, on a bare aiohttp application ---------------------------------------------------


class Server:
    """What install_webhooks needs of ComfyUI's PromptServer: the submission-handler registry."""

    def __init__(self) -> None:
        self.handlers: list[Any] = []
        self.app = web.Application()  # install_webhooks adds its middleware (the self-URL check) here

    def add_on_prompt_handler(self, fn: Any) -> None:
        self.handlers.append(fn)


async def test_adapter_and_route_on_a_bare_app(aiohttp_client: Any, receiver: Receiver, tmp_path: Path) -> None:
    mine = Receiver().start()
    rt = sub("hooks.runtime").Runtime(
        user_dir=tmp_path,
        output_dir=lambda: tmp_path,
        snapshot=lambda: {},
        env={
            "RUN_TELEMETRY_WEBHOOK_URL": f"{receiver.url},ftp://x.example/in",
            "RUN_TELEMETRY_WEBHOOK_SECRET": SECRET,
            "RUN_TELEMETRY_WEBHOOK_EVENTS": "prompt.ended",  # not the health monitor's first report
        },
    )
    try:
        server = Server()
        sub("hooks.webhooks").install_webhooks(rt, server)
        routes = web.RouteTableDef()
        sub("server_routes").add_routes(routes, rt)
        app = web.Application()
        app.add_routes(routes)
        client = await aiohttp_client(app)
        assert any("ftp://x.example/in" in n for n in rt.notes)

        # The submission handler takes the run's secret out and fixes the prompt id it is parked under.
        body = {
            "prompt": {},
            "extra_data": {"telemetry": {"run_id": "r1", "webhook": {"url": mine.url, "secret": "run-key-5d1e"}}},
        }
        (handler,) = server.handlers
        body = handler(body)
        pid = body["prompt_id"]
        assert body["extra_data"]["telemetry"]["webhook"] == {"url": mine.url}
        rt.recorder.started(pid, {}, body["extra_data"])
        rt.recorder.ended(pid, [["execution_success", {"timestamp": time.time() * 1000}]], {"outputs": {}})
        assert rt.writer.flush(10)
        assert "webhook" not in rt.recorder.get(pid).Tags  # never stored nor served

        wait_until(lambda: mine.events("prompt.ended") and receiver.events("prompt.ended"), 20, what="both notices")
        (run_req,) = mine.events("prompt.ended")
        assert verify("run-key-5d1e", run_req.body, run_req.headers["X-Run-Telemetry-Signature"])
        (env_req,) = receiver.events("prompt.ended")
        assert verify(SECRET, env_req.body, env_req.headers["X-Run-Telemetry-Signature"])
        assert env_req.body == run_req.body and env_req.delivery_id != run_req.delivery_id

        resp = await client.get("/telemetry/webhooks")
        assert resp.status == 200
        text = await resp.text()
        assert SECRET not in text and "run-key-5d1e" not in text
        status = json.loads(text)
        wait_until(
            lambda: rt.webhooks.status()["Delivered"] == 2 and rt.webhooks.status()["Pending"] == 0,
            20,
            what="both delivered and none pending",
        )
        summary = json.loads(await (await client.get("/telemetry")).text())["Webhooks"]
        assert summary == {"Delivered": 2, "Pending": 0, "GivenUp": 0, "Failing": []}
        assert [e["Source"] for e in status["Config"]["Endpoints"]] == ["environment"]
    finally:
        rt.webhooks.stop()
        rt.writer.stop()
        mine.stop()


def test_an_environment_secret_of_non_utf8_bytes_signs_with_those_bytes() -> None:
    # Python keeps an environment's non-UTF-8 bytes as surrogate escapes; signing used to raise on them, losing the
    # event for every endpoint after the first. The receiver's copy of the variable holds the raw bytes.
    import hashlib
    import hmac
    import os

    secret = os.fsdecode(b"cl\xe9-latin1")
    config, _ = config_from_env(
        {"RUN_TELEMETRY_WEBHOOK_URL": "http://127.0.0.1:9/in", "RUN_TELEMETRY_WEBHOOK_SECRET": secret}
    )
    (endpoint,) = config.endpoints
    body = b'{"Event":"prompt.ended"}'
    expected = "sha256=" + hmac.new(b"cl\xe9-latin1", body, hashlib.sha256).hexdigest()
    assert sign(endpoint.secret, body) == expected
    assert sign("clé", body) == "sha256=" + hmac.new("clé".encode(), body, hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    ("url", "is_self"),
    [
        ("http://127.0.0.1:8188/interrupt", True),
        ("http://127.9.9.9:8188/x", True),
        ("http://[::1]:8188/api/interrupt", True),
        ("http://0.0.0.0:8188/queue", True),
        ("http://LOCALHOST.:8188/x", True),
        ("http://gpu-box:8188/x", True),  # the Host header the request came with
        ("http://127.0.0.1:8189/hook", False),  # another port: a receiver
        ("http://10.0.0.5:8188/hook", False),  # another machine
        ("https://localhost/hook", False),  # 443 is not ComfyUI's port here
    ],
)
def test_a_url_reaching_this_comfyui_is_recognised(url: str, is_self: bool) -> None:
    from telemetry.webhooks import self_url_problem

    problem = self_url_problem(url, 8188, ["192.168.1.20", "gpu-box"])
    assert (problem is not None) == is_self, problem
    if problem:
        assert "this ComfyUI itself" in problem
