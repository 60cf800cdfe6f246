"""Durable store of prompt records: SQLite in WAL mode, one writer thread, any number of readers."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydantic_core

from .records import FINAL_OUTCOMES, PromptRecord

_FINAL_SQL = ",".join(f"'{o}'" for o in sorted(FINAL_OUTCOMES))
_FAILED_SQL = ",".join(f"'{o}'" for o in sorted(FINAL_OUTCOMES - {"success"}))

logger = logging.getLogger("run_telemetry.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    prompt_id  TEXT PRIMARY KEY,
    run_id     TEXT,
    scene_id   TEXT,
    outcome    TEXT NOT NULL,
    updated_at REAL NOT NULL,
    record     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS prompts_run ON prompts(run_id, scene_id);
CREATE INDEX IF NOT EXISTS prompts_updated ON prompts(updated_at);
CREATE TABLE IF NOT EXISTS runs (
    run_id     TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    info       TEXT NOT NULL
);
"""

# Webhook deliveries not yet delivered ('pending') or given up ('given_up', kept for a while to be seen).
OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_outbox (
    delivery_id TEXT PRIMARY KEY,
    event       TEXT NOT NULL,
    url         TEXT NOT NULL,
    body        BLOB NOT NULL,
    signature   TEXT,
    created_at  REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     REAL NOT NULL,
    state       TEXT NOT NULL DEFAULT 'pending',
    last_error  TEXT,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_outbox_state ON webhook_outbox(state, created_at);
"""

DEFAULT_RETENTION = 10_000


class Store:
    """Prompt records keyed by prompt id. Writes must come from one thread (the writer); reads from any.

    The webhook outbox (``outbox_*``) is the exception: the webhook delivery thread writes its own table, so a slow
    receiver never queues work on the writer. SQLite (WAL) serializes the two writers; each outbox write is one short
    autocommit statement, so the writer waits at most that long for the lock.
    """

    def __init__(
        self, path: Path, *, retention: int = DEFAULT_RETENTION, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = Path(path)
        self._clock = clock  # only for the informational updated_at / LastActivity: order is by sequence number
        self.retention = max(1, int(retention))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._writes_since_prune = 0
        with self._conn() as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.executescript(SCHEMA)
            columns = {row[1] for row in c.execute("PRAGMA table_info(prompts)")}
            if "seq" not in columns:  # a store of an older version: its rows keep their insertion order
                c.execute("ALTER TABLE prompts ADD COLUMN seq INTEGER")
                c.execute("UPDATE prompts SET seq = rowid")
            c.execute("CREATE INDEX IF NOT EXISTS prompts_seq ON prompts(seq)")
            self.last_seq = int(c.execute("SELECT COALESCE(MAX(seq), 0) FROM prompts").fetchone()[0])
            c.executescript(OUTBOX_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        # NORMAL in WAL mode: a committed transaction survives the process being killed (kill -9); only an
        # OS crash or power loss can drop the last commits, which is the right trade for telemetry.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        yield conn

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- writes (writer thread) ---

    def put(self, rec: PromptRecord) -> None:
        """Insert or replace one record."""
        self.put_json(
            rec.PromptId, rec.RunId, rec.SceneId, rec.Outcome, rec.model_dump_json(exclude={"Workflow"}), seq=rec.Seq
        )

    def put_json(
        self,
        prompt_id: str,
        run_id: str | None,
        scene_id: str | None,
        outcome: str,
        record: str,
        *,
        seq: int | None = None,
    ) -> None:
        """Insert or replace one record already serialized (``record`` is its JSON, without the workflow).

        ``seq`` orders records (newest = highest; the recorder's monotonic sequence number, not the wall clock);
        without one the record goes after every other.
        """
        if seq is None:
            seq = self.last_seq + 1
        self.last_seq = max(self.last_seq, seq)
        with self._conn() as c:
            c.execute(
                "INSERT OR REPLACE INTO prompts(prompt_id, run_id, scene_id, outcome, updated_at, record, seq)"
                " VALUES (?,?,?,?,?,?,?)",
                (prompt_id, run_id, scene_id, outcome, self._clock(), record, seq),
            )
        self._writes_since_prune += 1
        if self._writes_since_prune >= 100:
            self._writes_since_prune = 0
            self.prune()

    def prune(self) -> int:
        """Drop records beyond the retention count, never part of a run; return how many went.

        Prompts without a run go first, oldest first (by sequence number). Then whole runs, oldest last activity
        first, finalized ones before others; never a run with a prompt still queued or running, nor the run with the
        newest activity. So a run is kept whole until it has been finalized (or newer runs pushed it out whole).
        """
        with self._conn() as c:
            excess = int(c.execute("SELECT COUNT(*) FROM prompts").fetchone()[0]) - self.retention
            if excess <= 0:
                return 0
            gone = c.execute(
                "DELETE FROM prompts WHERE prompt_id IN (SELECT prompt_id FROM prompts WHERE run_id IS NULL"
                " ORDER BY seq LIMIT ?)",
                (excess,),
            ).rowcount
            excess -= gone
            if excess <= 0:
                return gone
            finalized = {
                r[0] for r in c.execute("SELECT run_id FROM runs WHERE json_extract(info, '$.FinalizedAt') IS NOT NULL")
            }
            runs = c.execute(
                "SELECT run_id, COUNT(*), MAX(seq), SUM(outcome IN ('queued','running')) FROM prompts"
                " WHERE run_id IS NOT NULL GROUP BY run_id ORDER BY MAX(seq)"
            ).fetchall()
            candidates = [r for r in runs[:-1] if not r[3]]  # not the newest, none pending
            candidates.sort(key=lambda r: (r[0] not in finalized, r[2]))
            for run_id, count, _, _ in candidates:
                if excess <= 0:
                    break
                c.execute("DELETE FROM prompts WHERE run_id=?", (run_id,))
                c.execute("DELETE FROM runs WHERE run_id=?", (run_id,))
                gone += count
                excess -= count
            return gone

    def mark_cut_off(self, note: str) -> list[str]:
        """Mark records left running by a process that died as ``crashed``; return their ids.

        Records left ``queued`` are not touched here: see :meth:`queued_records` (the recorder finishes them ``lost``).
        """
        ids: list[str] = []
        with self._conn() as c:
            rows = c.execute("SELECT record FROM prompts WHERE outcome = 'running'").fetchall()
            for (raw,) in rows:
                rec = PromptRecord.model_validate_json(raw)
                rec.Outcome = "crashed"
                rec.FallbackNotes.append(note)
                ids.append(rec.PromptId)
                c.execute(
                    "UPDATE prompts SET outcome='crashed', updated_at=?, record=? WHERE prompt_id=?",
                    (self._clock(), rec.model_dump_json(), rec.PromptId),
                )
        return ids

    def queued_records(self) -> list[PromptRecord]:
        """Records still ``queued`` (accepted by ComfyUI's queue, never started), oldest first."""
        with self._conn() as c:
            rows = c.execute("SELECT record FROM prompts WHERE outcome = 'queued' ORDER BY seq").fetchall()
        return [PromptRecord.model_validate_json(r[0]) for r in rows]

    def put_run(self, run_id: str, info: dict[str, Any]) -> None:
        """Insert or update a run's own information (policy, story, retries)."""
        now = self._clock()
        with self._conn() as c:
            c.execute(
                "INSERT INTO runs(run_id, created_at, updated_at, info) VALUES (?,?,?,?)"
                " ON CONFLICT(run_id) DO UPDATE SET updated_at=excluded.updated_at, info=excluded.info",
                (run_id, now, now, json.dumps(info)),
            )

    # --- reads (any thread) ---

    def get(self, prompt_id: str) -> PromptRecord | None:
        """One record, or ``None``."""
        with self._conn() as c:
            row = c.execute("SELECT record FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
        return PromptRecord.model_validate_json(row[0]) if row else None

    def final_json(self, prompt_id: str) -> bytes | None:
        """The stored JSON of a finished prompt, exactly as routes serve it, or ``None``."""
        with self._conn() as c:
            row = c.execute(
                f"SELECT record FROM prompts WHERE prompt_id=? AND outcome IN ({_FINAL_SQL})",
                (prompt_id,),
            ).fetchone()
        return row[0].encode() if row else None

    def has(self, prompt_id: str) -> bool:
        """Whether a record of ``prompt_id`` is stored (any outcome)."""
        with self._conn() as c:
            return c.execute("SELECT 1 FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone() is not None

    def scene_prompt_ids(self, run_id: str, scene: str) -> set[str]:
        """Prompt ids stored for one scene of a run (``scene`` is its scene id, or the prompt id of a scene-less one)."""
        with self._conn() as c:
            rows = c.execute(
                "SELECT prompt_id FROM prompts WHERE run_id=? AND (scene_id=? OR (scene_id IS NULL AND prompt_id=?))",
                (run_id, scene, scene),
            ).fetchall()
        return {r[0] for r in rows}

    def recent(self, limit: int) -> list[PromptRecord]:
        """The most recently updated records, newest first."""
        with self._conn() as c:
            rows = c.execute("SELECT record FROM prompts ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [PromptRecord.model_validate_json(r[0]) for r in rows]

    def _run_rows(self, run_id: str) -> list[str]:
        """The stored JSON of every record of a run, by (sequence number, rowid), oldest first."""
        with self._conn() as c:
            rows = c.execute("SELECT seq, rowid, record FROM prompts WHERE run_id=?", (run_id,)).fetchall()
        # Sorted here rather than by ORDER BY, which would copy every record through a temporary B-tree first; rowids
        # are unique, so the tuples never compare records.
        rows.sort()
        return [row[2] for row in rows]

    def by_run(self, run_id: str) -> list[PromptRecord]:
        """Every record of a run, oldest first."""
        return [PromptRecord.model_validate_json(raw) for raw in self._run_rows(run_id)]

    def by_run_raw(self, run_id: str) -> list[dict[str, Any]]:
        """Every record of a run, oldest first, as the JSON the store keeps, parsed but not validated.

        Each record was validated by :class:`PromptRecord` when it was stored; parsing the JSON once (pydantic-core's
        parser) is what run assembly needs and several times faster than building the models again.
        """
        return [pydantic_core.from_json(raw) for raw in self._run_rows(run_id)]

    def run_info(self, run_id: str) -> dict[str, Any] | None:
        """A run's own information, or ``None``."""
        with self._conn() as c:
            row = c.execute("SELECT info FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def runs(self) -> list[dict[str, Any]]:
        """Every run, newest activity first: scenes, prompts, and scene outcomes judged by each scene's last attempt."""
        with self._conn() as c:
            rows = c.execute(
                f"""
                WITH ranked AS (
                    SELECT run_id, outcome, updated_at,
                           ROW_NUMBER() OVER (PARTITION BY run_id, COALESCE(scene_id, prompt_id)
                                              ORDER BY seq DESC, rowid DESC) AS rn,
                           COUNT(*) OVER (PARTITION BY run_id) AS prompts,
                           MAX(updated_at) OVER (PARTITION BY run_id) AS last,
                           MAX(seq) OVER (PARTITION BY run_id) AS last_seq
                    FROM prompts WHERE run_id IS NOT NULL
                )
                SELECT run_id, COUNT(*), MAX(prompts), MAX(last),
                       SUM(outcome = 'success'), SUM(outcome IN ({_FAILED_SQL})),
                       SUM(outcome IN ('queued','running'))
                FROM ranked WHERE rn = 1 GROUP BY run_id ORDER BY MAX(last_seq) DESC
                """
            ).fetchall()
        return [
            {
                "RunId": r[0],
                "Scenes": r[1],
                "Prompts": r[2],
                "LastActivity": r[3],
                "Succeeded": r[4],
                "Failed": r[5],
                "Pending": r[6],
            }
            for r in rows
        ]

    def count(self) -> int:
        """How many records are kept."""
        with self._conn() as c:
            return int(c.execute("SELECT COUNT(*) FROM prompts").fetchone()[0])

    # --- webhook outbox (written by the webhook delivery thread, one small row per delivery) ---

    def outbox_add(self, row: dict[str, Any]) -> None:
        """Insert a pending delivery: ``delivery_id, event, url, body, signature, created_at, attempts, next_at``."""
        with self._conn() as c:
            c.execute(
                "INSERT OR REPLACE INTO webhook_outbox(delivery_id, event, url, body, signature, created_at, attempts,"
                " next_at, state, last_error, updated_at) VALUES (?,?,?,?,?,?,?,?,'pending',?,?)",
                (
                    row["delivery_id"],
                    row["event"],
                    row["url"],
                    row["body"],
                    row.get("signature"),
                    row["created_at"],
                    row.get("attempts", 0),
                    row["next_at"],
                    row.get("last_error"),
                    time.time(),
                ),
            )

    def outbox_update(
        self, delivery_id: str, *, attempts: int, next_at: float, last_error: str | None, state: str = "pending"
    ) -> None:
        """Record a failed try (``state`` ``pending``) or that the delivery was given up (``given_up``)."""
        with self._conn() as c:
            c.execute(
                "UPDATE webhook_outbox SET attempts=?, next_at=?, last_error=?, state=?, updated_at=?"
                " WHERE delivery_id=?",
                (attempts, next_at, last_error, state, time.time(), delivery_id),
            )

    def outbox_delete(self, delivery_id: str) -> None:
        """Forget a delivered delivery."""
        with self._conn() as c:
            c.execute("DELETE FROM webhook_outbox WHERE delivery_id=?", (delivery_id,))

    def outbox_pending(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` newest pending deliveries, oldest first (what a new process resumes)."""
        with self._conn() as c:
            rows = c.execute(
                "SELECT delivery_id, event, url, body, signature, created_at, attempts, next_at, last_error"
                " FROM webhook_outbox WHERE state='pending' ORDER BY created_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        keys = ("delivery_id", "event", "url", "body", "signature", "created_at", "attempts", "next_at", "last_error")
        return [dict(zip(keys, r, strict=True)) for r in reversed(rows)]

    def outbox_given_up(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` most recently given-up deliveries, newest first (without their bodies)."""
        with self._conn() as c:
            rows = c.execute(
                "SELECT delivery_id, event, url, created_at, attempts, last_error, updated_at"
                " FROM webhook_outbox WHERE state='given_up' ORDER BY updated_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        keys = ("delivery_id", "event", "url", "created_at", "attempts", "last_error", "given_up_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def outbox_prune(self, *, pending: int, given_up: int) -> int:
        """Give up pending rows beyond the newest ``pending`` and drop given-up rows beyond the newest ``given_up``."""
        with self._conn() as c:
            cur = c.execute(
                "UPDATE webhook_outbox SET state='given_up', last_error=COALESCE(last_error, 'outbox full'),"
                " updated_at=? WHERE delivery_id IN (SELECT delivery_id FROM webhook_outbox WHERE state='pending'"
                " ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
                (time.time(), pending),
            )
            c.execute(
                "DELETE FROM webhook_outbox WHERE delivery_id IN (SELECT delivery_id FROM webhook_outbox"
                " WHERE state='given_up' ORDER BY updated_at DESC LIMIT -1 OFFSET ?)",
                (given_up,),
            )
            return cur.rowcount
