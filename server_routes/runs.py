"""Runs: list, assemble in-process, finalize to artifact-metadata.json + run-summary.txt, serve the files."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pydantic_core
from aiohttp import web

from ..telemetry.atomic import MarkerWriteError, UnsafePathError, open_folder, remove_stale_temps
from ..telemetry.llm import health_from_env
from ..telemetry.runs import (
    METADATA_FILE,
    SUMMARY_FILE,
    assemble_run,
    finalize_files,
    foreign_scenes,
    gc_paused,
    is_finalized,
    read_run_file,
    run_id_problem,
    run_status,
)
from ..telemetry.summary import render_summary
from .common import json_error

logger = logging.getLogger("run_telemetry")
# How long finalize (and the assembly route) waits for the store thread to write the records already answered.
STORE_FLUSH_SECONDS = 10.0


def clean_finalize_temps(output_dir: Path) -> list[Path]:
    """Remove the temp files a finalize cut off by a kill left in the run folders (their writer is gone).

    The folders are opened below the output folder without following symlinks, so a ``telemetry`` or ``runs`` link
    leading out is left alone (nothing outside is removed).
    """
    removed: list[Path] = []
    root = Path(os.path.realpath(output_dir))
    runs = Path(output_dir) / "telemetry" / "runs"
    try:
        with open_folder(root, ("telemetry", "runs"), create=False) as runs_fd:
            names = [
                e.name for e in os.scandir(runs if runs_fd is None else runs_fd) if e.is_dir(follow_symlinks=False)
            ]
    except OSError:
        return removed
    for name in names:
        try:
            with open_folder(root, ("telemetry", "runs", name), create=False) as fd:
                for file_name in (METADATA_FILE, SUMMARY_FILE):
                    removed += remove_stale_temps(runs / name / file_name, dir_fd=fd)
        except OSError as exc:
            logger.warning("Run Telemetry: run folder %s skipped while cleaning temp files: %s", runs / name, exc)
    if removed:
        logger.info("Run Telemetry: removed %d temp file(s) of cut-off finalizes: %s", len(removed), removed)
    return removed


class RunLocks:
    """One lock per run id: finalizes of one run run one after the other (bounded: idle locks are dropped)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def acquire(self, run_id: str) -> threading.Lock:
        """The run's lock, held on return; give it back with :meth:`release`."""
        with self._lock:
            lock, users = self._locks.get(run_id) or (threading.Lock(), 0)
            self._locks[run_id] = (lock, users + 1)
        lock.acquire()
        return lock

    def release(self, run_id: str) -> None:
        """Release the run's lock, forgetting it when nobody else waits."""
        with self._lock:
            lock, users = self._locks[run_id]
            lock.release()
            if users <= 1:
                del self._locks[run_id]
            else:
                self._locks[run_id] = (lock, users - 1)


def emit_run_finalized(rt: Any, result: dict[str, Any]) -> None:
    """Queue the ``run.finalized`` webhook (the environment's endpoints and the run's own); never raises."""
    service = getattr(rt, "webhooks", None)
    if service is None:
        return
    targets = getattr(rt, "webhook_targets", None)
    service.emit("run.finalized", result, extra=targets.for_run(result["RunId"]) if targets is not None else ())


