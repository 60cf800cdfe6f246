"""Markers: the JSON shape, describe/clear/write/read, and real processes reading and being killed mid-write."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from telemetry.atomic import is_temp_for
from telemetry.markers import (
    DoneMarker,
    FailedMarker,
    MarkerReadError,
    MarkerTelemetry,
    OutputFile,
    clear_markers,
    describe_outputs,
    marker_bytes,
    read_marker,
    write_done_marker,
    write_failed_marker,
)

HELPERS = Path(__file__).resolve().parent / "helpers"


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.001)


# --- shape ----------------------------------------------------------------------------------------------------------


def test_done_marker_json_shape() -> None:
    """PascalCase keys in contract order, ISO 8601 UTC timestamp with Z, indent 2 and a trailing newline."""
    marker = DoneMarker(
        PromptId="p1",
        Prefix="scene/frame",
        FrameCount=1,
        Outputs=[OutputFile(Filename="frame_00001_.png", Subfolder="scene", Bytes=3, Sha256="ab")],
        Telemetry=MarkerTelemetry(DurationSeconds=1.5, VramBeforeMB=10, VramAfterMB=12, VramDeltaMB=2, Gpu="RTX"),
    )
    text = marker_bytes(marker).decode()
    assert text.endswith("}\n")
    assert text.startswith('{\n  "SchemaVersion": 1,\n  "Kind": "done",\n')
    data = json.loads(text)
    assert list(data) == [
        "SchemaVersion",
        "Kind",
        "Timestamp",
        "PromptId",
        "Prefix",
        "FrameCount",
        "Outputs",
        "Telemetry",
    ]
    assert data["Timestamp"].endswith("Z")
    assert list(data["Outputs"][0]) == ["Filename", "Subfolder", "Type", "Bytes", "Sha256", "Missing"]
    assert data["Telemetry"] == {
        "DurationSeconds": 1.5,
        "VramBeforeMB": 10,
        "VramAfterMB": 12,
        "VramDeltaMB": 2,
        "Gpu": "RTX",
    }


def test_failed_marker_json_shape_and_snake_case_construction() -> None:
    """Python names work as well as the aliases; the file uses the aliases."""
    marker = FailedMarker(prefix="x", outcome="interrupted", node="7", node_type="KSampler", message="stopped")
    data = json.loads(marker_bytes(marker))
    assert data["Kind"] == "failed"
    assert data["Outcome"] == "interrupted"
    assert (data["Node"], data["NodeType"], data["Message"]) == ("7", "KSampler", "stopped")
    assert data["Telemetry"] is None


def test_timestamp_is_normalised_to_utc() -> None:
    """A timestamp with an offset is written in UTC."""
    marker = DoneMarker(Prefix="x", Timestamp="2025-01-01T12:00:00+02:00")
    assert json.loads(marker_bytes(marker))["Timestamp"] == "2025-01-01T10:00:00.000Z"


# --- describe_outputs -----------------------------------------------------------------------------------------------


def test_describe_outputs_measures_hashes_and_reports_missing(tmp_path: Path) -> None:
    """Sizes always, sha256 when asked (over several 1 MiB chunks), missing and escaping files flagged, not raised."""
    output, temp = tmp_path / "output", tmp_path / "temp"
    (output / "scene").mkdir(parents=True)
    temp.mkdir()
    big = os.urandom(2 * 1024 * 1024 + 17)
    (output / "scene" / "frame_00001_.png").write_bytes(big)
    (temp / "preview.png").write_bytes(b"tmp")
    (tmp_path / "secret").write_bytes(b"outside")
    items = [
        {"filename": "frame_00001_.png", "subfolder": "scene", "type": "output"},
        {"filename": "gone.png", "subfolder": "scene", "type": "output"},
        {"filename": "preview.png", "subfolder": "", "type": "temp"},
        {"filename": "secret", "subfolder": "..", "type": "output"},
        {"filename": "x.png", "subfolder": "", "type": "input"},
    ]
    described = describe_outputs(output, items, sha256=True, roots={"temp": temp})
    assert [(o.filename, o.missing) for o in described] == [
        ("frame_00001_.png", False),
        ("gone.png", True),
        ("preview.png", False),
        ("secret", True),
        ("x.png", True),
    ]
    assert described[0].size_bytes == len(big)
    assert described[0].sha256 == hashlib.sha256(big).hexdigest()
    assert described[2].folder_type == "temp"
    assert described[2].size_bytes == 3
    assert described[1].size_bytes is None
    assert described[3].size_bytes is None  # not measured: it is outside the output folder
    assert describe_outputs(output, items[:1], sha256=False)[0].sha256 is None


# --- write / clear / read -------------------------------------------------------------------------------------------


def test_write_creates_subfolders_and_swaps_done_and_failed(tmp_path: Path) -> None:
    """A .done write removes a stale .failed and the other way round; sub-folders are created."""
    failed = write_failed_marker(tmp_path, "a/b/frame", FailedMarker(Prefix="a/b/frame", Message="boom"))
    assert failed.path == tmp_path / "a" / "b" / "frame.failed"
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["frame.failed"]
    done = write_done_marker(tmp_path, "a/b/frame", DoneMarker(Prefix="a/b/frame", FrameCount=2))
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["frame.done"]
    assert read_marker(done.path).frame_count == 2
    write_failed_marker(tmp_path, "a/b/frame", FailedMarker(Prefix="a/b/frame", Message="again"))
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["frame.failed"]
    assert read_marker(tmp_path / "a" / "b" / "frame.failed").message == "again"  # type: ignore[union-attr]


def test_writers_check_the_marker_kind(tmp_path: Path) -> None:
    """Handing a failed marker to the done writer is a programming error, caught before anything is written."""
    with pytest.raises(TypeError):
        write_done_marker(tmp_path, "x", FailedMarker(Prefix="x"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        write_failed_marker(tmp_path, "x", DoneMarker(Prefix="x"))  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_clear_markers_removes_only_the_two_markers(tmp_path: Path) -> None:
    """Outputs, look-alike names and other prefixes' markers survive; stale temps of dead writers go."""
    scene = tmp_path / "scene"
    scene.mkdir()
    keep = ["frame_00001_.png", "frame.done.bak", "frame.doneX", "frame2.done", "xframe.failed"]
    for name in [*keep, "frame.done", "frame.failed"]:
        (scene / name).write_text("{}")
    stale_temp = scene / ".frame.done.999999999.0badc0de.tmp"
    stale_temp.write_text("{partial")
    removed = clear_markers(tmp_path, "scene/frame")
    assert sorted(removed) == [scene / "frame.done", scene / "frame.failed"]
    assert sorted(os.listdir(scene)) == sorted(keep)
    assert clear_markers(tmp_path, "scene/frame") == []
    assert clear_markers(tmp_path, "not/there/yet") == []


