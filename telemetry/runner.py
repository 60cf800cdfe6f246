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
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from .policy import QueuePolicy, apply_overrides
from .records import iso
from .remote import ServerUnreachable, Worker, check_server_url
from .runs import assemble_run, finalize_files, run_id_problem
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
DEFAULT_WORKER_GRACE = 30.0
EXIT_INTERRUPTED = 130
# Outcomes that stop a scene: a person chose them (or the worker's own retries are spent).
_FINAL_FAILURES = frozenset({"error", "interrupted", "cancelled"})
_PENDING = frozenset({"queued", "running"})


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


@dataclass
class _Slot:
    """One worker as the scheduler sees it: its client, its load, whether it is alive."""

    worker: Worker
    depth: int
    active: int = 0
    assigned: int = 0
    last_answer: float = field(default_factory=time.monotonic)
    dead: str | None = None

    @property
    def url(self) -> str:
        return self.worker.base


@dataclass
class _Attempt:
    number: int
    prompt_id: str
    slot: _Slot
    queued_at: str
    started: float = field(default_factory=time.monotonic)
    record: dict[str, Any] | None = None


@dataclass
class _Scene:
    index: int
    id: str
    prompt: dict[str, Any]
    tags: dict[str, Any]
    label: str
    attempts: list[_Attempt] = field(default_factory=list)
    budget_used: int = 0
    done: bool = False
    success: bool = False
    adopt: tuple[str, _Slot] | None = None


