"""The consumer CLI as real processes: ``python -m telemetry wait`` with markers written by another process."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from telemetry import consumer
from telemetry.consumer import find_candidates, wait_for_marker
from telemetry.markers import DoneMarker, FailedMarker, marker_bytes, marker_paths

REPO = Path(__file__).resolve().parents[2]
HELPERS = Path(__file__).resolve().parent / "helpers"


def cli(*args: str) -> list[str]:
    """The command line for ``python -m telemetry ARGS``."""
    return [sys.executable, "-m", "telemetry", *args]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion from the repo, as a user would."""
    return subprocess.run(cli(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class Waiter:
    """A running ``wait`` process whose stderr announced that the watch is in place."""

    proc: subprocess.Popen[str]
    announcement: str

    def finish(self, timeout: float = 30) -> tuple[int, dict[str, object], str]:
        """Wait for exit; return the exit code, the one JSON object on stdout, and the rest of stderr."""
        out, err = self.proc.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.strip()]
        assert len(lines) == 1, out
        return self.proc.returncode, json.loads(lines[0]), err


@pytest.fixture()
def start_wait() -> Iterator[object]:
    """Start ``wait`` and block (with a deadline) until it says it is watching; kill leftovers at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> Waiter:
        proc = subprocess.Popen(cli("wait", *args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 20)
        assert ready, "wait did not announce itself within 20 s"
        line = proc.stderr.readline()
        assert line.startswith("waiting for "), line
        return Waiter(proc, line)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture()
def output(tmp_path: Path) -> Path:
    """An output folder with two frames of a scene and an unrelated file."""
    out = tmp_path / "output"
    (out / "scene").mkdir(parents=True)
    (out / "scene" / "frame_00001_.png").write_bytes(os.urandom(3000))
    (out / "scene" / "frame_00002_.png").write_bytes(os.urandom(5000))
    (out / "scene" / "other_00001_.png").write_bytes(b"other")
    return out


def write_marker(output: Path, *args: str) -> dict[str, object]:
    """Write a marker from a separate process with the ``write-marker`` sub-command."""
    result = run("write-marker", "--output-dir", str(output), *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- done, failed, timeout ------------------------------------------------------------------------------------------


def test_done_marker_written_later_is_verified_and_copied(output: Path, tmp_path: Path, start_wait) -> None:
    """wait (inotify) → another process writes the .done → exit 0, outputs verified by hash and copied whole."""
    copy_to = tmp_path / "copy"
    waiter = start_wait(
        "--output-dir", str(output), "--prefix", "scene/frame", "--timeout", "20", "--copy-to", str(copy_to),
        "--verify-hash",
    )  # fmt: skip
    assert "watcher: inotify" in waiter.announcement
    assert not (output / "scene" / "frame.done").exists()
    written = write_marker(output, "--prefix", "scene/frame", "--sha256", "--prompt-id", "p-1")
    code, report, _ = waiter.finish()
    assert code == 0, report
    assert report["Status"] == "done"
    assert report["Verified"] is True
    assert report["MarkerPath"] == written["MarkerPath"]
    assert report["Marker"]["PromptId"] == "p-1"
    assert report["Marker"]["FrameCount"] == 2
    assert report["ForcedCopyTriggered"] is False
    assert report["WaitSeconds"] > 0
    assert sorted(report["Copied"]) == [str(copy_to / "scene" / f"frame_0000{i}_.png") for i in (1, 2)]
    for name in ("frame_00001_.png", "frame_00002_.png"):
        assert (copy_to / "scene" / name).read_bytes() == (output / "scene" / name).read_bytes()
    assert sorted(os.listdir(copy_to / "scene")) == ["frame_00001_.png", "frame_00002_.png"]


def test_done_marker_in_a_folder_created_after_the_wait_began(tmp_path: Path, start_wait) -> None:
    """The marker's sub-folder does not exist yet: the waiter polls for it, then watches it."""
    out = tmp_path / "output"
    out.mkdir()
    waiter = start_wait("--output-dir", str(out), "--prefix", "late/sub/frame", "--timeout", "20")
    (out / "late" / "sub").mkdir(parents=True)
    (out / "late" / "sub" / "frame_1.png").write_bytes(b"x" * 10)
    write_marker(out, "--prefix", "late/sub/frame", "--frames", "7")
    code, report, _ = waiter.finish()
    assert code == 0, report
    assert report["Marker"]["FrameCount"] == 7
    assert [o["Filename"] for o in report["Marker"]["Outputs"]] == ["frame_1.png"]


def test_failed_marker_written_later_exits_1(output: Path, start_wait) -> None:
    """wait (polling) → another process writes .failed → exit 1 with the marker's message."""
    waiter = start_wait("--output-dir", str(output), "--prefix", "scene/frame", "--timeout", "20", "--watcher", "poll")
    assert "watcher: poll" in waiter.announcement
    write_marker(output, "--prefix", "scene/frame", "--failed", "--message", "node 4 ran out of memory", "--node", "4")
    code, report, _ = waiter.finish()
    assert code == 1
    assert report["Status"] == "failed"
    assert report["Marker"]["Message"] == "node 4 ran out of memory"
    assert report["Marker"]["Node"] == "4"
    assert report["Copied"] == []


def test_timeout_without_copy_exits_3(output: Path) -> None:
    """No marker and no --copy-to: exit 3 after the timeout, nothing forced."""
    result = run("wait", "--output-dir", str(output), "--prefix", "scene/frame", "--timeout", "0.3")
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["Status"] == "timeout"
    assert report["ForcedCopyTriggered"] is False
    assert report["ForcedCopyDebugPath"] is None
    assert report["WaitSeconds"] >= 0.3


# --- verification ---------------------------------------------------------------------------------------------------


def test_size_mismatch_fails_verification_and_copies_nothing(output: Path, tmp_path: Path) -> None:
    """A frame that changed size after the marker: exit 1, 'verification-failed', the problem named."""
    write_marker(output, "--prefix", "scene/frame")
    (output / "scene" / "frame_00002_.png").write_bytes(b"short")
    copy_to = tmp_path / "copy"
    result = run("wait", "--output-dir", str(output), "--prefix", "scene/frame", "--copy-to", str(copy_to))
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["Status"] == "verification-failed"
    assert report["Verified"] is False
    assert report["Problems"] == ["'scene/frame_00002_.png' is 5 bytes, the marker says 5000"]
    assert report["Copied"] == []
    assert list(copy_to.iterdir()) == []


def test_missing_output_fails_verification(output: Path) -> None:
    """A listed frame that was deleted: exit 1 naming it."""
    write_marker(output, "--prefix", "scene/frame")
    (output / "scene" / "frame_00001_.png").unlink()
    result = run("wait", "--output-dir", str(output), "--prefix", "scene/frame")
    assert result.returncode == 1
    assert json.loads(result.stdout)["Problems"] == ["'scene/frame_00001_.png' does not exist"]


def test_same_size_corruption_is_caught_only_with_verify_hash(output: Path) -> None:
    """Same size, different bytes: passes on size alone, fails with --verify-hash."""
    write_marker(output, "--prefix", "scene/frame", "--sha256")
    frame = output / "scene" / "frame_00001_.png"
    frame.write_bytes(bytes(len(frame.read_bytes())))
    assert run("wait", "--output-dir", str(output), "--prefix", "scene/frame").returncode == 0
    result = run("wait", "--output-dir", str(output), "--prefix", "scene/frame", "--verify-hash")
    assert result.returncode == 1
    assert json.loads(result.stdout)["Problems"] == ["'scene/frame_00001_.png' does not match the marker's Sha256"]


# --- forced copy on timeout -----------------------------------------------------------------------------------------


def test_forced_copy_on_timeout_copies_newest_matching_files(output: Path, tmp_path: Path) -> None:
    """Timeout with --copy-to: the new matching frames are copied after a stable window, with a debug file; exit 3."""
    scene = output / "scene"
    old = scene / "frame_old.png"
    old.write_bytes(b"from an earlier run")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    (scene / ".frame.done.4242.0badc0de.tmp").write_bytes(b"{partial")
    (scene / "frame_00003_.png.tmp").write_bytes(b"half")
    copy_to = tmp_path / "copy"
    started = time.time()
    # The frames fixture files were written just before; --newer-than makes them this render's however slowly the
    # process starts (the wait's own start would leave them stale on a loaded machine).
    result = run(
        "wait", "--output-dir", str(output), "--prefix", "scene/frame", "--timeout", "0.3",
        "--newer-than", f"{started - 60}",
        "--copy-to", str(copy_to), "--stability-seconds", "0.2", "--stability-retries", "3",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["Status"] == "timeout"
    assert report["ForcedCopyTriggered"] is True
    assert sorted(report["Copied"]) == [str(copy_to / "scene" / f"frame_0000{i}_.png") for i in (1, 2)]
    for name in ("frame_00001_.png", "frame_00002_.png"):
        assert (copy_to / "scene" / name).read_bytes() == (scene / name).read_bytes()
    debug = Path(report["ForcedCopyDebugPath"])
    assert debug.parent == copy_to
    assert debug.name.startswith("forced-copy-debug-") and debug.name.endswith("Z.txt")
    text = debug.read_text()
    for expected in ("frame_00001_.png: 3000 bytes", "frame_00002_.png: 5000 bytes", "frame_old.png", "-> stable"):
        assert expected in text, text
    assert "frame_00003_.png.tmp" not in text and ".frame.done" not in text.split("candidates")[1]
    assert "other_00001_.png" not in text
    assert any(
        "force-copied 2 matching file(s) after a stable window, all modified since --newer-than" in n
        and "skipped 1 stale file(s)" in n
        for n in report["FallbackNotes"]
    ), report["FallbackNotes"]
    assert sorted(os.listdir(copy_to)) == [debug.name, "scene"]
    assert not (copy_to / "scene" / "frame_old.png").exists()
    assert time.time() - started < 10


def test_forced_copy_reports_files_that_never_hold_still(output: Path, tmp_path: Path) -> None:
    """A frame still growing through every stability window is reported as changing in the debug file and note."""
    growing = output / "scene" / "frame_00003_.png"
    growing.write_bytes(b"")
    stop = tmp_path / "stop-growing"
    grower = subprocess.Popen([sys.executable, str(HELPERS / "grow_file.py"), str(growing), str(stop)])
    try:
        deadline = time.monotonic() + 20
        while growing.stat().st_size < 3:
            assert time.monotonic() < deadline, "the grower never started"
            time.sleep(0.005)
        copy_to = tmp_path / "copy"
        result = run(
            "wait", "--output-dir", str(output), "--prefix", "scene/frame", "--timeout", "0.1",
            "--copy-to", str(copy_to), "--stability-seconds", "0.15", "--stability-retries", "2",
        )  # fmt: skip
    finally:
        stop.touch()
        grower.wait(timeout=20)
    assert result.returncode == 3
    report = json.loads(result.stdout)
    text = Path(report["ForcedCopyDebugPath"]).read_text()
    assert text.count("-> changed: frame_00003_.png") == 2, text
    assert "-> stable" not in text
    assert any("still changed after 2 tries" in n for n in report["FallbackNotes"])
    assert str(copy_to / "scene" / "frame_00003_.png") in report["Copied"]


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["wait", "--prefix", "../x"], "--prefix '../x' has a '..' segment"),
        (["wait", "--prefix", "/etc/passwd"], "is an absolute path"),
        (["wait", "--prefix", "C:\\x"], "drive letter"),
        (["wait", "--prefix", "x", "--timeout", "-1"], "--timeout -1.0 is negative"),
        (["wait", "--prefix", "x", "--poll-interval", "0"], "--poll-interval"),
        (["wait", "--prefix", "x", "--stability-retries", "0"], "--stability-retries"),
        (["write-marker", "--prefix", "a\\..\\..\\x"], "'..' segment"),
        (["write-marker", "--prefix", "x", "--message", "m"], "only apply with --failed"),
        (["write-marker", "--prefix", "x", "--frames", "-2"], "--frames -2 is negative"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(output: Path, args: list[str], fragment: str) -> None:
    """User mistakes: exit 2, one line on stderr naming the input, nothing on stdout, no traceback, nothing written."""
    before = sorted(p.name for p in output.rglob("*"))
    result = run(args[0], "--output-dir", str(output), *args[1:])
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in output.rglob("*")) == before


@pytest.mark.parametrize("command", ["wait", "write-marker"])
def test_missing_output_dir_exits_2(tmp_path: Path, command: str) -> None:
    """A missing output folder is named, with the fix."""
    result = run(command, "--output-dir", str(tmp_path / "nope"), "--prefix", "x")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"python -m telemetry {command}: --output-dir '{tmp_path / 'nope'}' does not exist or is not a folder; "
        "pass ComfyUI's output folder"
    )


