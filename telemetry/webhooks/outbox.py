"""The outbox's shapes: a delivery, per-endpoint counts, the store methods it needs, and the retry schedule."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from ..records import iso
from .config import RetryPolicy, display_url

__all__ = ["Delivery", "EndpointStats", "OutboxStore", "parse_retry_after", "retry_delay"]


class OutboxStore(Protocol):
    """The store's outbox methods (``telemetry.store.Store``)."""

    def outbox_add(self, row: dict[str, Any]) -> None: ...
    def outbox_update(
        self, delivery_id: str, *, attempts: int, next_at: float, last_error: str | None, state: str = ...
    ) -> None: ...
    def outbox_delete(self, delivery_id: str) -> None: ...
    def outbox_pending(self, limit: int) -> list[dict[str, Any]]: ...
    def outbox_given_up(self, limit: int) -> list[dict[str, Any]]: ...
    def outbox_prune(self, *, pending: int, given_up: int) -> int: ...


@dataclass
class Delivery:
    """One event to one endpoint, tried until delivered or given up."""

    delivery_id: str
    event: str
    url: str
    body: bytes
    signature: str | None
    created_at: float
    attempts: int = 0
    next_at: float = 0.0
    last_error: str | None = None
    persisted: bool = True
    in_flight: bool = False  # a task is scheduled for it
    sending: bool = False  # that task holds one of the endpoint's connections
    task: Any = field(default=None, repr=False, compare=False)


@dataclass
class EndpointStats:
    """Counts and the last error of one endpoint, since this process started (resumed rows count as pending)."""

    source: str
    delivered: int = 0
    given_up: int = 0
    failed_tries: int = 0
    pending: int = 0
    failing: bool = False
    last_error: str | None = None
    last_error_at: float | None = None
    last_delivered_at: float | None = None
    used_at: float = field(default_factory=time.time)

    def view(self, url: str) -> dict[str, Any]:
        """Plain form for JSON (the URL shown without user info or query)."""
        return {
            "Url": display_url(url),
            "Source": self.source,
            "Delivered": self.delivered,
            "Pending": self.pending,
            "GivenUp": self.given_up,
            "FailedTries": self.failed_tries,
            "Failing": self.failing,
            "LastError": self.last_error,
            "LastErrorAt": iso(self.last_error_at),
            "LastDeliveredAt": iso(self.last_delivered_at),
        }


def retry_delay(policy: RetryPolicy, attempts: int, rng: random.Random, retry_after: float | None = None) -> float:
    """Seconds to wait after ``attempts`` failed tries: exponential with jitter, at least ``retry_after``.

    Computed here rather than by a retry library because the schedule has to outlive the process: the next try's
    time is stored in the outbox row, and a library's in-memory retry loop cannot resume after a restart.
    """
    ceiling = min(policy.max_delay_seconds, policy.base_seconds * 2 ** max(0, attempts - 1))
    delay = rng.uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.max_delay_seconds))
    return delay


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or ``None``."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