class _Output:
    """Per-scene lines (``tqdm.write`` under the bar on a terminal) and an overall bar of scenes done, with ETA."""

    def __init__(self, out: TextIO, total: int, done: int) -> None:
        self.out = out
        self.bar = None
        if bool(getattr(out, "isatty", lambda: False)()):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="scene", file=out, dynamic_ncols=True, leave=True)

    def line(self, text: str) -> None:
        """One line, kept above the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def scene_done(self) -> None:
        """Advance the bar by one finished scene."""
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


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


class _Run:
    """One invocation of the runner: the scenes, the workers, the records collected."""

    def __init__(
        self,
        *,
        run_id: str,
        scenes: list[_Scene],
        slots: list[_Slot],
        policy: QueuePolicy,
        max_wait: float,
        grace: float,
        out: _Output,
        records: dict[str, dict[str, Any]],
    ) -> None:
        self.run_id = run_id
        self.scenes = scenes
        self.slots = slots
        self.policy = policy
        self.max_attempts = 1 + policy.scene_retry_budget
        self.max_wait = max_wait
        self.grace = grace
        self.out = out
        self.records = records  # prompt id -> record, every attempt of this run the runner knows of
        self.stop = asyncio.Event()
        self.failed_workers: dict[str, str] = {}

    # --- scheduling --------------------------------------------------------------------------------------------

    def _pick(self, avoid: _Slot | None) -> _Slot | None:
        live = [s for s in self.slots if s.dead is None and s.active < s.depth]
        if not live:
            return None
        preferred = [s for s in live if s is not avoid] or live
        return min(preferred, key=lambda s: (s.active, s.assigned))

    async def drive(self) -> None:
        """Dispatch scenes until every one is done, no worker is left, or :attr:`stop` is set."""
        todo: deque[tuple[_Scene, _Slot | None]] = deque((s, None) for s in self.scenes if not s.done)
        tasks: dict[asyncio.Task[bool], _Scene] = {}
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            while (todo or tasks) and not self.stop.is_set():
                while todo:
                    scene, avoid = todo[0]
                    slot = scene.adopt[1] if scene.adopt and scene.adopt[1].dead is None else self._pick(avoid)
                    if slot is None:
                        break
                    todo.popleft()
                    slot.active += 1
                    slot.assigned += 1
                    tasks[asyncio.ensure_future(self._scene_on(scene, slot))] = scene
                if not tasks:
                    for scene, _ in todo:  # no live worker is left for them
                        self._finish(scene, False, "not run: no live worker left")
                    todo.clear()
                    break
                finished, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    if task is stopper:
                        continue
                    scene = tasks.pop(task)
                    slot_failed = task.result()
                    if not scene.done:
                        todo.appendleft((scene, slot_failed))
        finally:
            stopper.cancel()
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def _finish(self, scene: _Scene, success: bool, text: str) -> None:
        scene.done, scene.success = True, success
        self.out.line(f"{scene.label} {text}")
        self.out.scene_done()

    def _note_dead(self, slot: _Slot, reason: str) -> None:
        if slot.dead is None:
            slot.dead = reason
            self.failed_workers[slot.url] = reason
            self.out.line(f"worker {slot.url} failed: {reason}; its unfinished scenes go to the other workers")

    # --- one scene on one worker -------------------------------------------------------------------------------

    async def _scene_on(self, scene: _Scene, slot: _Slot) -> _Slot | None:
        """Run (or adopt) an attempt of ``scene`` on ``slot`` and follow the worker's own retries.

        Returns ``None`` when the scene is done, else the slot to avoid when it is queued again.
        """
        try:
            if scene.adopt is not None:
                pid, _ = scene.adopt
                scene.adopt = None
                attempt = _Attempt(len(scene.attempts) + 1, pid, slot, iso(time.time()) or "")
                scene.attempts.append(attempt)
                self.out.line(f"{scene.label} attempt {attempt.number} on {slot.url}: adopted pending prompt {pid}")
            else:
                if scene.budget_used >= self.max_attempts:
                    self._finish(scene, False, f"failed: {scene.budget_used} attempt(s), retry budget spent")
                    return None
                attempt = await self._submit(scene, slot)
                if attempt is None:
                    return None if scene.done else slot
            while True:
                rec = await self._wait(scene, attempt)
                if rec is None:  # worker dead, 404, or gave up waiting
                    if scene.done:
                        return None
                    return slot
                outcome = rec.get("Outcome")
                elapsed = time.monotonic() - attempt.started
                head = f"{scene.label} attempt {attempt.number} on {slot.url}:"
                if outcome == "success":
                    self._finish(scene, True, f"{head} success after {elapsed:.1f}s")
                    return None
                err = (rec.get("Error") or {}).get("Message") or outcome
                if outcome == "error" and rec.get("RetriedBy"):
                    self.out.line(f"{head} error after {elapsed:.1f}s: {err}; the worker queued a retry")
                    scene.budget_used += 1
                    attempt = _Attempt(attempt.number + 1, str(rec["RetriedBy"]), slot, iso(time.time()) or "")
                    scene.attempts.append(attempt)
                    continue
                if outcome in _FINAL_FAILURES:
                    self._finish(scene, False, f"{head} {outcome} after {elapsed:.1f}s: {err}")
                    return None
                # crashed, lost, or an outcome this runner does not know: a failed attempt, queued again.
                self.out.line(f"{head} {outcome} after {elapsed:.1f}s: {err}")
                return self._requeue_or_fail(scene, slot)
        finally:
            slot.active -= 1

    def _requeue_or_fail(self, scene: _Scene, slot: _Slot) -> _Slot | None:
        if scene.budget_used >= self.max_attempts:
            self._finish(scene, False, f"failed: {scene.budget_used} attempt(s), retry budget spent")
            return None
        return slot

    def _tags(self, scene: _Scene, number: int, retry_of: str | None) -> dict[str, Any]:
        tags = dict(scene.tags)
        tags["attempt"] = number
        if retry_of:
            tags["retry_of"] = retry_of
        return tags

    async def _submit(self, scene: _Scene, slot: _Slot) -> _Attempt | None:
        """POST /prompt with a runner-chosen id; an unclear answer is checked and the same id sent again."""
        scene.budget_used += 1
        number = scene.budget_used
        retry_of = scene.attempts[-1].prompt_id if scene.attempts else None
        pid = str(uuid.uuid4())
        attempt = _Attempt(len(scene.attempts) + 1, pid, slot, iso(time.time()) or "")
        scene.attempts.append(attempt)
        body = {
            "prompt": scene.prompt,
            "prompt_id": pid,
            "extra_data": {"telemetry": self._tags(scene, number, retry_of)},
        }
        while True:
            try:
                status, answer = await slot.worker.call("POST", "/prompt", body)
            except ServerUnreachable as exc:
                if await self._unanswered(slot, str(exc)):
                    self._lost(scene, attempt, f"worker {slot.url} stopped answering before accepting the prompt")
                    return None
                known = await self._known(slot, pid)
                if known:
                    break
                continue  # unknown there: the same id again (idempotent)
            slot.last_answer = time.monotonic()
            if status == 200:
                break
            if status == 409:  # the id is already there: an earlier try of this same submission got through
                break
            message = json.dumps(answer)[:800] if not isinstance(answer, str) else answer[:800]
            self.records[pid] = self._synthetic(scene, attempt, "error", f"refused by {slot.url}: HTTP {status}")
            self._finish(scene, False, f"attempt {attempt.number} refused by {slot.url}: HTTP {status}: {message}")
            return None
        self.out.line(f"{scene.label} attempt {attempt.number} queued on {slot.url} as {pid}")
        return attempt

    async def _known(self, slot: _Slot, pid: str) -> bool:
        try:
            status, _ = await slot.worker.call("GET", f"/telemetry/prompts/{pid}", timeout=10)
        except ServerUnreachable:
            return False
        slot.last_answer = time.monotonic()
        return status == 200

    async def _unanswered(self, slot: _Slot, reason: str) -> bool:
        """Count a failed request; True (and the worker dead) once it has not answered for ``grace`` seconds."""
        if slot.dead is not None:
            return True
        if time.monotonic() - slot.last_answer >= self.grace:
            self._note_dead(slot, f"no answer for {self.grace:.0f}s ({reason})")
            return True
        await asyncio.sleep(min(1.0, self.grace / 5))
        return slot.dead is not None

    def _synthetic(self, scene: _Scene, attempt: _Attempt, outcome: str, message: str) -> dict[str, Any]:
        """A record for an attempt whose worker cannot give one (dead, or the id is unknown there)."""
        return {
            "PromptId": attempt.prompt_id,
            "RunId": self.run_id,
            "SceneId": scene.id,
            "Tags": self._tags(scene, attempt.number, None),
            "Outcome": outcome,
            "Error": {"Message": message},
            "QueuedAt": attempt.queued_at,
            "EndedAt": iso(time.time()),
            "FallbackNotes": [message],
            "Attempt": attempt.number,
        }

    def _lost(self, scene: _Scene, attempt: _Attempt, message: str) -> None:
        attempt.record = self.records[attempt.prompt_id] = self._synthetic(scene, attempt, "crashed", message)
        self.out.line(f"{scene.label} attempt {attempt.number} on {attempt.slot.url}: {message}")
        self._requeue_or_fail(scene, attempt.slot)

    async def _wait(self, scene: _Scene, attempt: _Attempt) -> dict[str, Any] | None:
        """The attempt's final record, or ``None`` (worker dead, prompt unknown, waited ``max_wait``)."""
        slot = attempt.slot
        deadline = attempt.started + self.max_wait
        state = "queued"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                message = f"gave up after {self.max_wait:.0f}s (prompt {attempt.prompt_id} still {state})"
                self.records[attempt.prompt_id] = self._synthetic(scene, attempt, "crashed", message)
                self._finish(scene, False, f"attempt {attempt.number} on {slot.url}: {message}")
                return None
            if slot.dead is not None:
                self._lost(scene, attempt, f"worker {slot.url} failed ({slot.dead}) before the prompt ended")
                return None
            try:
                status, body = await slot.worker.wait_once(attempt.prompt_id, min(left, 5.0))
            except ServerUnreachable as exc:
                if await self._unanswered(slot, str(exc)):
                    self._lost(scene, attempt, f"worker {slot.url} failed ({slot.dead}) before the prompt ended")
                    return None
                continue
            slot.last_answer = time.monotonic()
            if status == 200 and isinstance(body, dict):
                attempt.record = self.records[attempt.prompt_id] = body
                return body
            if status == 202 and isinstance(body, dict):
                new = str(body.get("Outcome", "queued"))
                if new != state and new == "running":
                    self.out.line(
                        f"{scene.label} attempt {attempt.number} running on {slot.url} "
                        f"({time.monotonic() - attempt.started:.1f}s)"
                    )
                state = new
                continue
            if status == 404:
                self._lost(scene, attempt, f"worker {slot.url} does not know prompt {attempt.prompt_id} (404)")
                return None
            if await self._unanswered(slot, f"HTTP {status}: {str(body)[:200]}"):
                self._lost(scene, attempt, f"worker {slot.url} failed ({slot.dead}) before the prompt ended")
                return None

    # --- Ctrl-C ------------------------------------------------------------------------------------------------

    async def cancel_pending(self) -> int:
        """Delete this run's unfinished prompts from every live worker's queue and interrupt the running ones."""
        by_slot: dict[int, list[str]] = {}
        for scene in self.scenes:
            for att in scene.attempts:
                rec = self.records.get(att.prompt_id)
                if rec is None or rec.get("Outcome") in _PENDING:
                    by_slot.setdefault(id(att.slot), []).append(att.prompt_id)
        cancelled = 0
        for slot in self.slots:
            ids = by_slot.get(id(slot))
            if not ids or slot.dead is not None:
                continue
            try:
                await slot.worker.call("POST", "/queue", {"delete": ids}, timeout=10)
                _, queue = await slot.worker.call("GET", "/queue", timeout=10)
                running = {str(item[1]) for item in (queue or {}).get("queue_running", []) if len(item) > 1}
                for pid in set(ids) & running:
                    await slot.worker.call("POST", "/interrupt", {"prompt_id": pid}, timeout=10)
            except (ServerUnreachable, TypeError, AttributeError):
                continue
            cancelled += len(ids)
        return cancelled


