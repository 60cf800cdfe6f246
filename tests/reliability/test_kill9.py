"""kill -9 of a real ComfyUI during a run, repeated: completed prompts keep record and marker, the cut-off prompt is
marked, and no partial file is left anywhere (output folder, telemetry store folder)."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path

import pytest

from harness.comfy import ComfyServer, wait_until
from telemetry.records import FINAL_OUTCOMES
from tests.conftest import PACKAGE_FOLDER, SOLO, VERSIONS, make_server

from .helpers import check_done_marker, marker_prompt, package_tracebacks, temp_files, uniq, with_sleep

pytestmark = pytest.mark.comfy


def final_ids(server: ComfyServer, ids: list[str]) -> dict[str, dict]:
    """Records the server reports as final right now (a final record promises marker and store write are done)."""
    out = {}
    for pid in ids:
        status, rec = server.request("GET", f"/telemetry/prompts/{pid}", timeout=10)
        if status == 200 and rec.get("Outcome") in FINAL_OUTCOMES:
            out[pid] = rec
    return out


def stored_outcome(server: ComfyServer, prompt_id: str) -> str | None:
    """The outcome of the prompt's row in the package's SQLite store (read-only), or None when it has no row."""
    db = server.user_dir / "telemetry" / "telemetry.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        row = conn.execute("SELECT outcome FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
    return row[0] if row else None


def kill_while_long_prompt_runs(server: ComfyServer, tmp: Path, rng: random.Random) -> tuple[dict, str, list[str]]:
    """Quick prompts, then a long one; kill -9 a random few ms after the long one started. Returns what was known."""
    quick = [
        server.queue(marker_prompt(f"kill/{uniq('q')}", color=rng.randrange(1 << 24))) for _ in range(rng.randint(3, 8))
    ]
    started = tmp / uniq("started")
    long_prefix = f"kill/{uniq('long')}"
    long_id = server.queue(with_sleep(marker_prompt(long_prefix), 120, str(started)))
    behind = [server.queue(marker_prompt(f"kill/{uniq('behind')}")) for _ in range(2)]
    wait_until(started.exists, 60, what="the long prompt to start", interval=0.01)
    # The running state is visible at once (from memory) but reaches the store on the writer thread, after any
    # marker writes queued before it: a kill before that leaves no row, and the prompt is unknown after a restart.
    wait_until(
        lambda: stored_outcome(server, long_id) == "running", 30, what="the stored running record", interval=0.01
    )
    known = final_ids(server, quick)
    time.sleep(rng.uniform(0, 0.02))  # fault injection: a random instant for the kill, not a synchronisation
    pid = server.proc.pid
    server.kill9()
    # What a kill inside the marker's atomic write leaves (the random kills of the stream cycles hit it only now and
    # then): a half-written temp file named after the dead writer's pid, beside the cut-off prompt's marker.
    done = server.output_dir / f"{long_prefix}.done"
    done.parent.mkdir(parents=True, exist_ok=True)
    (done.parent / f".{done.name}.{pid}.0badf00d.tmp").write_bytes(b'{"SchemaVersion": 1, "Kind": "do')
    return known, long_id, quick + behind


def kill_during_stream(server: ComfyServer, rng: random.Random) -> tuple[dict, str | None, list[str]]:
    """A stream of quick prompts with markers; kill -9 at a random instant while the writer is busy with them."""
    ids = [server.queue(marker_prompt(f"kill/{uniq('s')}", color=rng.randrange(1 << 24))) for _ in range(80)]
    wait_until(lambda: bool(final_ids(server, ids[:1])), 60, what="the first prompt of the stream", interval=0.01)
    known = final_ids(server, ids[:10])
    time.sleep(rng.uniform(0, 0.15))  # fault injection: a random instant for the kill, not a synchronisation
    server.kill9()
    return known, None, ids


def check_after_restart(server: ComfyServer, known: dict, cut_id: str | None, all_ids: list[str]) -> dict[str, int]:
    """Everything the kill must not have broken; returns counts of what each prompt became."""
    counts = {"success": 0, "crashed": 0, "lost": 0, "unknown": 0, "cut_off_marked": 0}
    for pid, before in known.items():
        status, rec = server.request("GET", f"/telemetry/prompts/{pid}")
        assert status == 200, (pid, status, rec)
        assert rec["Outcome"] == before["Outcome"] == "success"
        assert rec["EndedAt"] == before["EndedAt"] and rec["Markers"] == before["Markers"]
        check_done_marker(server.output_dir, rec)
    if cut_id is not None:
        status, rec = server.request("GET", f"/telemetry/prompts/{cut_id}")
        assert status == 200 and rec["Outcome"] == "crashed", rec
        assert any("stopped" in n for n in rec["FallbackNotes"]), rec["FallbackNotes"]
        assert not Path(server.output_dir / f"{rec['Markers'][0]['Prefix']}.done").exists()
        counts["cut_off_marked"] = 1
    for pid in all_ids:
        status, rec = server.request("GET", f"/telemetry/prompts/{pid}")
        if status == 404:
            counts["unknown"] += 1  # accepted and killed before its queued row was written (under 50 ms)
            continue
        assert status == 200
        # Nothing is left half-way: success with an intact marker, marked as cut off, or lost (never started).
        assert rec["Outcome"] in ("success", "crashed", "lost"), (pid, rec["Outcome"])
        counts[rec["Outcome"]] += 1
        if rec["Outcome"] == "success":
            check_done_marker(server.output_dir, rec)
        elif rec["Outcome"] == "lost":
            prefix = rec["Markers"][0]["Prefix"]
            assert json.loads((server.output_dir / f"{prefix}.failed").read_text())["Outcome"] == "lost"
        else:
            done = server.output_dir / f"{rec['Markers'][0]['Prefix']}.done"
            if done.exists():  # killed between the marker's rename and the final store write: the marker is whole
                check_done_marker(
                    server.output_dir,
                    {
                        **rec,
                        "Outcome": "success",
                        "Markers": [{**rec["Markers"][0], "State": "written", "Path": str(done)}],
                    },
                )
    # No partial file anywhere: no temp file of the atomic writer, every marker parses.
    assert temp_files(server.output_dir) == []
    assert temp_files(server.user_dir) == []
    for marker in server.output_dir.rglob("*.done"):
        assert marker.stat().st_size > 0 and marker.read_text().strip().endswith("}"), marker
    db = server.user_dir / "telemetry" / "telemetry.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stuck = conn.execute("SELECT COUNT(*) FROM prompts WHERE outcome IN ('queued','running')").fetchone()[0]
    assert stuck == 0
    assert package_tracebacks(server.log_text(), PACKAGE_FOLDER) == []
    return counts


def run_cycles(version: str, cycles: int, tmp_path: Path, seed: int) -> list[dict[str, int]]:
    """Alternate the two kinds of kill; after each restart check everything. Returns per-cycle counts."""
    rng = random.Random(seed)
    server = make_server(version)
    results = []
    try:
        server.start()
        for cycle in range(cycles):
            if cycle % 2 == 0:
                known, cut_id, ids = kill_while_long_prompt_runs(server, tmp_path, rng)
            else:
                known, cut_id, ids = kill_during_stream(server, rng)
            server.start()
            counts = check_after_restart(server, known, cut_id, ids)
            counts["known_final_before_kill"] = len(known)
            results.append(counts)
        # The server works normally after all that.
        pid = server.queue(marker_prompt(f"kill/{uniq('after')}"))
        status, rec = server.request("GET", f"/telemetry/prompts/{pid}/wait?timeout=60", timeout=70)
        assert status == 200
        check_done_marker(server.output_dir, rec)
    finally:
        server.stop()
    return results


def test_kill9_twice_keeps_every_completed_prompt(tmp_path: Path) -> None:
    results = run_cycles(SOLO, 2, tmp_path, seed=11)
    print(f"kill -9 cycles: {results}")
    assert results[0]["cut_off_marked"] == 1
    assert results[1]["success"] < 80  # the stream was really cut
    assert sum(r["known_final_before_kill"] for r in results) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("version", VERSIONS)
def test_kill9_repeated(version: str, tmp_path: Path) -> None:
    results = run_cycles(version, 10, tmp_path, seed=23)
    print(f"kill -9 cycles on {version}: {results}")
    assert sum(r["cut_off_marked"] for r in results) == 5
