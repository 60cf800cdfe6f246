"""Webhook configuration: endpoints and events from the environment or a run's ``extra_data.telemetry.webhook``.

One frozen :class:`WebhookConfig` is read once at start; invalid entries are dropped with a note (logged and shown in
``GET /telemetry``), never an exception. A run's own endpoints are checked at ``POST /prompt`` by
:func:`run_webhook_problem`, which names the bad field so the client gets a 400.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

logger = logging.getLogger("run_telemetry.webhooks")

__all__ = [
    "ENV_EVENTS",
    "ENV_OUTBOX_MAX",
    "ENV_RETRY_BASE",
    "ENV_SECRET",
    "ENV_TIMEOUT",
    "ENV_URL",
    "EVENTS",
    "Endpoint",
    "RetryPolicy",
    "WebhookConfig",
    "config_from_env",
    "display_url",
    "parse_run_webhook",
    "run_webhook_problem",
]

ENV_URL = "RUN_TELEMETRY_WEBHOOK_URL"
ENV_SECRET = "RUN_TELEMETRY_WEBHOOK_SECRET"
ENV_EVENTS = "RUN_TELEMETRY_WEBHOOK_EVENTS"
ENV_RETRY_BASE = "RUN_TELEMETRY_WEBHOOK_RETRY_BASE_SECONDS"
ENV_TIMEOUT = "RUN_TELEMETRY_WEBHOOK_TIMEOUT_SECONDS"
ENV_OUTBOX_MAX = "RUN_TELEMETRY_WEBHOOK_OUTBOX_MAX"

EVENTS: tuple[str, ...] = ("prompt.ended", "run.finalized", "health.changed")
# Events a run's own endpoints can receive (health is the worker's, not a run's).
RUN_EVENTS: tuple[str, ...] = ("prompt.ended", "run.finalized")
RUN_KEYS = ("url", "secret", "events")


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed delivery is tried again.

    Try ``n`` (1-based) that fails with a timeout, a connection error, 429 or 5xx is followed, after a delay drawn
    uniformly from ``[d/2, d]`` with ``d = min(max_delay, base * 2 ** (n - 1))``, by try ``n + 1``, up to
    ``max_attempts`` tries. With the defaults (10 s, 10 tries) the nine waits add up to at least 42.6 minutes and at
    most 85 minutes. A ``Retry-After`` answer waits at least that long (capped at ``max_delay``).
    """

    base_seconds: float = 10.0
    max_attempts: int = 10
    max_delay_seconds: float = 3600.0

    def as_dict(self) -> dict[str, float | int]:
        """Plain form for JSON (GET /telemetry/webhooks)."""
        return {
            "BaseSeconds": self.base_seconds,
            "MaxAttempts": self.max_attempts,
            "MaxDelaySeconds": self.max_delay_seconds,
        }


@dataclass(frozen=True)
class Endpoint:
    """One receiver: its URL, the secret that signs its bodies (``None``: unsigned) and the events it gets."""

    url: str
    secret: str | None = field(default=None, repr=False)
    events: frozenset[str] = frozenset(EVENTS)
    source: str = "environment"  # or "run"

    def view(self) -> dict[str, Any]:
        """What routes show: never the secret, only whether there is one."""
        return {
            "Url": display_url(self.url),
            "Events": sorted(self.events),
            "Signed": bool(self.secret),
            "Source": self.source,
        }


@dataclass(frozen=True)
class WebhookConfig:
    """The worker's webhook settings, read once at start (:func:`config_from_env`)."""

    endpoints: tuple[Endpoint, ...] = ()
    retry: RetryPolicy = RetryPolicy()
    timeout_seconds: float = 10.0
    outbox_max: int = 2000
    # In flight at once per endpoint: a receiver that never answers holds at most this many connections.
    concurrency_per_endpoint: int = 4

    def view(self) -> dict[str, Any]:
        """Plain form for JSON, secrets left out."""
        return {
            "Endpoints": [e.view() for e in self.endpoints],
            "Retry": self.retry.as_dict(),
            "TimeoutSeconds": self.timeout_seconds,
            "OutboxMax": self.outbox_max,
            "ConcurrencyPerEndpoint": self.concurrency_per_endpoint,
        }