# --- the waiting loop in-process (fake clock) -----------------------------------------------------------------------


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.on_sleep: list[object] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for action in list(self.on_sleep):
            action(self.now)  # type: ignore[operator]


def test_invalid_marker_is_reported_after_a_grace_period(tmp_path: Path) -> None:
    """A .done that never parses is reported as invalid once the grace period has passed, not before."""
    (tmp_path / "frame.done").write_text("{not json")
    fake = FakeTime()
    outcome = wait_for_marker(
        tmp_path / "frame", timeout=60, poll_interval=0.1, watcher="poll", clock=fake.clock, sleep=fake.sleep
    )
    assert outcome.marker is None
    assert outcome.error is not None and "malformed JSON" in outcome.error
    assert consumer.INVALID_MARKER_GRACE_SECONDS <= outcome.waited < consumer.INVALID_MARKER_GRACE_SECONDS + 0.2


def test_marker_completed_within_the_grace_period_is_used(tmp_path: Path) -> None:
    """A torn marker (the Windows fallback mid-write) that becomes whole in time is read normally."""
    path = tmp_path / "frame.done"
    path.write_text("{")
    fake = FakeTime()

    def complete(now: float) -> None:
        if now >= 0.5:
            path.write_bytes(marker_bytes(DoneMarker(Prefix="frame", FrameCount=3)))

    fake.on_sleep.append(complete)
    outcome = wait_for_marker(
        tmp_path / "frame", timeout=60, poll_interval=0.1, watcher="poll", clock=fake.clock, sleep=fake.sleep
    )
    assert isinstance(outcome.marker, DoneMarker)
    assert outcome.marker.frame_count == 3


