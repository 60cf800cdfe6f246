"""Crash-safe file writes: temp file in the same folder, fsync, rename, fsync the folder.

A reader of the destination sees either the previous whole file or the new whole file, never a partial one,
and a writer killed at any point leaves at worst a temp file whose name says it is one (``.<name>.<pid>.<hex>.tmp``).
Such stale temps are removed by :func:`remove_stale_temps`, which the marker writer runs before every write.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("run_telemetry.markers")

ReplaceFn = Callable[[str | os.PathLike[str], str | os.PathLike[str]], None]
SleepFn = Callable[[float], None]

DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 0.010
# A temp this old is abandoned on any OS: a marker write takes milliseconds, not a minute.
STALE_TEMP_SECONDS = 60.0

_TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\.tmp$")


class MarkerWriteError(OSError):
    """A file could not be written; carries the ``errno`` and a message naming the path."""

    def __init__(self, err: int | None, message: str, path: str | os.PathLike[str]) -> None:
        super().__init__(err, message, os.fspath(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass(frozen=True)
class AtomicWriteResult:
    """Where the file went, how many rename attempts it took, and a note when the non-atomic fallback was used."""

    path: Path
    attempts: int
    fallback_note: str | None = None


def temp_name_for(path: Path) -> str:
    """A fresh, unique temp file name for ``path``, in the same folder so the rename never crosses devices."""
    return f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}"


def is_temp_for(candidate_name: str, path: Path) -> bool:
    """True when ``candidate_name`` is a temp file that :func:`atomic_write` made for ``path``."""
    match = _TEMP_RE.match(candidate_name)
    return bool(match and match.group("name") == path.name)


def is_temp_name(candidate_name: str) -> bool:
    """True when ``candidate_name`` looks like any temp file made by :func:`atomic_write`."""
    return bool(_TEMP_RE.match(candidate_name))


def _pid_is_gone(pid: int) -> bool:
    # os.kill(pid, 0) terminates the process on Windows, so liveness is only probed on POSIX.
    if os.name != "posix" or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def remove_stale_temps(
    path: Path, *, stale_after: float = STALE_TEMP_SECONDS, now: Callable[[], float] = time.time
) -> list[Path]:
    """Remove temp files left for ``path`` by killed writers; return what was removed.

    A temp is stale when it is older than ``stale_after`` seconds or, on POSIX, when the process id in its
    name no longer exists on this host. Errors are logged, never raised: cleaning is best effort.
    """
    folder = path.parent
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if not match or match.group("name") != path.name:
            continue
        try:
            age = now() - entry.stat(follow_symlinks=False).st_mtime
            if age > stale_after or _pid_is_gone(int(match.group("pid"))):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("could not remove stale temp file %s: %s", entry.path, exc)
    if removed:
        logger.info("removed %d stale temp file(s) for %s", len(removed), path)
    return removed


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove temp file %s: %s", path, exc)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_folder(folder: Path) -> None:
    # Without this the rename itself may be lost on power failure; Windows cannot open a folder this way.
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        logger.debug("cannot open folder %s to fsync it: %s", folder, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            logger.warning("fsync of folder %s failed: %s", folder, exc)
    finally:
        os.close(fd)


def _error(exc: OSError, path: Path, doing: str) -> MarkerWriteError:
    reason = exc.strerror or str(exc)
    return MarkerWriteError(exc.errno, f"could not write {path}: {doing} failed: {reason}", path)


def _direct_write(path: Path, data: bytes) -> None:
    # open('wb') would follow a symlink out of the folder, which the rename never does.
    if path.is_symlink():
        raise MarkerWriteError(
            errno.ELOOP, f"could not write {path}: it is a symlink and the rename kept failing; remove the link", path
        )
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o666)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path,
    data: bytes,
    *,
    replace: ReplaceFn = os.replace,
    sleep: SleepFn = time.sleep,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
) -> AtomicWriteResult:
    """Write ``data`` to ``path`` so readers never see a partial file; raise :class:`MarkerWriteError` on failure.

    ``replace`` failing with PermissionError (Windows, while a reader holds the destination) is retried
    ``retries`` more times, sleeping ``backoff`` seconds doubling each time; then the destination is written
    directly (not atomic) and the result's ``fallback_note`` says so.
    """
    path = Path(path)
    tmp = path.parent / temp_name_for(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o666)
    except OSError as exc:
        raise _error(exc, path, "creating the temp file") from exc
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _error(exc, path, "writing the temp file") from exc

    attempts = 0
    delay = backoff
    while True:
        attempts += 1
        try:
            replace(tmp, path)
            break
        except PermissionError as exc:
            if attempts <= retries:
                logger.debug("rename onto %s refused (%s); retry %d in %.3f s", path, exc, attempts, delay)
                sleep(delay)
                delay *= 2
                continue
            return _fallback(path, tmp, data, attempts, exc)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise _error(exc, path, "renaming the temp file into place") from exc

    _fsync_folder(path.parent)
    return AtomicWriteResult(path=path, attempts=attempts)


def _fallback(path: Path, tmp: Path, data: bytes, attempts: int, cause: PermissionError) -> AtomicWriteResult:
    try:
        _direct_write(path, data)
    except MarkerWriteError:
        _unlink_quietly(tmp)
        raise
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _error(exc, path, f"the direct write after {attempts} refused renames") from exc
    _unlink_quietly(tmp)
    note = (
        f"renaming onto {path} was refused {attempts} times ({cause.strerror or cause}); "
        "wrote it directly instead, so a reader at that moment could have seen a partial file"
    )
    logger.warning(note)
    return AtomicWriteResult(path=path, attempts=attempts, fallback_note=note)
