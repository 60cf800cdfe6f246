"""Runs and retries that cannot run away, on real ComfyUI: the hard bound on attempts (the TelemetryCapture node's
default tags, a full store), a retry that keeps the submission whole, interrupt and clear cancelling pending retries,
a reused prompt id refused with 409, and a scene queued again by hand counted as an attempt, not a requeue."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from harness.comfy import ComfyServer, wait_until
from tests.comfy.workflows import frames, with_capture, with_raise, with_sleep
from tests.conftest import make_server

pytestmark = pytest.mark.comfy

MAX_LINKS = 8  # far above any budget here: a chain this long is a runaway


def uniq(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def wait_final(server: ComfyServer, prompt_id: str, timeout: float = 60) -> dict[str, Any]:
    status, rec = server.request("GET", f"/telemetry/prompts/{prompt_id}/wait?timeout={timeout}", timeout=timeout + 10)
    assert status == 200, (prompt_id, status, rec)
    return rec


def attempt_chain(server: ComfyServer, first: str) -> list[dict[str, Any]]:
    """The final records of a prompt and the retries that followed it (RetriedBy), at most MAX_LINKS."""
    chain = [wait_final(server, first)]
    while chain[-1].get("RetriedBy") and len(chain) < MAX_LINKS:
        chain.append(wait_final(server, chain[-1]["RetriedBy"]))
    return chain


def run_row(server: ComfyServer, run_id: str) -> dict[str, Any]:
    return {r["RunId"]: r for r in server.get("/telemetry/runs")["Runs"]}[run_id]


def pending_ids(server: ComfyServer) -> set[str]:
    queue = server.get("/queue")
    return {item[1] for item in (*queue["queue_running"], *queue["queue_pending"])}


def failing_capture_prompt(run_id: str, prefix: str) -> dict[str, Any]:
    """A failing node under a TelemetryCapture left at its defaults except run_id (scene_id empty), as an editor has."""
    return with_capture(with_raise(frames(prefix, count=1), "scene render failed"), run_id=run_id)


def check_bounded(
    server: ComfyServer, run_id: str, first: str, budget: int = 1, scene: str | None = None
) -> list[dict[str, Any]]:
    chain = attempt_chain(server, first)
    assert len(chain) == 1 + budget, [(r["PromptId"], r.get("RetriedBy")) for r in chain]
    assert chain[-1]["RetriedBy"] is None
    assert any("retry budget exhausted" in n for n in chain[-1]["FallbackNotes"]), chain[-1]["FallbackNotes"]
    # The last attempt's retry would have been queued before its final record was published: nothing follows.
    assert not (pending_ids(server) - {r["PromptId"] for r in chain})
    assert run_row(server, run_id)["Prompts"] == 1 + budget
    # All attempts are one scene (named after the first prompt when it has no scene id), attempts numbered 1..n.
    assert [r["Attempt"] for r in chain] == list(range(1, 2 + budget))
    assert {r["SceneId"] for r in chain[1:]} == {scene or first}
    return chain


def test_default_capture_tags_failing_scene_is_retried_within_budget(comfy: ComfyServer) -> None:
    run_id = uniq("runaway")
    prefix = uniq("runaway/frame")
    first = comfy.queue(failing_capture_prompt(run_id, prefix))
    chain = check_bounded(comfy, run_id, first)
    assert chain[1]["RetryOf"] == first
    status, meta = comfy.request("GET", f"/telemetry/runs/{run_id}")
    assert status == 200 and len(meta["Scenes"]) == 1, meta
    scene = meta["Scenes"][0]
    assert scene["AttemptsRun"] == 2 and scene["Requeued"] is True and scene["Success"] is False
    assert (comfy.output_dir / f"{prefix}.failed").exists()


def test_full_store_does_not_reset_the_attempt_count(tmp_path: Path) -> None:
    from tests.reliability.test_faults import fill, tmpfs

    with tmpfs(tmp_path / "store", "1m") as store:
        server = make_server(env={"RUN_TELEMETRY_DIR": str(store)})
        try:
            server.start()
            fill(store)
            run_id = uniq("fullstore")
            first = server.queue(failing_capture_prompt(run_id, uniq("fullstore/frame")))
            chain = attempt_chain(server, first)
            assert len(chain) == 2, [(r["PromptId"], r.get("RetriedBy")) for r in chain]
            assert chain[-1]["RetriedBy"] is None
            assert not (pending_ids(server) - {r["PromptId"] for r in chain})
            # The store really failed: it went on in memory, said once in the log and in GET /telemetry.
            assert "not writable" in server.log_text() and server.get("/telemetry")["Store"]["Mode"] == "memory"
        finally:
            server.stop()


def test_retry_keeps_the_submission_whole(comfy: ComfyServer) -> None:
    run_id = uniq("whole")
    prefix = uniq("whole/frame")
    prompt = with_raise(frames(prefix, count=1), "fails")
    prompt["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}  # an output left out below
    client_id = uuid.uuid4().hex
    pnginfo = {"workflow": {"nodes": [{"id": 1, "type": "EmptyImage"}], "note": uniq("pnginfo")}}
    body = {
        "prompt": prompt,
        "client_id": client_id,
        "partial_execution_targets": ["3", "4"],
        "extra_data": {"extra_pnginfo": pnginfo, "my_key": [1, 2], "telemetry": {"run_id": run_id, "scene_id": "1"}},
    }
    status, answer = comfy.request("POST", "/prompt", body)
    assert status == 200, answer
    chain = attempt_chain(comfy, answer["prompt_id"])
    assert len(chain) == 2
    comfy.wait_history(chain[1]["PromptId"])
    first, retry = (comfy.get(f"/history/{r['PromptId']}")[r["PromptId"]]["prompt"] for r in chain)
    extra = retry[3]
    assert extra["extra_pnginfo"] == pnginfo and extra["my_key"] == [1, 2] and extra["client_id"] == client_id
    assert extra["telemetry"]["run_id"] == run_id and extra["telemetry"]["scene_id"] == "1"
    assert sorted(retry[4]) == sorted(first[4]) == ["3", "4"]
    assert chain[1]["ClientId"] == client_id


def blocker(server: ComfyServer, tmp: Path, seconds: float = 120) -> tuple[str, Path]:
    started = tmp / uniq("started")
    prompt = with_sleep(frames(uniq("blk"), count=1, marker=False), seconds, started_file=str(started))
    return server.queue(prompt), started


@pytest.mark.parametrize("how", ["interrupt", "clear"])
def test_interrupt_and_clear_cancel_pending_retries(comfy: ComfyServer, tmp_path: Path, how: str) -> None:
    run_id = uniq(f"cancel-{how}")
    # The failing prompt waits behind a short blocker, so the long one is queued before it fails: its retry is
    # queued behind the long one (the queue runs in order of acceptance).
    short, short_started = blocker(comfy, tmp_path, seconds=5)
    wait_until(short_started.exists, 60, what="the short blocker to start", interval=0.02)
    failing = comfy.queue(failing_capture_prompt(run_id, uniq("cr/frame")))
    block, started = blocker(comfy, tmp_path)
    rec = wait_final(comfy, failing)
    retry = rec["RetriedBy"]
    assert retry, rec  # queued behind the blocker
    wait_until(started.exists, 60, what="the blocker to start", interval=0.02)
    if how == "interrupt":
        comfy.interrupt()
    else:
        status, _ = comfy.request("POST", "/queue", {"clear": True})
        assert status == 200
        comfy.interrupt()
    assert wait_final(comfy, retry, 30)["Outcome"] == "cancelled"
    assert wait_final(comfy, block)["Outcome"] == "interrupted"
    assert retry not in pending_ids(comfy)
    status, meta = comfy.request("GET", f"/telemetry/runs/{run_id}")
    scene = meta["Scenes"][0]
    assert scene["Success"] is False and scene["AttemptsRun"] == 2, scene
    assert run_row(comfy, run_id)["Status"] == "failed"


def test_reused_prompt_id_is_refused_with_409(comfy: ComfyServer, tmp_path: Path) -> None:
    run_a, run_b = uniq("reuse-a"), uniq("reuse-b")
    pid = str(uuid.uuid4())
    prompt = frames(uniq("reuse/frame"), count=1)
    body = {"prompt": prompt, "prompt_id": pid, "extra_data": {"telemetry": {"run_id": run_a, "scene_id": "1"}}}
    status, answer = comfy.request("POST", "/prompt", body)
    assert status == 200 and answer["prompt_id"] == pid
    done = wait_final(comfy, pid)
    assert done["Outcome"] == "success"
    # Finished, then the same id again (the same run, or another run): refused, naming it; the record is untouched.
    for run_id in (run_a, run_b):
        again = {**body, "extra_data": {"telemetry": {"run_id": run_id, "scene_id": "1"}}}
        status, refused = comfy.request("POST", "/prompt", again)
        assert status == 409, refused
        assert refused["error"]["prompt_id"] == pid and pid in refused["error"]["message"]
    assert wait_final(comfy, pid) == done
    assert run_row(comfy, run_a)["Prompts"] == 1 and run_b not in {
        r["RunId"] for r in comfy.get("/telemetry/runs")["Runs"]
    }
    # Queued, then the same id again: refused as well.
    block, started = blocker(comfy, tmp_path)
    queued_id = str(uuid.uuid4())
    status, _ = comfy.request("POST", "/prompt", {"prompt": prompt, "prompt_id": queued_id})
    assert status == 200
    status, refused = comfy.request("POST", "/prompt", {"prompt": prompt, "prompt_id": queued_id})
    assert status == 409 and refused["error"]["prompt_id"] == queued_id
    comfy.interrupt()
    assert wait_final(comfy, block)["Outcome"] == "interrupted"
    assert wait_final(comfy, queued_id)["Outcome"] == "success"


def test_scene_queued_again_by_hand_is_an_attempt_not_a_requeue(comfy: ComfyServer) -> None:
    run_id = uniq("byhand")
    prefix = uniq("byhand/frame")
    tags = {"telemetry": {"run_id": run_id, "scene_id": "7", "policy": {"scene_retry_budget": 0}}}
    first = wait_final(comfy, comfy.queue(with_raise(frames(prefix, count=1)), extra_data=tags))
    assert first["Outcome"] == "error" and first["RetriedBy"] is None
    # Queued again by hand, with the same tags a pipeline or the editor would send (attempt/retry_of ignored).
    tags["telemetry"].update({"attempt": 5, "retry_of": first["PromptId"]})
    second = wait_final(comfy, comfy.queue(frames(prefix, count=1), extra_data=tags))
    assert second["Outcome"] == "success" and second["Attempt"] == 2 and second["RetryOf"] is None
    status, meta = comfy.request("GET", f"/telemetry/runs/{run_id}")
    scene = meta["Scenes"][0]
    assert scene["AttemptsRun"] == 2 and scene["Requeued"] is False and scene["Success"] is True, scene
    assert not any("RetryOf" in a for a in scene["AttemptSummaries"])


def test_run_policy_cannot_raise_the_ceiling(comfy: ComfyServer) -> None:
    run_id = uniq("ceiling")
    tags = {"telemetry": {"run_id": run_id, "scene_id": "1", "policy": {"scene_retry_budget": 50}}}
    first = comfy.queue(with_raise(frames(uniq("ceiling/frame"), count=1)), extra_data=tags)
    chain = check_bounded(comfy, run_id, first, scene="1")
    status, meta = comfy.request("GET", f"/telemetry/runs/{run_id}")
    assert meta["QueueConfig"]["SceneRetryBudget"] == 1
    assert any("is the ceiling" in n for n in meta["Scenes"][0]["Telemetry"]["System"]["FallbackNotes"])
    assert chain[1]["RetryOf"] == first