def display_url(url: str) -> str:
    """``url`` without user info and with its query replaced by ``?…`` (either may carry a token)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "\u2026" if parts.query else "", ""))
    except ValueError:
        return "<unparsable URL>"


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot receive webhooks, or ``None`` when it is an absolute http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError as exc:
        return f"{display_url(url)!r} is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"{display_url(url)!r} is not an http(s) URL; use http://host/path or https://host/path"
    if not parts.hostname:
        return f"{display_url(url)!r} has no host"
    if not port_ok:
        return f"{display_url(url)!r} has an invalid port"
    return None


def self_url_problem(url: str, port: int, hosts: Iterable[str] = ()) -> str | None:
    """Why ``url`` would reach this ComfyUI itself (listening on ``port``), or ``None``.

    A URL reaches it when its port (80/443 by default) is ``port`` and its host is a loopback or unspecified address,
    ``localhost`` (or a name under it), or one of ``hosts`` (the address the request came in on, its Host header).
    An event POSTed there would land on ComfyUI's own routes: ``/interrupt`` stops whatever prompt runs then.
    """
    try:
        parts = urlsplit(url)
        url_port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    host = (parts.hostname or "").lower().rstrip(".")
    if url_port != port or not host:
        return None
    own = {h.lower().strip("[]").rstrip(".") for h in hosts if h}
    local = host == "localhost" or host.endswith(".localhost") or host in own
    if not local:
        try:
            address = ipaddress.ip_address(host)
            local = address.is_loopback or address.is_unspecified
        except ValueError:
            pass
    if not local:
        return None
    return (
        f"{display_url(url)!r} is this ComfyUI itself (port {port}): its events would be POSTed to ComfyUI's own "
        "routes (/interrupt stops the running prompt); give the URL of a receiver"
    )


def _split(raw: Any) -> list[str] | None:
    """A comma-separated string or a list of strings as a list of non-empty stripped strings (``None``: neither)."""
    if isinstance(raw, str):
        items = raw.split(",")
    elif isinstance(raw, list | tuple) and all(isinstance(x, str) for x in raw):
        items = list(raw)
    else:
        return None
    return [x.strip() for x in items if x.strip()]


def _events(raw: Any, allowed: tuple[str, ...]) -> tuple[frozenset[str], list[str]]:
    """The known event names in ``raw`` and the unknown ones."""
    names = _split(raw) or []
    known = frozenset(n for n in names if n in allowed)
    return known, [n for n in names if n not in allowed]


def _positive(env: Mapping[str, str], name: str, default: float, notes: list[str], *, whole: bool = False) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        val = float(raw)
        if math.isnan(val) or math.isinf(val) or val <= 0:
            raise ValueError("must be a number > 0")
        if whole and val != int(val):
            raise ValueError("must be a whole number")
    except ValueError as exc:
        notes.append(f"invalid {name}={raw!r} ({exc}); using the default {default:g}")
        return default
    return int(val) if whole else val


def config_from_env(env: Mapping[str, str]) -> tuple[WebhookConfig, list[str]]:
    """The worker's webhook config and one note per invalid setting (which is ignored or defaulted).

    Reads ``RUN_TELEMETRY_WEBHOOK_URL`` (comma-separated http(s) URLs), ``RUN_TELEMETRY_WEBHOOK_SECRET``,
    ``RUN_TELEMETRY_WEBHOOK_EVENTS`` (comma-separated, default all of :data:`EVENTS`), and for tests and tuning
    ``RUN_TELEMETRY_WEBHOOK_RETRY_BASE_SECONDS``, ``RUN_TELEMETRY_WEBHOOK_TIMEOUT_SECONDS`` and
    ``RUN_TELEMETRY_WEBHOOK_OUTBOX_MAX``. Never raises.
    """
    notes: list[str] = []
    urls = _split(env.get(ENV_URL, "")) or []
    good: list[str] = []
    for url in urls:
        problem = url_problem(url)
        if problem:
            notes.append(f"{ENV_URL}: {problem}; that endpoint is ignored")
        elif url not in good:
            good.append(url)
    events = frozenset(EVENTS)
    raw_events = env.get(ENV_EVENTS)
    if raw_events is not None and raw_events.strip():
        known, unknown = _events(raw_events, EVENTS)
        if unknown:
            fallback = "" if known else "; no known event left, so every event is sent"
            notes.append(
                f"{ENV_EVENTS}: unknown event name(s) {', '.join(map(repr, unknown))} ignored "
                f"(known: {', '.join(EVENTS)}){fallback}"
            )
        events = known or frozenset(EVENTS)
    secret = env.get(ENV_SECRET) or None
    if good and not secret:
        notes.append(f"{ENV_SECRET} is not set: webhook deliveries carry no X-Run-Telemetry-Signature")
    default = WebhookConfig()
    base = _positive(env, ENV_RETRY_BASE, default.retry.base_seconds, notes)
    timeout = _positive(env, ENV_TIMEOUT, default.timeout_seconds, notes)
    outbox_max = int(_positive(env, ENV_OUTBOX_MAX, default.outbox_max, notes, whole=True))
    config = WebhookConfig(
        endpoints=tuple(Endpoint(url=u, secret=secret, events=events) for u in good),
        retry=RetryPolicy(base_seconds=base),
        timeout_seconds=timeout,
        outbox_max=outbox_max,
    )
    for note in notes:
        logger.error("Run Telemetry: %s", note)
    return config, notes


def run_webhook_problem(raw: Any) -> tuple[str, str] | None:
    """(field, message) when ``extra_data.telemetry.webhook`` is unusable, else ``None``.

    Accepted: ``{"url": "https://a/x,https://b/y" | [...], "secret": "...", "events": "prompt.ended" | [...]}``;
    ``url`` is required, ``secret`` and ``events`` are optional.
    """
    where = "extra_data.telemetry.webhook"
    if not isinstance(raw, Mapping):
        return where, f'{where} must be an object such as {{"url": "https://example.com/hook", "secret": "..."}}'
    unknown = [str(k) for k in raw if k not in RUN_KEYS]
    if unknown:
        return f"{where}.{unknown[0]}", f"unknown key {unknown[0]!r} in {where} (known: {', '.join(RUN_KEYS)})"
    urls = _split(raw.get("url"))
    if not urls:
        return f"{where}.url", f"{where}.url must be an http(s) URL, a comma-separated list or a list of them"
    if len(urls) > 8:
        return f"{where}.url", f"{where}.url lists {len(urls)} URLs; at most 8 per run"
    for url in urls:
        problem = url_problem(url)
        if problem:
            return f"{where}.url", problem
    secret = raw.get("secret")
    if secret is not None and (not isinstance(secret, str) or not secret):
        return f"{where}.secret", f"{where}.secret must be a non-empty string"
    if isinstance(secret, str):
        try:
            secret.encode("utf-8")
        except UnicodeEncodeError:
            # JSON lets a body carry a lone surrogate (\ud800): no UTF-8 bytes to sign with, so no signature at all.
            return f"{where}.secret", f"{where}.secret holds an unpaired surrogate (\\uD800-\\uDFFF); use valid Unicode"
    if "events" in raw and raw["events"] is not None:
        names = _split(raw["events"])
        if names is None or not names:
            return f"{where}.events", f"{where}.events must be event names ({', '.join(RUN_EVENTS)})"
        _, bad = _events(names, RUN_EVENTS)
        if bad:
            return f"{where}.events", f"unknown event {bad[0]!r} for a run (known: {', '.join(RUN_EVENTS)})"
    return None


def parse_run_webhook(raw: Any, secret: str | None = None) -> tuple[Endpoint, ...]:
    """The endpoints of a run's ``extra_data.telemetry.webhook`` (already checked by :func:`run_webhook_problem`).

    ``secret`` is used when given (the submission handler takes it out of the body before ComfyUI queues it).
    """
    if run_webhook_problem(raw) is not None:
        return ()
    urls = list(dict.fromkeys(_split(raw.get("url")) or []))
    key = secret if secret is not None else raw.get("secret")
    events = frozenset(RUN_EVENTS)
    if raw.get("events") is not None:
        events, _ = _events(raw["events"], RUN_EVENTS)
    return tuple(Endpoint(url=u, secret=key or None, events=events, source="run") for u in urls)
