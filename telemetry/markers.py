"""Done and failed markers: the models, and a writer that never leaves a partial or stale marker.

A marker is ``<output_dir>/<prefix>.done`` or ``<output_dir>/<prefix>.failed``, JSON with PascalCase fields.
Writing one removes the other first, so a watcher never sees a fresh ``.done`` beside a stale ``.failed``;
it also removes temp files abandoned by killed writers (:func:`telemetry.atomic.sweep_stale_temps`: at most once a
minute per folder).

The prefix is checked (:func:`telemetry.paths.resolve_prefix`), then its folder is opened below the output folder
one component at a time without following symlinks (:func:`telemetry.atomic.open_folder`), and the clearing and
writing happen in that opened folder: a folder swapped for a symlink after the check is refused, never written
through. On Windows (no ``dir_fd``) the resolved path is checked again just before writing instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_serializer

from .atomic import (
    DIR_FD_SUPPORTED,
    READ_FLAGS_FOLLOW,
    AtomicWriteResult,
    MarkerWriteError,
    UnsafePathError,
    atomic_write,
    open_file_under,
    open_folder,
    sweep_stale_temps,
)
from .paths import resolve_prefix

logger = logging.getLogger("run_telemetry.markers")

SCHEMA_VERSION = 1
DONE_SUFFIX = ".done"
FAILED_SUFFIX = ".failed"
MARKER_SUFFIXES = (DONE_SUFFIX, FAILED_SUFFIX)
HASH_CHUNK = 1024 * 1024
# A marker lists one small entry per output file; anything larger than this is not one (a reader would load it whole).
MAX_MARKER_BYTES = 64 * 1024 * 1024


def utc_now() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def format_utc(value: datetime) -> str:
    """ISO 8601 in UTC with a ``Z`` suffix and millisecond precision."""
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Record(BaseModel):
    # Readers ignore fields a newer writer added; both the PascalCase alias and the Python name are accepted.
    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class OutputFile(_Record):
    """One file a prompt produced, as ComfyUI's UI output names it, with its size and optional hash."""

    filename: str = Field(alias="Filename")
    subfolder: str = Field("", alias="Subfolder")
    folder_type: str = Field("output", alias="Type")
    size_bytes: int | None = Field(None, alias="Bytes", ge=0)
    sha256: str | None = Field(None, alias="Sha256")
    missing: bool = Field(False, alias="Missing")


class MarkerTelemetry(_Record):
    """The run figures a marker carries; every field may be unknown."""

    duration_seconds: float | None = Field(None, alias="DurationSeconds")
    vram_before_mb: float | None = Field(None, alias="VramBeforeMB")
    vram_after_mb: float | None = Field(None, alias="VramAfterMB")
    vram_delta_mb: float | None = Field(None, alias="VramDeltaMB")
    gpu: str | None = Field(None, alias="Gpu")


class _MarkerBase(_Record):
    schema_version: int = Field(SCHEMA_VERSION, alias="SchemaVersion")
    # Narrowed to a Literal by each marker; declared here so "Kind" comes second in the JSON.
    kind: str = Field(alias="Kind")
    timestamp: AwareDatetime = Field(default_factory=utc_now, alias="Timestamp")
    prompt_id: str | None = Field(None, alias="PromptId")
    prefix: str = Field(alias="Prefix")

    @field_serializer("timestamp")
    def _serialize_timestamp(self, value: datetime) -> str:
        return format_utc(value)


class DoneMarker(_MarkerBase):
    """Written when every output of a prompt is on disk."""

    kind: Literal["done"] = Field("done", alias="Kind")
    frame_count: int = Field(0, alias="FrameCount", ge=0)
    outputs: list[OutputFile] = Field(default_factory=list, alias="Outputs")
    telemetry: MarkerTelemetry | None = Field(None, alias="Telemetry")


class DroppedNode(_Record):
    """An output node of the submitted workflow that ComfyUI did not run, and ComfyUI's reason."""

    node_id: str = Field(alias="NodeId")
    class_type: str = Field("", alias="ClassType")
    reason: str = Field("", alias="Reason")


FailedOutcome = Literal["error", "interrupted", "cancelled", "lost", "validation", "outputsIncomplete"]


class FailedMarker(_MarkerBase):
    """Written when a prompt did not produce what was asked for, or will never run.

    ``Outcome``: ``error`` (a node raised), ``interrupted``, ``cancelled`` (removed from ComfyUI's queue before it
    ran), ``lost`` (still queued when ComfyUI stopped; written at the next start), ``validation`` (ComfyUI dropped
    output nodes of the submitted workflow: ``Dropped``), ``outputsIncomplete`` (files still missing or growing when
    the policy's post-execution timeout ran out: ``Incomplete``).
    """

    kind: Literal["failed"] = Field("failed", alias="Kind")
    outcome: FailedOutcome = Field("error", alias="Outcome")
    node: str | None = Field(None, alias="Node")
    node_type: str | None = Field(None, alias="NodeType")
    message: str = Field("", alias="Message")
    dropped: list[DroppedNode] = Field(default_factory=list, alias="Dropped")
    incomplete: list[OutputFile] = Field(default_factory=list, alias="Incomplete")
    telemetry: MarkerTelemetry | None = Field(None, alias="Telemetry")


