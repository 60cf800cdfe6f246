"""atomic_write on a real file system: the rename, the Windows retry/fallback, a full disk, a read-only mount."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from telemetry.atomic import (
    AtomicWriteResult,
    MarkerWriteError,
    atomic_write,
    is_temp_for,
    remove_stale_temps,
    temp_name_for,
)
from telemetry.markers import DoneMarker, OutputFile, marker_bytes, read_marker, write_done_marker


def temps_in(folder: Path) -> list[str]:
    """Names in ``folder`` that look like temp files."""
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


class FlakyReplace:
    """A ``replace`` that refuses with PermissionError ``failures`` times (as Windows does while a reader holds
    the destination), then renames for real."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[str, str]] = []

    def __call__(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        self.calls.append((os.fspath(src), os.fspath(dst)))
        if len(self.calls) <= self.failures:
            raise PermissionError(errno.EACCES, "Access is denied", os.fspath(dst))
        os.replace(src, dst)


def test_writes_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    """A plain write lands whole, replaces the old content, and leaves nothing else behind."""
    target = tmp_path / "frame.done"
    target.write_bytes(b"old")
    result = atomic_write(target, b"new content\n")
    assert result == AtomicWriteResult(path=target, attempts=1, fallback_note=None)
    assert target.read_bytes() == b"new content\n"
    assert os.listdir(tmp_path) == ["frame.done"]


def test_temp_file_is_in_the_same_folder_with_a_temp_name(tmp_path: Path) -> None:
    """The rename source sits beside the target (no cross-device rename) and is recognisable as a temp."""
    replace = FlakyReplace(0)
    target = tmp_path / "frame.done"
    atomic_write(target, b"x", replace=replace)
    (src, dst), *_ = replace.calls
    assert Path(src).parent == tmp_path
    assert dst == str(target)
    assert is_temp_for(Path(src).name, target)
    assert not is_temp_for(Path(src).name, tmp_path / "other.done")


def test_temp_names_are_unique(tmp_path: Path) -> None:
    """Two writers in one process never pick the same temp name."""
    names = {temp_name_for(tmp_path / "x.done") for _ in range(1000)}
    assert len(names) == 1000


def test_permission_error_is_retried_with_doubling_backoff(tmp_path: Path) -> None:
    """Two refused renames, then success: no fallback, and the sleeps double from the base backoff."""
    sleeps: list[float] = []
    target = tmp_path / "frame.done"
    target.write_bytes(b"old")
    result = atomic_write(target, b"new", replace=FlakyReplace(2), sleep=sleeps.append)
    assert result.attempts == 3
    assert result.fallback_note is None
    assert sleeps == pytest.approx([0.010, 0.020])
    assert target.read_bytes() == b"new"
    assert temps_in(tmp_path) == []


def test_permission_error_every_time_falls_back_to_direct_write(tmp_path: Path) -> None:
    """After the retries run out the destination is written directly, the temp removed, and the note says so."""
    sleeps: list[float] = []
    target = tmp_path / "frame.done"
    target.write_bytes(b"old")
    replace = FlakyReplace(10**6)
    result = atomic_write(target, b"fallback content", replace=replace, sleep=sleeps.append, retries=4, backoff=0.5)
    assert result.attempts == 5
    assert len(replace.calls) == 5
    assert sleeps == pytest.approx([0.5, 1.0, 2.0, 4.0])
    assert result.fallback_note is not None
    assert "wrote it directly" in result.fallback_note
    assert str(target) in result.fallback_note
    assert target.read_bytes() == b"fallback content"
    assert temps_in(tmp_path) == []


def test_fallback_does_not_follow_a_symlink_out(tmp_path: Path) -> None:
    """The direct write would follow a link; it refuses instead, and the link's target is untouched."""
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"precious")
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "frame.done"
    target.symlink_to(outside)
    with pytest.raises(MarkerWriteError) as caught:
        atomic_write(target, b"evil", replace=FlakyReplace(10**6), sleep=lambda _s: None)
    assert caught.value.errno == errno.ELOOP
    assert outside.read_bytes() == b"precious"
    assert temps_in(folder) == []


def test_failed_fallback_raises_and_cleans_up(tmp_path: Path) -> None:
    """When the direct write fails too (here the target is a folder), the error names the path and no temp stays."""
    target = tmp_path / "frame.done"
    target.mkdir()
    with pytest.raises(MarkerWriteError) as caught:
        atomic_write(target, b"x", replace=FlakyReplace(10**6), sleep=lambda _s: None)
    assert caught.value.errno == errno.EISDIR
    assert str(target) in str(caught.value)
    assert temps_in(tmp_path) == []


