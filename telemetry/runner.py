"""``run-telemetry run``: drive a story through one or several ComfyUI workers that have this package.

Scenes go to the least-loaded live worker; each worker holds at most ``--depth`` of this run's prompts (queued or
running) so its GPU does not idle between scenes. The runner chooses every prompt's id (a lowercase UUID), so a
submission whose answer was lost is asked about and, if unknown, sent again with the same id.

Attempts of a scene, within ``1 + SceneRetryBudget`` (the workers' policy):
- ``success``: done. ``error``: the worker itself requeues the scene while the budget lasts (``RetriedBy``); the
  runner follows that chain on the same worker.
- ``interrupted`` / ``cancelled`` (a person stopped or deleted it): the scene failed; not requeued.
- ``crashed`` / ``lost``, an id the worker does not know (404), or a worker that stops answering for
  ``--worker-grace`` seconds: a failed attempt; the scene is queued again on a live worker while the budget lasts.
  A dead worker gets no more scenes and is named in the summary.

The run is assembled from the records the runner collected, with the same code as the server's finalize
(:func:`telemetry.runs.assemble_run`, :func:`telemetry.runs.finalize_files`), into ``--out``; a single-worker run is
also finalized on its server. ``--resume`` with an existing ``--run-id`` reads the run's records from the workers,
keeps them, and queues only the scenes that have not succeeded (adopting prompts still pending). Ctrl-C cancels this
run's pending prompts on every worker and prints the command that resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from .atomic import atomic_write
from .dispatch import PENDING, Output, Run, Scene, Slot, collect
from .policy import QueuePolicy, apply_overrides
from .remote import ServerUnreachable, Worker, check_server_url
from .runs import assemble_run, finalize_files, metadata_json, run_id_problem
from .story import (  # re-exported: the runner's public helpers
    PLACEHOLDER,
    RunnerError,
    fill,
    load_story,
    load_workflow,
    scene_values,
)
from .summary import render_summary

__all__ = [
    "PLACEHOLDER",
    "RunResult",
    "RunnerError",
    "fill",
    "load_story",
    "load_workflow",
    "register",
    "run_story",
    "scene_values",
]

DEFAULT_DEPTH = 2
# Beside artifact-metadata.json in --out: every record the runner collected, for --resume.
JOURNAL_FILE = "runner-records.json"
DEFAULT_WORKER_GRACE = 30.0
EXIT_INTERRUPTED = 130


@dataclass
class RunResult:
    """What a run ended with: exit code, run id, where its files are, failed scenes and workers."""

    exit_code: int
    run_id: str
    run_dir: str | None = None
    failed_scenes: list[str] = field(default_factory=list)
    summary: str | None = None
    failed_workers: dict[str, str] = field(default_factory=dict)
    valid: bool | None = None
    problems: list[str] = field(default_factory=list)


def _policy_from(tel: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> QueuePolicy:
    view = tel.get("Policy") or {}
    known = {f.name for f in dataclasses.fields(QueuePolicy)}
    policy = QueuePolicy(**{k: v for k, v in view.items() if k in known and isinstance(v, int)})
    if overrides:
        policy, _ = apply_overrides(policy, overrides)
    return policy


async def _preflight(worker: Worker, out: TextIO) -> dict[str, Any]:
    """Server reachable, this package's routes present, a GPU snapshot printed."""
    try:
        status, _ = await worker.call("GET", "/system_stats")
        if status != 200:
            raise RunnerError(f"{worker.base} answered /system_stats with HTTP {status}: is it ComfyUI?")
        status, tel = await worker.call("GET", "/telemetry?limit=1")
    except ServerUnreachable as exc:
        raise RunnerError(f"cannot reach ComfyUI at {worker.base}: {exc}") from None
    if status != 200 or not isinstance(tel, Mapping):
        raise RunnerError(f"Run Telemetry is not installed on {worker.base} (GET /telemetry answered {status})")
    snap = tel.get("Snapshot") or {}
    dev = snap.get("Device") or {}
    total, free = dev.get("VramTotal") or 0, dev.get("VramFree") or 0
    out.write(
        f"Preflight: {worker.base} ok; device {dev.get('Name')} ({dev.get('Type')}), "
        f"{free / 1048576:.0f} MiB free of {total / 1048576:.0f} MiB via {snap.get('Source')}\n"
    )
    for note in tel.get("FallbackNotes") or []:
        out.write(f"  note: {note}\n")
    return dict(tel)


