"""Crash-safe file writes: temp file in the same folder, fsync, rename, fsync the folder.

A reader of the destination sees either the previous whole file or the new whole file, never a partial one,
and a writer killed at any point leaves at worst a temp file whose name says it is one (``.<name>.<pid>.<hex>.tmp``).
Such stale temps are removed by :func:`remove_stale_temps`; the marker writer sweeps each folder with
:func:`sweep_stale_temps` before writing, at most once a minute per folder (listing a scene folder of thousands of
frames before every marker would make each write cost O(frames)).

Writes under a trusted root (the output folder) go through :func:`open_folder`: every folder below the root is
opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to the one above it, and the temp file, the rename, the unlinks
and the folder fsync all happen relative to that one opened folder (``dir_fd=``, the ``openat`` family). Swapping a
folder for a symlink after the checks then makes the open fail (refused, :class:`UnsafePathError`) instead of
carrying the file out of the root. Windows has no ``dir_fd``: there :data:`DIR_FD_SUPPORTED` is false and callers
fall back to checking resolved paths just before writing, which narrows the window but cannot close it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger("run_telemetry.markers")

# Called as replace(src, dst) with paths, or replace(src, dst, src_dir_fd=fd, dst_dir_fd=fd) with names in a folder.
ReplaceFn = Callable[..., None]
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


class UnsafePathError(MarkerWriteError):
    """A folder or file on the way is a symlink or not what it should be: refused, nothing written or read there."""


# openat-style writes need O_NOFOLLOW, O_DIRECTORY and dir_fd support for every call used (POSIX; not Windows).
DIR_FD_SUPPORTED = (
    os.name == "posix"
    and hasattr(os, "O_NOFOLLOW")
    and hasattr(os, "O_DIRECTORY")
    and {os.open, os.mkdir, os.unlink, os.rename, os.stat, os.readlink} <= os.supports_dir_fd
    and os.scandir in os.supports_fd
)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# Files are opened for reading with O_NONBLOCK (no effect on a regular file): opening a FIFO put where a file should be
# would otherwise block until some process opens it for writing, hanging the reader; the S_ISREG check then refuses it.
READ_FLAGS_FOLLOW = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
READ_FLAGS = READ_FLAGS_FOLLOW | _NOFOLLOW


def _describe_entry(name: str, dir_fd: int, shown: Path) -> tuple[str, bool]:
    """What ``name`` in ``dir_fd`` is, for an error message (a symlink and where to, a file, missing), and if a link."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return f"{shown} is missing or unreadable", False
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            target = "?"
        return f"{shown} is a symlink (to {target})", True
    if not stat.S_ISDIR(st.st_mode):
        return f"{shown} is not a folder", False
    return f"{shown} changed while it was opened", False


@contextmanager
def open_folder(root: str | os.PathLike[str], parts: Sequence[str], *, create: bool) -> Iterator[int | None]:
    """Yield an open descriptor of ``root/parts...``, every part opened without following symlinks.

    ``root`` itself is opened normally (it is configured, e.g. ComfyUI's output folder, and may be a link); each
    of ``parts`` is opened relative to the folder above it with ``O_NOFOLLOW | O_DIRECTORY`` and, with ``create``,
    made first when missing. Raises :class:`UnsafePathError` when a part is a symlink or not a folder, and
    :class:`MarkerWriteError` with ``errno.ENOENT`` when a part is missing and not ``create``. Yields ``None`` where
    :data:`DIR_FD_SUPPORTED` is false (Windows): the caller then uses paths and its own checks.
    """
    if not DIR_FD_SUPPORTED:
        yield None
        return
    root_path = Path(root)
    if create:
        # The root is configured, not requested (ComfyUI's output folder); ComfyUI makes it only when a save node
        # first writes, so a marker written before that (a prompt finished "lost" at start-up) makes it here.
        try:
            os.makedirs(root_path, exist_ok=True)
        except OSError as exc:
            raise MarkerWriteError(
                exc.errno, f"could not create the folder {root_path}: {exc.strerror or exc}", root_path
            ) from exc
    try:
        fd = os.open(root_path, _DIR_FLAGS)
    except OSError as exc:
        raise MarkerWriteError(
            exc.errno, f"cannot open the folder {root_path}: {exc.strerror or exc}", root_path
        ) from exc
    shown = root_path
    try:
        for part in parts:
            if part in ("", ".", "..") or "/" in part or os.sep in part:
                raise UnsafePathError(errno.EINVAL, f"{shown / part} is not a plain folder name; refused", shown / part)
            shown = shown / part
            if create:
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise MarkerWriteError(
                        exc.errno, f"could not create the folder {shown}: {exc.strerror or exc}", shown
                    ) from exc
            try:
                child = os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
            except FileNotFoundError as exc:
                raise MarkerWriteError(errno.ENOENT, f"{shown} does not exist", shown) from exc
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    # Linux answers ENOTDIR for a symlink opened with O_NOFOLLOW | O_DIRECTORY: report it as ELOOP.
                    what, is_link = _describe_entry(part, fd, shown)
                    raise UnsafePathError(
                        errno.ELOOP if is_link else exc.errno,
                        f"{what}: refused, so that nothing is written or read outside "
                        f"{root_path}; replace it by a real folder",
                        shown,
                    ) from exc
                raise MarkerWriteError(
                    exc.errno, f"cannot open the folder {shown}: {exc.strerror or exc}", shown
                ) from exc
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def open_file_under(root: str | os.PathLike[str], relative: str | os.PathLike[str]) -> BinaryIO:
    """Open ``root/relative`` for reading, its folders by :func:`open_folder` and the file with ``O_NOFOLLOW``.

    ``relative`` is a path already checked to stay inside ``root`` (symlinks resolved); this open is what keeps it
    there when a folder or the file is swapped for a symlink meanwhile. Raises FileNotFoundError when something is
    missing and :class:`UnsafePathError` for a symlink or a file that is not regular. Without ``dir_fd`` (Windows)
    the path is opened as it is.
    """
    rel = Path(relative)
    if not DIR_FD_SUPPORTED:
        return open(Path(root) / rel, "rb")  # the caller closes it
    shown = Path(root) / rel
    try:
        with open_folder(root, rel.parent.parts, create=False) as fd:
            assert fd is not None
            try:
                file_fd = os.open(rel.name, READ_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EMLINK):
                    refuse_symlinked_file(rel.name, fd, shown)
                raise
    except MarkerWriteError as exc:
        if exc.errno == errno.ENOENT and not isinstance(exc, UnsafePathError):
            raise FileNotFoundError(errno.ENOENT, str(exc), str(shown)) from exc
        raise
    handle = os.fdopen(file_fd, "rb")
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
        handle.close()
        raise UnsafePathError(errno.EISDIR, f"{shown} is not a regular file: refused", shown)
    return handle