def test_other_rename_errors_are_not_retried(tmp_path: Path) -> None:
    """A rename error other than PermissionError fails at once with its errno; the old file stays."""
    target = tmp_path / "frame.done"
    target.write_bytes(b"old")
    sleeps: list[float] = []

    def cross_device(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    with pytest.raises(MarkerWriteError) as caught:
        atomic_write(target, b"new", replace=cross_device, sleep=sleeps.append)
    assert isinstance(caught.value, OSError)
    assert caught.value.errno == errno.EXDEV
    assert str(target) in str(caught.value)
    assert sleeps == []
    assert target.read_bytes() == b"old"
    assert temps_in(tmp_path) == []


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    """atomic_write does not create folders (the marker writer does); the error names the path."""
    target = tmp_path / "nope" / "frame.done"
    with pytest.raises(MarkerWriteError, match="nope/frame.done") as caught:
        atomic_write(target, b"x")
    assert caught.value.errno == errno.ENOENT


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_stale_temps_are_removed_fresh_live_ones_kept(tmp_path: Path) -> None:
    """Old temps and temps of dead writers go; a fresh temp of a live writer and unrelated files stay."""
    target = tmp_path / "frame.done"
    live_pid = os.getppid()
    old = tmp_path / f".frame.done.{live_pid}.0000000a.tmp"
    dead = tmp_path / f".frame.done.{_dead_pid()}.0000000b.tmp"
    fresh_live = tmp_path / f".frame.done.{live_pid}.0000000c.tmp"
    other_target = tmp_path / f".other.done.{_dead_pid()}.0000000d.tmp"
    lookalike = tmp_path / "frame.done.tmp"
    for path in (old, dead, fresh_live, other_target, lookalike):
        path.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    removed = remove_stale_temps(target)
    assert sorted(removed) == sorted([old, dead])
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (fresh_live, other_target, lookalike))


# --- real full and read-only file systems ---------------------------------------------------------------------------


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False)


@pytest.fixture()
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs, mounted for this test and unmounted after."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no 'mount' command: cannot build a real full or read-only file system")
    result = _run("mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount_point))
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if _run("umount", str(mount_point)).returncode != 0:
            _run("umount", "-l", str(mount_point))


def _fill(folder: Path) -> int:
    """Write to a filler file until the file system reports ENOSPC; return the bytes written."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    written = 0
    try:
        for chunk in (b"\0" * 4096, b"\0"):
            while True:
                try:
                    written += os.write(fd, chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return written


def _big_marker(count: int) -> DoneMarker:
    outputs = [OutputFile(Filename=f"frame_{i:05}_.png", Bytes=i) for i in range(count)]
    return DoneMarker(Prefix="frame", FrameCount=count, Outputs=outputs)


def test_full_disk_raises_enospc_and_leaves_nothing(tiny_tmpfs: Path) -> None:
    """On a full file system the write fails with ENOSPC; no marker, no temp; an old marker stays whole."""
    write_done_marker(tiny_tmpfs, "kept", _big_marker(3))
    kept = (tiny_tmpfs / "kept.done").read_bytes()
    assert _fill(tiny_tmpfs) > 0
    before = sorted(os.listdir(tiny_tmpfs))

    with pytest.raises(MarkerWriteError) as caught:
        atomic_write(tiny_tmpfs / "frame.done", marker_bytes(_big_marker(50)))
    assert caught.value.errno == errno.ENOSPC
    assert "frame.done" in str(caught.value)
    assert sorted(os.listdir(tiny_tmpfs)) == before

    with pytest.raises(MarkerWriteError) as caught:
        write_done_marker(tiny_tmpfs, "kept", _big_marker(50))
    assert caught.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tiny_tmpfs)) == before
    assert (tiny_tmpfs / "kept.done").read_bytes() == kept
    assert read_marker(tiny_tmpfs / "kept.done").frame_count == 3


def test_read_only_mount_raises_erofs_and_leaves_nothing(tiny_tmpfs: Path) -> None:
    """On a read-only remount the write fails with EROFS and the existing marker is untouched."""
    write_done_marker(tiny_tmpfs, "kept", _big_marker(3))
    kept = (tiny_tmpfs / "kept.done").read_bytes()
    result = _run("mount", "-o", "remount,ro", str(tiny_tmpfs))
    if result.returncode != 0:
        pytest.skip(f"remounting read-only is not permitted here: {result.stderr.strip()}")
    before = sorted(os.listdir(tiny_tmpfs))

    with pytest.raises(MarkerWriteError) as caught:
        write_done_marker(tiny_tmpfs, "kept", _big_marker(5))
    assert caught.value.errno == errno.EROFS
    assert "kept.done" in str(caught.value)
    with pytest.raises(MarkerWriteError) as caught:
        write_done_marker(tiny_tmpfs, "new/sub/frame", _big_marker(5))
    assert caught.value.errno == errno.EROFS
    assert sorted(os.listdir(tiny_tmpfs)) == before
    assert (tiny_tmpfs / "kept.done").read_bytes() == kept


def test_a_marker_is_written_before_comfyui_made_its_output_folder(tmp_path: Path) -> None:
    """ComfyUI makes its output folder on the first save: a prompt failing (or cancelled) before that gets its .failed."""
    from telemetry.markers import FailedMarker, write_failed_marker

    out = tmp_path / "fresh" / "output"
    result = write_failed_marker(out, "run/scene-1", FailedMarker(Prefix="run/scene-1", Outcome="cancelled"))
    assert result.path == out / "run" / "scene-1.failed"
    assert read_marker(result.path).outcome == "cancelled"