def _build_scenes(story: Mapping[str, Any], workflow: Mapping[str, Any], run_id: str, policy: Any) -> list[Scene]:
    story_tag = {k: v for k, v in story.items() if k != "scenes"}
    scenes = []
    n = len(story["scenes"])
    for i in range(n):
        values = scene_values(story, i, run_id)
        tags: dict[str, Any] = {
            "run_id": run_id,
            "scene_id": values["id"],
            "title": values["title"],
            "prompt": values["prompt"],
            "negative_prompt": values["negative_prompt"],
            "frame_floor": int(values["frame_floor"] or 0),
            "prefix": values["prefix"],
        }
        if story_tag:
            tags["story"] = story_tag
        if policy:
            tags["policy"] = dict(policy)
        label = f"[scene {i + 1}/{n} {values['id']}]"
        scenes.append(Scene(i, values["id"], fill(workflow, values, {"id": run_id}), tags, label))
    return scenes


def _workers(run: Run, slots: Sequence[Slot]) -> list[dict[str, Any]]:
    """The contract's ``Workers``: each worker, the attempts queued on it in this invocation, and whether it failed."""
    counts = Counter(att.slot.url for scene in run.scenes for att in scene.attempts)
    workers = []
    for slot in slots:
        info: dict[str, Any] = {"Url": slot.url, "Attempts": counts[slot.url], "Failed": slot.dead is not None}
        if slot.dead is not None:
            info["Reason"] = slot.dead
        workers.append(info)
    return workers


def _write_journal(out_dir: Path | None, records: Mapping[str, Mapping[str, Any]]) -> None:
    """Keep the collected records beside the run's files, so ``--resume`` still has a dead worker's attempts."""
    if out_dir is None or not records:
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / JOURNAL_FILE, metadata_json({"Records": list(records.values())}))
    except OSError as exc:
        raise RunnerError(f"cannot write {JOURNAL_FILE} into --out {out_dir}: {exc}") from None


def _read_journal(out_dir: Path | None, run_id: str) -> list[dict[str, Any]]:
    """The records an earlier run with this ``--out`` kept; [] when there are none or they cannot be read."""
    if out_dir is None:
        return []
    try:
        data = json.loads((out_dir / JOURNAL_FILE).read_bytes())
    except (OSError, ValueError):
        return []
    items = data.get("Records") if isinstance(data, dict) else None
    return [r for r in items or [] if isinstance(r, dict) and r.get("RunId") == run_id and r.get("PromptId")]


def _resume_hint(run_id: str, servers: Sequence[str], workflow: Path, scenes: Path, out_dir: Path | None) -> str:
    parts = ["run-telemetry", "run", "--resume", "--run-id", run_id]
    for s in servers:
        parts += ["--server", s]
    parts += ["--workflow", str(workflow), "--scenes", str(scenes)]
    if out_dir is not None:
        parts += ["--out", str(out_dir)]
    return " ".join(parts)