Marker = Annotated[DoneMarker | FailedMarker, Field(discriminator="kind")]
_MARKER_ADAPTER: TypeAdapter[DoneMarker | FailedMarker] = TypeAdapter(Marker)


class MarkerReadError(ValueError):
    """A marker file that is not valid JSON or not a valid marker; the message names the path."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"marker {path} is not a valid marker: {reason}")
        self.path = path


def marker_bytes(marker: DoneMarker | FailedMarker) -> bytes:
    """The marker as the file holds it: PascalCase JSON, indent 2, trailing newline."""
    return (marker.model_dump_json(by_alias=True, indent=2) + "\n").encode("utf-8")


def parse_marker(data: bytes | str, *, source: Path | None = None) -> DoneMarker | FailedMarker:
    """Parse marker JSON, raising :class:`MarkerReadError` with a clear reason."""
    where = source or Path("<memory>")
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MarkerReadError(where, f"malformed JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise MarkerReadError(where, f"expected a JSON object, found {type(raw).__name__}")
    try:
        return _MARKER_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise MarkerReadError(where, problems) from exc


def read_marker(path: str | Path) -> DoneMarker | FailedMarker:
    """Read and validate one marker file; OSError if unreadable, :class:`MarkerReadError` if invalid.

    Only a regular file of at most :data:`MAX_MARKER_BYTES` is read: a FIFO in the marker's place would block the
    reader until some process writes to it, and a huge file would be loaded whole; both are invalid markers.
    """
    path = Path(path)
    with os.fdopen(os.open(path, READ_FLAGS_FOLLOW), "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise MarkerReadError(path, "not a regular file")
        if st.st_size > MAX_MARKER_BYTES:
            raise MarkerReadError(path, f"{st.st_size} bytes, more than a marker's {MAX_MARKER_BYTES} at most")
        data = handle.read(MAX_MARKER_BYTES + 1)
    if len(data) > MAX_MARKER_BYTES:
        raise MarkerReadError(path, f"more than a marker's {MAX_MARKER_BYTES} bytes at most")
    return parse_marker(data, source=path)


def marker_paths(base: Path) -> tuple[Path, Path]:
    """The ``.done`` and ``.failed`` paths for a resolved prefix base path."""
    return base.with_name(base.name + DONE_SUFFIX), base.with_name(base.name + FAILED_SUFFIX)


def _within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def sha256_file(path: Path | BinaryIO) -> str:
    """The hex sha256 of a file (a path, or a handle read from where it stands), read in 1 MiB chunks."""
    if not isinstance(path, Path | str):
        return _sha256_handle(path)
    with Path(path).open("rb") as handle:
        return _sha256_handle(handle)


def _sha256_handle(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def describe_outputs(
    output_dir: str | Path,
    items: Sequence[Mapping[str, Any]],
    *,
    sha256: bool,
    roots: Mapping[str, str | Path] | None = None,
) -> list[OutputFile]:
    """Measure ComfyUI UI output entries ``{"filename", "subfolder", "type"}``; missing files get ``Missing``.

    ``type`` "output" resolves under ``output_dir``; other types resolve under ``roots[type]`` when given.
    An entry whose path would leave its root is reported as missing rather than measured.
    """
    all_roots: dict[str, Path] = {key: Path(os.path.realpath(value)) for key, value in (roots or {}).items()}
    all_roots.setdefault("output", Path(os.path.realpath(output_dir)))
    described: list[OutputFile] = []
    for item in items:
        entry = OutputFile(
            filename=str(item.get("filename", "")),
            subfolder=str(item.get("subfolder", "") or ""),
            folder_type=str(item.get("type", "output") or "output"),
        )
        root = all_roots.get(entry.folder_type)
        if root is None or not entry.filename:
            logger.warning("cannot measure output %r: no folder known for type %r", entry.filename, entry.folder_type)
            described.append(entry.model_copy(update={"missing": True}))
            continue
        try:
            path = Path(os.path.realpath(root / entry.subfolder / entry.filename))
        except OSError as exc:  # a folder on the way changed while it was resolved
            logger.warning("output %r/%r could not be resolved: %s", entry.subfolder, entry.filename, exc)
            described.append(entry.model_copy(update={"missing": True}))
            continue
        if not _within(path, root):
            logger.warning("output %r/%r leaves its folder %s; not measured", entry.subfolder, entry.filename, root)
            described.append(entry.model_copy(update={"missing": True}))
            continue
        try:
            # Opened below the root without following links: a swap after the check cannot measure an outside file.
            with open_file_under(root, path.relative_to(root)) as handle:
                size = os.fstat(handle.fileno()).st_size
                digest = sha256_file(handle) if sha256 else None
        except OSError as exc:
            logger.warning("output %s is missing or unreadable: %s", path, exc)
            described.append(entry.model_copy(update={"missing": True}))
            continue
        described.append(entry.model_copy(update={"size_bytes": size, "sha256": digest}))
    return described


def _remove(path: Path, dir_fd: int | None = None) -> bool:
    # Linux reports EROFS for unlinking even a missing file on a read-only mount: look first.
    name = path if dir_fd is None else path.name
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise MarkerWriteError(exc.errno, f"could not remove {path}: {exc.strerror or exc}", path) from exc
    return True


def _folder_parts(output_dir: str | Path, base: Path) -> tuple[Path, tuple[str, ...]]:
    root = Path(os.path.realpath(os.fspath(output_dir)))
    return root, base.parent.relative_to(root).parts


def clear_markers(output_dir: str | Path, prefix: str, *, base: Path | None = None) -> list[Path]:
    """Remove ``<prefix>.done`` and ``<prefix>.failed`` (only those two, and stale temps); return what was removed.

    ``base`` is the prefix already resolved by :func:`~telemetry.paths.resolve_prefix` (the caller's check); the
    folders are still opened without following links. Raises :class:`~telemetry.paths.UnsafePrefixError` for a
    prefix that leaves the output folder and :class:`~telemetry.atomic.UnsafePathError` (a MarkerWriteError) when a
    folder on the way became a symlink.
    """
    if base is None:
        base = resolve_prefix(output_dir, prefix)
    if not DIR_FD_SUPPORTED:
        removed = [path for path in marker_paths(base) if _remove(path)]
        sweep_stale_temps(base)
        return removed
    root, parts = _folder_parts(output_dir, base)
    try:
        with open_folder(root, parts, create=False) as fd:
            removed = [path for path in marker_paths(base) if _remove(path, fd)]
            sweep_stale_temps(base, dir_fd=fd)
    except MarkerWriteError as exc:
        if exc.errno == errno.ENOENT and not isinstance(exc, UnsafePathError):
            return []  # the folder does not exist yet: nothing to clear
        raise
    return removed


def _write_in(
    fd: int | None, target: Path, other: Path, marker: DoneMarker | FailedMarker, atomic_kwargs: dict[str, Any]
) -> AtomicWriteResult:
    sweep_stale_temps(target, dir_fd=fd)
    # The opposite marker goes first, so there is never a moment with both a fresh and a stale marker.
    if _remove(other, fd):
        logger.info("removed stale marker %s", other)
    if fd is not None:
        atomic_kwargs = {**atomic_kwargs, "dir_fd": fd}
    return atomic_write(target, marker_bytes(marker), **atomic_kwargs)


def _write_marker(
    output_dir: str | Path, prefix: str, marker: DoneMarker | FailedMarker, **atomic_kwargs: Any
) -> AtomicWriteResult:
    base = resolve_prefix(output_dir, prefix)
    done_path, failed_path = marker_paths(base)
    target, other = (done_path, failed_path) if marker.kind == "done" else (failed_path, done_path)
    if DIR_FD_SUPPORTED:
        root, parts = _folder_parts(output_dir, base)
        try:  # ComfyUI makes its output folder only when something is first saved (get_save_image_path)
            os.makedirs(root, exist_ok=True)
        except OSError as exc:
            raise MarkerWriteError(
                exc.errno, f"could not create the output folder {root}: {exc.strerror or exc}", root
            ) from exc
        with open_folder(root, parts, create=True) as fd:
            result = _write_in(fd, target, other, marker, atomic_kwargs)
    else:
        # No dir_fd (Windows): create, re-check the resolved path, then write by path. A swap in between is not
        # excluded here, only made unlikely.
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MarkerWriteError(
                exc.errno, f"could not create the folder {base.parent}: {exc.strerror or exc}", base.parent
            ) from exc
        if resolve_prefix(output_dir, prefix) != base:
            raise MarkerWriteError(None, f"the folder of {target} changed while writing; not written", target)
        result = _write_in(None, target, other, marker, atomic_kwargs)
    logger.info("wrote %s marker %s", marker.kind, target)
    return result


def write_done_marker(
    output_dir: str | Path, prefix: str, marker: DoneMarker, **atomic_kwargs: Any
) -> AtomicWriteResult:
    """Write ``<prefix>.done`` atomically under ``output_dir`` (removing a stale ``.failed``)."""
    if not isinstance(marker, DoneMarker):
        raise TypeError(f"write_done_marker needs a DoneMarker, not {type(marker).__name__}")
    return _write_marker(output_dir, prefix, marker, **atomic_kwargs)


def write_failed_marker(
    output_dir: str | Path, prefix: str, marker: FailedMarker, **atomic_kwargs: Any
) -> AtomicWriteResult:
    """Write ``<prefix>.failed`` atomically under ``output_dir`` (removing a stale ``.done``)."""
    if not isinstance(marker, FailedMarker):
        raise TypeError(f"write_failed_marker needs a FailedMarker, not {type(marker).__name__}")
    return _write_marker(output_dir, prefix, marker, **atomic_kwargs)
