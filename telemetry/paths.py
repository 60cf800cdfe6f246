"""Path guards for names that come from a workflow or a command line: prefixes and ids.

A prefix is checked against the rules of every OS, not just the one we run on, because a workflow written on
Windows is often run on Linux and the other way round.
"""

from __future__ import annotations

import errno
import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from .atomic import UnsafePathError

_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_SEPARATORS_RE = re.compile(r"[\\/]")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Windows maps these names (with any extension) to devices in every folder.
_RESERVED_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{stem}{n}" for stem in ("COM", "LPT") for n in "123456789\u00b9\u00b2\u00b3"]
)


# The longest file name most file systems hold (ext4, XFS, APFS, NTFS: 255 bytes or UTF-16 units, never more than
# the UTF-8 bytes). A marker's temp file is ``.<stem>.failed.<pid>.<8 hex>.tmp`` (telemetry.atomic): 29 bytes more.
NAME_MAX = 255
MAX_FILE_STEM = NAME_MAX - len("..failed.4194304.01234567.tmp")


class UnsafePrefixError(ValueError):
    """A prefix that is empty, absolute or would leave the output folder; the message names the input and the fix."""


def _refuse(input_name: str, prefix: str, why: str, fix: str) -> UnsafePrefixError:
    return UnsafePrefixError(f"{input_name} {prefix!r} {why}; {fix}")


