"""The symlink guard on real ComfyUI (issue #13 case I4, issue #17 "Symlinks"): finalize never writes through a
symlink that leads out of the output folder, the file routes never serve an outside file, and markers written while a
real process keeps swapping their folder for a symlink never land outside."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness.comfy import ComfyServer, wait_until
from tests.comfy import workflows as wf

pytestmark = pytest.mark.comfy

SWAPPER = Path(__file__).resolve().parents[1] / "unit" / "helpers" / "swap_dir.py"


def wait_record(server: ComfyServer, prompt_id: str, timeout: float = 120) -> dict:
    status, body = server.request("GET", f"/telemetry/prompts/{prompt_id}/wait?timeout={timeout}", timeout=timeout + 10)
    assert status == 200, (status, body)
    return body


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def render_run(comfy: ComfyServer, run_id: str) -> None:
    """One tagged scene of ``run_id``, rendered and recorded."""
    prompt = wf.frames(f"{run_id}/scene-1/frame", count=1)
    pid = comfy.queue(prompt, extra_data={"telemetry": {"run_id": run_id, "scene_id": "1"}})
    assert wait_record(comfy, pid)["Outcome"] == "success"


@contextmanager
def linked(path: Path, target: Path) -> Iterator[None]:
    """Make ``path`` a symlink to ``target`` for the block; a real folder already there is put aside and back."""
    aside = path.with_name(f"{path.name}.aside-{uuid.uuid4().hex[:6]}")
    had = path.exists()
    if had:
        path.rename(aside)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target, target_is_directory=True)
    try:
        yield
    finally:
        path.unlink()
        if had:
            aside.rename(path)


@pytest.mark.parametrize("level", ["telemetry", "telemetry/runs", "telemetry/runs/<run_id>"])
def test_finalize_and_file_routes_refuse_a_run_folder_leading_out(
    comfy: ComfyServer, tmp_path: Path, level: str
) -> None:
    """``telemetry``, ``runs`` or the run folder is a symlink to an outside folder holding a planted
    artifact-metadata.json: finalize answers 409 naming the link and writes nothing there; the file routes answer 403
    and never the planted bytes. (Before: finalize wrote into the outside folder and the routes served it.)"""
    run_id = f"i4-{uuid.uuid4().hex[:8]}"
    render_run(comfy, run_id)
    outside = tmp_path / "outside"
    planted = {
        "telemetry": outside / "runs" / run_id,
        "telemetry/runs": outside / run_id,
        "telemetry/runs/<run_id>": outside,
    }[level]
    planted.mkdir(parents=True)
    (planted / "artifact-metadata.json").write_text('{"planted": "outside"}')
    (planted / "run-summary.txt").write_text("planted outside\n")
    before = tree(outside)
    link = comfy.output_dir / level.replace("<run_id>", run_id)
    with linked(link, outside):
        status, body = comfy.request("POST", f"/telemetry/runs/{run_id}/finalize", {})
        assert status == 409, (status, body)
        assert str(link) in body["error"] and "outside" in body["error"] and body["Path"] == str(link), body
        for name in ("artifact-metadata.json", "run-summary.txt"):
            status, served = comfy.request("GET", f"/telemetry/runs/{run_id}/{name}")
            assert status == 403, (status, served)
            assert "planted" not in json.dumps(served) and str(link) in served["error"]
        runs = {r["RunId"]: r for r in comfy.get("/telemetry/runs")["Runs"]}
        assert runs[run_id]["Finalized"] is False  # the planted outside file does not count
        assert tree(outside) == before
    # With the link gone the same run finalizes normally, inside the output folder.
    status, body = comfy.request("POST", f"/telemetry/runs/{run_id}/finalize", {})
    assert status == 200 and body["Valid"], body
    assert body["RunDir"] == str(comfy.output_dir / "telemetry" / "runs" / run_id)


def test_symlinked_run_file_is_neither_served_nor_written_through(comfy: ComfyServer, tmp_path: Path) -> None:
    """A finalized run whose run-summary.txt was replaced by a symlink to an outside file: GET answers 403 without its
    bytes, finalize answers 409 naming the file; the outside file is intact. (Before: served with 200.)"""
    run_id = f"i4f-{uuid.uuid4().hex[:8]}"
    render_run(comfy, run_id)
    status, body = comfy.request("POST", f"/telemetry/runs/{run_id}/finalize", {})
    assert status == 200, body
    secret = tmp_path / "secret.txt"
    secret.write_text("outside secret\n")
    summary = Path(body["SummaryPath"])
    summary.unlink()
    summary.symlink_to(secret)
    status, served = comfy.request("GET", f"/telemetry/runs/{run_id}/run-summary.txt")
    assert status == 403, (status, served)
    assert "outside secret" not in json.dumps(served) and "is a symlink" in served["error"]
    status, meta = comfy.request("GET", f"/telemetry/runs/{run_id}/artifact-metadata.json")
    assert status == 200 and meta["RunId"] == run_id  # the regular file beside it is still served
    status, body = comfy.request("POST", f"/telemetry/runs/{run_id}/finalize", {})
    assert status == 409 and str(summary) in body["error"] and "is a symlink" in body["error"], body
    assert secret.read_text() == "outside secret\n" and summary.is_symlink()


def test_markers_never_land_outside_while_a_process_swaps_their_folder(comfy: ComfyServer, tmp_path: Path) -> None:
    """A real process exchanges the marker folder with a symlink to an outside folder (atomically, as fast as the
    kernel allows, bounded to 2,000,000 swaps / 90 s) while 40 prompts write and clear markers there: the outside
    folder (with a decoy ``shot.done``) never changes; some markers are written, others refused with a note."""
    folder = comfy.output_dir / f"race-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shot.done").write_bytes(b"decoy: must stay")
    prefix = f"{folder.name}/shot"
    stop = tmp_path / "stop"
    swapper = subprocess.Popen(
        [sys.executable, str(SWAPPER), str(folder), str(outside), str(stop), "2000000", "90"],
        stdout=subprocess.PIPE,
        text=True,
    )
    states: list[str] = []
    refused_at_submission = 0
    try:
        assert swapper.stdout is not None
        assert swapper.stdout.readline().strip() == "ready"
        for i in range(40):
            prompt = {
                "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": i}},
                "4": {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": prefix, "images": ["1", 0]}},
            }
            status, body = comfy.request("POST", "/prompt", {"prompt": prompt})
            if status != 200 or body.get("node_errors"):
                refused_at_submission += 1  # the link was there when the prefix was validated
                continue
            rec = wait_record(comfy, body["prompt_id"])
            states += [m["State"] for m in rec["Markers"]]
            assert tree(outside) == {"shot.done": b"decoy: must stay"}, f"prompt {i} reached the outside folder"
    finally:
        stop.touch()
        out, _ = swapper.communicate(timeout=60)
    swaps = json.loads(out.strip().splitlines()[-1])["swaps"]
    print(f"\nmarker states {dict((s, states.count(s)) for s in set(states))}, "
          f"{refused_at_submission} refused at submission, {swaps} swaps")  # fmt: skip
    assert tree(outside) == {"shot.done": b"decoy: must stay"}
    assert not folder.is_symlink()
    assert swaps > 1000 and states, "the swaps must really race the markers"
    # written; error (refused at write time, with a note); failed (the node itself found the prefix unsafe at run time)
    # How many land in each state is the race's luck (a loaded machine has seen 40 refused, none written); that
    # every write reached the writer and none reached outside is the point.
    assert set(states) <= {"written", "error", "failed"} and {"written", "error"} & set(states)
    shutil.rmtree(folder)


@contextmanager
def fifo_at(path: Path) -> Iterator[None]:
    """A FIFO at ``path`` for the block; afterwards any reader still blocked on it is let go (EOF) and it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    try:
        yield
    finally:
        try:  # succeeds only while a reader has it open: closing at once hands that reader an EOF
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        path.unlink()


