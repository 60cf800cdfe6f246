"""Durable store of prompt records: SQLite in WAL mode, one writer thread, any number of readers.

The store never switches the package off and never holds up a marker:

- **damaged** (not a database, malformed pages, a folder where the file should be): the damaged file is moved aside as
  evidence (``<name>.damaged-<UTC stamp>``, with its ``-wal``/``-shm`` beside it, never overwriting an earlier one) and a
  fresh store is started;
- **unwritable or full** (read-only folder or file, no space, I/O errors): the store goes on in memory (an in-memory
  SQLite holding a copy of what could still be read), and tries the file again every ``FILE_RETRY_SECONDS``;
- **locked by another process**: reads give up after ``READ_BUSY_SECONDS`` (a route answers from memory), writes (on
  the store's own thread only) wait and retry for up to ``LOCK_PATIENCE_SECONDS`` before going to memory.

A failed write never resets anything: a healthy file is only ever moved aside when SQLite itself says it is damaged.
Every change of state is logged once at warning level and shown by :meth:`Store.health`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

import pydantic_core

from .records import FINAL_OUTCOMES, PromptRecord, iso

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
# Readers (routes, the marker thread's look-ups) never wait long on another process's lock: they answer from memory.
READ_BUSY_SECONDS = 0.25
# One attempt of a write on the store's own thread; attempts repeat while the lock is held, up to the patience.
WRITE_BUSY_SECONDS = 2.0
LOCK_PATIENCE_SECONDS = 60.0
# In memory after the file failed: how often a write tries the file again.
FILE_RETRY_SECONDS = 30.0
# Free space the folder must have for a fresh store to be worth starting there.
PROBE_BYTES = 64 * 1024

Mode = Literal["file", "memory"]
Kind = Literal["busy", "damaged", "unwritable", "other"]
T = TypeVar("T")

_DAMAGED_CODES = {"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CORRUPT_VTAB", "SQLITE_CORRUPT_SEQUENCE"}
_BUSY_CODES = {"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_BUSY_RECOVERY", "SQLITE_BUSY_SNAPSHOT", "SQLITE_BUSY_TIMEOUT"}
_UNWRITABLE_PREFIXES = ("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_PERM")


def classify(exc: BaseException) -> Kind:
    """What a failure says about the store: ``busy`` (another process holds the lock), ``damaged`` (the file is not
    a sound database), ``unwritable`` (read-only, full, I/O error, cannot open) or ``other`` (this one statement)."""
    if isinstance(exc, OSError):
        return "unwritable"
    if not isinstance(exc, sqlite3.Error):
        return "other"
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    text = str(exc).lower()
    if name in _BUSY_CODES or "locked" in text or "busy" in text:
        return "busy"
    if name in _DAMAGED_CODES or "malformed" in text or "not a database" in text or "no such table" in text:
        return "damaged"
    if name.startswith(_UNWRITABLE_PREFIXES) or any(
        w in text for w in ("readonly", "read-only", "disk is full", "disk i/o", "unable to open")
    ):
        return "unwritable"
    return "other"


@dataclass(frozen=True)
class StoreHealth:
    """The store's state, as ``GET /telemetry`` and ``GET /telemetry/health`` show it.

    ``Since`` is ISO 8601 UTC of when the problem began (``None`` when ``Ok``); ``KeptFile`` is the damaged file moved
    aside, if any (kept until someone deletes it).
    """

    Ok: bool
    Mode: Mode
    Path: str
    Problem: str | None = None
    Since: str | None = None
    KeptFile: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain form for JSON."""
        return asdict(self)

    def note(self) -> str | None:
        """The ``FallbackNotes`` line for this state, or ``None`` when all is well."""
        if self.Ok:
            return None
        if self.Mode == "memory":
            where = "records are kept in memory only (lost on restart)"
        elif self.KeptFile:
            where = "a fresh store is in use; the records before are in the kept file"
        else:
            where = "writes wait and are retried; records are served from memory meanwhile"
        kept = f"; the damaged file is kept as {self.KeptFile}" if self.KeptFile else ""
        return f"telemetry store {self.Path}: {self.Problem} (since {self.Since}); {where}{kept}"