def _check_text(prefix: str, input_name: str) -> list[str]:
    """Apply the OS-independent rules and return the segments split on both kinds of separator."""
    relative_fix = "give a path relative to ComfyUI's output folder, such as 'scene01/frame'"
    if not prefix.strip():
        raise _refuse(input_name, prefix, "is empty", f"{relative_fix}")
    for index, char in enumerate(prefix):
        if unicodedata.category(char) == "Cs":  # a lone surrogate: no file system can name it, no JSON can hold it
            raise _refuse(
                input_name,
                prefix,
                f"holds a lone surrogate ({ord(char):#06x}) at position {index}",
                "send valid Unicode text",
            )
        if unicodedata.category(char) == "Cc":
            raise _refuse(
                input_name,
                prefix,
                f"contains a control character ({ord(char):#04x}) at position {index}",
                "remove it",
            )
    if _DRIVE_RE.match(prefix):
        raise _refuse(input_name, prefix, "is an absolute path or has a drive letter", relative_fix)
    if prefix[0] in "/\\":
        raise _refuse(input_name, prefix, "is an absolute path (it starts with a path separator)", relative_fix)
    if prefix[-1] in "/\\":
        raise _refuse(
            input_name,
            prefix,
            "ends with a path separator, so it names a folder, not a file",
            "add a file name after it, such as 'scene01/frame'",
        )
    segments = _SEPARATORS_RE.split(prefix)
    for segment in segments:
        # Windows drops trailing dots and spaces, so '.. ' and '...' can act as '..' there.
        if segment and segment != "." and not segment.rstrip(". "):
            raise _refuse(
                input_name,
                prefix,
                f"has a {segment!r} segment that climbs out of the folder",
                "remove the '..' parts and give a path inside ComfyUI's output folder",
            )
        stem = segment.split(".", 1)[0].rstrip(" ").upper()
        if stem in _RESERVED_NAMES:
            raise _refuse(
                input_name, prefix, f"uses {segment!r}, a reserved device name on Windows", "choose another name"
            )
    for segment in segments[:-1]:
        if len(segment.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise _refuse(
                input_name,
                prefix,
                f"has a folder name of {len(segment.encode('utf-8', 'surrogatepass'))} bytes; file systems allow "
                f"{NAME_MAX}",
                "shorten it",
            )
    size = len(segments[-1].encode("utf-8", "surrogatepass"))
    if size > MAX_FILE_STEM:
        raise _refuse(
            input_name,
            prefix,
            f"ends in a file name of {size} bytes: its marker (<name>.failed) and the marker's temp file would "
            f"exceed the {NAME_MAX}-byte name limit of file systems",
            f"shorten the last part to at most {MAX_FILE_STEM} bytes",
        )
    if segments[-1] == ".":
        raise _refuse(
            input_name,
            prefix,
            "names the output folder itself, not a file",
            "add a file name, such as 'scene01/frame'",
        )
    return segments


def _is_within(child: str, parent: str) -> bool:
    child_n, parent_n = os.path.normcase(child), os.path.normcase(parent)
    try:
        return os.path.commonpath([child_n, parent_n]) == parent_n
    except ValueError:
        # Different drives on Windows.
        return False


def resolve_prefix(output_dir: str | Path, prefix: str, *, input_name: str = "filename_prefix") -> Path:
    """The absolute, symlink-resolved base path for ``prefix`` inside ``output_dir``, or :class:`UnsafePrefixError`."""
    if not isinstance(prefix, str):
        raise UnsafePrefixError(f"{input_name} must be text, not {type(prefix).__name__}; give a relative file name")
    segments = _check_text(prefix, input_name)
    # Join with the native separator rules so the marker lands beside what ComfyUI itself saves for this prefix.
    native = segments if os.name == "nt" else prefix.split("/")
    parts = [part for part in native if part not in ("", ".")]
    try:
        root = os.path.realpath(os.fspath(output_dir))
        candidate = os.path.join(root, *parts)
        real_parent = os.path.realpath(os.path.dirname(candidate))
    except OSError as exc:  # a folder on the way turned into a link (or back) while it was being resolved
        raise _refuse(
            input_name,
            prefix,
            f"could not be resolved ({exc.strerror or exc}): a folder on the way changed while it was checked",
            "keep the folders under ComfyUI's output folder real folders",
        ) from exc
    if not _is_within(real_parent, root):
        raise _refuse(
            input_name,
            prefix,
            f"leads through a symlink to {real_parent}, outside the output folder {root}",
            "give a path whose folders are inside ComfyUI's output folder",
        )
    return Path(real_parent) / os.path.basename(candidate)


def resolve_under(root: str | Path, parts: Sequence[str]) -> tuple[Path, tuple[str, ...]]:
    """``root`` resolved, and ``parts`` below it after following the symlinks that stay inside it.

    Raises :class:`~telemetry.atomic.UnsafePathError` naming the first folder that leads out of ``root`` through a
    symlink. This is the check; :func:`telemetry.atomic.open_folder` on the result is the guard that holds when a
    folder is swapped for a link afterwards.
    """
    root_real = Path(os.path.realpath(os.fspath(root)))
    current = root_real
    for part in parts:
        candidate = current / part
        try:
            real = Path(os.path.realpath(candidate))
        except OSError as exc:  # it turned into a link (or back) while it was being resolved
            raise UnsafePathError(
                exc.errno, f"{candidate} changed while it was checked ({exc.strerror or exc}); refused", candidate
            ) from exc
        if not _is_within(str(real), str(root_real)):
            raise UnsafePathError(
                errno.ELOOP,
                f"{candidate} leads through a symlink to {real}, outside {root_real}: refused, so that nothing is "
                "written or read there; replace the link by a real folder inside it",
                candidate,
            )
        current = real
    return root_real, current.relative_to(root_real).parts


def safe_id(value: str, *, input_name: str) -> str:
    """Return ``value`` when it is a safe run or scene id, else raise ValueError naming ``input_name`` and why."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{input_name} is empty; give 1-128 letters, digits, '.', '_' or '-'")
    if len(value) > 128:
        raise ValueError(f"{input_name} {value[:32]!r}... is {len(value)} characters long; use at most 128")
    if not _ID_RE.fullmatch(value):
        raise ValueError(
            f"{input_name} {value!r} must start with a letter or digit and contain only letters, digits, '.', '_' or '-'"
        )
    if ".." in value:
        raise ValueError(f"{input_name} {value!r} contains '..'; remove it")
    return value
