"""Runs: list, assemble in-process, finalize to artifact-metadata.json + run-summary.txt, serve the files."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pydantic_core
from aiohttp import web

from ..telemetry.atomic import MarkerWriteError
from ..telemetry.llm import health_from_env
from ..telemetry.runs import (
    METADATA_FILE,
    SUMMARY_FILE,
    assemble_run,
    finalize_files,
    gc_paused,
    run_dir,
    run_id_problem,
    run_status,
)
from ..telemetry.summary import render_summary
from .common import json_error


def add_routes(routes: web.RouteTableDef, rt: Any) -> None:
    """Register the run routes."""

    def checked_run_id(request: web.Request) -> str:
        run_id = request.match_info["run_id"]
        problem = run_id_problem(run_id)
        if problem:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": problem, "parameter": "run_id"}), content_type="application/json"
            )
        return run_id

    def assemble(run_id: str, llm: dict[str, Any] | None = None) -> dict[str, Any] | None:
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
        rows = await asyncio.to_thread(rt.store.runs)
        for row in rows:
            row["Status"] = run_status(row)
            row["Finalized"] = (run_dir(rt.output_dir(), row["RunId"]) / METADATA_FILE).exists()
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
            llm = health_from_env(os.environ)
            with gc_paused():
                meta = assemble(run_id, llm)
                if meta is None:
                    return json_error(404, f"unknown run {run_id!r}: no prompt was tagged with it")
                if llm is not None:
                    info = dict(rt.store.run_info(run_id) or {})
                    info["LLMHealthInfo"] = llm
                    rt.writer.submit(lambda: rt.store.put_run(run_id, info))
                folder = Path(meta["RunDir"])
                try:
                    report = finalize_files(folder, meta, render_summary(meta))
                except (MarkerWriteError, OSError) as exc:
                    return json_error(507, f"could not write the run files in {folder}: {exc}", RunId=run_id)
                scenes = len(meta["Scenes"])
            return web.json_response(
                {
                    "RunId": run_id,
                    "RunDir": str(folder),
                    "MetadataPath": str(folder / METADATA_FILE),
                    "SummaryPath": str(folder / SUMMARY_FILE),
                    "Valid": report.valid,
                    "Problems": report.errors,
                    "Scenes": scenes,
                }
            )

        return await asyncio.to_thread(finalize)

    async def serve_file(request: web.Request, name: str, content_type: str) -> web.StreamResponse:
        run_id = checked_run_id(request)
        path = run_dir(rt.output_dir(), run_id) / name
        if not path.is_file():
            return json_error(404, f"run {run_id!r} has no {name} yet: POST /telemetry/runs/{run_id}/finalize first")
        return web.FileResponse(path, headers={"Content-Type": content_type})

    @routes.get("/telemetry/runs/{run_id}/artifact-metadata.json")
    async def telemetry_run_metadata_file(request: web.Request) -> web.StreamResponse:
        """The finalized artifact-metadata.json; 404 before finalize."""
        return await serve_file(request, METADATA_FILE, "application/json")

    @routes.get("/telemetry/runs/{run_id}/run-summary.txt")
    async def telemetry_run_summary_file(request: web.Request) -> web.StreamResponse:
        """The finalized run-summary.txt; 404 before finalize."""
        return await serve_file(request, SUMMARY_FILE, "text/plain; charset=utf-8")