def _stamp(now: float) -> str:
    return datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def move_aside(path: Path, now: float) -> Path:
    """Rename ``path`` (and its ``-wal``/``-shm``) to ``<name>.damaged-<stamp>[-n]``; never overwrites; returns it."""
    for n in itertools.count():
        target = path.with_name(f"{path.name}.damaged-{_stamp(now)}" + (f"-{n}" if n else ""))
        if not any(Path(str(target) + s).exists() or Path(str(target) + s).is_symlink() for s in ("", "-wal", "-shm")):
            break
    if path.is_dir() and not path.is_symlink():
        os.rename(path, target)  # no link() for folders; the name was checked free just above
    else:
        os.link(path, target, follow_symlinks=False)  # fails rather than overwrite
        os.unlink(path)
    for suffix in ("-wal", "-shm"):
        side = Path(str(path) + suffix)
        if side.exists() or side.is_symlink():
            try:
                os.rename(side, Path(str(target) + suffix))
            except OSError as exc:  # the main file is what matters; a stale -shm is rebuilt by SQLite
                logger.warning("Run Telemetry: could not move %s aside: %s", side, exc)
    return target


def _migrate(c: sqlite3.Connection) -> int:
    """Make the schema (tables, the ``seq`` column of older stores, the webhook outbox); return the highest ``seq``."""
    c.executescript(SCHEMA)
    columns = {row[1] for row in c.execute("PRAGMA table_info(prompts)")}
    if "seq" not in columns:  # a store of an older version: its rows keep their insertion order
        c.execute("ALTER TABLE prompts ADD COLUMN seq INTEGER")
        c.execute("UPDATE prompts SET seq = rowid")
    c.execute("CREATE INDEX IF NOT EXISTS prompts_seq ON prompts(seq)")
    c.executescript(OUTBOX_SCHEMA)
    return int(c.execute("SELECT COALESCE(MAX(seq), 0) FROM prompts").fetchone()[0])


class _Damaged(Exception):
    """The store file is not a sound SQLite database."""