def test_newer_of_two_markers_wins_with_a_note(tmp_path: Path) -> None:
    """With both .done and .failed present the newer one is used, and the note says so."""
    done, failed = marker_paths(tmp_path / "frame")
    done.write_bytes(marker_bytes(DoneMarker(Prefix="frame")))
    failed.write_bytes(marker_bytes(FailedMarker(Prefix="frame", Message="new")))
    os.utime(done, (1_000_000, 1_000_000))
    outcome = wait_for_marker(tmp_path / "frame", timeout=0, poll_interval=0.1, watcher="poll")
    assert outcome.path == failed
    assert outcome.notes == ["both frame.failed and frame.done exist; used the newer, frame.failed"]


def test_marker_kind_must_match_its_file_name(tmp_path: Path) -> None:
    """A .done file holding a failed marker is invalid, not silently a success or a failure."""
    (tmp_path / "frame.done").write_bytes(marker_bytes(FailedMarker(Prefix="frame")))
    fake = FakeTime()
    outcome = wait_for_marker(
        tmp_path / "frame", timeout=60, poll_interval=0.1, watcher="poll", clock=fake.clock, sleep=fake.sleep
    )
    assert outcome.error is not None and "says Kind 'failed'" in outcome.error


def test_find_candidates_excludes_markers_temps_and_other_prefixes(tmp_path: Path) -> None:
    """Candidates start with the prefix's name and are regular files; markers, temps and links are left out."""
    names = ["frame_1.png", "frame.mp4", "frame.done", "frame.failed", ".frame.done.1.0badc0de.tmp", "frame_2.tmp"]
    for name in [*names, "other.png"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "frame_dir").mkdir()
    (tmp_path / "frame_link.png").symlink_to(tmp_path / "other.png")
    assert [p.name for p in find_candidates(tmp_path / "frame")] == ["frame.mp4", "frame_1.png"]
    (tmp_path / ".hidden_1.png").write_bytes(b"x")
    assert [p.name for p in find_candidates(tmp_path / ".hidden")] == [".hidden_1.png"]


