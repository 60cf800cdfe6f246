"""The symlink guard on a real file system: folders opened without following links, a real process swapping a folder
for a link while markers are written and cleared, run files written and served only inside the output folder."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from telemetry.atomic import DIR_FD_SUPPORTED, MarkerWriteError, UnsafePathError, atomic_write, open_folder
from telemetry.markers import DoneMarker, FailedMarker, clear_markers, write_done_marker, write_failed_marker
from telemetry.paths import UnsafePrefixError
from telemetry.runs import METADATA_FILE, SUMMARY_FILE, finalize_files, read_run_file, run_dir
from tests.pkg import sub

HELPERS = Path(__file__).resolve().parent / "helpers"

pytestmark = pytest.mark.skipif(not DIR_FD_SUPPORTED, reason="dir_fd guard is POSIX only (Windows: path checks)")


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def places(tmp_path: Path) -> tuple[Path, Path]:
    """An output folder and, beside it, an outside folder holding a decoy marker that must never change."""
    out = tmp_path / "output"
    outside = tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (outside / "shot.done").write_bytes(b"decoy: must stay")
    return out, outside


def test_open_folder_refuses_a_symlinked_part_and_names_it(places: tuple[Path, Path]) -> None:
    """A folder below the root that is a symlink is refused with its path and target; the root itself may be one."""
    out, outside = places
    (out / "scene").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError) as caught, open_folder(out, ["scene"], create=True):
        pass
    assert caught.value.errno == errno.ELOOP
    assert f"{out / 'scene'} is a symlink (to {outside})" in str(caught.value)
    linked_root = out.parent / "output-link"
    linked_root.symlink_to(out, target_is_directory=True)
    with open_folder(linked_root, ["new", "sub"], create=True) as fd:
        assert fd is not None
        atomic_write(linked_root / "new" / "sub" / "x.txt", b"x", dir_fd=fd)
    assert (out / "new" / "sub" / "x.txt").read_bytes() == b"x"
    with pytest.raises(MarkerWriteError) as missing, open_folder(out, ["nope"], create=False):
        pass
    assert missing.value.errno == errno.ENOENT and not isinstance(missing.value, UnsafePathError)


def test_marker_writer_and_clear_never_act_outside_while_a_process_swaps_the_folder(
    places: tuple[Path, Path], tmp_path: Path
) -> None:
    """A real process exchanges output/race with a symlink to the outside folder (renameat2, atomically, thousands of
    times) while this process writes .done/.failed markers and clears them 600 times: nothing is ever created,
    changed or removed outside. On the old writer (path-based after a re-check) files landed outside."""
    out, outside = places
    (out / "race").mkdir()
    stop = tmp_path / "stop"
    swapper = subprocess.Popen(
        [sys.executable, str(HELPERS / "swap_dir.py"), str(out / "race"), str(outside), str(stop), "2000000", "60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    written = refused = 0
    try:
        assert swapper.stdout is not None
        assert swapper.stdout.readline().strip() == "ready"
        for i in range(600):
            try:
                if i % 3 == 0:
                    write_failed_marker(out, "race/shot", FailedMarker(Prefix="race/shot", PromptId=f"p{i}"))
                else:
                    write_done_marker(out, "race/shot", DoneMarker(Prefix="race/shot", PromptId=f"p{i}"))
                written += 1
                if i % 5 == 0:
                    clear_markers(out, "race/shot")
            except (MarkerWriteError, UnsafePrefixError):
                refused += 1
            assert tree(outside) == {"shot.done": b"decoy: must stay"}, f"write {i} reached the outside folder"
    finally:
        stop.touch()
        out_text, _ = swapper.communicate(timeout=60)
    swaps = json.loads(out_text.strip().splitlines()[-1])["swaps"]
    print(f"\n{written} markers written, {refused} refused, {swaps} folder swaps")
    assert tree(outside) == {"shot.done": b"decoy: must stay"}
    assert not (out / "race").is_symlink()
    assert swaps > 1000 and written > 0 and refused > 0  # the swaps really raced the writes


def _meta(out: Path, run_id: str) -> dict:
    return {"RunId": run_id, "RunDir": str(run_dir(out, run_id)), "Scenes": []}


@pytest.mark.parametrize("link", ["telemetry", "telemetry/runs", "telemetry/runs/r1"])
def test_finalize_refuses_a_run_folder_that_leads_out(places: tuple[Path, Path], link: str) -> None:
    """telemetry, runs or the run folder as a symlink to an outside folder: refused naming it, nothing written there."""
    out, outside = places
    linked = out / link
    linked.parent.mkdir(parents=True, exist_ok=True)
    linked.symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError) as caught:
        finalize_files(run_dir(out, "r1"), _meta(out, "r1"), "summary\n", output_dir=out)
    assert str(linked) in str(caught.value) and "outside" in str(caught.value)
    assert tree(outside) == {"shot.done": b"decoy: must stay"}
    with pytest.raises(UnsafePathError):
        read_run_file(out, "r1", METADATA_FILE)


def test_run_files_that_are_symlinks_are_neither_written_nor_served(places: tuple[Path, Path]) -> None:
    """A run file that is a symlink to an outside file: finalize refuses it, reading refuses it; the file is intact."""
    out, outside = places
    secret = outside / "secret.json"
    secret.write_bytes(b'{"secret": true}')
    folder = run_dir(out, "r2")
    folder.mkdir(parents=True)
    (folder / METADATA_FILE).symlink_to(secret)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        finalize_files(folder, _meta(out, "r2"), "summary\n", output_dir=out)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        read_run_file(out, "r2", METADATA_FILE)
    assert secret.read_bytes() == b'{"secret": true}'
    with pytest.raises(FileNotFoundError):
        read_run_file(out, "r2", SUMMARY_FILE)
    with pytest.raises(FileNotFoundError):
        read_run_file(out, "never", SUMMARY_FILE)


def test_a_symlink_that_stays_inside_is_followed_for_folders(places: tuple[Path, Path]) -> None:
    """output/telemetry linking to a folder inside the output folder is fine: the files land in the real folder."""
    out, _ = places
    (out / "real-telemetry").mkdir()
    (out / "telemetry").symlink_to(out / "real-telemetry", target_is_directory=True)
    report = finalize_files(run_dir(out, "r3"), _meta(out, "r3"), "summary\n", output_dir=out)
    assert report is not None
    assert (out / "real-telemetry" / "runs" / "r3" / METADATA_FILE).is_file()
    assert read_run_file(out, "r3", SUMMARY_FILE) == b"summary\n"


def test_consumer_never_copies_or_measures_an_outside_file_while_the_folder_is_swapped(
    places: tuple[Path, Path], tmp_path: Path
) -> None:
    """``wait --copy-to``'s verify-and-copy and the marker's measuring, 300 times while a real process swaps the
    output sub-folder for a link to an outside folder holding a same-named secret: the secret is never copied or
    measured (before, both followed the path after checking it, and copied the secret)."""
    from telemetry.consumer import _copy_all, verify_outputs
    from telemetry.markers import describe_outputs

    out, outside = places
    (out / "race").mkdir()
    (out / "race" / "frame_1.png").write_bytes(b"the real frame")
    (outside / "frame_1.png").write_bytes(b"SECRET from outside, longer")
    entry = describe_outputs(out, [{"filename": "frame_1.png", "subfolder": "race", "type": "output"}], sha256=False)
    stop = tmp_path / "stop"
    swapper = subprocess.Popen(
        [sys.executable, str(HELPERS / "swap_dir.py"), str(out / "race"), str(outside), str(stop), "2000000", "60"],
        stdout=subprocess.PIPE,
        text=True,
    )
    copied = measured = 0
    try:
        assert swapper.stdout is not None
        assert swapper.stdout.readline().strip() == "ready"
        for i in range(300):
            copy_to = tmp_path / f"copy-{i}"
            check = verify_outputs(out, entry, verify_hash=False)
            done, _ = _copy_all(check.files, copy_to, out.resolve())
            for path in done:
                assert Path(path).read_bytes() == b"the real frame", f"copy {i} took the outside file"
                copied += 1
            (measure,) = describe_outputs(
                out, [{"filename": "frame_1.png", "subfolder": "race", "type": "output"}], sha256=True
            )
            if not measure.missing:
                assert measure.size_bytes == len(b"the real frame"), f"measure {i} read the outside file"
                measured += 1
    finally:
        stop.touch()
        swapper.communicate(timeout=60)
    print(f"\n{copied} copies and {measured} measurements of 300 went through; none reached outside")
    assert copied > 0 and measured > 0


def test_start_up_temp_cleaning_never_removes_outside_files(places: tuple[Path, Path]) -> None:
    """clean_finalize_temps removes a dead writer's temp in a real run folder, but never one behind a ``telemetry``
    link leading out (before, it followed the link and removed the outside file)."""
    clean_finalize_temps = sub("server_routes.runs").clean_finalize_temps
    out, outside = places
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    temp = f".{METADATA_FILE}.{int(dead.stdout)}.0badc0de.tmp"
    (out / "real" / "runs" / "r1").mkdir(parents=True)
    (out / "real" / "runs" / "r1" / temp).write_bytes(b"{cut off")
    (outside / "runs" / "r2").mkdir(parents=True)
    (outside / "runs" / "r2" / temp).write_bytes(b"outside, not ours")
    (out / "telemetry").symlink_to(outside, target_is_directory=True)
    assert clean_finalize_temps(out) == []
    assert (outside / "runs" / "r2" / temp).read_bytes() == b"outside, not ours"
    (out / "telemetry").unlink()
    (out / "real").rename(out / "telemetry")
    assert [p.name for p in clean_finalize_temps(out)] == [temp]
    assert not (out / "telemetry" / "runs" / "r1" / temp).exists()
