"""Readiness and liveness of one ComfyUI worker, from facts the adapters hand in (``GET /telemetry/health``).

Each check answers ``ok``, ``degraded`` (telemetry works in part: the worker still renders) or ``down`` (ComfyUI will
not run a queued prompt: its prompt worker thread has exited, or a prompt has waited while nothing ran for longer than
the policy's max wait). The report's ``Status`` is the worst check's. ``Since`` is when a check left ``ok`` (ISO 8601
UTC), kept while it stays failing. Listeners hear of every change of the overall status or of the set of failing
checks (``health.changed`` for webhooks), and of a first report that is not ok; evaluation happens on demand (the route, a metrics scrape, a prompt's end, a
store state change): no timer thread, so an idle worker stays idle.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .records import iso

logger = logging.getLogger("run_telemetry.health")

Status = Literal["ok", "degraded", "down"]
_RANK = {"ok": 0, "degraded": 1, "down": 2}
MIB = 1 << 20


@dataclass(frozen=True)
class HealthPolicy:
    """What counts as unhealthy (shown in the health report)."""

    stuck_after_seconds: float = 600.0  # the queue policy's max wait
    min_free_bytes: int = 256 * MIB  # below this in the output or store folder: degraded
    writer_busy_seconds: float = 60.0  # one finishing job (markers) running longer: degraded
    probe_ttl_seconds: float = 5.0  # the output folder's write probe is repeated at most this often

    def as_dict(self) -> dict[str, Any]:
        """Plain form for JSON."""
        return {
            "StuckAfterSeconds": self.stuck_after_seconds,
            "MinFreeBytes": self.min_free_bytes,
            "WriterBusySeconds": self.writer_busy_seconds,
        }


@dataclass(frozen=True)
class WorkerFacts:
    """ComfyUI's prompt worker as the adapter sees it."""

    found: bool  # the thread is known (seen running a prompt, or by its name)
    alive: bool
    exit_reason: str | None = None  # a BaseException that left PromptExecutor.execute, if one did
    exit_at: float | None = None  # epoch seconds
    running: int = 0  # prompts ComfyUI's queue reports running
    queued: int = 0  # prompts waiting behind them


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    Name: str
    Status: Status
    Detail: str
    Since: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain form for JSON."""
        return {"Name": self.Name, "Status": self.Status, "Detail": self.Detail, "Since": self.Since}


def folder_writable(folder: Path) -> str | None:
    """Why a small file cannot be created in ``folder`` (which must exist), or ``None``."""
    probe = folder / f".rt-health-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return None


class HealthMonitor:
    """Evaluates the checks from callables (each a seam a test can hand a real alternative to)."""

    def __init__(
        self,
        *,
        policy: HealthPolicy,
        worker: Callable[[], WorkerFacts],
        last_activity: Callable[[], float],
        store: Callable[[], Mapping[str, Any]] | None = None,
        writer_busy: Callable[[], float | None] | None = None,
        marker_error: Callable[[], tuple[float, str] | None] | None = None,
        output_dir: Callable[[], Path] | None = None,
        store_dir: Path | None = None,
        snapshot: Callable[[], Mapping[str, Any]] | None = None,
        comfyui: Callable[[], tuple[str | None, Mapping[str, str]]] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self._worker = worker
        self._last_activity = last_activity
        self._store = store
        self._writer_busy = writer_busy
        self._marker_error = marker_error
        self._output_dir = output_dir
        self._store_dir = store_dir
        self._snapshot = snapshot
        self._comfyui = comfyui
        self._clock = clock
        self._mono = monotonic
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}
        self._probe: tuple[float, str | None] | None = None
        self._last: dict[str, Any] | None = None
        self._last_at = 0.0
        self.listeners: list[Callable[[dict[str, Any] | None, dict[str, Any]], None]] = []

    # --- checks ---

    def _check_worker(self) -> tuple[Status, str, float | None]:
        w = self._worker()
        if w.found and not w.alive:
            why = f" after {w.exit_reason}" if w.exit_reason else ""
            return (
                "down",
                f"ComfyUI's prompt worker thread has exited{why}; HTTP still answers but no prompt will run "
                f"({w.queued + w.running} waiting); restart ComfyUI",
                w.exit_at,
            )
        idle = self._mono() - self._last_activity()
        if w.queued > 0 and idle > self.policy.stuck_after_seconds:
            return (
                "down",
                f"prompt worker stuck: {w.queued} prompt(s) waiting while nothing has run for {idle:.0f} s "
                f"(over the max wait of {self.policy.stuck_after_seconds:g} s)",
                self._clock() - idle + self.policy.stuck_after_seconds,
            )
        state = "alive" if w.found else "not seen yet (no prompt has run)"
        return "ok", f"{state}; {w.running} running, {w.queued} queued", None

    def _check_store(self) -> tuple[Status, str, float | None]:
        if self._store is None:
            return "ok", "not used", None
        h = self._store()
        if h.get("Ok"):
            return "ok", f"{h.get('Mode')} {h.get('Path')}", None
        detail = str(h.get("Problem"))
        if h.get("Mode") == "memory":
            detail += "; records are kept in memory only"
        if h.get("KeptFile"):
            detail += f"; damaged file kept as {h['KeptFile']}"
        return "degraded", detail, _epoch(h.get("Since"))

    def _check_marker_writer(self) -> tuple[Status, str, float | None]:
        busy = self._writer_busy() if self._writer_busy else None
        if busy is not None and busy > self.policy.writer_busy_seconds:
            return "degraded", f"the marker writer has been busy with one prompt for {busy:.0f} s", self._clock() - busy
        err = self._marker_error() if self._marker_error else None
        if err is not None:
            return "degraded", f"the last marker could not be written: {err[1]}", err[0]
        return "ok", "idle" if busy is None else f"writing ({busy:.1f} s)", None

    def _check_output(self) -> tuple[Status, str, float | None]:
        if self._output_dir is None:
            return "ok", "not checked", None
        folder = self._output_dir()
        now = self._mono()
        if self._probe is None or now - self._probe[0] > self.policy.probe_ttl_seconds:
            target = folder
            while not target.is_dir() and target.parent != target:
                target = target.parent  # not made yet (ComfyUI makes it on the first save): where it will be made
            problem = folder_writable(target)
            self._probe = (now, problem)
        problem = self._probe[1]
        if folder.exists() and not folder.is_dir():
            problem = f"{folder} is not a folder"
        if problem:
            return "degraded", f"output folder {folder} is not writable: {problem}", None
        return "ok", f"{folder} writable", None

    def _check_disk(self) -> tuple[Status, str, float | None]:
        parts = []
        worst: Status = "ok"
        folders = [("output", self._output_dir() if self._output_dir else None), ("store", self._store_dir)]
        for label, folder in folders:
            if folder is None:
                continue
            try:
                free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
            except OSError as exc:
                parts.append(f"{label}: {exc.strerror or exc}")
                worst = "degraded"
                continue
            parts.append(f"{label} {free // MIB} MiB free")
            if free < self.policy.min_free_bytes:
                worst = "degraded"
                parts[-1] += f" (under {self.policy.min_free_bytes // MIB} MiB)"
        return worst, "; ".join(parts) or "not checked", None

    def _check_probe(self) -> tuple[Status, str, float | None]:
        if self._snapshot is None:
            return "ok", "not checked", None
        try:
            snap = self._snapshot() or {}
        except Exception as exc:
            return "degraded", f"the probe chain failed: {type(exc).__name__}: {exc}", None
        source = snap.get("Source")
        if not source:
            return "degraded", "no probe answered", None
        return "ok", f"answered by {source}", None

    def _check_hooks(self) -> tuple[Status, str, float | None]:
        """How the package is wired into this ComfyUI: degraded when a hook point could not be installed."""
        if self._comfyui is None:
            return "ok", "not checked", None
        version, hooks = self._comfyui()
        where = f"ComfyUI {version or '(version unknown)'}"
        degraded = [f"{name}: {how}" for name, how in hooks.items() if how.startswith(("degraded", "not installed"))]
        if degraded:
            return "degraded", f"{where}: {'; '.join(degraded)}", None
        return "ok", f"{where}: {len(hooks)} hook points wired", None

    # --- report ---

    def evaluate(self, max_age: float = 0.0) -> dict[str, Any]:
        """``{"Status", "Checks": [{"Name", "Status", "Detail", "Since"}], "CheckedAt", "Policy"}``; tells listeners.

        ``max_age`` > 0 returns the last report when it is younger than that many seconds.
        """
        checks: list[Check] = []
        now = self._clock()
        last = self._last
        if max_age > 0 and last is not None and now - self._last_at < max_age:
            return last
        with self._lock:
            for name, fn in (
                ("prompt_worker", self._check_worker),
                ("store", self._check_store),
                ("marker_writer", self._check_marker_writer),
                ("output_folder", self._check_output),
                ("free_disk", self._check_disk),
                ("probe_chain", self._check_probe),
                ("comfyui_hooks", self._check_hooks),
            ):
                try:
                    status, detail, since = fn()
                except Exception as exc:  # a check that fails says so; it never fails the report
                    status, detail, since = "degraded", f"check failed: {type(exc).__name__}: {exc}", None
                if status == "ok":
                    self._since.pop(name, None)
                else:
                    first = self._since.setdefault(name, since if since is not None else now)
                    since = first
                checks.append(Check(name, status, detail, iso(since) if status != "ok" and since else None))
            overall: Status = max((c.Status for c in checks), key=_RANK.__getitem__, default="ok")
            report = {
                "Status": overall,
                "Checks": [c.as_dict() for c in checks],
                "CheckedAt": iso(now),
                "Policy": self.policy.as_dict(),
            }
            previous = self._last
            # A first report that is all ok is the starting state, not a change: listeners hear of none.
            changed = _key(previous) != _key(report) and not (previous is None and overall == "ok")
            self._last, self._last_at = report, now
        if changed:
            level = logging.INFO if overall == "ok" else logging.WARNING
            failing = [f"{c.Name}: {c.Detail}" for c in checks if c.Status != "ok"]
            logger.log(level, "Run Telemetry: health %s%s", overall, f" ({'; '.join(failing)})" if failing else "")
            for fn in list(self.listeners):
                try:
                    fn(previous, report)
                except Exception:
                    logger.exception("Run Telemetry: a health listener failed")
        return report

    def last(self) -> dict[str, Any] | None:
        """The last report, without evaluating again."""
        return self._last


def _key(report: dict[str, Any] | None) -> tuple[Any, ...] | None:
    if report is None:
        return None
    return (report["Status"], tuple(sorted((c["Name"], c["Status"]) for c in report["Checks"])))


def _epoch(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