# --- C1: a forced copy never takes an earlier render's files without saying so ---------------------------------------


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_forced_copy_skips_stale_files_and_says_so(tmp_path: Path) -> None:
    """Only hour-old matching files: nothing is copied, each is listed as skipped-stale in the result and debug file.

    Before the fix the forced copy took all of them ("none modified since the wait began; took all") and the note
    said "force-copied 2 newest matching file(s)".
    """
    out = tmp_path / "output"
    (out / "scene").mkdir(parents=True)
    for name in ("frame_00001_.png", "frame_00002_.png"):
        (out / "scene" / name).write_bytes(b"earlier take")
        _age(out / "scene" / name, 3600)
    copy_to = tmp_path / "copy"
    result = run(
        "wait", "--output-dir", str(out), "--prefix", "scene/frame", "--timeout", "0.2",
        "--copy-to", str(copy_to), "--stability-seconds", "0.05", "--stability-retries", "1",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["Copied"] == []
    assert not (copy_to / "scene").exists()
    entries = report["ForcedCopyFiles"]
    assert sorted(Path(e["Source"]).name for e in entries) == ["frame_00001_.png", "frame_00002_.png"]
    assert {e["Action"] for e in entries} == {"skipped"}
    assert all(e["Reason"].startswith("stale: modified ") and "before the wait began" in e["Reason"] for e in entries)
    note = report["FallbackNotes"][-1]
    assert "force-copied 0 matching file(s)" in note and "skipped 2 stale file(s)" in note, note
    text = Path(report["ForcedCopyDebugPath"]).read_text()
    skipped_section = text.split("\nskipped:\n")[1]
    assert "frame_00001_.png: stale: modified" in skipped_section and "frame_00002_.png" in skipped_section
    assert text.split("\ncopied:\n")[1].startswith("  (none)")


def test_forced_copy_with_allow_stale_copies_and_marks_them_stale(tmp_path: Path) -> None:
    """--allow-stale-copy copies the earlier take, and its entry and the note say it is stale."""
    out = tmp_path / "output"
    (out / "scene").mkdir(parents=True)
    (out / "scene" / "frame_00001_.png").write_bytes(b"earlier take")
    _age(out / "scene" / "frame_00001_.png", 3600)
    copy_to = tmp_path / "copy"
    result = run(
        "wait", "--output-dir", str(out), "--prefix", "scene/frame", "--timeout", "0.1", "--allow-stale-copy",
        "--copy-to", str(copy_to), "--stability-seconds", "0.05", "--stability-retries", "1",
    )  # fmt: skip
    report = json.loads(result.stdout)
    assert report["Copied"] == [str(copy_to / "scene" / "frame_00001_.png")]
    (entry,) = report["ForcedCopyFiles"]
    assert (
        entry["Action"] == "copied"
        and entry["Reason"].startswith("stale: ")
        and "--allow-stale-copy" in entry["Reason"]
    )
    assert "--allow-stale-copy" in report["FallbackNotes"][-1]


def test_forced_copy_cutoff_is_newer_than_when_given(tmp_path: Path) -> None:
    """With --newer-than the cut-off is that time: a file from before it is skipped, a file after it copied."""
    out = tmp_path / "output"
    (out / "scene").mkdir(parents=True)
    (out / "scene" / "frame_a.png").write_bytes(b"a")
    _age(out / "scene" / "frame_a.png", 600)
    (out / "scene" / "frame_b.png").write_bytes(b"b")
    _age(out / "scene" / "frame_b.png", 60)
    copy_to = tmp_path / "copy"
    cutoff = time.time() - 300
    result = run(
        "wait", "--output-dir", str(out), "--prefix", "scene/frame", "--timeout", "0.1", "--newer-than", f"{cutoff}",
        "--copy-to", str(copy_to), "--stability-seconds", "0.05", "--stability-retries", "1",
    )  # fmt: skip
    report = json.loads(result.stdout)
    actions = {Path(e["Source"]).name: (e["Action"], e["Reason"]) for e in report["ForcedCopyFiles"]}
    assert actions["frame_b.png"][0] == "copied" and "after --newer-than" in actions["frame_b.png"][1]
    assert actions["frame_a.png"][0] == "skipped" and "before --newer-than" in actions["frame_a.png"][1]


# --- M3: a consumer names what it waits for -------------------------------------------------------------------------


@pytest.mark.parametrize("watcher", ["auto", "poll"])
def test_prompt_id_ignores_another_prompts_marker_until_its_own_lands(output: Path, start_wait, watcher: str) -> None:
    """A's .done is there; wait --prompt-id B says it ignores it, keeps waiting, and returns B's when it lands."""
    write_marker(output, "--prefix", "scene/frame", "--prompt-id", "prompt-A")
    waiter = start_wait(
        "--output-dir", str(output), "--prefix", "scene/frame", "--prompt-id", "prompt-B", "--timeout", "30",
        "--watcher", watcher,
    )  # fmt: skip
    assert "with PromptId 'prompt-B'" in waiter.announcement
    assert waiter.proc.stderr is not None
    # The waiter exits by its --timeout at the latest, so this read cannot hang.
    ignored = waiter.proc.stderr.readline()
    assert "frame.done: its PromptId 'prompt-A' is not 'prompt-B'; still waiting" in ignored, ignored
    assert waiter.proc.poll() is None  # it told us it ignores A's marker and keeps waiting
    # Another prompt's .failed does not answer either; B's .done does.
    write_marker(output, "--prefix", "scene/frame", "--failed", "--prompt-id", "prompt-C")
    write_marker(output, "--prefix", "scene/frame", "--prompt-id", "prompt-B", "--frames", "2")
    code, report, _ = waiter.finish()
    assert code == 0, report
    assert report["Marker"]["PromptId"] == "prompt-B"
    assert any("prompt-A" in text for text in report["IgnoredMarkers"])


@pytest.mark.parametrize("watcher", ["auto", "poll"])
def test_newer_than_ignores_an_older_marker(output: Path, start_wait, watcher: str) -> None:
    """A marker written before --newer-than is not the answer; one written after is."""
    write_marker(output, "--prefix", "scene/frame", "--prompt-id", "old")
    old_stamp = json.loads((output / "scene" / "frame.done").read_text())["Timestamp"]
    cutoff = datetime.now(timezone.utc) + timedelta(milliseconds=5)
    waiter = start_wait(
        "--output-dir", str(output), "--prefix", "scene/frame", "--newer-than", cutoff.isoformat(),
        "--timeout", "30", "--watcher", watcher,
    )  # fmt: skip
    assert waiter.proc.stderr is not None
    ignored = waiter.proc.stderr.readline()
    assert f"its Timestamp {old_stamp} is older than" in ignored, ignored
    write_marker(output, "--prefix", "scene/frame", "--prompt-id", "new")
    code, report, _ = waiter.finish()
    assert code == 0, report
    assert report["Marker"]["PromptId"] == "new"


def test_marker_filter_compares_at_millisecond_precision() -> None:
    """Timestamp is written to the millisecond: a marker in the same millisecond as --newer-than counts as newer."""
    cutoff = datetime(2026, 11, 29, 18, 0, 0, 123456, tzinfo=timezone.utc)
    same_ms = DoneMarker(Prefix="p", Timestamp=datetime(2026, 11, 29, 18, 0, 0, 123000, tzinfo=timezone.utc))
    before = DoneMarker(Prefix="p", Timestamp=datetime(2026, 11, 29, 18, 0, 0, 122999, tzinfo=timezone.utc))
    accept = consumer.MarkerFilter(newer_than=cutoff)
    assert accept.reason_to_ignore(same_ms) is None
    assert accept.reason_to_ignore(before) is not None
    assert consumer.MarkerFilter(prompt_id="x").reason_to_ignore(DoneMarker(Prefix="p")) == (
        "its PromptId None is not 'x'"
    )


def test_timeout_reports_the_markers_it_ignored(output: Path) -> None:
    """Only another prompt's marker until the deadline: exit 3, and the report names the ignored marker."""
    write_marker(output, "--prefix", "scene/frame", "--prompt-id", "A")
    result = run("wait", "--output-dir", str(output), "--prefix", "scene/frame", "--prompt-id", "B", "--timeout", "0.3")
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["Status"] == "timeout" and report["Marker"] is None
    assert len(report["IgnoredMarkers"]) == 1 and "'A' is not 'B'" in report["IgnoredMarkers"][0]


# --- C1: write-marker lists this render's files only ----------------------------------------------------------------


@pytest.fixture()
def two_takes(tmp_path: Path) -> tuple[Path, float]:
    """An output folder holding an earlier take (frames 1-3, an hour old) and this render's frames 4-5."""
    out = tmp_path / "output"
    (out / "shot").mkdir(parents=True)
    for i in (1, 2, 3):
        path = out / "shot" / f"frame_{i:05}_.png"
        path.write_bytes(b"earlier" * i)
        _age(path, 3600 - i)
    render_start = time.time() - 10
    for i in (4, 5):
        path = out / "shot" / f"frame_{i:05}_.png"
        path.write_bytes(b"this render" * i)
        _age(path, 6 - i)
    return out, render_start


def test_write_marker_since_lists_only_this_renders_files(two_takes: tuple[Path, float], tmp_path: Path) -> None:
    """--since leaves the earlier take out of Outputs (and says so); wait --copy-to then copies only frames 4-5."""
    out, render_start = two_takes
    since = datetime.fromtimestamp(render_start, timezone.utc).isoformat()
    written = write_marker(out, "--prefix", "shot/frame", "--since", since, "--prompt-id", "p")
    assert written["Listed"] == ["frame_00004_.png", "frame_00005_.png"]
    assert [item["File"] for item in written["LeftOut"]] == [f"frame_0000{i}_.png" for i in (1, 2, 3)]
    assert all("before --since" in item["Reason"] for item in written["LeftOut"])
    marker = json.loads((out / "shot" / "frame.done").read_text())
    assert [o["Filename"] for o in marker["Outputs"]] == ["frame_00004_.png", "frame_00005_.png"]
    assert marker["FrameCount"] == 2
    copy_to = tmp_path / "copy"
    result = run("wait", "--output-dir", str(out), "--prefix", "shot/frame", "--copy-to", str(copy_to))
    assert result.returncode == 0, result.stdout
    assert sorted(os.listdir(copy_to / "shot")) == ["frame_00004_.png", "frame_00005_.png"]


def test_write_marker_since_accepts_epoch_seconds(two_takes: tuple[Path, float]) -> None:
    """--since as epoch seconds means the same as ISO 8601."""
    out, render_start = two_takes
    written = write_marker(out, "--prefix", "shot/frame", "--since", f"{render_start:.3f}")
    assert written["Listed"] == ["frame_00004_.png", "frame_00005_.png"]


def test_write_marker_frames_lists_the_newest_n_and_warns(two_takes: tuple[Path, float]) -> None:
    """--frames 2 with five matching files lists the newest two and warns that three were left out."""
    out, _ = two_takes
    result = run("write-marker", "--output-dir", str(out), "--prefix", "shot/frame", "--frames", "2")
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)
    assert written["Listed"] == ["frame_00004_.png", "frame_00005_.png"]
    assert written["Warnings"] == [
        "--frames 2 but 5 matching file(s): listed the newest 2, left out 3 older one(s) as earlier takes"
    ]
    assert "warning: --frames 2 but 5 matching file(s)" in result.stderr
    assert json.loads((out / "shot" / "frame.done").read_text())["FrameCount"] == 2


