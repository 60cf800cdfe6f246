"""The marker consumer: ``python -m telemetry wait`` and ``python -m telemetry write-marker``.

``wait`` blocks until ``<prefix>.done`` or ``<prefix>.failed`` appears (inotify on Linux, polling elsewhere), checks
every output the marker lists, optionally copies them, and prints one JSON object. Exit codes: 0 done and verified,
1 failed / invalid marker / verification or copy failed, 2 bad input, 3 timed out. With ``--prompt-id`` or
``--newer-than`` a marker of another prompt (or an older one) is not the answer: it is reported as ignored and the
wait goes on until the file is replaced by the right one.

On a timeout with ``--copy-to`` it falls back to what the pre-marker helper did: copy the files matching the prefix
that were modified since the wait began (or ``--newer-than``) once their sizes and mtimes hold still, skip older ones
as earlier renders' (saying so), and leave a ``forced-copy-debug-<UTC>.txt`` saying what it saw, copied and skipped.

``write-marker`` is the marker writer for scripts; a done marker lists the files matching the prefix
(see :func:`find_candidates`) as its Outputs, only those modified since ``--since`` and only the newest ``--frames``
of them when given (see :func:`select_outputs`); FrameCount is ``--frames`` or, without it, the number listed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import re
import select
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field

from .atomic import (
    MarkerWriteError,
    UnsafePathError,
    atomic_write,
    is_temp_name,
    open_file_under,
    remove_stale_temps,
    temp_name_for,
)
from .markers import (
    HASH_CHUNK,
    MARKER_SUFFIXES,
    DoneMarker,
    FailedMarker,
    MarkerReadError,
    OutputFile,
    describe_outputs,
    format_utc,
    marker_paths,
    read_marker,
    sha256_file,
    write_done_marker,
    write_failed_marker,
)
from .paths import UnsafePrefixError, resolve_prefix

logger = logging.getLogger("run_telemetry.markers")

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TIMEOUT = 3

# With inotify a wake-up normally comes from an event; the periodic re-check covers file systems
# (network shares, some container mounts) where events never arrive.
INOTIFY_RECHECK_SECONDS = 0.5
# A marker that exists but does not parse may be mid-way through the non-atomic Windows fallback write.
INVALID_MARKER_GRACE_SECONDS = 2.0
# mtimes on some file systems are coarse; a file touched just before the wait began still counts as new.
MTIME_SLACK_SECONDS = 1.0

_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100

Clock = Callable[[], float]
Sleep = Callable[[float], None]


class BadInputError(ValueError):
    """Input the user can fix; reported as one sentence on stderr with exit code 2."""


class _Report(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


class ForcedCopyEntry(_Report):
    """One file the forced copy looked at: copied, skipped or failed, and why."""

    source: str = Field(alias="Source")
    action: Literal["copied", "skipped", "failed"] = Field(alias="Action")
    reason: str = Field(alias="Reason")
    destination: str | None = Field(None, alias="Destination")
    size_bytes: int | None = Field(None, alias="Bytes")
    modified_at: str | None = Field(None, alias="ModifiedAt")


class WaitReport(_Report):
    """The one JSON object ``wait`` prints."""

    status: Literal["done", "failed", "verification-failed", "copy-failed", "invalid-marker", "timeout"] = Field(
        alias="Status"
    )
    marker_path: str | None = Field(None, alias="MarkerPath")
    marker: dict[str, Any] | None = Field(None, alias="Marker")
    verified: bool | None = Field(None, alias="Verified")
    problems: list[str] = Field(default_factory=list, alias="Problems")
    copied: list[str] = Field(default_factory=list, alias="Copied")
    wait_seconds: float = Field(alias="WaitSeconds")
    watcher: str = Field(alias="Watcher")
    forced_copy_triggered: bool = Field(False, alias="ForcedCopyTriggered")
    forced_copy_debug_path: str | None = Field(None, alias="ForcedCopyDebugPath")
    fallback_notes: list[str] = Field(default_factory=list, alias="FallbackNotes")
    ignored_markers: list[str] = Field(default_factory=list, alias="IgnoredMarkers")
    forced_copy_files: list[ForcedCopyEntry] = Field(default_factory=list, alias="ForcedCopyFiles")


# --- naming what to wait for --------------------------------------------------------------------------------------


def parse_time(value: str, *, option: str) -> datetime:
    """An aware UTC datetime from ISO 8601 with a zone (``2026-11-29T18:00:00Z``) or Unix epoch seconds.

    Raises :class:`BadInputError` naming ``option`` for anything else, a time without a zone included (it would be
    read in some local zone silently).
    """
    text = value.strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        try:
            return datetime.fromtimestamp(float(text), timezone.utc)
        except (OverflowError, OSError, ValueError) as exc:
            raise BadInputError(f"{option} {value!r} is out of range as epoch seconds ({exc})") from exc
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise BadInputError(
            f"{option} {value!r} is not a time; give ISO 8601 with a zone, such as 2026-11-29T18:00:00Z, "
            "or Unix epoch seconds"
        ) from None
    if parsed.tzinfo is None:
        raise BadInputError(
            f"{option} {value!r} has no time zone; add one (Z for UTC, or an offset such as +01:00) or give epoch seconds"
        )
    return parsed.astimezone(timezone.utc)


@dataclass(frozen=True)
class MarkerFilter:
    """What a marker must carry to be the answer: this ``PromptId``, a ``Timestamp`` at or after ``newer_than``.

    ``Timestamp`` is written at millisecond precision, so ``newer_than`` is compared at millisecond precision too
    (a marker written in the same millisecond counts as newer).
    """

    prompt_id: str | None = None
    newer_than: datetime | None = None

    def __bool__(self) -> bool:
        return self.prompt_id is not None or self.newer_than is not None

    def reason_to_ignore(self, marker: DoneMarker | FailedMarker) -> str | None:
        """Why ``marker`` is not the one waited for, or ``None`` when it is."""
        if self.prompt_id is not None and marker.prompt_id != self.prompt_id:
            return f"its PromptId {marker.prompt_id!r} is not {self.prompt_id!r}"
        if self.newer_than is not None:
            cutoff = self.newer_than.replace(microsecond=self.newer_than.microsecond // 1000 * 1000)
            if marker.timestamp < cutoff:
                return f"its Timestamp {format_utc(marker.timestamp)} is older than {format_utc(self.newer_than)}"
        return None


# --- watching -----------------------------------------------------------------------------------------------------


class _Inotify:
    """A minimal inotify watch on one folder through libc, used only to wake up early."""

    def __init__(self, folder: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        wd = libc.inotify_add_watch(fd, os.fsencode(folder), _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, os.strerror(err), str(folder))
        self._fd = fd

    def wait(self, timeout: float) -> None:
        """Block until an event arrives or ``timeout`` passes, then drain pending events."""
        ready, _, _ = select.select([self._fd], [], [], max(timeout, 0.0))
        if not ready:
            return
        # The events themselves are not parsed: any change in the folder just triggers a re-check.
        while True:
            try:
                if not os.read(self._fd, 65536):
                    return
            except BlockingIOError:
                return

    def close(self) -> None:
        """Release the inotify descriptor."""
        os.close(self._fd)


def _open_inotify(folder: Path) -> _Inotify | None:
    try:
        return _Inotify(folder)
    except (OSError, AttributeError) as exc:
        logger.info("inotify unavailable for %s (%s); polling instead", folder, exc)
        return None


@dataclass
class WaitOutcome:
    """What :func:`wait_for_marker` found: a marker, an invalid marker, or nothing before the deadline.

    ``ignored`` describes markers that were valid but not the one waited for (another prompt's, or too old).
    """

    path: Path | None
    marker: DoneMarker | FailedMarker | None
    error: str | None
    waited: float
    watcher: str
    notes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


_Signature = tuple[int, int, int, int]


def _newest_existing(paths: tuple[Path, ...]) -> tuple[list[tuple[Path, _Signature]], list[str]]:
    present: list[tuple[int, int, Path, _Signature]] = []
    for order, path in enumerate(paths):
        try:
            st = path.stat()
        except OSError:
            continue
        present.append((st.st_mtime_ns, order, path, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)))
    # Newest first; on an mtime tie the .failed one (listed second) wins, the safer reading.
    present.sort(key=lambda item: (item[0], item[1]), reverse=True)
    notes = []
    if len(present) > 1:
        notes.append(f"both {present[0][2].name} and {present[1][2].name} exist; used the newer, {present[0][2].name}")
    return [(item[2], item[3]) for item in present], notes


def _try_read(path: Path) -> tuple[DoneMarker | FailedMarker | None, str | None]:
    try:
        marker = read_marker(path)
    except FileNotFoundError:
        return None, None
    except (OSError, MarkerReadError) as exc:
        return None, str(exc)
    expected = "done" if path.name.endswith(".done") else "failed"
    if marker.kind != expected:
        return None, f"marker {path} says Kind {marker.kind!r} but its name ends in .{expected}"
    return marker, None


def wait_for_marker(
    base: Path,
    *,
    timeout: float,
    poll_interval: float,
    watcher: Literal["auto", "poll"] = "auto",
    on_ready: Callable[[str], None] | None = None,
    accept: MarkerFilter | None = None,
    on_ignore: Callable[[str], None] | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = time.sleep,
) -> WaitOutcome:
    """Wait until ``<base>.done`` or ``<base>.failed`` holds a valid marker ``accept`` takes, or ``timeout`` passes.

    A valid marker that ``accept`` refuses (another prompt's, or older than asked) is not the answer: it is
    described once in ``WaitOutcome.ignored`` (and to ``on_ignore``) and the wait goes on until that file is replaced.
    """
    done_path, failed_path = marker_paths(base)
    folder = base.parent
    start = clock()
    deadline = start + timeout
    may_watch = watcher == "auto" and sys.platform.startswith("linux")
    notifier = None
    if may_watch and folder.is_dir():
        may_watch = False
        notifier = _open_inotify(folder)
    used = "inotify" if notifier else "poll"
    invalid_since: float | None = None
    # Markers already described as not the answer. Every look reads the files again: a file's identity and stamp
    # (inode, mtime, size) can stay the same across a rewrite by another prompt (a same-size marker in the same tick
    # of a coarse file-system clock, rewritten in place or given a freed inode), so they cannot tell that it changed.
    announced: set[tuple[Path, str | None, datetime]] = set()
    ignored: list[str] = []
    if on_ready is not None:
        on_ready(used)
    try:
        while True:
            existing, notes = _newest_existing((done_path, failed_path))
            invalid_error: tuple[Path, str] | None = None
            for path, _signature in existing:
                marker, error = _try_read(path)
                if marker is None:
                    if error is not None:
                        invalid_error = (path, error)
                    break
                reason = accept.reason_to_ignore(marker) if accept else None
                if reason is None:
                    return WaitOutcome(path, marker, None, clock() - start, used, notes, ignored)
                key = (path, marker.prompt_id, marker.timestamp)
                if key in announced:
                    continue
                announced.add(key)
                text = f"ignored {path}: {reason}"
                ignored.append(text)
                if on_ignore is not None:
                    on_ignore(text)
            if invalid_error is None:
                invalid_since = None
            else:
                invalid_since = clock() if invalid_since is None else invalid_since
                if clock() - invalid_since >= INVALID_MARKER_GRACE_SECONDS or clock() >= deadline:
                    return WaitOutcome(invalid_error[0], None, invalid_error[1], clock() - start, used, notes, ignored)
            remaining = deadline - clock()
            if remaining <= 0:
                return WaitOutcome(None, None, None, clock() - start, used, ignored=ignored)
            if notifier is None and may_watch and folder.is_dir():
                # One try once the folder exists; if inotify is unavailable, keep polling without retrying.
                may_watch = False
                notifier = _open_inotify(folder)
                if notifier is not None:
                    used = "inotify"
                    # A marker may have landed before the watch existed: look again before blocking.
                    continue
            if notifier is not None:
                notifier.wait(min(remaining, INOTIFY_RECHECK_SECONDS))
            else:
                sleep(min(remaining, poll_interval))
    finally:
        if notifier is not None:
            notifier.close()


# --- verifying and copying ----------------------------------------------------------------------------------------


@dataclass
class Verification:
    """Problems found in a done marker's outputs, and the files that passed, as (source, path relative to root)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[tuple[Path, Path]] = field(default_factory=list)


def verify_outputs(output_dir: Path, outputs: list[OutputFile], *, verify_hash: bool) -> Verification:
    """Check that every listed output exists with its recorded size (and sha256 when asked and recorded)."""
    root = Path(os.path.realpath(output_dir))
    result = Verification()
    for entry in outputs:
        label = f"{entry.subfolder}/{entry.filename}" if entry.subfolder else entry.filename
        if entry.folder_type != "output":
            result.notes.append(f"skipped {label!r}: type {entry.folder_type!r} is not in the output folder")
            continue
        if entry.missing:
            result.problems.append(f"{label!r} was already missing when the marker was written")
            continue
        try:
            path = Path(os.path.realpath(root / entry.subfolder / entry.filename))
        except OSError as exc:  # a folder on the way changed while it was resolved
            result.problems.append(f"{label!r} could not be resolved: {exc.strerror or exc}")
            continue
        try:
            relative = path.relative_to(root)
        except ValueError:
            result.problems.append(f"{label!r} points outside the output folder; not checked")
            continue
        try:
            # Opened below the output folder without following links (a swap after the check is refused).
            with open_file_under(root, relative) as handle:
                size = os.fstat(handle.fileno()).st_size
                if entry.size_bytes is not None and size != entry.size_bytes:
                    result.problems.append(f"{label!r} is {size} bytes, the marker says {entry.size_bytes}")
                    continue
                if verify_hash:
                    if entry.sha256 is None:
                        result.notes.append(f"{label!r} has no Sha256 in the marker; checked its size only")
                    elif sha256_file(handle) != entry.sha256.lower():
                        result.problems.append(f"{label!r} does not match the marker's Sha256")
                        continue
        except UnsafePathError as exc:
            result.problems.append(f"{label!r} not checked: {exc}")
            continue
        except OSError:
            result.problems.append(f"{label!r} does not exist")
            continue
        result.files.append((path, relative))
    return result


def copy_atomic(source: Path | BinaryIO, destination: Path) -> None:
    """Copy ``source`` (a path, or an open handle) to ``destination`` through a temp file in its folder, so a reader
    never sees half a copy; the copy keeps the source's modification time."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(destination)
    tmp = destination.parent / temp_name_for(destination)
    try:
        with contextlib.ExitStack() as stack:
            src = stack.enter_context(source.open("rb")) if isinstance(source, Path) else source
            with tmp.open("xb") as dst:
                shutil.copyfileobj(src, dst, HASH_CHUNK)
                dst.flush()
                os.fsync(dst.fileno())
            st = os.fstat(src.fileno())
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_all(files: list[tuple[Path, Path]], copy_to: Path, root: Path) -> tuple[list[str], list[str]]:
    """Copy each (source, path relative to ``root``), the source opened below ``root`` without following links."""
    copied: list[str] = []
    problems: list[str] = []
    for source, relative in files:
        destination = copy_to / relative
        try:
            with open_file_under(root, relative) as handle:
                copy_atomic(handle, destination)
        except OSError as exc:
            problems.append(f"could not copy {source} to {destination}: {exc.strerror or exc}")
            continue
        copied.append(str(destination))
    return copied, problems


# --- forced copy on timeout ---------------------------------------------------------------------------------------


def find_candidates(base: Path) -> list[Path]:
    """Regular files beside ``base`` whose names start with its name; markers and temp files excluded."""
    found: list[Path] = []
    try:
        entries = list(os.scandir(base.parent))
    except OSError:
        return found
    for entry in entries:
        name = entry.name
        if not name.startswith(base.name) or name.endswith(MARKER_SUFFIXES):
            continue
        if is_temp_name(name) or name.endswith(".tmp"):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                found.append(Path(entry.path))
        except OSError:
            continue
    return sorted(found)


Snapshot = dict[str, tuple[int, int]]


def _snapshot(paths: list[Path]) -> Snapshot:
    snap: Snapshot = {}
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        snap[path.name] = (stat.st_size, stat.st_mtime_ns)
    return snap


@dataclass
class _Candidate:
    path: Path
    size: int
    mtime_ns: int


def _stat_candidates(paths: list[Path]) -> list[_Candidate]:
    found = []
    for path in paths:
        try:
            st = path.stat(follow_symlinks=False)
        except OSError:
            continue
        found.append(_Candidate(path, st.st_size, st.st_mtime_ns))
    return found


def _freshness(candidate: _Candidate, cutoff: float, cutoff_label: str, slack: float) -> tuple[bool, str]:
    """Whether a forced copy may take ``candidate`` (modified at/after ``cutoff`` less ``slack`` s), and why."""
    mtime = candidate.mtime_ns / 1e9
    stamp = _utc_ns(candidate.mtime_ns)
    if mtime >= cutoff:
        return True, f"modified {stamp}, after {cutoff_label}"
    if mtime >= cutoff - slack:
        return True, (
            f"modified {stamp}, {cutoff - mtime:.3f} s before {cutoff_label}: within the {slack:g} s "
            "allowed for coarse file-system clocks"
        )
    return False, f"stale: modified {stamp}, {cutoff - mtime:.1f} s before {cutoff_label}"


@dataclass
class ForcedCopy:
    """What the forced copy did: every file looked at with its action and reason."""

    copied: list[str]
    problems: list[str]
    stable: bool
    debug_path: Path | None
    note: str
    entries: list[ForcedCopyEntry] = field(default_factory=list)


def _utc_ns(ns: int) -> str:
    stamp = datetime.fromtimestamp(ns / 1e9, timezone.utc)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _fmt_snapshot(snap: Snapshot) -> str:
    if not snap:
        return "(no files)"
    return ", ".join(f"{name}={size}B@{_utc_ns(mtime_ns)}" for name, (size, mtime_ns) in sorted(snap.items()))


def _select(
    base: Path, cutoff: float, cutoff_label: str, slack: float, allow_stale: bool
) -> tuple[list[Path], dict[Path, str]]:
    chosen: list[Path] = []
    skipped: dict[Path, str] = {}
    for candidate in _stat_candidates(find_candidates(base)):
        fresh, why = _freshness(candidate, cutoff, cutoff_label, slack)
        if fresh or allow_stale:
            chosen.append(candidate.path)
        else:
            skipped[candidate.path] = why
    return chosen, skipped


def forced_copy(
    output_dir: Path,
    base: Path,
    copy_to: Path,
    *,
    since: float,
    stability_seconds: float,
    stability_retries: int,
    prefix: str,
    waited: float,
    since_label: str = "the wait began",
    allow_stale: bool = False,
    slack: float = MTIME_SLACK_SECONDS,
    sleep: Sleep = time.sleep,
) -> ForcedCopy:
    """Copy the files matching the prefix modified since ``since`` (epoch seconds) once they hold still.

    A file modified before ``since`` (less ``slack`` seconds, for coarse file-system clocks) is an earlier render's:
    it is skipped, and listed as skipped with its reason, unless ``allow_stale`` (then it is copied and its reason
    says it is stale).
    A ``forced-copy-debug-<UTC>.txt`` in ``copy_to`` says what was seen, copied and skipped, and why.
    """
    root = Path(os.path.realpath(output_dir))
    cutoff_text = format_utc(datetime.fromtimestamp(since, timezone.utc))
    cutoff_label = f"{since_label} ({cutoff_text})"
    lines = [
        "Run Telemetry forced copy",
        f"began: {format_utc(datetime.now(timezone.utc))}",
        f"output dir: {root}",
        f"prefix: {prefix!r} -> {base}",
        f"no {base.name}.done or {base.name}.failed within {waited:.2f} s",
        f"cut-off: {cutoff_label}; files modified before it are earlier renders' and "
        + ("copied anyway (--allow-stale-copy)" if allow_stale else "not copied"),
        "",
        "candidates (files in the prefix's folder starting with its name, markers and temp files excluded):",
    ]
    all_candidates = find_candidates(base)
    lines += [
        f"  {name}: {size} bytes, modified {_utc_ns(mtime)}"
        for name, (size, mtime) in _snapshot(all_candidates).items()
    ]
    if not all_candidates:
        lines.append("  (none)")
    stable = False
    selected: list[Path] = []
    skipped: dict[Path, str] = {}
    lines += ["", f"stability checks ({stability_seconds} s window, up to {stability_retries} tries):"]
    for attempt in range(1, stability_retries + 1):
        selected, skipped = _select(base, since, cutoff_label, slack, allow_stale)
        before = _snapshot(selected)
        sleep(stability_seconds)
        selected, skipped = _select(base, since, cutoff_label, slack, allow_stale)
        after = _snapshot(selected)
        stable = before == after
        changed = sorted(set(before.items()) ^ set(after.items()))
        verdict = "stable" if stable else "changed: " + ", ".join(sorted({name for name, _ in changed}))
        lines += [
            f"  try {attempt}: {len(selected)} of {len(selected) + len(skipped)} candidate(s) taken, "
            f"{len(skipped)} skipped as stale",
            f"    before: {_fmt_snapshot(before)}",
            f"    after:  {_fmt_snapshot(after)}",
            f"    -> {verdict}",
        ]
        if stable:
            break
    entries: list[ForcedCopyEntry] = []
    copied: list[str] = []
    problems: list[str] = []
    for candidate in _stat_candidates(selected):
        _, why = _freshness(candidate, since, cutoff_label, slack)
        if allow_stale and why.startswith("stale"):
            why += "; copied because of --allow-stale-copy"
        entry = ForcedCopyEntry(
            Source=str(candidate.path),
            Action="copied",
            Reason=why,
            Bytes=candidate.size,
            ModifiedAt=_utc_ns(candidate.mtime_ns),
        )
        try:
            real = Path(os.path.realpath(candidate.path))
            relative = real.relative_to(root)
        except (OSError, ValueError):
            entries.append(
                entry.model_copy(update={"action": "skipped", "reason": "it leads outside the output folder"})
            )
            continue
        destination = copy_to / relative
        done, trouble = _copy_all([(real, relative)], copy_to, root)
        if trouble:
            problems += trouble
            entries.append(entry.model_copy(update={"action": "failed", "reason": trouble[0]}))
            continue
        copied += done
        entries.append(entry.model_copy(update={"destination": str(destination)}))
    for path, why in sorted(skipped.items()):
        stats = _stat_candidates([path])
        entries.append(
            ForcedCopyEntry(
                Source=str(path),
                Action="skipped",
                Reason=why,
                Bytes=stats[0].size if stats else None,
                ModifiedAt=_utc_ns(stats[0].mtime_ns) if stats else None,
            )
        )
    for action in ("copied", "failed", "skipped"):
        lines += ["", f"{action}:"]
        chosen = [e for e in entries if e.action == action]
        lines += [f"  {e.source}{' -> ' + e.destination if e.destination else ''}: {e.reason}" for e in chosen]
        if not chosen:
            lines.append("  (none)")
    stability = "after a stable window" if stable else f"although they still changed after {stability_retries} tries"
    stale = [e for e in entries if e.action == "skipped" and e.reason.startswith("stale")]
    note = f"no marker for {prefix!r} within {waited:.2f} s; force-copied {len(copied)} matching file(s)"
    if copied:
        note += f" {stability}"
        if allow_stale and any(e.reason.startswith("stale") for e in entries if e.action == "copied"):
            note += ", some of them modified before " + cutoff_label + " (--allow-stale-copy)"
        else:
            note += f", all modified since {cutoff_label}"
    if stale:
        note += (
            f"; skipped {len(stale)} stale file(s) modified before {cutoff_label} (earlier renders; "
            "--allow-stale-copy copies them too)"
        )
    lines += ["", f"note: {note}"]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    debug_path = copy_to / f"forced-copy-debug-{stamp}.txt"
    try:
        atomic_write(debug_path, ("\n".join(lines) + "\n").encode("utf-8"))
    except MarkerWriteError as exc:
        problems.append(str(exc))
        return ForcedCopy(copied, problems, stable, None, note, entries)
    return ForcedCopy(copied, problems, stable, debug_path, note, entries)


# --- command handlers ---------------------------------------------------------------------------------------------


def _check_output_dir(value: str) -> Path:
    path = Path(value)
    if not path.is_dir():
        raise BadInputError(f"--output-dir {value!r} does not exist or is not a folder; pass ComfyUI's output folder")
    return path


def _emit(payload: BaseModel | dict[str, Any]) -> None:
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json(by_alias=True)
    else:
        text = json.dumps(payload)
    print(text, flush=True)


def _fail_input(command: str, exc: Exception) -> int:
    print(f"python -m telemetry {command}: {exc}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


@dataclass
class _WaitInputs:
    output_dir: Path
    base: Path
    copy_to: Path | None
    accept: MarkerFilter


def _validate_wait_args(args: argparse.Namespace) -> _WaitInputs:
    output_dir = _check_output_dir(args.output_dir)
    base = resolve_prefix(output_dir, args.prefix, input_name="--prefix")
    if args.timeout < 0:
        raise BadInputError(f"--timeout {args.timeout} is negative; give seconds to wait, 0 or more")
    if args.poll_interval <= 0:
        raise BadInputError(f"--poll-interval {args.poll_interval} must be above 0 seconds")
    if args.stability_seconds < 0:
        raise BadInputError(f"--stability-seconds {args.stability_seconds} is negative; give 0 or more")
    if args.stability_retries < 1:
        raise BadInputError(f"--stability-retries {args.stability_retries} must be at least 1")
    if args.prompt_id is not None and not args.prompt_id.strip():
        raise BadInputError("--prompt-id is empty; give the prompt_id POST /prompt answered")
    newer_than = parse_time(args.newer_than, option="--newer-than") if args.newer_than is not None else None
    copy_to = None
    if args.copy_to is not None:
        copy_to = Path(args.copy_to).absolute()
        try:
            copy_to.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInputError(
                f"--copy-to {args.copy_to!r} cannot be used as a folder ({exc.strerror or exc}); pass a writable folder"
            ) from exc
    return _WaitInputs(output_dir, base, copy_to, MarkerFilter(args.prompt_id, newer_than))


def wait_command(args: argparse.Namespace) -> int:
    """Handler for ``wait``: wait for the marker, verify, copy, print one JSON object (or, with ``--server``, the
    prompt's record through the wait route, see :mod:`.remote`)."""
    if args.server is not None:
        disk_only = [
            name
            for name, value in (
                ("--output-dir", args.output_dir),
                ("--prefix", args.prefix),
                ("--copy-to", args.copy_to),
                ("--newer-than", args.newer_than),
            )
            if value is not None
        ]
        if disk_only:
            return _fail_input(
                "wait",
                BadInputError(
                    f"--server waits through HTTP; {', '.join(disk_only)} read a shared disk: give --server with "
                    "--prompt-id, or --output-dir and --prefix without --server"
                ),
            )
        from .remote import wait_server_command

        return wait_server_command(args)
    if args.output_dir is None or args.prefix is None:
        return _fail_input(
            "wait",
            BadInputError("give --output-dir and --prefix (shared disk), or --server and --prompt-id (over HTTP)"),
        )
    try:
        inputs = _validate_wait_args(args)
    except (BadInputError, UnsafePrefixError) as exc:
        return _fail_input("wait", exc)
    output_dir, base, copy_to, accept = inputs.output_dir, inputs.base, inputs.copy_to, inputs.accept

    started_wall = time.time()
    done_path, failed_path = marker_paths(base)
    wanted = []
    if accept.prompt_id is not None:
        wanted.append(f"PromptId {accept.prompt_id!r}")
    if accept.newer_than is not None:
        wanted.append(f"Timestamp at or after {format_utc(accept.newer_than)}")

    def announce(watcher: str) -> None:
        print(
            f"waiting for {done_path} or {failed_path}"
            + (f" with {' and '.join(wanted)}" if wanted else "")
            + f" (watcher: {watcher}, timeout {args.timeout} s)",
            file=sys.stderr,
            flush=True,
        )

    def tell_ignored(text: str) -> None:
        print(f"{text}; still waiting", file=sys.stderr, flush=True)

    outcome = wait_for_marker(
        base,
        timeout=args.timeout,
        poll_interval=args.poll_interval,
        watcher=args.watcher,
        on_ready=announce,
        accept=accept if accept else None,
        on_ignore=tell_ignored,
    )
    report = WaitReport(
        status="timeout",
        wait_seconds=round(outcome.waited, 4),
        watcher=outcome.watcher,
        fallback_notes=list(outcome.notes),
        marker_path=str(outcome.path) if outcome.path else None,
        ignored_markers=outcome.ignored,
    )

    if outcome.path is None:
        if copy_to is not None:
            # The newer of the wait's start and --newer-than: files before either are not this render's.
            # The wait's own start gets a slack for coarse mtimes; a time the caller names is taken as given.
            since, since_label, slack = started_wall, "the wait began", MTIME_SLACK_SECONDS
            if accept.newer_than is not None:
                since, since_label, slack = accept.newer_than.timestamp(), "--newer-than", 0.0
            forced = forced_copy(
                output_dir,
                base,
                copy_to,
                since=since,
                since_label=since_label,
                allow_stale=args.allow_stale_copy,
                slack=slack,
                stability_seconds=args.stability_seconds,
                stability_retries=args.stability_retries,
                prefix=args.prefix,
                waited=outcome.waited,
            )
            report.forced_copy_triggered = True
            report.forced_copy_debug_path = str(forced.debug_path) if forced.debug_path else None
            report.copied = forced.copied
            report.forced_copy_files = forced.entries
            report.problems += forced.problems
            report.fallback_notes.append(forced.note)
        _emit(report)
        return EXIT_TIMEOUT

    if outcome.marker is None:
        report.status = "invalid-marker"
        report.problems.append(outcome.error or "unreadable marker")
        _emit(report)
        return EXIT_FAILED

    report.marker = outcome.marker.model_dump(mode="json", by_alias=True)
    if isinstance(outcome.marker, FailedMarker):
        report.status = "failed"
        _emit(report)
        return EXIT_FAILED

    check = verify_outputs(output_dir, outcome.marker.outputs, verify_hash=args.verify_hash)
    report.fallback_notes += check.notes
    report.problems += check.problems
    report.verified = not check.problems
    if check.problems:
        report.status = "verification-failed"
        _emit(report)
        return EXIT_FAILED
    if copy_to is not None:
        # Only what the marker lists for this render: earlier takes beside it are not copied.
        report.copied, copy_problems = _copy_all(check.files, copy_to, Path(os.path.realpath(output_dir)))
        if copy_problems:
            report.problems += copy_problems
            report.status = "copy-failed"
            _emit(report)
            return EXIT_FAILED
    report.status = "done"
    _emit(report)
    return EXIT_DONE


@dataclass
class OutputSelection:
    """The files ``write-marker`` lists as this render's outputs, those it left out and why, and warnings."""

    listed: list[Path]
    left_out: list[tuple[Path, str]]
    warnings: list[str]


def select_outputs(base: Path, *, since: datetime | None, frames: int | None) -> OutputSelection:
    """This render's files beside ``base``: those modified at/after ``since``, then the newest ``frames`` of them.

    ComfyUI's counters keep earlier takes (``frame_00001_.png`` from an earlier render beside this one's
    ``frame_00005_.png``), so without ``since`` or ``frames`` every matching file is listed. A warning is given when
    the files found and ``frames`` disagree.
    """
    candidates = _stat_candidates(find_candidates(base))
    left_out: list[tuple[Path, str]] = []
    warnings: list[str] = []
    links = _linked_candidates(base)
    for link in links:
        left_out.append((link, "a symlink: only regular files are listed (a marker never vouches for a link's target)"))
    if links:
        warnings.append(
            f"{len(links)} matching symlink(s) left out ({', '.join(p.name for p in links[:5])}"
            f"{', …' if len(links) > 5 else ''}); copy the frames they point to under their own names to list them"
        )
    kept = candidates
    if since is not None:
        since_ns = int(since.timestamp() * 1_000_000) * 1000
        kept = []
        for candidate in candidates:
            if candidate.mtime_ns >= since_ns:
                kept.append(candidate)
            else:
                left_out.append(
                    (candidate.path, f"modified {_utc_ns(candidate.mtime_ns)}, before --since {format_utc(since)}")
                )
    if frames is not None:
        newest_first = sorted(kept, key=lambda c: (c.mtime_ns, c.path.name), reverse=True)
        kept = newest_first[:frames]
        for candidate in newest_first[frames:]:
            left_out.append((candidate.path, f"older than the newest {frames} (--frames {frames})"))
        found = len(newest_first)
        where = f" modified since {format_utc(since)}" if since is not None else ""
        if found > frames:
            warnings.append(
                f"--frames {frames} but {found} matching file(s){where}: listed the newest {frames}, left out "
                f"{found - frames} older one(s) as earlier takes"
            )
        elif found < frames:
            warnings.append(
                f"--frames {frames} but only {found} matching file(s){where}: FrameCount is {frames}, Outputs lists "
                f"{found}"
            )
    listed = sorted(candidate.path for candidate in kept)
    return OutputSelection(listed, sorted(left_out), warnings)


def _linked_candidates(base: Path) -> list[Path]:
    """Symlinks beside ``base`` whose names would make them candidates (left out of :func:`find_candidates`)."""
    found: list[Path] = []
    try:
        entries = list(os.scandir(base.parent))
    except OSError:
        return found
    for entry in entries:
        name = entry.name
        if not name.startswith(base.name) or name.endswith(MARKER_SUFFIXES) or is_temp_name(name):
            continue
        if entry.is_symlink():
            found.append(Path(entry.path))
    return sorted(found)


def _list_outputs(output_dir: Path, base: Path, paths: list[Path]) -> list[dict[str, str]]:
    root = Path(os.path.realpath(output_dir))
    subfolder = base.parent.relative_to(root).as_posix()
    subfolder = "" if subfolder == "." else subfolder
    return [{"filename": path.name, "subfolder": subfolder, "type": "output"} for path in paths]


def write_marker_command(args: argparse.Namespace) -> int:
    """Handler for ``write-marker``: write a done (or ``--failed``) marker for a prefix and print its path as JSON."""
    try:
        output_dir = _check_output_dir(args.output_dir)
        base = resolve_prefix(output_dir, args.prefix, input_name="--prefix")
        if args.frames is not None and args.frames < 0:
            raise BadInputError(f"--frames {args.frames} is negative; give the number of frames written")
        failed_only = [args.message, args.outcome, args.node, args.node_type]
        if not args.failed and any(value is not None for value in failed_only):
            raise BadInputError(
                "--message, --outcome, --node and --node-type only apply with --failed; add --failed or drop them"
            )
        if args.failed and args.since is not None:
            raise BadInputError("--since only applies to a done marker's Outputs; drop it with --failed")
        since = parse_time(args.since, option="--since") if args.since is not None else None
    except (BadInputError, UnsafePrefixError) as exc:
        return _fail_input("write-marker", exc)

    selection = OutputSelection([], [], [])
    try:
        if args.failed:
            failed = FailedMarker(
                prefix=args.prefix,
                prompt_id=args.prompt_id,
                outcome=args.outcome or "error",
                node=args.node,
                node_type=args.node_type,
                message=args.message or "",
            )
            result = write_failed_marker(output_dir, args.prefix, failed)
            count = 0
        else:
            selection = select_outputs(base, since=since, frames=args.frames)
            for warning in selection.warnings:
                print(f"python -m telemetry write-marker: warning: {warning}", file=sys.stderr, flush=True)
            items = _list_outputs(output_dir, base, selection.listed)
            outputs = describe_outputs(output_dir, items, sha256=args.sha256)
            done = DoneMarker(
                prefix=args.prefix,
                prompt_id=args.prompt_id,
                frame_count=args.frames if args.frames is not None else len(outputs),
                outputs=outputs,
            )
            result = write_done_marker(output_dir, args.prefix, done)
            count = len(outputs)
    except MarkerWriteError as exc:
        print(f"python -m telemetry write-marker: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    _emit(
        {
            "MarkerPath": str(result.path),
            "Kind": "failed" if args.failed else "done",
            "Outputs": count,
            "Listed": [path.name for path in selection.listed],
            "LeftOut": [{"File": path.name, "Reason": why} for path, why in selection.left_out],
            "Warnings": selection.warnings,
            "FallbackNote": result.fallback_note,
        }
    )
    return EXIT_DONE


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``wait`` and ``write-marker`` sub-commands."""
    wait = subparsers.add_parser(
        "wait",
        help="wait for <prefix>.done or .failed, verify and copy the outputs",
        description=(
            "Wait for <prefix>.done or <prefix>.failed under the output folder, verify the listed outputs and "
            "print one JSON object. Exit 0 done, 1 failed or not verified, 2 bad input, 3 timed out. "
            "With --server URL --prompt-id ID instead: wait through the server's wait route (no shared disk) and "
            "print the prompt's record; exit 0 success, 1 failed/cancelled, 2 unknown prompt, 3 timed out."
        ),
    )
    wait.add_argument("--output-dir", help="ComfyUI's output folder (shared-disk mode)")
    wait.add_argument("--prefix", help="the filename_prefix the marker was written for (shared-disk mode)")
    wait.add_argument("--server", help="ComfyUI base URL (HTTP mode), e.g. http://gpu-1:8188")
    wait.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    wait.add_argument("--poll-interval", type=float, default=0.05, help="seconds between polls without inotify")
    wait.add_argument(
        "--prompt-id",
        help="only a marker whose PromptId is this is the answer; other prompts' markers are ignored (keep waiting); "
        "with --server: the prompt to wait for",
    )
    wait.add_argument(
        "--newer-than",
        metavar="ISO8601|EPOCH",
        help="only a marker whose Timestamp is at or after this is the answer (ISO 8601 with a zone, or epoch s); "
        "also the forced copy's cut-off",
    )
    wait.add_argument("--copy-to", help="copy the outputs here, keeping sub-folders; on timeout, force-copy")
    wait.add_argument(
        "--allow-stale-copy",
        action="store_true",
        help="forced copy: also copy files modified before the wait began (or --newer-than), saying so",
    )
    wait.add_argument("--stability-seconds", type=float, default=2.0, help="forced copy: window files must hold still")
    wait.add_argument("--stability-retries", type=int, default=3, help="forced copy: how many windows to try")
    wait.add_argument("--verify-hash", action="store_true", help="also check each output's Sha256 when recorded")
    wait.add_argument(
        "--watcher", choices=["auto", "poll"], default="auto", help="auto uses inotify on Linux; poll never does"
    )
    wait.set_defaults(func=wait_command)

    write = subparsers.add_parser(
        "write-marker",
        help="write <prefix>.done (or .failed) for a script's outputs",
        description=(
            "Write <prefix>.done atomically, listing the files beside it whose names start with the prefix as its "
            "Outputs (only those modified since --since, and only the newest --frames of them; FrameCount is "
            "--frames, else their number); with --failed write <prefix>.failed instead."
        ),
    )
    write.add_argument("--output-dir", required=True, help="the output folder the prefix is relative to")
    write.add_argument("--prefix", required=True, help="the prefix, relative to --output-dir")
    write.add_argument(
        "--frames",
        type=int,
        help="FrameCount to record, and list only the newest N matching files (warns when the files found differ)",
    )
    write.add_argument(
        "--since",
        metavar="ISO8601|EPOCH",
        help="list only matching files modified at or after this time (earlier takes of the prefix are left out)",
    )
    write.add_argument("--sha256", action="store_true", help="record each output's sha256")
    write.add_argument("--prompt-id", help="PromptId to record")
    write.add_argument("--failed", action="store_true", help="write a .failed marker instead")
    write.add_argument("--message", help="with --failed: what went wrong")
    write.add_argument("--outcome", choices=["error", "interrupted"], help="with --failed: default error")
    write.add_argument("--node", help="with --failed: the node id that failed")
    write.add_argument("--node-type", help="with --failed: that node's class")
    write.set_defaults(func=write_marker_command)
