"""Webhook delivery: an outbox kept in the store and a worker thread of its own that POSTs, retries and gives up.

Nothing here runs on ComfyUI's prompt worker or on the package's writer thread beyond :meth:`WebhookService.emit`,
which hands the event to the delivery thread (one ``call_soon_threadsafe``). That thread runs its own asyncio loop
with one aiohttp ``ClientSession``; a receiver that is slow, down or failing only ever holds
``concurrency_per_endpoint`` connections and ``outbox_max`` deliveries.

Every delivery is written to the store's outbox before its first try and removed once delivered, so a restart resumes
it (same delivery id, same body, same signature: the secret itself is never stored). If the store cannot be written,
the delivery is kept in memory with a note. Delivery is at least once: a process killed between a receiver's 2xx and
the outbox update sends that delivery again after the restart; receivers dedupe on ``X-Run-Telemetry-Delivery``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..records import iso
from .config import EVENTS, Endpoint, WebhookConfig, display_url
from .events import event_body, sign
from .outbox import Delivery, EndpointStats, OutboxStore, parse_retry_after, retry_delay

logger = logging.getLogger("run_telemetry.webhooks")

__all__ = ["REASONS", "WebhookService"]

GIVEN_UP_SHOWN = 50
GIVEN_UP_KEPT = 200  # given-up rows the store keeps (for GET /telemetry/webhooks after a restart)
MAX_ENDPOINT_STATS = 100
MAX_NOTES = 20
_ERROR_CHARS = 300

# (event, outcome, reason): outcome delivered | retry | given_up; reason from REASONS (a fixed vocabulary).
Observer = Callable[[str, str, str], None]
REASONS: tuple[str, ...] = (
    "ok",
    "timeout",
    "connection",
    "http_429",
    "http_5xx",
    "http_4xx",
    "http_3xx",
    "outbox_full",
    "other",
)


def _short(text: str) -> str:
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 1] + "\u2026"


class WebhookService:
    """The outbox and the delivery thread. Public methods are thread-safe."""

    def __init__(
        self,
        config: WebhookConfig,
        store: OutboxStore | None,
        *,
        version: str = "",
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        """``store`` keeps the outbox (``None``: memory only); ``clock`` is wall time (next tries are stored);
        ``on_note`` receives each new note (the runtime shows them in ``GET /telemetry``)."""
        self.config = config
        self._store = store
        self._version = version
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_note = on_note
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, Delivery] = OrderedDict()  # oldest first
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._env_by_event = {event: [e for e in config.endpoints if event in e.events] for event in EVENTS}
        self._stats: dict[str, EndpointStats] = {e.url: EndpointStats(e.source) for e in config.endpoints}
        self._given_up: deque[dict[str, Any]] = deque(maxlen=GIVEN_UP_SHOWN)
        self.notes: list[str] = []
        self._observers: list[Observer] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._early: deque[tuple[str, dict[str, Any], list[Endpoint], float]] = deque()
        self._wake: asyncio.Event | None = None
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: Any = None
        self._stopping = False
        self.version = 0  # bumped on every change a reader can see (route caches key on it)

    # --- wiring ---

    def add_observer(self, fn: Observer) -> None:
        """Call ``fn(event, outcome, reason)`` on the delivery thread after each try (metrics)."""
        self._observers.append(fn)

    def endpoints_for(self, event: str, extra: Iterable[Endpoint] = ()) -> list[Endpoint]:
        """The environment's endpoints for ``event`` plus ``extra`` ones (a run's), each URL once."""
        if not extra:  # the common case, on the writer thread once per prompt: precomputed
            return self._env_by_event.get(event, [])
        seen: dict[tuple[str, str | None], Endpoint] = {}
        for ep in (*self.config.endpoints, *extra):
            if event in ep.events:
                seen.setdefault((ep.url, ep.secret), ep)
        return list(seen.values())

    def start(self, *, wait: float = 0.0) -> None:
        """Start the delivery thread (idempotent); it resumes the outbox the store kept.

        ``wait`` seconds at most for it to be ready (tests); events emitted before that are buffered.
        """
        with self._lock:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._run, name="run-telemetry-webhooks", daemon=True)
                self._thread.start()
        if wait:
            self._ready.wait(wait)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the delivery thread; pending deliveries stay in the outbox for the next start."""
        self._stopping = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._shutdown)
            thread.join(timeout)

    # --- producers (any thread) ---

    def emit(self, event: str, data: Mapping[str, Any], *, extra: Iterable[Endpoint] = ()) -> int:
        """Queue ``event`` with ``data`` to every endpoint that wants it; return how many. Never raises, never waits."""
        try:
            endpoints = self.endpoints_for(event, extra)
            if not endpoints or self._stopping:
                return 0
            item = (event, dict(data), endpoints, self._clock())
            with self._lock:
                loop = self._loop
                if loop is None:  # the thread is starting (or resuming the outbox): it takes these first
                    if len(self._early) >= self.config.outbox_max:
                        self._early.popleft()
                    self._early.append(item)
            if loop is None:
                self.start()
            else:
                loop.call_soon_threadsafe(self._accept, *item)
            return len(endpoints)
        except Exception as exc:  # a webhook problem never reaches the caller (a finishing prompt, a route)
            logger.exception("Run Telemetry: could not queue webhook event %s", event)
            self._note(f"webhook event {event} could not be queued: {type(exc).__name__}: {exc}")
            return 0

    # --- readers (any thread) ---

    def pending_count(self) -> int:
        """Deliveries not yet delivered nor given up."""
        return len(self._pending)

    def status(self) -> dict[str, Any]:
        """What ``GET /telemetry/webhooks`` shows: config (no secret), counts per endpoint, recent given-up ones."""
        with self._lock:
            endpoints = [s.view(url) for url, s in self._stats.items()]
            given_up = list(reversed(self._given_up))
            notes = list(self.notes)
        return {
            "Config": self.config.view(),
            "Delivered": sum(e["Delivered"] for e in endpoints),
            "Pending": sum(e["Pending"] for e in endpoints),
            "GivenUp": sum(e["GivenUp"] for e in endpoints),
            "Endpoints": endpoints,
            "RecentGivenUp": given_up,
            "Notes": notes,
        }

    def summary(self) -> dict[str, Any] | None:
        """The small form ``GET /telemetry`` carries (``None`` when no webhook was ever configured or used)."""
        with self._lock:
            if not self._stats:
                return None
            failing = [{"Url": display_url(u), "LastError": s.last_error} for u, s in self._stats.items() if s.failing]
            return {
                "Delivered": sum(s.delivered for s in self._stats.values()),
                "Pending": sum(s.pending for s in self._stats.values()),
                "GivenUp": sum(s.given_up for s in self._stats.values()),
                "Failing": failing,
            }

    # --- the delivery thread ---

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._wake = asyncio.Event()
        try:
            self._resume()
        except Exception:
            logger.exception("Run Telemetry: could not resume the webhook outbox")
        with self._lock:
            self._loop = loop
            early, self._early = list(self._early), deque()
        for item in early:
            loop.call_soon(self._accept, *item)
        self._ready.set()
        main = loop.create_task(self._schedule())
        try:
            loop.run_until_complete(main)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # a bug: say so where people look, pending deliveries stay in the outbox
            logger.exception("Run Telemetry: the webhook delivery thread stopped")
            self._note(
                f"the webhook delivery thread stopped ({type(exc).__name__}: {exc}); pending deliveries are sent "
                "after the next start"
            )
        finally:
            with self._lock:
                self._loop = None  # later events wait in the bounded buffer instead of a closed loop
            with contextlib.suppress(Exception):
                if self._session is not None:
                    loop.run_until_complete(self._session.close())
            loop.close()

    def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._wake is not None:
            self._wake.set()

    def _resume(self) -> None:
        """Load the store's pending deliveries (a previous process's) and recent given-up ones."""
        if self._store is None:
            return
        try:
            self._store.outbox_prune(pending=self.config.outbox_max, given_up=GIVEN_UP_KEPT)
            rows = self._store.outbox_pending(self.config.outbox_max)
            given_up = self._store.outbox_given_up(GIVEN_UP_SHOWN)
        except Exception as exc:
            self._note(f"webhook outbox could not be read from the store ({type(exc).__name__}: {exc})")
            return
        with self._lock:
            for row in reversed(given_up):
                self._given_up.append(self._given_up_view(row))
            for row in rows:
                d = Delivery(
                    delivery_id=row["delivery_id"],
                    event=row["event"],
                    url=row["url"],
                    body=bytes(row["body"]),
                    signature=row["signature"],
                    created_at=row["created_at"],
                    attempts=int(row["attempts"]),
                    next_at=float(row["next_at"]),
                    last_error=row["last_error"],
                )
                self._pending[d.delivery_id] = d
                stats = self._stats_for(d.url, "stored")
                stats.pending += 1
                if d.last_error:
                    stats.last_error, stats.failing = d.last_error, True
                heapq.heappush(self._heap, (d.next_at, next(self._seq), d.delivery_id))
            self.version += 1
        if rows:
            logger.info("Run Telemetry: resuming %d webhook deliveries from the outbox", len(rows))

    def _accept(self, event: str, data: dict[str, Any], endpoints: list[Endpoint], occurred_at: float) -> None:
        """Build the body once, then one outbox row per endpoint (delivery thread)."""
        try:
            body = event_body(event, data, version=self._version, occurred_at=occurred_at)
        except Exception as exc:
            logger.exception("Run Telemetry: webhook event %s has an invalid body", event)
            self._note(f"webhook event {event} not sent: its body is invalid ({type(exc).__name__}: {exc})")
            return
        now = self._clock()
        for ep in endpoints:
            d = Delivery(
                delivery_id=str(uuid.uuid4()),
                event=event,
                url=ep.url,
                body=body,
                signature=sign(ep.secret, body) if ep.secret else None,
                created_at=now,
                next_at=now,
            )
            d.persisted = self._store_call(
                "write",
                lambda d=d: self._store.outbox_add(
                    {
                        "delivery_id": d.delivery_id,
                        "event": d.event,
                        "url": d.url,
                        "body": d.body,
                        "signature": d.signature,
                        "created_at": d.created_at,
                        "attempts": 0,
                        "next_at": d.next_at,
                    }
                ),
            )
            with self._lock:
                self._pending[d.delivery_id] = d
                self._stats_for(d.url, ep.source).pending += 1
                heapq.heappush(self._heap, (d.next_at, next(self._seq), d.delivery_id))
                self.version += 1
            self._bound()
        if self._wake is not None:
            self._wake.set()

    def _bound(self) -> None:
        """Give up the oldest deliveries beyond ``outbox_max``."""
        while len(self._pending) > self.config.outbox_max:
            oldest = next(iter(self._pending.values()))
            self._note(
                f"webhook outbox full ({self.config.outbox_max} pending): the oldest deliveries are given up "
                f"(RUN_TELEMETRY_WEBHOOK_OUTBOX_MAX raises the bound)"
            )
            reason = f"outbox full ({self.config.outbox_max} pending); given up after {oldest.attempts} tries"
            self._give_up(oldest, reason, "outbox_full")
        if len(self._heap) > 2 * self.config.outbox_max + 64:  # stale entries of given-up deliveries
            with self._lock:
                self._heap = [(d.next_at, next(self._seq), d.delivery_id) for d in self._pending.values()]
                heapq.heapify(self._heap)

    async def _schedule(self) -> None:
        import aiohttp

        assert self._wake is not None
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_seconds),
            headers={"User-Agent": f"run-telemetry/{self._version}"},
        )
        while not self._stopping:
            now = self._clock()
            due: list[Delivery] = []
            with self._lock:
                while self._heap and self._heap[0][0] <= now:
                    _, _, did = heapq.heappop(self._heap)
                    d = self._pending.get(did)
                    if d is not None and not d.in_flight:
                        d.in_flight = True
                        due.append(d)
                wait = self._heap[0][0] - now if self._heap else None
            for d in due:
                task = d.task = asyncio.get_running_loop().create_task(self._attempt(d))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _attempt(self, d: Delivery) -> None:
        import aiohttp

        sem = self._sems.get(d.url)
        if sem is None:
            sem = self._sems[d.url] = asyncio.Semaphore(self.config.concurrency_per_endpoint)
        try:
            async with sem:
                if d.delivery_id not in self._pending:
                    return  # given up (outbox full) while it waited for a connection
                d.sending = True
                d.attempts += 1
                headers = {
                    "Content-Type": "application/json",
                    "X-Run-Telemetry-Event": d.event,
                    "X-Run-Telemetry-Delivery": d.delivery_id,
                    "X-Run-Telemetry-Timestamp": str(int(self._clock())),
                }
                if d.signature:
                    headers["X-Run-Telemetry-Signature"] = d.signature
                retry_after: float | None = None
                try:
                    async with self._session.post(d.url, data=d.body, headers=headers, allow_redirects=False) as resp:
                        status = resp.status
                        retry_after = parse_retry_after(resp.headers.get("Retry-After"), self._clock())
                    if 200 <= status < 300:
                        self._delivered(d)
                        return
                    error = f"HTTP {status}"
                    retryable = status == 429 or status >= 500
                    kind = "http_429" if status == 429 else f"http_{min(max(status // 100, 3), 5)}xx"
                    if 300 <= status < 400:
                        error += " (redirects are not followed; configure the final URL)"
                except asyncio.TimeoutError:
                    error, retryable, kind = f"timed out after {self.config.timeout_seconds:g} s", True, "timeout"
                except aiohttp.ClientError as exc:
                    error, retryable, kind = f"{type(exc).__name__}: {exc}", True, "connection"
                # An error text may quote the URL, user info and query included: show it as routes show URLs.
                self._failed(d, _short(error.replace(d.url, display_url(d.url))), retryable, retry_after, kind)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not stop other deliveries; the delivery is retried
            logger.exception("Run Telemetry: webhook delivery %s failed unexpectedly", d.delivery_id)
            self._failed(d, _short(f"{type(exc).__name__}: {exc}"), True, None, "other")
        finally:
            d.in_flight = d.sending = False
            d.task = None
            stats = self._stats.get(d.url)
            if (stats is None or stats.pending == 0) and not sem.locked():
                self._sems.pop(d.url, None)  # one per URL with deliveries: run URLs come and go

    # --- outcomes (delivery thread) ---

    def _delivered(self, d: Delivery) -> None:
        if d.persisted:
            self._store_call("delete", lambda: self._store.outbox_delete(d.delivery_id))
        with self._lock:
            if self._pending.pop(d.delivery_id, None) is None:
                return
            stats = self._stats_for(d.url, "stored")
            stats.pending -= 1
            stats.delivered += 1
            stats.failing = False
            stats.last_delivered_at = self._clock()
            self.version += 1
        self._observe(d.event, "delivered", "ok")

    def _failed(self, d: Delivery, error: str, retryable: bool, retry_after: float | None, kind: str) -> None:
        now = self._clock()
        d.last_error = error
        with self._lock:
            if d.delivery_id not in self._pending:
                return
            stats = self._stats_for(d.url, "stored")
            stats.failed_tries += 1
            stats.failing = True
            stats.last_error, stats.last_error_at = error, now
            self.version += 1
        if not retryable:
            self._give_up(d, f"{error}; not retried (only timeouts, connection errors, 429 and 5xx are)", kind)
            return
        if d.attempts >= self.config.retry.max_attempts:
            self._give_up(d, f"{error}; given up after {d.attempts} tries", kind)
            return
        d.next_at = now + retry_delay(self.config.retry, d.attempts, self._rng, retry_after)
        if d.persisted:
            self._store_call(
                "update",
                lambda: self._store.outbox_update(
                    d.delivery_id, attempts=d.attempts, next_at=d.next_at, last_error=error
                ),
            )
        with self._lock:
            heapq.heappush(self._heap, (d.next_at, next(self._seq), d.delivery_id))
        self._observe(d.event, "retry", kind)
        if self._wake is not None:
            self._wake.set()

    def _give_up(self, d: Delivery, reason: str, kind: str) -> None:
        now = self._clock()
        if d.task is not None and d.task is not asyncio.current_task():
            # Given up from outside its own try (outbox full): stop waiting for a connection or for the receiver now,
            # so tasks and connections stay bounded by the outbox, not by how many events came.
            d.task.cancel()
        if d.persisted:
            self._store_call(
                "update",
                lambda: self._store.outbox_update(
                    d.delivery_id, attempts=d.attempts, next_at=d.next_at, last_error=reason, state="given_up"
                ),
            )
        with self._lock:
            if self._pending.pop(d.delivery_id, None) is None:
                return
            stats = self._stats_for(d.url, "stored")
            stats.pending -= 1
            stats.given_up += 1
            self._given_up.append(
                self._given_up_view(
                    {
                        "delivery_id": d.delivery_id,
                        "event": d.event,
                        "url": d.url,
                        "created_at": d.created_at,
                        "attempts": d.attempts,
                        "last_error": reason,
                        "given_up_at": now,
                    }
                )
            )
            self.version += 1
        logger.warning(
            "Run Telemetry: webhook delivery %s (%s to %s) given up: %s",
            d.delivery_id,
            d.event,
            display_url(d.url),
            reason,
        )
        self._observe(d.event, "given_up", kind)

    # --- helpers ---

    @staticmethod
    def _given_up_view(row: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "DeliveryId": row["delivery_id"],
            "Event": row["event"],
            "Url": display_url(row["url"]),
            "CreatedAt": iso(row["created_at"]),
            "GivenUpAt": iso(row.get("given_up_at")),
            "Attempts": row["attempts"],
            "Reason": row["last_error"],
        }

    def _stats_for(self, url: str, source: str) -> EndpointStats:
        """The stats of ``url`` (caller holds the lock); at most MAX_ENDPOINT_STATS, idle run URLs dropped first."""
        stats = self._stats.get(url)
        if stats is None:
            if len(self._stats) >= MAX_ENDPOINT_STATS:
                idle = [u for u, s in self._stats.items() if s.pending == 0 and s.source != "environment"]
                for u in sorted(idle, key=lambda u: self._stats[u].used_at)[: max(1, len(idle) // 2)]:
                    del self._stats[u]
            stats = self._stats[url] = EndpointStats(source)
        stats.used_at = time.time()
        return stats

    def _store_call(self, what: str, fn: Callable[[], None]) -> bool:
        """Run an outbox write; on failure note it (the delivery stays in memory) and return False."""
        if self._store is None:
            return False
        try:
            fn()
            return True
        except Exception as exc:
            logger.warning("Run Telemetry: webhook outbox %s failed: %s", what, exc)
            self._note(
                f"webhook outbox {what} failed ({type(exc).__name__}: {exc}); deliveries are kept in memory "
                "only and are lost if ComfyUI stops"
            )
            return False

    def _note(self, note: str) -> None:
        with self._lock:
            if note in self.notes:
                return
            self.notes.append(note)
            del self.notes[:-MAX_NOTES]
            self.version += 1
        logger.warning("Run Telemetry: %s", note)
        if self._on_note is not None:
            try:
                self._on_note(note)
            except Exception:
                logger.debug("webhook note callback failed", exc_info=True)

    def _observe(self, event: str, outcome: str, reason: str) -> None:
        for fn in self._observers:
            try:
                fn(event, outcome, reason)
            except Exception:
                logger.debug("webhook observer failed", exc_info=True)