async def _run_async(
    *,
    servers: Sequence[str],
    workflow: Path,
    scenes_path: Path,
    run_id: str,
    out: TextIO,
    max_wait: float | None,
    policy: Mapping[str, Any] | None,
    depth: int,
    grace: float,
    out_dir: Path | None,
    resume: bool,
) -> RunResult:
    wf = load_workflow(workflow)
    story = load_story(scenes_path)
    async with aiohttp.ClientSession() as session:
        slots = [Slot(Worker(url, session), depth) for url in servers]
        tels = [await _preflight(slot.worker, out) for slot in slots]
        run_policy = _policy_from(tels[0], policy)
        budget = float(max_wait or run_policy.max_wait_seconds or 600)
        scenes = _build_scenes(story, wf, run_id, policy)
        records: dict[str, dict[str, Any]] = {}
        if resume:
            found = await collect(slots, run_id)
            by_scene: dict[str, list[tuple[dict[str, Any], Slot | None]]] = {}
            # What an earlier --out kept (attempts of workers gone since), then what the workers hold now.
            journal = {r["PromptId"]: (r, None) for r in _read_journal(out_dir, run_id) if r["PromptId"] not in found}
            for rec, slot in [*journal.values(), *found.values()]:
                records[rec["PromptId"]] = rec
                by_scene.setdefault(str(rec.get("SceneId") or rec["PromptId"]), []).append((rec, slot))
            for scene in scenes:
                earlier = by_scene.get(scene.id, [])
                if any(r.get("Outcome") == "success" for r, _ in earlier):
                    scene.done = scene.success = True
                    continue
                pending = [(r, s) for r, s in earlier if r.get("Outcome") in PENDING and s is not None]
                if pending:
                    scene.adopt = (pending[-1][0]["PromptId"], pending[-1][1])
            kept = sum(1 for s in scenes if s.done)
            out.write(
                f"Resuming run {run_id}: {len(records)} earlier attempt(s) found, {kept} scene(s) already succeeded, "
                f"{len(scenes) - kept} to run\n"
            )
        else:
            out.write(f"Run {run_id}: {len(scenes)} scene(s) on {len(slots)} worker(s), depth {depth}\n")
        progress = Output(out, len(scenes), sum(1 for s in scenes if s.done))
        run = Run(
            run_id=run_id,
            scenes=scenes,
            slots=slots,
            policy=run_policy,
            max_wait=budget,
            grace=grace,
            out=progress,
            records=records,
        )
        loop = asyncio.get_running_loop()
        interrupted = False

        def on_sigint() -> None:
            nonlocal interrupted
            interrupted = True
            run.stop.set()

        try:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
            handler_set = True
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
            handler_set = False
        try:
            await run.drive()
        except (KeyboardInterrupt, asyncio.CancelledError):
            interrupted = True
        finally:
            if handler_set:
                loop.remove_signal_handler(signal.SIGINT)
            progress.close()
        if interrupted:
            n = await run.cancel_pending()
            await run.settle_cancelled()
            _write_journal(out_dir, run.records)
            out.write(
                f"\nInterrupted: {n} pending prompt(s) of run {run_id} cancelled on the workers.\n"
                f"Resume with:\n  {_resume_hint(run_id, servers, workflow, scenes_path, out_dir)}\n"
            )
            return RunResult(EXIT_INTERRUPTED, run_id, failed_workers=run.failed_workers)
        failed = [s.id for s in scenes if not s.success]
        return await _conclude(run, slots, out, out_dir, failed, story)


async def _conclude(
    run: Run, slots: Sequence[Slot], out: TextIO, out_dir: Path | None, failed: list[str], story: Mapping[str, Any]
) -> RunResult:
    """Assemble the run from the collected records (``--out``), finalize on a single worker, print the summary."""
    run_id = run.run_id
    result = RunResult(1, run_id, failed_scenes=failed, failed_workers=dict(run.failed_workers))
    for url, reason in run.failed_workers.items():
        out.write(f"Worker failed: {url}: {reason}\n")
    summary: str | None = None
    if out_dir is not None or len(slots) > 1:
        story_tag = {k: v for k, v in story.items() if k != "scenes"}
        records = sorted(run.records.values(), key=lambda r: (r.get("QueuedAt") or "", r["PromptId"]))
        meta = assemble_run(
            run_id,
            records,
            policy=run.policy,
            output_dir=out_dir or Path("."),
            run_info={"Story": story_tag} if story_tag else {},
        )
        meta["Workers"] = _workers(run, slots)
        summary = render_summary(meta)
        if out_dir is not None:
            _write_journal(out_dir, run.records)
            meta["RunDir"] = str(out_dir.resolve())
            summary = render_summary(meta)
            try:
                report = await asyncio.to_thread(finalize_files, out_dir, meta, summary)
            except OSError as exc:
                raise RunnerError(f"cannot write the run into --out {out_dir}: {exc}") from None
            result.run_dir, result.valid, result.problems = str(out_dir), report.valid, list(report.errors)
    if len(slots) == 1 and slots[0].dead is None:
        worker = slots[0].worker
        quoted = urllib.parse.quote(run_id, safe="")
        try:
            status, fin = await worker.call("POST", f"/telemetry/runs/{quoted}/finalize", {}, timeout=300)
            if status != 200:
                raise RunnerError(f"finalizing run {run_id} on {worker.base} failed: HTTP {status}: {fin}")
            _, text = await worker.call("GET", f"/telemetry/runs/{quoted}/run-summary.txt")
        except ServerUnreachable as exc:
            raise RunnerError(f"finalizing run {run_id}: {exc}") from None
        if out_dir is None:
            summary = text if isinstance(text, str) else json.dumps(text)
            result.run_dir, result.valid = fin["RunDir"], bool(fin.get("Valid"))
            result.problems = list(fin.get("Errors") or fin.get("Problems") or [])
        else:
            out.write(f"Also finalized on {worker.base}: {fin['RunDir']} (valid: {fin.get('Valid')})\n")
    result.summary = summary
    if summary:
        out.write("\n" + summary + ("" if summary.endswith("\n") else "\n"))
    if result.run_dir:
        out.write(f"Run folder: {result.run_dir}  (valid: {result.valid})\n")
    for p in result.problems:
        out.write(f"  problem: {p}\n")
    result.exit_code = 0 if not failed and result.valid is not False else 1
    return result