def test_a_fifo_in_place_of_a_run_file_is_refused_not_waited_on(comfy: ComfyServer) -> None:
    """A FIFO where artifact-metadata.json belongs: GET answers 403 at once. (Before: the read blocked a worker thread
    of the server until some process wrote to the FIFO, and the request hung.)"""
    run_id = f"fifo-{uuid.uuid4().hex[:8]}"
    fifo = comfy.output_dir / "telemetry" / "runs" / run_id / "artifact-metadata.json"
    with fifo_at(fifo):
        status, body = comfy.request("GET", f"/telemetry/runs/{run_id}/artifact-metadata.json", timeout=10)
        assert status == 403 and "not a regular file" in body["error"], (status, body)
        assert comfy.get("/telemetry/runs") is not None  # the server still answers


def test_a_fifo_in_place_of_a_listed_output_never_stalls_markers(comfy: ComfyServer) -> None:
    """An output node lists a file that turns out to be a FIFO: the marker is still written (.failed, the file not
    complete on disk) and the next prompt's marker follows. (Before: measuring the output opened the FIFO and blocked
    the marker writer until some process wrote to it, so no marker came for this prompt nor any later one.)"""
    folder = f"fifo-{uuid.uuid4().hex[:8]}"
    prompt = wf.frames(f"{folder}/frame", count=1, size=8)
    prompt["90"] = {  # lists late_00001_.png at once, writes it only after `delay`
        "class_type": "RTTestLateSave",
        "inputs": {"images": ["2", 0], "filename_prefix": f"{folder}/late", "delay": 600.0},
    }
    pid = comfy.queue(prompt)
    # Made once the node has run (before, ComfyUI's counter would count it and list _00002_).
    wait_until(lambda: pid in comfy.request("GET", f"/history/{pid}")[1], 60, what="the prompt in ComfyUI's history")
    with fifo_at(comfy.output_dir / folder / "late_00001_.png"):
        rec = wait_record(comfy, pid, timeout=90)
        assert rec["Markers"][0]["State"] == "failed", rec
        assert (comfy.output_dir / folder / "frame.failed").is_file()
        after = comfy.queue(wf.frames(f"fifo-{uuid.uuid4().hex[:8]}/frame", count=1, size=8))
        assert wait_record(comfy, after, timeout=60)["Markers"][0]["State"] == "written"


