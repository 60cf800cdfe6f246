"""Load with concurrency on a real ComfyUI: 64 route clients read while 100 prompts with done markers run.
Zero errors, zero lost records, every record consistent, and no client ever sees a final prompt go back."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness.comfy import ComfyServer
from telemetry.records import FINAL_OUTCOMES
from tests.conftest import PACKAGE_FOLDER

from .helpers import check_done_marker, marker_prompt, package_tracebacks, uniq

pytestmark = pytest.mark.comfy

CLIENTS = 64
PROMPTS = 100


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def scenario(server: ComfyServer, tag: str) -> dict[str, Any]:
    ids: list[str] = []
    errors: list[str] = []
    seen_final: dict[str, str] = {}  # prompt id -> EndedAt first seen final
    regressions: list[str] = []
    requests = Counter()
    done = asyncio.Event()
    rng = random.Random(5)

    async def get(session: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
        async with session.get(server.url + path) as r:
            body = await r.read()
            route = path.split("?")[0]
            if "/prompts/" in route:
                route = "/telemetry/prompts/{id}" + ("/wait" if route.endswith("/wait") else "")
            requests[route] += 1
            return r.status, json.loads(body) if body else None

    def observe(rec: dict[str, Any]) -> None:
        pid, outcome = rec["PromptId"], rec["Outcome"]
        if pid in seen_final and (outcome not in FINAL_OUTCOMES or rec.get("EndedAt") != seen_final[pid]):
            regressions.append(f"{pid}: final ({seen_final[pid]}) then {outcome} ({rec.get('EndedAt')})")
        if outcome in FINAL_OUTCOMES:
            seen_final.setdefault(pid, rec.get("EndedAt"))

    async def client(n: int, session: aiohttp.ClientSession) -> None:
        while not done.is_set():
            kind = n % 4
            try:
                if kind == 0 or not ids:
                    status, body = await get(session, "/telemetry?limit=50")
                    if status != 200:
                        errors.append(f"/telemetry -> {status}")
                        continue
                    for p in body["Prompts"]:
                        if p["PromptId"] in ids:
                            observe(p)
                elif kind in (1, 2):
                    pid = rng.choice(ids)
                    status, body = await get(session, f"/telemetry/prompts/{pid}")
                    if status != 200 or body.get("PromptId") != pid:
                        errors.append(f"record {pid} -> {status} {body}")
                    elif "Outcome" in body and "EndedAt" in body:
                        observe(body)
                else:
                    pid = rng.choice(ids)
                    status, body = await get(session, f"/telemetry/prompts/{pid}/wait?timeout=5")
                    if status not in (200, 202) or body.get("PromptId") != pid:
                        errors.append(f"wait {pid} -> {status} {body}")
                    elif status == 200:
                        if body["Outcome"] not in FINAL_OUTCOMES:
                            errors.append(f"wait {pid} answered 200 with {body['Outcome']}")
                        observe(body)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors.append(f"client {n}: {type(exc).__name__}: {exc}")

    async def submit(session: aiohttp.ClientSession) -> None:
        for i in range(PROMPTS):
            prompt = marker_prompt(f"{tag}/p{i:03d}", color=0x10000 + i)
            async with session.post(server.url + "/prompt", json={"prompt": prompt}) as r:
                assert r.status == 200, await r.text()
                ids.append((await r.json())["prompt_id"])
            await asyncio.sleep(0)  # let readers in between submissions

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        readers = [asyncio.create_task(client(n, session)) for n in range(CLIENTS)]
        await submit(session)
        finals = {}
        for pid in ids:
            status, body = await get(session, f"/telemetry/prompts/{pid}/wait?timeout=120")
            assert status == 200, (pid, status, body)
            finals[pid] = body
            observe(body)
        done.set()
        await asyncio.gather(*readers)
        status, listing = await get(session, "/telemetry?limit=1000")
    return {
        "ids": ids,
        "finals": finals,
        "errors": errors,
        "regressions": regressions,
        "requests": requests,
        "listing": listing,
    }


def test_64_route_clients_during_100_prompts(rel_server: ComfyServer) -> None:
    tag = uniq("load")
    result = asyncio.run(scenario(rel_server, tag))
    ids, finals = result["ids"], result["finals"]
    total = sum(result["requests"].values())
    print(f"load: {total} route requests by {CLIENTS} clients during {PROMPTS} prompts: {dict(result['requests'])}")
    assert result["errors"] == []
    assert result["regressions"] == []
    assert total > 10 * CLIENTS
    # Zero lost records: every prompt is final, listed, and stored.
    assert len(set(ids)) == PROMPTS and set(finals) == set(ids)
    listed = {p["PromptId"]: p for p in result["listing"]["Prompts"]}
    assert set(ids) <= set(listed)
    db = rel_server.user_dir / "telemetry" / "telemetry.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        stored = dict(
            conn.execute(
                f"SELECT prompt_id, record FROM prompts WHERE prompt_id IN ({','.join('?' * len(ids))})", ids
            ).fetchall()
        )
    assert set(stored) == set(ids)
    # Every record consistent: with itself, its marker, the listing and the store.
    for i, pid in enumerate(ids):
        rec = finals[pid]
        assert rec["Outcome"] == "success", rec
        assert ts(rec["QueuedAt"]) <= ts(rec["StartedAt"]) <= ts(rec["EndedAt"])
        assert ts(rec["StartedAt"]) - 0.002 <= ts(rec["ExecutionSuccessAt"]) <= ts(rec["EndedAt"]) + 0.002
        assert rec["DurationSeconds"] > 0 and {n["NodeId"] for n in rec["Nodes"]} == {"1", "2", "3", "4"}
        assert [o["Filename"] for o in rec["Outputs"]] and rec["Markers"][0]["Prefix"] == f"{tag}/p{i:03d}"
        check_done_marker(rel_server.output_dir, rec)
        tel = rec["Telemetry"]
        assert tel["DoneMarkerDetected"] and tel["DoneMarkerPath"] == rec["Markers"][0]["Path"]
        assert tel["PromptId"] == pid and tel["DurationSeconds"] == rec["DurationSeconds"]
        assert listed[pid]["Outcome"] == "success" and listed[pid]["EndedAt"] == rec["EndedAt"]
        kept = json.loads(stored[pid])
        assert kept["Outcome"] == "success" and kept["EndedAt"] == rec["EndedAt"]
        assert kept["Markers"] == rec["Markers"]
    assert not list(Path(rel_server.output_dir, tag).glob(".*.tmp"))
    assert package_tracebacks(rel_server.log_text(), PACKAGE_FOLDER) == []