def run_story(
    *,
    server: str | Sequence[str],
    workflow: Path,
    scenes: Path,
    run_id: str | None = None,
    out: TextIO = sys.stdout,
    max_wait: float | None = None,
    policy: Mapping[str, Any] | None = None,
    depth: int = DEFAULT_DEPTH,
    worker_grace: float = DEFAULT_WORKER_GRACE,
    out_dir: Path | None = None,
    resume: bool = False,
) -> RunResult:
    """Run every scene of a story on the workers in ``server`` (a URL or several), assemble and print the run.

    Raises :class:`RunnerError` for input the user can fix (files, run id, an unreachable worker at the start).
    """
    servers = [server] if isinstance(server, str) else list(server)
    if not servers:
        raise RunnerError("give at least one --server URL")
    try:
        servers = [check_server_url(s) for s in servers]
    except ValueError as exc:
        raise RunnerError(str(exc)) from None
    if len(set(servers)) != len(servers):
        raise RunnerError("a --server is given twice; give each worker once")
    if resume and not run_id:
        raise RunnerError("--resume needs the --run-id of the run to continue")
    if depth < 1:
        raise RunnerError(f"--depth {depth} must be at least 1 (prompts of this run queued per worker)")
    run_id = run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    problem = run_id_problem(run_id, name="--run-id")
    if problem:
        raise RunnerError(problem)
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise RunnerError(f"--out {out_dir} is a file; give a folder for the run's files")
    return asyncio.run(
        _run_async(
            servers=servers,
            workflow=Path(workflow),
            scenes_path=Path(scenes),
            run_id=run_id,
            out=out,
            max_wait=max_wait,
            policy=policy,
            depth=depth,
            grace=worker_grace,
            out_dir=Path(out_dir) if out_dir is not None else None,
            resume=resume,
        )
    )


def _handle(args: argparse.Namespace) -> int:
    try:
        result = run_story(
            server=args.server,
            workflow=Path(args.workflow),
            scenes=Path(args.scenes),
            run_id=args.run_id,
            max_wait=args.max_wait,
            depth=args.depth,
            worker_grace=args.worker_grace,
            out_dir=Path(args.out) if args.out else None,
            resume=args.resume,
        )
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before the run started; nothing was queued", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.failed_scenes:
        print(f"failed scenes: {', '.join(result.failed_scenes)}", file=sys.stderr)
    return result.exit_code


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``run`` sub-command."""
    p = subparsers.add_parser(
        "run",
        help="run a story's scenes on one or several ComfyUI workers and assemble the run",
        description=(
            "Queue a story's scenes on the workers (least-loaded first, --depth prompts each), follow every attempt, "
            "assemble artifact-metadata.json and run-summary.txt. Exit 0 all scenes succeeded and the run is valid, "
            "1 otherwise, 2 bad input or no worker reachable, 130 interrupted (Ctrl-C; prints how to resume)."
        ),
    )
    p.add_argument(
        "--server",
        required=True,
        action="append",
        help="ComfyUI base URL, e.g. http://127.0.0.1:8188; repeat for several workers",
    )
    p.add_argument("--workflow", required=True, help="API-format workflow with {{scene.…}} placeholders")
    p.add_argument("--scenes", required=True, help="story JSON with a 'scenes' list")
    p.add_argument("--run-id", help="run id (letters, digits, . _ -); default run-<local time>")
    p.add_argument("--max-wait", type=float, help="seconds to wait per attempt (default: the server's policy)")
    p.add_argument("--out", help="write the run's artifact-metadata.json and run-summary.txt here (all workers)")
    p.add_argument("--resume", action="store_true", help="continue --run-id: run only the scenes not yet succeeded")
    p.add_argument(
        "--depth",
        type=int,
        default=DEFAULT_DEPTH,
        help=f"prompts of this run queued or running per worker (default {DEFAULT_DEPTH})",
    )
    p.add_argument(
        "--worker-grace",
        type=float,
        default=DEFAULT_WORKER_GRACE,
        help=f"seconds without an answer before a worker counts as failed (default {DEFAULT_WORKER_GRACE:.0f})",
    )
    p.set_defaults(func=_handle)