def test_read_marker_errors_name_the_path(tmp_path: Path) -> None:
    """Malformed JSON, a non-object, and a wrong shape each give MarkerReadError naming the file."""
    path = tmp_path / "frame.done"
    for content, reason in [
        ('{"Kind": "done", "Prefix": ', "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"Kind": "done"}', "Prefix"),
        ('{"Kind": "maybe", "Prefix": "x"}', "Kind"),
        ('{"Kind": "done", "Prefix": "x", "FrameCount": -1}', "FrameCount"),
        (b"\xff\xfe", "malformed JSON"),
    ]:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(MarkerReadError) as caught:
            read_marker(path)
        assert str(path) in str(caught.value)
        assert reason in str(caught.value)


def test_read_marker_round_trip_ignores_unknown_fields(tmp_path: Path) -> None:
    """A newer writer's extra fields do not break an older reader."""
    path = tmp_path / "x.failed"
    data = json.loads(marker_bytes(FailedMarker(Prefix="x", Message="m")))
    data["FutureField"] = {"a": 1}
    path.write_text(json.dumps(data))
    marker = read_marker(path)
    assert isinstance(marker, FailedMarker)
    assert marker.message == "m"


# --- real processes -------------------------------------------------------------------------------------------------


def _frames_marker(count: int, seq: int) -> DoneMarker:
    outputs = [
        OutputFile(Filename=f"frame_{i:05}_.png", Subfolder="scene", Bytes=1000 + i, Sha256=f"{i:064x}")
        for i in range(count)
    ]
    return DoneMarker(PromptId=f"seq-{seq}", Prefix="scene/frame", FrameCount=count, Outputs=outputs)


def _read_while_writing(tmp_path: Path, writes: int, **atomic_kwargs: object) -> dict[str, object]:
    """Rewrite one ~100 KB marker ``writes`` times while a reader process loops over it; return its counts."""
    marker_path = tmp_path / "scene" / "frame.done"
    stop = tmp_path / "stop"
    base = _frames_marker(400, 0)  # about 100 KB: a non-atomic write would be visibly torn
    write_done_marker(tmp_path, "scene/frame", base)
    reader = subprocess.Popen(
        [sys.executable, str(HELPERS / "marker_reader.py"), str(marker_path), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "ready"
        for seq in range(1, writes + 1):
            marker = base.model_copy(update={"prompt_id": f"seq-{seq}"})
            write_done_marker(tmp_path, "scene/frame", marker, **atomic_kwargs)
        stop.touch()
        out, _ = reader.communicate(timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    return json.loads(out.strip().splitlines()[-1])


def test_reader_process_never_sees_a_partial_marker(tmp_path: Path) -> None:
    """A separate process reading in a tight loop during 1000 rewrites only ever reads whole, valid markers."""
    stats = _read_while_writing(tmp_path, 1000)
    print(f"\nreader process: {stats['reads']} reads, {stats['versions_seen']} versions seen during 1000 writes")
    assert stats["invalid"] == 0, stats["errors"]
    assert stats["absent"] == 0  # the rename never leaves a moment without a marker
    assert stats["reads"] >= 100
    assert stats["versions_seen"] >= 10  # the reads really overlapped the writes
    assert [n for n in os.listdir(tmp_path / "scene") if n.endswith(".tmp")] == []


def test_reader_process_catches_a_non_atomic_writer(tmp_path: Path) -> None:
    """Control: the same reader does see torn markers from the direct-write fallback, so the test above can fail."""

    def refuse(src: object, dst: object, **dir_fds: object) -> None:
        raise PermissionError(13, "Access is denied")

    stats = _read_while_writing(tmp_path, 300, replace=refuse, sleep=lambda _s: None, retries=0)
    print(f"\nnon-atomic control: {stats['invalid']} torn reads of {stats['reads']} during 300 writes")
    assert stats["invalid"] > 0


def test_sigkill_mid_write_never_leaves_a_partial_marker(tmp_path: Path) -> None:
    """A writer of ~700 KB markers killed with SIGKILL 20 times leaves either no .done or a whole, valid one.

    Half the kills land as soon as the writer's temp file exists; the other half at a random moment within one
    write cycle (measured from the writer's own progress lines), so every phase of the write gets hit.
    Leftover temps are allowed but must be named as temps; clear_markers and the next write remove those of
    dead writers and are otherwise not confused by them.
    """
    folder = tmp_path / "scene"
    done = folder / "frame.done"
    rng = random.Random(1234)
    kills = mid_write_kills = leftovers = 0
    for round_ in range(20):
        writer = subprocess.Popen(
            [sys.executable, str(HELPERS / "marker_writer_loop.py"), str(tmp_path), "scene/frame", "3000"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert writer.stdout is not None
            if round_ % 2:
                writer.stdout.readline()
                began = time.monotonic()
                writer.stdout.readline()
                cycle = time.monotonic() - began
                # Not synchronisation: a random kill point somewhere inside the next write cycle.
                time.sleep(rng.uniform(0, cycle))
            else:

                def temp_present() -> bool:
                    return folder.is_dir() and any(is_temp_for(n, done) for n in os.listdir(folder))

                wait_for(temp_present, 20, "the writer's temp file")
            os.kill(writer.pid, signal.SIGKILL)
            kills += 1
        finally:
            writer.kill()
            writer.wait()
        temps = [n for n in os.listdir(folder) if n.endswith(".tmp")]
        if temps:
            mid_write_kills += 1
            leftovers += len(temps)
        assert all(is_temp_for(n, done) for n in temps), temps
        assert set(os.listdir(folder)) <= {"frame.done", *temps}
        if done.exists():
            marker = read_marker(done)
            assert isinstance(marker, DoneMarker)
            assert marker.frame_count == len(marker.outputs) == 3000
            assert marker.outputs[-1].filename == "frame_02999_.png"
    print(f"\nSIGKILL: {kills} kills, {mid_write_kills} left a temp file (killed mid-write), {leftovers} temps total")
    assert mid_write_kills >= 5  # the kills really landed mid-write, so the checks above could have failed
    removed = clear_markers(tmp_path, "scene/frame")
    assert removed == ([done] if removed else [])
    assert os.listdir(folder) == []  # every leftover temp belonged to a dead writer
    write_done_marker(tmp_path, "scene/frame", _frames_marker(2, 1))
    assert os.listdir(folder) == ["frame.done"]
    assert read_marker(done).frame_count == 2  # type: ignore[union-attr]


def test_markers_in_a_folder_of_many_frames_list_it_once_a_minute(tmp_path: Path, monkeypatch) -> None:
    """A scene folder of 2,000 frames and 50 scenes' markers: one listing of the folder, not one per clear and write.

    Each listing is O(entries) and ran on ComfyUI's HTTP thread (the clear at acceptance) and on the writer (before
    the write): a long scene made every later marker slower. Stale temps of a dead writer still go, in every
    target's name, at the first touch of the folder and again once the minute has passed.
    """
    import telemetry.atomic as atomic

    scene = tmp_path / "scene"
    scene.mkdir()
    for i in range(2000):
        (scene / f"frame_{i:05d}_.png").write_bytes(b"png")
    dead = [scene / f".s{k:03d}.done.999999999.0badc0d{k}.tmp" for k in range(3)]
    for t in dead:
        t.write_text("{partial")
    listings: list[object] = []
    real_scandir = os.scandir

    def counting_scandir(target: object):
        listings.append(target)
        return real_scandir(target)

    now = [1000.0]
    monkeypatch.setattr(atomic.os, "scandir", counting_scandir)
    monkeypatch.setattr(atomic.time, "monotonic", lambda: now[0])
    for k in range(50):
        clear_markers(tmp_path, f"scene/s{k:03d}")
        write_done_marker(tmp_path, f"scene/s{k:03d}", DoneMarker(Prefix=f"scene/s{k:03d}"))
    assert len(listings) == 1
    assert not any(t.exists() for t in dead)  # every target's stale temp went with that one listing
    assert all((scene / f"s{k:03d}.done").is_file() for k in range(50))
    late = scene / ".s000.done.999999999.0badc0de.tmp"
    late.write_text("{partial")
    now[0] += 61.0
    clear_markers(tmp_path, "scene/s000")
    assert len(listings) == 2 and not late.exists()