def test_a_hardlinked_run_file_is_not_served_and_finalize_leaves_its_other_name_alone(
    comfy: ComfyServer, tmp_path: Path
) -> None:
    """run-summary.txt replaced by a hard link to a file outside the output folder (same inode, no symlink to see):
    GET answers 403 without its bytes; finalize writes a new file in the run folder and the outside file is intact.
    (Before: served with 200, the outside file's bytes.)"""
    run_id = f"i4h-{uuid.uuid4().hex[:8]}"
    render_run(comfy, run_id)
    status, body = comfy.request("POST", f"/telemetry/runs/{run_id}/finalize", {})
    assert status == 200, body
    secret = comfy.output_dir.parent / f"secret-{run_id}.txt"  # outside the output folder, on its file system
    secret.write_text("outside secret\n")
    summary = Path(body["SummaryPath"])
    summary.unlink()
    os.link(secret, summary)
    metadata = Path(body["MetadataPath"])
    os.link(metadata, comfy.output_dir.parent / f"meta-{run_id}.json")  # a second name for the metadata too
    (row,) = [r for r in comfy.get("/telemetry/runs")["Runs"] if r["RunId"] == run_id]
    assert row["Finalized"] is False, row  # the list agrees with the file routes
    status, served = comfy.request("GET", f"/telemetry/runs/{run_id}/run-summary.txt")
    assert status == 403, (status, served)
    assert "outside secret" not in json.dumps(served) and "hard link" in served["error"], served
    status, body = comfy.request("POST", f"/telemetry/runs/{run_id}/finalize", {})
    assert status == 200, body
    assert secret.read_text() == "outside secret\n" and os.stat(summary).st_ino != os.stat(secret).st_ino
    status, served = comfy.request("GET", f"/telemetry/runs/{run_id}/run-summary.txt")
    assert status == 200 and run_id in served
