"""resolve_prefix and safe_id: every escaping prefix is refused, and refusing writes nothing anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from telemetry.markers import DoneMarker, FailedMarker, clear_markers, write_done_marker, write_failed_marker
from telemetry.paths import UnsafePrefixError, resolve_prefix, safe_id


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    """An outer folder holding ComfyUI's output folder, a sibling, and an 'outside' target for symlinks."""
    output = tmp_path / "comfy" / "output"
    (output / "scene01").mkdir(parents=True)
    (output / "scene01" / "frame_00001_.png").write_bytes(b"png")
    outside = tmp_path / "outside"
    outside.mkdir()
    (output / "escape").symlink_to(outside, target_is_directory=True)
    (output / "scene01" / "deeper").symlink_to(outside, target_is_directory=True)
    (output / "inner").symlink_to(output / "scene01", target_is_directory=True)
    return {"root": tmp_path, "output": output, "outside": outside}


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under ``root`` (without following symlinks) with its kind and size."""
    found: dict[str, tuple[str, int]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            st = path.lstat()
            kind = "link" if path.is_symlink() else ("dir" if path.is_dir() else "file")
            found[str(path.relative_to(root))] = (kind, st.st_size if kind == "file" else 0)
    return found


ESCAPING = [
    pytest.param("", "is empty", id="empty"),
    pytest.param("   ", "is empty", id="blank"),
    pytest.param("C:\\x", "drive letter", id="windows-absolute"),
    pytest.param("C:x", "drive letter", id="drive-relative"),
    pytest.param("c:/x", "drive letter", id="drive-forward-slash"),
    pytest.param("\\\\srv\\share\\x", "absolute", id="unc"),
    pytest.param("//srv/share/x", "absolute", id="unc-forward"),
    pytest.param("\\x", "absolute", id="root-of-drive"),
    pytest.param("..", "'..'", id="dotdot"),
    pytest.param("../x", "'..'", id="dotdot-first"),
    pytest.param("a/../../x", "'..'", id="dotdot-posix"),
    pytest.param("a\\..\\..\\x", "'..'", id="dotdot-windows"),
    pytest.param("a/..\\../x", "'..'", id="dotdot-mixed"),
    pytest.param("a/.. /x", "'.. '", id="dotdot-trailing-space"),
    pytest.param("a/.../x", "'...'", id="three-dots"),
    pytest.param("x\x00", "control character", id="nul"),
    pytest.param("a/\x00b", "control character", id="nul-in-segment"),
    pytest.param("a\nb", "control character", id="newline"),
    pytest.param("a\x85b", "control character", id="c1-control"),
    pytest.param("scene01/", "ends with a path separator", id="trailing-slash"),
    pytest.param("scene01\\", "ends with a path separator", id="trailing-backslash"),
    pytest.param(".", "output folder itself", id="dot"),
    pytest.param("scene01/.", "output folder itself", id="trailing-dot"),
    pytest.param("escape/x", "symlink", id="symlink-out"),
    pytest.param("scene01/deeper/x", "symlink", id="nested-symlink-out"),
    pytest.param("escape/new/sub/x", "symlink", id="symlink-out-missing-below"),
    pytest.param("scene01/NUL", "reserved device name", id="windows-device"),
    pytest.param("com1.txt", "reserved device name", id="windows-device-ext"),
]


@pytest.mark.parametrize(("prefix", "why"), ESCAPING)
def test_escaping_prefix_is_refused_and_writes_nothing(tree: dict[str, Path], prefix: str, why: str) -> None:
    """Each refusal names the input and the reason, and neither writer nor clearer touches any file."""
    before = snapshot(tree["root"])
    with pytest.raises(UnsafePrefixError) as caught:
        resolve_prefix(tree["output"], prefix)
    message = str(caught.value)
    assert message.startswith("filename_prefix ")
    assert why in message
    assert "; " in message  # the fix follows the reason
    with pytest.raises(UnsafePrefixError):
        write_done_marker(tree["output"], prefix, DoneMarker(Prefix=prefix or "x"))
    with pytest.raises(UnsafePrefixError):
        write_failed_marker(tree["output"], prefix, FailedMarker(Prefix=prefix or "x", Message="m"))
    with pytest.raises(UnsafePrefixError):
        clear_markers(tree["output"], prefix)
    assert snapshot(tree["root"]) == before


def test_absolute_prefix_pointing_elsewhere_is_refused(tree: dict[str, Path]) -> None:
    """An absolute POSIX path, even to a real writable folder, is refused before anything is written there."""
    target = tree["outside"] / "abs"
    before = snapshot(tree["root"])
    with pytest.raises(UnsafePrefixError, match=r"^filename_prefix .* is an absolute path"):
        write_done_marker(tree["output"], str(target), DoneMarker(Prefix="x"))
    assert not Path(str(target) + ".done").exists()
    assert snapshot(tree["root"]) == before


def test_input_name_is_used_in_the_message(tmp_path: Path) -> None:
    """CLI callers get their own flag name in the message."""
    with pytest.raises(UnsafePrefixError, match=r"^--prefix '\.\./x'"):
        resolve_prefix(tmp_path, "../x", input_name="--prefix")


def test_non_text_prefix_is_refused(tmp_path: Path) -> None:
    """A prefix wired from a non-string input gets a clear message, not a TypeError."""
    with pytest.raises(UnsafePrefixError, match="must be text"):
        resolve_prefix(tmp_path, 7)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("frame", "frame"),
        ("scene01/frames", "scene01/frames"),
        ("./scene01//frames", "scene01/frames"),
        ("scene01/./frames", "scene01/frames"),
        ("new/sub/folder/x", "new/sub/folder/x"),
        ("inner/x", "scene01/x"),  # a symlink that stays inside is followed
        ("escape", "escape"),  # the prefix itself may be a link: the marker is escape.done beside it
        ("%date:yyyy-MM-dd%/x", "%date:yyyy-MM-dd%/x"),
        ("..x/y..", "..x/y.."),
        ("a b/ c", "a b/ c"),
    ],
)
def test_safe_prefix_resolves_inside(tree: dict[str, Path], prefix: str, expected: str) -> None:
    """Sub-folders, dot segments and inside symlinks resolve to an absolute path within the real output folder."""
    result = resolve_prefix(tree["output"], prefix)
    real_output = Path(os.path.realpath(tree["output"]))
    assert result.is_absolute()
    assert result == real_output / expected


def test_output_dir_through_a_symlink_is_resolved(tmp_path: Path) -> None:
    """An output folder reached through a link resolves to its real location, and prefixes stay inside it."""
    real = tmp_path / "real-output"
    real.mkdir()
    link = tmp_path / "link-output"
    link.symlink_to(real, target_is_directory=True)
    assert resolve_prefix(link, "a/b") == real / "a" / "b"
    assert resolve_prefix(str(link), "c") == real / "c"


def test_dotdot_inside_name_is_allowed_only_as_part_of_a_name(tmp_path: Path) -> None:
    """'..' as a whole segment is refused, but 'a..b' is an ordinary name."""
    assert resolve_prefix(tmp_path, "a..b").name == "a..b"
    with pytest.raises(UnsafePrefixError):
        resolve_prefix(tmp_path, "a/..")


@pytest.mark.parametrize("value", ["run1", "Scene_01", "a", "r.2024-01-01", "A" * 128, "0abc"])
def test_safe_id_accepts(value: str) -> None:
    """Ordinary run and scene ids pass through unchanged."""
    assert safe_id(value, input_name="run_id") == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "is empty"),
        ("A" * 129, "at most 128"),
        (".hidden", "must start with a letter or digit"),
        ("-x", "must start with a letter or digit"),
        ("a/b", "only letters"),
        ("a\\b", "only letters"),
        ("a b", "only letters"),
        ("a\x00", "only letters"),
        ("a..b", "contains '..'"),
        ("é", "only letters"),
    ],
)
def test_safe_id_refuses(value: str, why: str) -> None:
    """Unsafe ids raise ValueError naming the input and the reason."""
    with pytest.raises(ValueError) as caught:
        safe_id(value, input_name="scene_id")
    assert str(caught.value).startswith("scene_id")
    assert why in str(caught.value)