def refuse_symlinked_file(name: str, dir_fd: int | None, shown: Path) -> None:
    """Raise :class:`UnsafePathError` when ``name`` in the opened folder is a symlink or not a regular file."""
    try:
        st = os.stat(name if dir_fd is not None else shown, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=dir_fd) if dir_fd is not None else os.readlink(shown)
        raise UnsafePathError(
            errno.ELOOP,
            f"{shown} is a symlink (to {target}): refused, so that nothing is written or read through it; "
            "remove the link",
            shown,
        )
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(errno.EISDIR, f"{shown} is not a regular file: refused; remove it", shown)


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
    path: Path,
    *,
    stale_after: float = STALE_TEMP_SECONDS,
    now: Callable[[], float] = time.time,
    dir_fd: int | None = None,
    any_target: bool = False,
) -> list[Path]:
    """Remove temp files left for ``path`` by killed writers; return what was removed.

    A temp is stale when it is older than ``stale_after`` seconds or, on POSIX, when the process id in its
    name no longer exists on this host. With ``dir_fd`` the folder is that opened folder (``path`` only names it).
    With ``any_target`` the stale temps of every file in the folder go, not only ``path``'s. One listing of the
    folder: O(entries). Errors are logged, never raised: cleaning is best effort.
    """
    folder = path.parent
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder if dir_fd is None else dir_fd))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if not match or (not any_target and match.group("name") != path.name):
            continue
        shown = folder / entry.name
        try:
            age = now() - entry.stat(follow_symlinks=False).st_mtime
            if age > stale_after or _pid_is_gone(int(match.group("pid"))):
                if dir_fd is None:
                    os.unlink(shown)
                else:
                    os.unlink(entry.name, dir_fd=dir_fd)
                removed.append(shown)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("could not remove stale temp file %s: %s", shown, exc)
    if removed:
        logger.info("removed %d stale temp file(s) for %s", len(removed), path)
    return removed


_SWEPT: OrderedDict[tuple[str, int, int], float] = OrderedDict()  # (folder, st_dev, st_ino) -> last sweep
_SWEPT_LOCK = threading.Lock()
_SWEPT_MAX = 4096


def sweep_stale_temps(
    path: Path,
    *,
    dir_fd: int | None = None,
    every: float = STALE_TEMP_SECONDS,
    clock: Callable[[], float] | None = None,
) -> list[Path]:
    """:func:`remove_stale_temps` for every file of ``path``'s folder, at most once per ``every`` seconds a folder.

    What the marker writer and the stale-marker clear call before touching a prefix: a scene folder holding
    thousands of frames is listed once a minute, not before each marker (a listing costs ~0.8 ms per 1,000 entries
    on a 2-core EPYC, on ComfyUI's HTTP thread at acceptance and on the writer thread at the prompt's end). A
    killed process's temps go at the first write into their folder after the restart; a temp left meanwhile by
    another process goes within ``every`` seconds of the next write there (hidden, and never read as a marker).
    The folder is known by its path and its inode, so a folder removed and made again is swept again.
    """
    try:
        st = os.fstat(dir_fd) if dir_fd is not None else os.stat(path.parent)
    except OSError:
        return []
    key = (str(path.parent), st.st_dev, st.st_ino)
    now = (clock or time.monotonic)()
    with _SWEPT_LOCK:
        last = _SWEPT.get(key)
        if last is not None and now - last < every:
            return []
        _SWEPT[key] = now
        _SWEPT.move_to_end(key)
        while len(_SWEPT) > _SWEPT_MAX:
            _SWEPT.popitem(last=False)
    return remove_stale_temps(path, dir_fd=dir_fd, any_target=True)