class Store:
    """Prompt records keyed by prompt id. Writes must come from one thread (the writer); reads from any.

    Reads never raise for a store problem: they answer what the store can give (``None`` or empty) and the routes
    fall back on the recorder's memory. Writes raise only for a problem of the statement itself (``classify`` says
    ``other``); a damaged, unwritable or locked store is handled here (see the module docstring).

    The webhook outbox (``outbox_*``) is the exception: the webhook delivery thread writes its own table, so a slow
    receiver never queues work on the writer. SQLite (WAL) serializes the two writers; each outbox write is one short
    autocommit statement, so the writer waits at most that long for the lock.
    """

    def __init__(
        self,
        path: Path,
        *,
        retention: int = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
        lock_patience: float = LOCK_PATIENCE_SECONDS,
        file_retry: float = FILE_RETRY_SECONDS,
    ) -> None:
        self.path = Path(path)
        self.retention = max(1, int(retention))
        self.lock_patience = lock_patience
        self.file_retry = file_retry
        self._clock = clock
        self._local = threading.local()
        self._state_lock = threading.RLock()
        self._writes_since_prune = 0
        self.last_seq = 0  # the highest record order number stored (the recorder continues from it)
        # Changes whenever a run's information may have changed (put_run, prune, another database): callers that
        # cache what they derive from run_info (the runtime's run policy) check it first.
        self.runs_version = 0
        # Reads that could not answer (locked, damaged, gone) and gave their default: a cache must not keep one.
        self.read_failures = 0
        self._gen = 0
        self._mode: Mode = "file"
        self._mem_name = f"run-telemetry-{uuid.uuid4().hex}"
        self._anchor: sqlite3.Connection | None = None  # keeps the in-memory database alive
        self._file_retry_at = 0.0
        self._can_return = False  # memory because the file was unwritable or locked (not: could not be replaced)
        self._schema_pending = False  # the file was locked at start: its schema is made by the first write
        self._damage_seen: str | None = None  # a reader met damage: the next write repairs
        self._kept: str | None = None
        self._ident: tuple[int, int] | str | None = None  # the file's (device, inode) when it was opened
        self._health = StoreHealth(Ok=True, Mode="file", Path=str(self.path))
        self.health_version = 0
        self.listeners: list[Callable[[StoreHealth], None]] = []
        self._open_initial()

    # --- state ---

    def health(self) -> StoreHealth:
        """The store's current state (immutable)."""
        return self._health

    @property
    def mode(self) -> Mode:
        """``file`` or ``memory``."""
        return self._mode

    def _set_health(self, ok: bool, problem: str | None, *, sticky: bool = False) -> None:
        with self._state_lock:
            old = self._health
            if (
                not ok
                and not old.Ok
                and old.Problem == problem
                and old.Mode == self._mode
                and old.KeptFile == self._kept
            ):
                return
            if ok and old.Ok:
                return
            since = old.Since if (not ok and not old.Ok and old.Since) else (None if ok else iso(self._clock()))
            new = StoreHealth(
                Ok=ok, Mode=self._mode, Path=str(self.path), Problem=problem, Since=since, KeptFile=self._kept
            )
            self._health = new
            self.health_version += 1
        if ok:
            logger.warning("Run Telemetry: telemetry store %s is writable again", self.path)
        elif (old.Problem or "").split(" (")[0] != (problem or "").split(" (")[0] or old.Mode != new.Mode:
            logger.warning("Run Telemetry: %s", new.note())  # once per kind of problem, not once per write
        for fn in list(self.listeners):
            try:
                fn(new)
            except Exception:
                logger.exception("Run Telemetry: a store health listener failed")

    # --- opening ---

    def _probe_folder(self) -> None:
        """Raise OSError when the folder cannot take a small file (read-only, full)."""
        probe = self.path.parent / f".{self.path.name}.probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"\0" * PROBE_BYTES)
            finally:
                os.close(fd)
        finally:
            try:
                os.unlink(probe)
            except FileNotFoundError:
                pass

    def _open_file(self) -> None:
        """Check the file is a sound, writable database and make its schema; raises _Damaged, sqlite3.Error, OSError."""
        p = self.path
        p.parent.mkdir(parents=True, exist_ok=True)
        if (p.exists() or p.is_symlink()) and not p.is_file():
            kind = "folder" if p.is_dir() else "dangling link" if p.is_symlink() and not p.exists() else "special file"
            raise _Damaged(f"a {kind} is where the database file should be")
        self._probe_folder()
        conn = sqlite3.connect(p, timeout=WRITE_BUSY_SECONDS, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            self.last_seq = max(self.last_seq, _migrate(conn))
            check = conn.execute("PRAGMA quick_check(1)").fetchone()
            if not check or check[0] != "ok":
                raise _Damaged(f"integrity check failed: {check[0] if check else 'no answer'}")
        except sqlite3.Error as exc:
            if classify(exc) == "damaged":
                raise _Damaged(str(exc)) from exc
            raise
        finally:
            conn.close()
        self._ident = self._identity()

    def _identity(self) -> tuple[int, int] | str | None:
        """(device, inode) of the database file now; ``None`` when gone, a word when something else is there."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"unreadable ({exc.strerror})"
        return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else "not a file"

    def _check_replaced(self) -> None:
        """Writer thread: the file was removed or replaced under the open store (its writes would go nowhere)."""
        ident = self._identity()
        if ident == self._ident or self._ident is None:
            return
        old = getattr(self._local, "conn", None)  # still open on the old file: the records are read from it
        why = "removed" if ident is None else "replaced by something else"
        if ident is not None:
            try:
                self._kept = str(move_aside(self.path, self._clock()))
            except OSError as exc:
                logger.warning("Run Telemetry: could not move %s aside: %s", self.path, exc)
        try:
            self._open_file()
            if old is not None:
                dst = sqlite3.connect(self.path, timeout=WRITE_BUSY_SECONDS, isolation_level=None)
                try:
                    old.backup(dst)
                    dst.execute("PRAGMA journal_mode=WAL")
                finally:
                    dst.close()
        except (_Damaged, sqlite3.Error, OSError) as exc:
            self._ident = None
            self._to_memory(
                f"the store file was {why} while running, and a new one could not be made ({exc})", copy=False
            )
            return
        self._local.conn = None  # the old connection goes with this thread's next look-up
        if old is not None:
            old.close()
        with self._state_lock:
            self._gen += 1
        self._set_health(False, f"the store file was {why} while running; a new one holds a copy of the records")

    def _open_initial(self) -> None:
        try:
            self._open_file()
            return
        except _Damaged as exc:
            self._replace_damaged(str(exc))
        except (sqlite3.Error, OSError) as exc:
            if classify(exc) == "busy":
                # Another process holds the lock while ComfyUI starts: stay on the file, the writes wait for it.
                self._schema_pending = True
                self._set_health(False, f"locked by another process ({exc})")
                return
            self._to_memory(f"not writable ({type(exc).__name__}: {exc})", copy=True)

    def _replace_damaged(self, why: str) -> None:
        """Move the damaged file aside and start a fresh one there (or in memory if that fails too)."""
        self._close_local()
        try:
            kept = move_aside(self.path, self._clock())
            self._kept = str(kept)
        except OSError as exc:
            self._to_memory(f"damaged ({why}) and could not be moved aside ({exc})", copy=False, can_return=False)
            return
        try:
            self._open_file()
        except (_Damaged, sqlite3.Error, OSError) as exc:
            self._to_memory(f"damaged ({why}); a fresh store could not be started ({exc})", copy=False)
            return
        with self._state_lock:
            self._mode = "file"
            self.runs_version += 1  # another database: cached run information is void
            self._gen += 1
        # Sticky: the records of the damaged file are not in the fresh one; the state stays loud until a restart.
        self._set_health(False, f"damaged ({why}); moved aside and a fresh store started")

    def _to_memory(self, problem: str, *, copy: bool, can_return: bool = True) -> None:
        """Go on in an in-memory database, with a copy of what the file still gives if ``copy``."""
        uri = f"file:{self._mem_name}?mode=memory&cache=shared"
        with self._state_lock:
            if self._mode != "memory":
                anchor = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
                copied = ""
                if copy and self.path.is_file():
                    copied = self._copy_file_into(anchor)
                self.last_seq = max(self.last_seq, _migrate(anchor))
                self._anchor = anchor
                self._mode = "memory"
                self.runs_version += 1  # another database: cached run information is void
                self._gen += 1
                problem += copied
            self._file_retry_at = time.monotonic() + self.file_retry
            self._can_return = can_return
        self._set_health(False, problem)

    def _copy_file_into(self, anchor: sqlite3.Connection) -> str:
        """Copy what the file still gives into ``anchor``; '' on success, else why not (for the note)."""
        # mode=ro reads a live file (another process may write it); immutable=1 reads a WAL file on a read-only folder,
        # where SQLite cannot make the -shm it needs otherwise.
        why = ""
        for params in ("mode=ro", "mode=ro&immutable=1"):
            try:
                src = sqlite3.connect(
                    f"file:{self.path}?{params}", uri=True, timeout=READ_BUSY_SECONDS, check_same_thread=False
                )
                try:
                    src.backup(anchor)
                finally:
                    src.close()
                return ""
            except (sqlite3.Error, OSError) as exc:
                why = f"; earlier records could not be copied ({exc})"
        return why

    def _maybe_return_to_file(self) -> None:
        """In memory and the file may be usable again: copy memory onto the file and use it (writer thread)."""
        if self._mode != "memory" or not self._can_return or time.monotonic() < self._file_retry_at:
            return
        self._file_retry_at = time.monotonic() + self.file_retry
        try:
            self._open_file()
            dst = sqlite3.connect(self.path, timeout=WRITE_BUSY_SECONDS, isolation_level=None, check_same_thread=False)
            try:
                assert self._anchor is not None
                self._anchor.backup(dst)  # memory holds everything the file had, plus what came since
                dst.execute("PRAGMA journal_mode=WAL")
            finally:
                dst.close()
        except _Damaged as exc:
            self._replace_damaged_from_memory(str(exc))
            return
        except (sqlite3.Error, OSError) as exc:
            logger.debug("store file still unusable: %s", exc)
            return
        with self._state_lock:
            self._mode = "file"
            self.runs_version += 1  # another database: cached run information is void
            self._gen += 1
            anchor, self._anchor = self._anchor, None
        if anchor is not None:
            anchor.close()
        if self._kept is None:
            self._set_health(True, None)
        else:
            self._set_health(False, f"back on file after: {self._health.Problem}")

    def _replace_damaged_from_memory(self, why: str) -> None:
        try:
            self._kept = str(move_aside(self.path, self._clock()))
        except OSError as exc:
            logger.debug("damaged store could not be moved aside yet: %s", exc)
            return
        self._file_retry_at = 0.0
        self._set_health(False, f"damaged ({why}); moved aside, records kept in memory")

    # --- connections ---

    def _connect(self) -> sqlite3.Connection:
        if self._mode == "memory":
            uri = f"file:{self._mem_name}?mode=memory&cache=shared"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA read_uncommitted=1")  # shared cache: readers take no table locks
            return conn
        conn = sqlite3.connect(self.path, timeout=READ_BUSY_SECONDS, isolation_level=None, check_same_thread=False)
        # NORMAL in WAL mode: a committed transaction survives the process being killed (kill -9); only an
        # OS crash or power loss can drop the last commits, which is the right trade for telemetry.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(READ_BUSY_SECONDS * 1000)}")
        return conn

    @contextmanager
    def _conn(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "gen", -1) != self._gen:
            self._close_local()
            conn = None
        if conn is None:
            gen = self._gen
            conn = self._connect()
            self._local.conn, self._local.gen, self._local.writer = conn, gen, False
        if write and not self._local.writer and self._mode == "file":
            conn.execute(f"PRAGMA busy_timeout={int(WRITE_BUSY_SECONDS * 1000)}")
            self._local.writer = True
        yield conn

    def _close_local(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass
            self._local.conn = None

    def close(self) -> None:
        """Close this thread's connection."""
        self._close_local()

    def _read(self, default: T, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)``, or ``default`` when the store cannot answer now (locked, damaged, gone)."""
        try:
            with self._conn() as c:
                return fn(c)
        except (sqlite3.Error, OSError) as exc:
            self.read_failures += 1
            kind = classify(exc)
            if kind == "damaged" and self._mode == "file":
                self._damage_seen = str(exc)  # the writer thread moves it aside at its next write
            logger.debug("store read failed (%s): %s", kind, exc)
            return default

    def _write(
        self, fn: Callable[[sqlite3.Connection], T], *, patience: float | None = None, busy_to_memory: bool = True
    ) -> T:
        """Run ``fn(conn)`` as a write, handling a locked, damaged or unwritable store.

        A lock held by another process is waited for up to ``patience`` seconds; then the store goes to memory, or
        (``busy_to_memory=False``) the error is raised for the caller to retry later.
        """
        patience = self.lock_patience if patience is None else patience
        deadline = time.monotonic() + patience
        changes = 0
        while True:
            with self._state_lock:  # one thread repairs; the webhook thread writes too
                self._maybe_return_to_file()
                if self._mode == "file":
                    self._check_replaced()
                if self._damage_seen is not None and self._mode == "file":
                    why, self._damage_seen = self._damage_seen, None
                    self._replace_damaged(why)
            try:
                with self._conn(write=True) as c:
                    if self._schema_pending and self._mode == "file":
                        c.execute("PRAGMA journal_mode=WAL")
                        self.last_seq = max(self.last_seq, _migrate(c))
                        self._schema_pending = False
                    result = fn(c)
            except (sqlite3.Error, OSError) as exc:
                kind = classify(exc)
                if self._mode == "memory" or kind == "other" or changes > 3:
                    raise
                changes += 1
                if kind == "busy":
                    self._set_health(False, f"locked by another process ({exc})")
                    if time.monotonic() < deadline:
                        changes -= 1  # waiting on a lock is not a change of state
                        continue
                    if not busy_to_memory:
                        raise
                    self._to_memory(f"locked by another process for over {patience:g} s", copy=True)
                elif kind == "damaged":
                    with self._state_lock:
                        self._replace_damaged(str(exc))
                else:
                    with self._state_lock:
                        self._to_memory(f"not writable ({exc})", copy=True)
                continue
            h = self._health
            if not h.Ok and self._mode == "file" and h.Problem and h.Problem.startswith("locked by another process"):
                self._set_health(True, None)
            return result

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
        row = (prompt_id, run_id, scene_id, outcome, self._clock(), record, seq)
        self._write(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO prompts(prompt_id, run_id, scene_id, outcome, updated_at, record, seq)"
                " VALUES (?,?,?,?,?,?,?)",
                row,
            )
        )
        self._writes_since_prune += 1
        if self._writes_since_prune >= 100:
            self._writes_since_prune = 0
            self.prune()

    def put_json_many(self, rows: Sequence[tuple[str, str | None, str | None, str, str, int | None]]) -> None:
        """:meth:`put_json` for several rows ``(prompt_id, run_id, scene_id, outcome, record, seq)`` in one
        transaction, in order (a later row for the same prompt wins). Raises like :meth:`put_json`; nothing is
        written then."""
        prepared = []
        for prompt_id, run_id, scene_id, outcome, record, seq in rows:
            if seq is None:
                seq = self.last_seq + 1
            self.last_seq = max(self.last_seq, seq)
            prepared.append((prompt_id, run_id, scene_id, outcome, self._clock(), record, seq))

        def write(c: sqlite3.Connection) -> None:
            c.execute("BEGIN")
            try:
                c.executemany(
                    "INSERT OR REPLACE INTO prompts(prompt_id, run_id, scene_id, outcome, updated_at, record, seq)"
                    " VALUES (?,?,?,?,?,?,?)",
                    prepared,
                )
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:  # a failed COMMIT leaves it open: the next try (or write) starts clean
                    try:
                        c.execute("ROLLBACK")
                    except sqlite3.Error:
                        logger.debug("rollback after a failed batch write failed", exc_info=True)
                raise

        self._write(write)
        self._writes_since_prune += len(prepared)
        if self._writes_since_prune >= 100:
            self._writes_since_prune = 0
            self.prune()

    def prune(self) -> int:
        """Drop records beyond the retention count, never part of a run; return how many went.

        Prompts without a run go first, oldest first (by sequence number). Then whole runs, oldest last activity
        first, finalized ones before others; never a run with a prompt still queued or running, nor the run with the
        newest activity. So a run is kept whole until it has been finalized (or newer runs pushed it out whole).
        """

        def prune(c: sqlite3.Connection) -> int:
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

        try:
            return self._write(prune)
        finally:
            self.runs_version += 1

    def mark_cut_off(self, note: str) -> list[str]:
        """Mark records left running by a process that died as ``crashed``; return their ids.

        Records left ``queued`` are not touched here: see :meth:`queued_records` (the recorder finishes them ``lost``).

        Called once at start-up; if another process holds the lock then, nothing is marked (logged) rather than
        holding up ComfyUI's start.
        """

        def mark(c: sqlite3.Connection) -> list[str]:
            ids: list[str] = []
            rows = c.execute("SELECT record FROM prompts WHERE outcome = 'running'").fetchall()
            for (raw,) in rows:
                try:
                    rec = PromptRecord.model_validate_json(raw)
                except ValueError:
                    continue  # a row this version cannot read: left as it is
                rec.Outcome = "crashed"
                rec.FallbackNotes.append(note)
                ids.append(rec.PromptId)
                c.execute(
                    "UPDATE prompts SET outcome='crashed', updated_at=?, record=? WHERE prompt_id=?",
                    (self._clock(), rec.model_dump_json(), rec.PromptId),
                )
            return ids

        try:
            return self._write(mark, patience=0.0, busy_to_memory=False)
        except (sqlite3.Error, OSError) as exc:
            logger.warning("Run Telemetry: prompts cut off by the last stop could not be marked: %s", exc)
            return []

    def queued_records(self) -> list[PromptRecord]:
        """Records still ``queued`` (accepted by ComfyUI's queue, never started), oldest first."""
        rows = self._read(
            [], lambda c: c.execute("SELECT record FROM prompts WHERE outcome = 'queued' ORDER BY seq").fetchall()
        )
        return [r for r in (_parse_record(row[0]) for row in rows) if r is not None]

    def put_run(self, run_id: str, info: dict[str, Any]) -> None:
        """Insert or update a run's own information (policy, story, retries)."""
        now = self._clock()
        body = json.dumps(info)
        self._write(
            lambda c: c.execute(
                "INSERT INTO runs(run_id, created_at, updated_at, info) VALUES (?,?,?,?)"
                " ON CONFLICT(run_id) DO UPDATE SET updated_at=excluded.updated_at, info=excluded.info",
                (run_id, now, now, body),
            )
        )
        self.runs_version += 1

    # --- reads (any thread) ---

    def get(self, prompt_id: str) -> PromptRecord | None:
        """One record, or ``None``."""
        row = self._read(
            None, lambda c: c.execute("SELECT record FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone()
        )
        return _parse_record(row[0]) if row else None

    def final_json(self, prompt_id: str) -> bytes | None:
        """The stored JSON of a finished prompt, exactly as routes serve it, or ``None``."""
        row = self._read(
            None,
            lambda c: c.execute(
                f"SELECT record FROM prompts WHERE prompt_id=? AND outcome IN ({_FINAL_SQL})",
                (prompt_id,),
            ).fetchone(),
        )
        return row[0].encode("utf-8", "backslashreplace") if row else None

    def has(self, prompt_id: str) -> bool:
        """Whether a record of ``prompt_id`` is stored (any outcome)."""
        row = self._read(None, lambda c: c.execute("SELECT 1 FROM prompts WHERE prompt_id=?", (prompt_id,)).fetchone())
        return row is not None

    def scene_prompt_ids(self, run_id: str, scene: str) -> set[str]:
        """Prompt ids stored for one scene of a run (``scene`` is its scene id, or the prompt id of a scene-less one)."""
        rows = self._read(
            [],
            lambda c: c.execute(
                "SELECT prompt_id FROM prompts WHERE run_id=? AND (scene_id=? OR (scene_id IS NULL AND prompt_id=?))",
                (run_id, scene, scene),
            ).fetchall(),
        )
        return {r[0] for r in rows}

    def recent(self, limit: int) -> list[PromptRecord]:
        """The most recently updated records, newest first."""
        rows = self._read(
            [], lambda c: c.execute("SELECT record FROM prompts ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        )
        return [r for r in (_parse_record(row[0]) for row in rows) if r is not None]

    def _run_rows(self, run_id: str) -> list[str]:
        """The stored JSON of every record of a run, by (sequence number, rowid), oldest first."""
        rows = self._read(
            [],
            lambda c: c.execute("SELECT seq, rowid, record FROM prompts WHERE run_id=?", (run_id,)).fetchall(),
        )
        # Sorted here rather than by ORDER BY, which would copy every record through a temporary B-tree first; rowids
        # are unique, so the tuples never compare records.
        rows.sort()
        return [row[2] for row in rows]

    def by_run(self, run_id: str) -> list[PromptRecord]:
        """Every record of a run, oldest first."""
        return [r for r in (_parse_record(raw) for raw in self._run_rows(run_id)) if r is not None]

    def by_run_raw(self, run_id: str) -> list[dict[str, Any]]:
        """Every record of a run, oldest first, as the JSON the store keeps, parsed but not validated.

        Each record was validated by :class:`PromptRecord` when it was stored; parsing the JSON once (pydantic-core's
        parser) is what run assembly needs and several times faster than building the models again.
        """
        out = []
        for raw in self._run_rows(run_id):
            try:
                out.append(pydantic_core.from_json(raw))
            except ValueError:
                logger.warning("Run Telemetry: a stored record of run %s is not valid JSON; left out", run_id)
        return out

    def run_info(self, run_id: str) -> dict[str, Any] | None:
        """A run's own information, or ``None``."""
        row = self._read(None, lambda c: c.execute("SELECT info FROM runs WHERE run_id=?", (run_id,)).fetchone())
        if not row:
            return None
        try:
            info = json.loads(row[0])
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def runs(self) -> list[dict[str, Any]]:
        """Every run, newest activity first: scenes, prompts, and scene outcomes judged by each scene's last attempt."""
        rows = self._read(
            [],
            lambda c: c.execute(
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
            ).fetchall(),
        )
        return [
            {
                "RunId": r[0],
                "Scenes": r[1],
                "Prompts": r[2],
                "LastActivity": iso(r[3]) if isinstance(r[3], int | float) else r[3],
                "Succeeded": r[4],
                "Failed": r[5],
                "Pending": r[6],
            }
            for r in rows
        ]

    def count(self) -> int:
        """How many records are kept."""
        return int(self._read((0,), lambda c: c.execute("SELECT COUNT(*) FROM prompts").fetchone())[0])

    # --- webhook outbox (written by the webhook delivery thread, one small row per delivery) ---
    # Its writes wait one busy timeout for another process's lock, then raise (the delivery thread retries later):
    # a delivery thread is never held for the store's whole lock patience.

    def _outbox_write(self, sql: str, params: tuple[Any, ...]) -> int:
        return self._write(lambda c: c.execute(sql, params).rowcount, patience=0.0, busy_to_memory=False)

    def outbox_add(self, row: dict[str, Any]) -> None:
        """Insert a pending delivery: ``delivery_id, event, url, body, signature, created_at, attempts, next_at``."""
        self._outbox_write(
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
        self._outbox_write(
            "UPDATE webhook_outbox SET attempts=?, next_at=?, last_error=?, state=?, updated_at=? WHERE delivery_id=?",
            (attempts, next_at, last_error, state, time.time(), delivery_id),
        )

    def outbox_delete(self, delivery_id: str) -> None:
        """Forget a delivered delivery."""
        self._outbox_write("DELETE FROM webhook_outbox WHERE delivery_id=?", (delivery_id,))

    def outbox_pending(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` newest pending deliveries, oldest first (what a new process resumes)."""
        rows = self._read(
            [],
            lambda c: c.execute(
                "SELECT delivery_id, event, url, body, signature, created_at, attempts, next_at, last_error"
                " FROM webhook_outbox WHERE state='pending' ORDER BY created_at DESC LIMIT ?",
                (limit,),
            ).fetchall(),
        )
        keys = ("delivery_id", "event", "url", "body", "signature", "created_at", "attempts", "next_at", "last_error")
        return [dict(zip(keys, r, strict=True)) for r in reversed(rows)]

    def outbox_given_up(self, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` most recently given-up deliveries, newest first (without their bodies)."""
        rows = self._read(
            [],
            lambda c: c.execute(
                "SELECT delivery_id, event, url, created_at, attempts, last_error, updated_at"
                " FROM webhook_outbox WHERE state='given_up' ORDER BY updated_at DESC LIMIT ?",
                (limit,),
            ).fetchall(),
        )
        keys = ("delivery_id", "event", "url", "created_at", "attempts", "last_error", "given_up_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def outbox_prune(self, *, pending: int, given_up: int) -> int:
        """Give up pending rows beyond the newest ``pending`` and drop given-up rows beyond the newest ``given_up``."""

        def prune(c: sqlite3.Connection) -> int:
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

        return self._write(prune, patience=0.0, busy_to_memory=False)


def _parse_record(raw: str) -> PromptRecord | None:
    """A stored record, or ``None`` (logged) when this row cannot be read back."""
    try:
        return PromptRecord.model_validate_json(raw)
    except ValueError as exc:
        logger.warning("Run Telemetry: a stored record could not be read back: %s", str(exc)[:200])
        return None