async def _collect(slots: Sequence[_Slot], run_id: str) -> dict[str, tuple[dict[str, Any], _Slot]]:
    """Every record of ``run_id`` the live workers hold (for ``--resume``): prompt id -> (record, worker)."""
    found: dict[str, tuple[dict[str, Any], _Slot]] = {}
    quoted = urllib.parse.quote(run_id, safe="")
    for slot in slots:
        try:
            status, meta = await slot.worker.call("GET", f"/telemetry/runs/{quoted}", timeout=120)
        except ServerUnreachable:
            continue
        if status != 200 or not isinstance(meta, Mapping):
            continue
        ids = [a["PromptId"] for s in meta.get("Scenes") or [] for a in s.get("AttemptSummaries") or []]
        for pid in ids:
            try:
                status, rec = await slot.worker.call("GET", f"/telemetry/prompts/{pid}", timeout=30)
            except ServerUnreachable:
                break
            if status == 200 and isinstance(rec, dict) and rec.get("RunId") == run_id:
                found[pid] = (rec, slot)
    return found


def _build_scenes(story: Mapping[str, Any], workflow: Mapping[str, Any], run_id: str, policy: Any) -> list[_Scene]:
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
        scenes.append(_Scene(i, values["id"], fill(workflow, values, {"id": run_id}), tags, label))
    return scenes


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
        slots = [_Slot(Worker(url, session), depth) for url in servers]
        tels = [await _preflight(slot.worker, out) for slot in slots]
        run_policy = _policy_from(tels[0], policy)
        budget = float(max_wait or run_policy.max_wait_seconds or 600)
        scenes = _build_scenes(story, wf, run_id, policy)
        records: dict[str, dict[str, Any]] = {}
        if resume:
            found = await _collect(slots, run_id)
            by_scene: dict[str, list[tuple[dict[str, Any], _Slot]]] = {}
            for rec, slot in found.values():
                records[rec["PromptId"]] = rec
                by_scene.setdefault(str(rec.get("SceneId") or rec["PromptId"]), []).append((rec, slot))
            for scene in scenes:
                earlier = by_scene.get(scene.id, [])
                if any(r.get("Outcome") == "success" for r, _ in earlier):
                    scene.done = scene.success = True
                    continue
                pending = [(r, s) for r, s in earlier if r.get("Outcome") in _PENDING]
                if pending:
                    scene.adopt = (pending[-1][0]["PromptId"], pending[-1][1])
            kept = sum(1 for s in scenes if s.done)
            out.write(
                f"Resuming run {run_id}: {len(records)} earlier attempt(s) found, {kept} scene(s) already succeeded, "
                f"{len(scenes) - kept} to run\n"
            )
        else:
            out.write(f"Run {run_id}: {len(scenes)} scene(s) on {len(slots)} worker(s), depth {depth}\n")
        progress = _Output(out, len(scenes), sum(1 for s in scenes if s.done))
        run = _Run(
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
            out.write(
                f"\nInterrupted: {n} pending prompt(s) of run {run_id} cancelled on the workers.\n"
                f"Resume with:\n  {_resume_hint(run_id, servers, workflow, scenes_path, out_dir)}\n"
            )
            return RunResult(EXIT_INTERRUPTED, run_id, failed_workers=run.failed_workers)
        failed = [s.id for s in scenes if not s.success]
        return await _conclude(run, slots, out, out_dir, failed, story)


async def _conclude(
    run: _Run, slots: Sequence[_Slot], out: TextIO, out_dir: Path | None, failed: list[str], story: Mapping[str, Any]
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
        summary = render_summary(meta)
        if out_dir is not None:
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