def test_write_marker_frames_more_than_found_warns(two_takes: tuple[Path, float]) -> None:
    """--frames 4 with --since finding two files: FrameCount 4, two listed, and a warning that they disagree."""
    out, render_start = two_takes
    result = run(
        "write-marker", "--output-dir", str(out), "--prefix", "shot/frame", "--frames", "4",
        "--since", f"{render_start}",
    )  # fmt: skip
    written = json.loads(result.stdout)
    assert written["Listed"] == ["frame_00004_.png", "frame_00005_.png"]
    assert (
        len(written["Warnings"]) == 1
        and "--frames 4 but only 2 matching file(s) modified since" in written["Warnings"][0]
    )
    assert json.loads((out / "shot" / "frame.done").read_text())["FrameCount"] == 4


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["wait", "--prefix", "x", "--newer-than", "yesterday"], "--newer-than 'yesterday' is not a time"),
        (["wait", "--prefix", "x", "--newer-than", "2026-11-29T18:00:00"], "has no time zone"),
        (["wait", "--prefix", "x", "--prompt-id", " "], "--prompt-id is empty"),
        (["write-marker", "--prefix", "x", "--since", "soon"], "--since 'soon' is not a time"),
        (["write-marker", "--prefix", "x", "--failed", "--since", "0"], "--since only applies to a done marker"),
    ],
)
def test_bad_time_and_filter_input_exits_2(output: Path, args: list[str], fragment: str) -> None:
    """Bad --newer-than, --since, --prompt-id: exit 2 with one line naming the option and the fix."""
    result = run(args[0], "--output-dir", str(output), *args[1:])
    assert result.returncode == 2, result.stdout
    assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr, result.stderr


