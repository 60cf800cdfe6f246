"""A run's own webhook endpoints, held in memory only (never in the store: they carry secrets).

The submission handler takes the secret out of ``extra_data.telemetry.webhook`` before ComfyUI queues the prompt (so
it never appears in ComfyUI's queue, history or this package's records) and parks it here under the prompt id; when
the prompt starts, its endpoints are registered under the prompt and under its run, so later attempts of the run and
``run.finalized`` reach them too. Bounded: the least recently used entries go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from .config import Endpoint, parse_run_webhook

__all__ = ["RunTargets"]


class RunTargets:
    """Per-prompt secrets waiting for their prompt to start, and the endpoints of prompts and runs. Thread-safe."""

    def __init__(self, size: int = 1000) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._secrets: OrderedDict[str, str] = OrderedDict()
        self._urls: OrderedDict[str, list[str]] = OrderedDict()
        self._prompts: OrderedDict[str, tuple[Endpoint, ...]] = OrderedDict()
        self._runs: OrderedDict[str, tuple[Endpoint, ...]] = OrderedDict()

    def _put(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self._size:
            table.popitem(last=False)

    def park_secret(self, prompt_id: str, secret: str) -> None:
        """Keep a run's secret for ``prompt_id`` until the prompt starts (submission handler)."""
        with self._lock:
            self._put(self._secrets, prompt_id, secret)

    def park_urls(self, prompt_id: str, urls: list[str]) -> None:
        """Keep a run's URLs as given (user info and query included) for ``prompt_id`` until the prompt starts."""
        with self._lock:
            self._put(self._urls, prompt_id, list(urls))

    def register(self, prompt_id: str, run_id: str | None, raw: Mapping[str, Any]) -> tuple[Endpoint, ...]:
        """Endpoints of a starting prompt from its ``webhook`` tag (secret and URLs taken from the parked ones)."""
        with self._lock:
            secret = self._secrets.pop(prompt_id, None)
            urls = self._urls.pop(prompt_id, None)
        if urls is not None:
            raw = {**raw, "url": urls}
        endpoints = parse_run_webhook(raw, secret=secret)
        if not endpoints:
            return ()
        with self._lock:
            self._put(self._prompts, prompt_id, endpoints)
            if run_id:
                # One endpoint per URL in a run: a later prompt naming the URL without a secret (or the same one)
                # keeps the signed endpoint instead of adding an unsigned twin.
                known = {e.url: e for e in self._runs.get(run_id, ())}
                for e in endpoints:
                    if e.secret or e.url not in known:
                        known[e.url] = e
                self._put(self._runs, run_id, tuple(known.values()))
        return endpoints

    def for_prompt(self, prompt_id: str, run_id: str | None) -> tuple[Endpoint, ...]:
        """The run's endpoints (every attempt of it), else the prompt's own."""
        with self._lock:
            if run_id and run_id in self._runs:
                return self._runs[run_id]
            return self._prompts.get(prompt_id, ())

    def for_run(self, run_id: str) -> tuple[Endpoint, ...]:
        """The endpoints the run's prompts named."""
        with self._lock:
            return self._runs.get(run_id, ())
