"""The runner's scheduler: scenes onto workers, attempts followed to their end, dead workers noticed.

Used by :mod:`.runner` (the command and its policy are described there). One :class:`Run` per invocation: it
dispatches each scene to the live worker with the fewest of the run's prompts in flight (at most ``depth`` each),
follows every attempt through the wait route, and keeps every record it collects (a synthetic ``crashed`` record for
an attempt whose worker cannot give one).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .policy import QueuePolicy
from .records import iso
from .remote import ServerUnreachable, Worker

# Outcomes that stop a scene: a person chose them (or the worker's own retries are spent).
FINAL_FAILURES = frozenset({"error", "interrupted", "cancelled"})
PENDING = frozenset({"queued", "running"})


@dataclass
class Slot:
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
class Attempt:
    number: int
    prompt_id: str
    slot: Slot
    queued_at: str
    started: float = field(default_factory=time.monotonic)
    record: dict[str, Any] | None = None


@dataclass
class Scene:
    index: int
    id: str
    prompt: dict[str, Any]
    tags: dict[str, Any]
    label: str
    attempts: list[Attempt] = field(default_factory=list)
    budget_used: int = 0
    done: bool = False
    success: bool = False
    adopt: tuple[str, Slot] | None = None


class Output:
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


class Run:
    """One invocation of the runner: the scenes, the workers, the records collected."""

    def __init__(
        self,
        *,
        run_id: str,
        scenes: list[Scene],
        slots: list[Slot],
        policy: QueuePolicy,
        max_wait: float,
        grace: float,
        out: Output,
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

    def _pick(self, avoid: Slot | None) -> Slot | None:
        live = [s for s in self.slots if s.dead is None and s.active < s.depth]
        if not live:
            return None
        preferred = [s for s in live if s is not avoid] or live
        return min(preferred, key=lambda s: (s.active, s.assigned))

    async def drive(self) -> None:
        """Dispatch scenes until every one is done, no worker is left, or :attr:`stop` is set."""
        todo: deque[tuple[Scene, Slot | None]] = deque((s, None) for s in self.scenes if not s.done)
        tasks: dict[asyncio.Task[bool], Scene] = {}
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

    def _finish(self, scene: Scene, success: bool, text: str) -> None:
        scene.done, scene.success = True, success
        self.out.line(f"{scene.label} {text}")
        self.out.scene_done()

    def _note_dead(self, slot: Slot, reason: str) -> None:
        if slot.dead is None:
            slot.dead = reason
            self.failed_workers[slot.url] = reason
            self.out.line(f"worker {slot.url} failed: {reason}; its unfinished scenes go to the other workers")

    # --- one scene on one worker -------------------------------------------------------------------------------

    async def _scene_on(self, scene: Scene, slot: Slot) -> Slot | None:
        """Run (or adopt) an attempt of ``scene`` on ``slot`` and follow the worker's own retries.

        Returns ``None`` when the scene is done, else the slot to avoid when it is queued again.
        """
        try:
            if scene.adopt is not None:
                pid, _ = scene.adopt
                scene.adopt = None
                attempt = Attempt(len(scene.attempts) + 1, pid, slot, iso(time.time()) or "")
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
                head = f"attempt {attempt.number} on {slot.url}:"
                if outcome == "success":
                    states = ",".join(str(m.get("State", "?")) for m in rec.get("Markers") or [])
                    marker = f", marker {states}" if states else ""  # what a consumer of the prefix will find
                    self._finish(scene, True, f"{head} success after {elapsed:.1f}s{marker}")
                    return None
                err = (rec.get("Error") or {}).get("Message") or outcome
                if outcome == "error" and rec.get("RetriedBy"):
                    self.out.line(f"{scene.label} {head} error after {elapsed:.1f}s: {err}; the worker queued a retry")
                    scene.budget_used += 1
                    attempt = Attempt(attempt.number + 1, str(rec["RetriedBy"]), slot, iso(time.time()) or "")
                    scene.attempts.append(attempt)
                    continue
                if outcome in FINAL_FAILURES:
                    self._finish(scene, False, f"{head} {outcome} after {elapsed:.1f}s: {err}")
                    return None
                # crashed, lost, or an outcome this runner does not know: a failed attempt, queued again.
                self.out.line(f"{scene.label} {head} {outcome} after {elapsed:.1f}s: {err}")
                return self._requeue_or_fail(scene, slot)
        finally:
            slot.active -= 1

    def _requeue_or_fail(self, scene: Scene, slot: Slot) -> Slot | None:
        if scene.budget_used >= self.max_attempts:
            self._finish(scene, False, f"failed: {scene.budget_used} attempt(s), retry budget spent")
            return None
        return slot

    def _tags(self, scene: Scene, number: int, retry_of: str | None) -> dict[str, Any]:
        tags = dict(scene.tags)
        tags["attempt"] = number
        if retry_of:
            tags["retry_of"] = retry_of
        return tags

    async def _submit(self, scene: Scene, slot: Slot) -> Attempt | None:
        """POST /prompt with a runner-chosen id; an unclear answer is checked and the same id sent again."""
        scene.budget_used += 1
        number = scene.budget_used
        retry_of = scene.attempts[-1].prompt_id if scene.attempts else None
        pid = str(uuid.uuid4())
        attempt = Attempt(len(scene.attempts) + 1, pid, slot, iso(time.time()) or "")
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

    async def _known(self, slot: Slot, pid: str) -> bool:
        try:
            status, _ = await slot.worker.call("GET", f"/telemetry/prompts/{pid}", timeout=10)
        except ServerUnreachable:
            return False
        slot.last_answer = time.monotonic()
        return status == 200

    async def _unanswered(self, slot: Slot, reason: str) -> bool:
        """Count a failed request; True (and the worker dead) once it has not answered for ``grace`` seconds."""
        if slot.dead is not None:
            return True
        if time.monotonic() - slot.last_answer >= self.grace:
            self._note_dead(slot, f"no answer for {self.grace:.0f}s ({reason})")
            return True
        await asyncio.sleep(min(1.0, self.grace / 5))
        return slot.dead is not None

    def _synthetic(self, scene: Scene, attempt: Attempt, outcome: str, message: str) -> dict[str, Any]:
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

    def _lost(self, scene: Scene, attempt: Attempt, message: str) -> None:
        attempt.record = self.records[attempt.prompt_id] = self._synthetic(scene, attempt, "crashed", message)
        self.out.line(f"{scene.label} attempt {attempt.number} on {attempt.slot.url}: {message}")
        self._requeue_or_fail(scene, attempt.slot)

    async def _wait(self, scene: Scene, attempt: Attempt) -> dict[str, Any] | None:
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

    async def settle_cancelled(self) -> None:
        """After :meth:`cancel_pending`: each unfinished attempt's record as its worker has it now, else a stub
        (``queued``, no end), so the journal names every prompt this run queued."""
        for scene in self.scenes:
            for att in scene.attempts:
                if att.prompt_id in self.records:
                    continue
                rec = None
                if att.slot.dead is None:
                    try:
                        status, body = await att.slot.worker.call(
                            "GET", f"/telemetry/prompts/{att.prompt_id}", timeout=10
                        )
                        rec = body if status == 200 and isinstance(body, dict) and body.get("RunId") else None
                    except ServerUnreachable:
                        rec = None
                if rec is None:
                    rec = {
                        "PromptId": att.prompt_id,
                        "RunId": self.run_id,
                        "SceneId": scene.id,
                        "Tags": self._tags(scene, att.number, None),
                        "Outcome": "queued",
                        "QueuedAt": att.queued_at,
                        "Attempt": att.number,
                    }
                self.records[att.prompt_id] = rec

    async def cancel_pending(self) -> int:
        """Delete this run's unfinished prompts from every live worker's queue and interrupt the running ones."""
        by_slot: dict[int, list[str]] = {}
        for scene in self.scenes:
            for att in scene.attempts:
                rec = self.records.get(att.prompt_id)
                if rec is None or rec.get("Outcome") in PENDING:
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


async def collect(slots: Sequence[Slot], run_id: str) -> dict[str, tuple[dict[str, Any], Slot]]:
    """Every record of ``run_id`` the live workers hold (for ``--resume``): prompt id -> (record, worker)."""
    found: dict[str, tuple[dict[str, Any], Slot]] = {}
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