# --- files that are not markers -------------------------------------------------------------------------------------


def _release(fifo: Path) -> None:
    """Let a reader still blocked on ``fifo`` go (it reads EOF) so that no process is left hanging."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_a_fifo_in_place_of_the_marker_is_an_invalid_marker_not_a_hang(output: Path) -> None:
    """A FIFO named frame.done: wait reports an invalid marker by its grace period. (Before: reading it blocked until
    some process wrote to the FIFO, past any --timeout.)"""
    fifo = output / "scene" / "frame.done"
    os.mkfifo(fifo)
    try:
        result = run("wait", "--output-dir", str(output), "--prefix", "scene/frame", "--timeout", "5", timeout=20)
    finally:
        _release(fifo)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["Status"] == "invalid-marker" and "not a regular file" in report["Problems"][0], report


def test_a_fifo_listed_as_an_output_fails_verification_not_hangs(output: Path, tmp_path: Path) -> None:
    """A marker lists a file that is now a FIFO: verification fails naming it. (Before: opening it to measure blocked.)"""
    write_marker(output, "--prefix", "scene/frame", "--frames", "2")
    listed = output / "scene" / "frame_00002_.png"
    listed.unlink()
    os.mkfifo(listed)
    try:
        result = run(
            "wait", "--output-dir", str(output), "--prefix", "scene/frame", "--copy-to", str(tmp_path / "copy"),
            "--timeout", "5", timeout=20,
        )  # fmt: skip
    finally:
        _release(listed)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["Status"] == "verification-failed", report
    assert any("frame_00002_.png" in p and "not a regular file" in p for p in report["Problems"]), report


def test_a_huge_marker_is_refused_without_being_loaded(output: Path, tmp_path: Path) -> None:
    """A 512 MiB (sparse) frame.done: reported invalid by its size, the reader stays small. (Before: loaded whole.)"""
    with (output / "scene" / "frame.done").open("wb") as handle:
        handle.truncate(512 * 1024 * 1024)
    stdout = tmp_path / "stdout.json"
    with stdout.open("w") as sink:
        proc = subprocess.Popen(
            cli("wait", "--output-dir", str(output), "--prefix", "scene/frame", "--timeout", "5"),
            cwd=REPO, stdout=sink, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak resident size (KiB on Linux)
        proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 1
    report = json.loads(stdout.read_text())
    assert report["Status"] == "invalid-marker" and "at most" in report["Problems"][0], report
    assert usage.ru_maxrss < 256 * 1024, usage.ru_maxrss


@pytest.mark.parametrize("watcher", ["auto", "poll"])
def test_a_same_stamp_rewrite_by_the_awaited_prompt_is_seen(output: Path, start_wait, watcher: str) -> None:
    """A's .done, ignored by wait --prompt-id B, is rewritten in place by B's marker of the same size within the same
    mtime tick (a coarse file-system clock: FAT/exFAT and many SMB mounts keep 1-2 s; emulated here by setting the old
    mtime back): B's marker is the answer. (Before: the file's unchanged inode, mtime and size kept it ignored until
    the timeout.)"""
    path = output / "scene" / "frame.done"
    stamp = datetime.now(timezone.utc)
    first = marker_bytes(DoneMarker(Prefix="scene/frame", PromptId="prompt-A", Timestamp=stamp))
    second = marker_bytes(DoneMarker(Prefix="scene/frame", PromptId="prompt-B", Timestamp=stamp))
    assert len(first) == len(second)
    path.write_bytes(first)
    before = path.stat()
    waiter = start_wait(
        "--output-dir", str(output), "--prefix", "scene/frame", "--prompt-id", "prompt-B", "--timeout", "10",
        "--watcher", watcher,
    )  # fmt: skip
    assert waiter.proc.stderr is not None
    assert "'prompt-A' is not 'prompt-B'" in waiter.proc.stderr.readline()
    with path.open("r+b") as handle:
        handle.write(second)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    code, report, _ = waiter.finish()
    assert code == 0, report
    assert report["Marker"]["PromptId"] == "prompt-B"


def test_write_marker_names_the_symlinks_it_leaves_out(tmp_path: Path) -> None:
    """A hold frame made as a symlink to the previous one is not listed (only regular files are), and the output says
    so with a warning and a LeftOut entry. (Before: left out silently; FrameCount one short with nothing said.)"""
    out = tmp_path / "output"
    (out / "shot").mkdir(parents=True)
    (out / "shot" / "frame_00001_.png").write_bytes(b"one")
    (out / "shot" / "frame_00002_.png").symlink_to("frame_00001_.png")
    report = write_marker(out, "--prefix", "shot/frame")
    assert [o["Filename"] for o in json.loads((out / "shot" / "frame.done").read_text())["Outputs"]] == [
        "frame_00001_.png"
    ]
    assert any(
        "frame_00002_.png" in json.dumps(entry) and "symlink" in json.dumps(entry) for entry in report["LeftOut"]
    )
    assert any("symlink" in w and "frame_00002_.png" in w for w in report["Warnings"]), report