def _unlink_quietly(path: Path, dir_fd: int | None = None) -> None:
    try:
        if dir_fd is None:
            os.unlink(path)
        else:
            os.unlink(path.name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove temp file %s: %s", path, exc)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_folder(folder: Path, dir_fd: int | None = None) -> None:
    # Without this the rename itself may be lost on power failure; Windows cannot open a folder this way.
    if os.name != "posix":
        return
    if dir_fd is None:
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError as exc:
            logger.debug("cannot open folder %s to fsync it: %s", folder, exc)
            return
    else:
        fd = dir_fd
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            logger.warning("fsync of folder %s failed: %s", folder, exc)
    finally:
        if dir_fd is None:
            os.close(fd)


def _error(exc: OSError, path: Path, doing: str) -> MarkerWriteError:
    reason = exc.strerror or str(exc)
    return MarkerWriteError(exc.errno, f"could not write {path}: {doing} failed: {reason}", path)


def _direct_write(path: Path, data: bytes, dir_fd: int | None = None) -> None:
    # open('wb') would follow a symlink out of the folder, which the rename never does; O_NOFOLLOW refuses it.
    if _NOFOLLOW == 0 and path.is_symlink():
        raise MarkerWriteError(
            errno.ELOOP, f"could not write {path}: it is a symlink and the rename kept failing; remove the link", path
        )
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0) | _NOFOLLOW
    try:
        fd = os.open(path if dir_fd is None else path.name, flags, 0o666, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MarkerWriteError(
                errno.ELOOP,
                f"could not write {path}: it is a symlink and the rename kept failing; remove the link",
                path,
            ) from exc
        raise
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
    dir_fd: int | None = None,
) -> AtomicWriteResult:
    """Write ``data`` to ``path`` so readers never see a partial file; raise :class:`MarkerWriteError` on failure.

    With ``dir_fd`` (an open folder from :func:`open_folder`) every step happens in that folder by name and
    ``path`` is only what messages and the result show; ``replace`` is then called with the names and
    ``src_dir_fd``/``dst_dir_fd``. ``replace`` failing with PermissionError (Windows, while a reader holds the
    destination) is retried ``retries`` more times, sleeping ``backoff`` seconds doubling each time; then the
    destination is written directly (not atomic, never through a symlink) and the result's ``fallback_note`` says so.
    """
    path = Path(path)
    tmp = path.parent / temp_name_for(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp if dir_fd is None else tmp.name, flags | _NOFOLLOW, 0o666, dir_fd=dir_fd)
    except OSError as exc:
        raise _error(exc, path, "creating the temp file") from exc
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        _unlink_quietly(tmp, dir_fd)
        raise _error(exc, path, "writing the temp file") from exc

    attempts = 0
    delay = backoff
    while True:
        attempts += 1
        try:
            if dir_fd is None:
                replace(tmp, path)
            else:
                replace(tmp.name, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            break
        except PermissionError as exc:
            if attempts <= retries:
                logger.debug("rename onto %s refused (%s); retry %d in %.3f s", path, exc, attempts, delay)
                sleep(delay)
                delay *= 2
                continue
            return _fallback(path, tmp, data, attempts, exc, dir_fd)
        except OSError as exc:
            _unlink_quietly(tmp, dir_fd)
            raise _error(exc, path, "renaming the temp file into place") from exc

    _fsync_folder(path.parent, dir_fd)
    return AtomicWriteResult(path=path, attempts=attempts)


def _fallback(
    path: Path, tmp: Path, data: bytes, attempts: int, cause: PermissionError, dir_fd: int | None
) -> AtomicWriteResult:
    try:
        _direct_write(path, data, dir_fd)
    except MarkerWriteError:
        _unlink_quietly(tmp, dir_fd)
        raise
    except OSError as exc:
        _unlink_quietly(tmp, dir_fd)
        raise _error(exc, path, f"the direct write after {attempts} refused renames") from exc
    _unlink_quietly(tmp, dir_fd)
    note = (
        f"renaming onto {path} was refused {attempts} times ({cause.strerror or cause}); "
        "wrote it directly instead, so a reader at that moment could have seen a partial file"
    )
    logger.warning(note)
    return AtomicWriteResult(path=path, attempts=attempts, fallback_note=note)