def add_routes(routes: web.RouteTableDef, rt: Any) -> None:
    """Register the run routes."""
    locks = RunLocks()
    try:
        clean_finalize_temps(rt.output_dir())
    except Exception as exc:  # best effort: a leftover temp file is hidden and harmless to readers
        logger.warning("Run Telemetry: could not clean up after cut-off finalizes: %s", exc)

    def checked_run_id(request: web.Request) -> str:
        run_id = request.match_info["run_id"]
        problem = run_id_problem(run_id)
        if problem:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": problem, "parameter": "run_id"}), content_type="application/json"
            )
        return run_id

    def settled(what: str) -> None:
        """The wait route answers before the store's thread has the final row: a client that reads or finalizes a
        run right after its last wait must find every record it was answered with. Bounded."""
        store_writer = getattr(rt, "store_writer", None)
        if store_writer is not None and not store_writer.flush(STORE_FLUSH_SECONDS):
            logger.warning("Run Telemetry: %s read before the store caught up (%.0f s)", what, STORE_FLUSH_SECONDS)

    def runs_now() -> list[dict[str, Any]]:
        settled("the run list")
        return rt.store.runs()

    def assemble(run_id: str, llm: dict[str, Any] | None = None) -> dict[str, Any] | None:
        settled(f"run {run_id}")
        records = rt.store.by_run_raw(run_id)
        if not records:
            return None
        policy, notes = rt.run_policy(run_id)
        info = dict(rt.store.run_info(run_id) or {})
        info["PolicyNotes"] = notes
        return assemble_run(
            run_id,
            records,
            policy=policy,
            output_dir=rt.output_dir(),
            run_info=info,
            waits=rt.waits(),
            llm=llm if llm is not None else info.get("LLMHealthInfo"),
        )

    @routes.get("/telemetry/runs")
    async def telemetry_runs(request: web.Request) -> web.Response:
        """Every run: scene and prompt counts, status (by each scene's last attempt), last activity."""
        rows = await asyncio.to_thread(runs_now)
        out = rt.output_dir()
        for row in rows:
            row["Status"] = run_status(row)
            # False too for an id no run folder can have (stored by an older version): listed, never finalized.
            row["Finalized"] = is_finalized(out, row["RunId"])
        return web.json_response({"Runs": rows})

    @routes.get("/telemetry/runs/{run_id}")
    async def telemetry_run(request: web.Request) -> web.Response:
        """The run's artifact metadata in the contract's shape, assembled from the store now; 404 if unknown."""
        run_id = checked_run_id(request)

        def body() -> bytes | None:
            with gc_paused():
                meta = assemble(run_id)
                return None if meta is None else pydantic_core.to_json(meta)

        data = await asyncio.to_thread(body)
        if data is None:
            return json_error(404, f"unknown run {run_id!r}: no prompt was tagged with it")
        return web.Response(body=data, content_type="application/json", charset="utf-8")

    @routes.post("/telemetry/runs/{run_id}/finalize")
    async def telemetry_run_finalize(request: web.Request) -> web.Response:
        """Write artifact-metadata.json and run-summary.txt atomically, validate them, return paths and result."""
        run_id = checked_run_id(request)

        def finalize() -> web.Response:
            # One finalize of a run at a time: concurrent ones write the same files one after the other and each
            # validates what it wrote, so every one answers the same Valid.
            locks.acquire(run_id)
            try:
                return finalize_locked()
            finally:
                locks.release(run_id)

        def finalize_locked() -> web.Response:
            llm = health_from_env(os.environ)
            with gc_paused():
                meta = assemble(run_id, llm)
                if meta is None:
                    return json_error(404, f"unknown run {run_id!r}: no prompt was tagged with it")
                if llm is not None:
                    info = dict(rt.store.run_info(run_id) or {})
                    info["LLMHealthInfo"] = llm
                    getattr(rt, "store_writer", rt.writer).submit(lambda: rt.store.put_run(run_id, info))
                folder = Path(meta["RunDir"])
                if request.query.get("replace") not in ("1", "true"):
                    try:
                        existing = read_run_file(rt.output_dir(), run_id, METADATA_FILE)
                    except (OSError, UnsafePathError):  # none yet, or a link finalize_files refuses below
                        existing = None
                    foreign = foreign_scenes(existing, meta)
                    if foreign:
                        named = ", ".join(f"{scene} ({', '.join(ids)})" for scene, ids in sorted(foreign.items()))
                        return json_error(
                            409,
                            f"{folder / METADATA_FILE} holds attempts this server has no record of (another worker's "
                            f"finalize on a shared output folder?): scene(s) {named}. Nothing was written. Assemble "
                            "the run across workers with `run-telemetry run --out DIR` (or `fetch` each worker's run "
                            "into its own folder); POST ...?replace=1 overwrites with this server's scenes only.",
                            RunId=run_id,
                            ForeignScenes=foreign,
                        )
                try:
                    report = finalize_files(folder, meta, render_summary(meta), output_dir=rt.output_dir())
                except UnsafePathError as exc:
                    # A symlink leading out of the output folder: refused, nothing written there.
                    return json_error(409, f"refused to write the run files: {exc}", RunId=run_id, Path=str(exc.path))
                except (MarkerWriteError, OSError) as exc:
                    return json_error(507, f"could not write the run files in {folder}: {exc}", RunId=run_id)
                scenes = len(meta["Scenes"])

            def stamp() -> None:  # a finalized run's records may be pruned as a whole (see Store.prune)
                info = dict(rt.store.run_info(run_id) or {})
                info["FinalizedAt"] = time.time()
                rt.store.put_run(run_id, info)

            getattr(rt, "store_writer", rt.writer).submit(stamp)  # a store write: never in front of a marker
            result = {
                "RunId": run_id,
                "RunDir": str(folder),
                "MetadataPath": str(folder / METADATA_FILE),
                "SummaryPath": str(folder / SUMMARY_FILE),
                "Valid": report.valid,
                "Errors": report.errors,  # named as `validate --json` names them
                "Problems": report.errors,  # deprecated alias of Errors
                "Scenes": scenes,
            }
            emit_run_finalized(rt, result)
            return web.json_response(result)

        return await asyncio.to_thread(finalize)

    async def serve_file(request: web.Request, name: str, content_type: str) -> web.StreamResponse:
        run_id = checked_run_id(request)
        try:
            data = await asyncio.to_thread(read_run_file, rt.output_dir(), run_id, name)
        except FileNotFoundError:
            known = await asyncio.to_thread(rt.store.by_run_raw, run_id)
            if not known:
                return json_error(
                    404, f"unknown run {run_id!r}: no prompt was tagged with it and it was never finalized"
                )
            return json_error(404, f"run {run_id!r} has no {name} yet: POST /telemetry/runs/{run_id}/finalize first")
        except UnsafePathError as exc:
            # Never serve a file outside the output folder: a symlinked run folder or file is refused.
            return json_error(403, f"not served: {exc}", RunId=run_id, Path=str(exc.path))
        return web.Response(body=data, headers={"Content-Type": content_type})

    @routes.get("/telemetry/runs/{run_id}/artifact-metadata.json")
    async def telemetry_run_metadata_file(request: web.Request) -> web.StreamResponse:
        """The finalized artifact-metadata.json; 404 before finalize."""
        return await serve_file(request, METADATA_FILE, "application/json")

    @routes.get("/telemetry/runs/{run_id}/run-summary.txt")
    async def telemetry_run_summary_file(request: web.Request) -> web.StreamResponse:
        """The finalized run-summary.txt; 404 before finalize."""
        return await serve_file(request, SUMMARY_FILE, "text/plain; charset=utf-8")
