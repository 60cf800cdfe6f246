"""Per-prefix ordering of marker clears and writes across prompts.

Prompts that declare the same marker prefix are served in the order ComfyUI's queue accepted them: a prompt's
stale-marker clear (made when it is accepted) never runs while an earlier prompt's marker at that prefix is still to
be written (the clear waits and runs right after that write), and a prompt's marker write waits while an earlier
prompt that has already ended is still writing its own. So a consumer never finds, after a prompt was accepted, a
marker at its prefix that an earlier prompt wrote later, and the last marker at a prefix is the last prompt's.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger("run_telemetry.markers")


@dataclass
class _Claim:
    prompt_id: str
    ended: bool = False  # the prompt's execution ended: its marker write is due (writer thread)
    clear: Callable[[], None] | None = None  # this prompt's stale-marker clear, waiting for earlier writes
    order: int | None = None  # acceptance order (the record's Seq), when known
    clear_fn: Callable[[], None] | None = None  # the clear itself, to run again after an earlier prompt's write


@dataclass
class PrefixOrder:
    """Claims on marker prefixes (keys: resolved base paths), in acceptance order. Thread-safe."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _claims: dict[str, list[_Claim]] = field(default_factory=dict)
    # prompt id -> {prefix text: key}: each prompt's prefix is resolved once, at its first claim, and
    # that one key serves its clear, its order gate and its write (bounded; released with the prompt's claims)
    _keys: OrderedDict[str, dict[str, str | None]] = field(default_factory=OrderedDict)
    keys_kept: int = 10_000

    def key_of(self, prompt_id: str, prefix: str, resolve: Callable[[], str | None]) -> str | None:
        """The key ``prompt_id`` uses for ``prefix``: resolved by ``resolve()`` the first time, remembered after."""
        with self._lock:
            known = self._keys.get(prompt_id)
            if known is not None and prefix in known:
                return known[prefix]
        key = resolve()  # outside the lock: it walks the file system
        if key is None:
            return None  # refused (or a folder changing while it was resolved): asked again next time, not kept
        with self._lock:
            known = self._keys.setdefault(prompt_id, {})
            key = known.setdefault(prefix, key)
            while len(self._keys) > self.keys_kept:
                self._keys.popitem(last=False)
        return key

    def claim(self, key: str, prompt_id: str, clear: Callable[[], None], order: int | None = None) -> bool:
        """``prompt_id`` declares a marker at ``key``: clear now if no earlier claim is open (True), else later.

        ``order`` is the prompt's acceptance order. A prefix known only when the prompt runs is claimed late: the
        claim goes before the open claims of prompts accepted after it that have not ended, and the first of those
        clears again right after this prompt's write (as if both had been claimed at acceptance).
        """
        with self._lock:
            claims = self._claims.setdefault(key, [])
            if any(c.prompt_id == prompt_id for c in claims):
                return False
            new = _Claim(prompt_id, order=order, clear_fn=clear)
            at = len(claims)
            while order is not None and at > 0:
                c = claims[at - 1]
                if c.order is None or c.order < order or c.ended:
                    break
                at -= 1
            claims.insert(at, new)
            if at + 1 < len(claims) and claims[at + 1].clear is None:
                claims[at + 1].clear = claims[at + 1].clear_fn  # later-accepted: clear again after this write
            if at > 0:
                new.clear = clear
                return False
            clear()  # under the lock: an earlier prompt's write cannot slip in between
            return True

    def ended(self, prompt_id: str) -> None:
        """The prompt's execution ended: a later prompt's write at its prefixes now waits for this one's."""
        with self._lock:
            for claims in self._claims.values():
                for c in claims:
                    if c.prompt_id == prompt_id:
                        c.ended = True

    def must_wait(self, key: str, prompt_id: str) -> bool:
        """Whether an earlier prompt that has ended still has to write its marker at ``key``."""
        with self._lock:
            for c in self._claims.get(key, ()):
                if c.prompt_id == prompt_id:
                    return False
                if c.ended:
                    return True
            return False

    def write(self, key: str, prompt_id: str, write: Callable[[], None]) -> None:
        """Write ``prompt_id``'s marker at ``key`` and release its claim; clears now due run right after it."""
        with self._lock:
            try:
                write()
            finally:
                self._release(key, prompt_id)

    def release(self, prompt_id: str) -> None:
        """Drop every claim of ``prompt_id`` (it wrote its markers, or never will); run clears now due."""
        with self._lock:
            self._keys.pop(prompt_id, None)
            for key in [k for k, claims in self._claims.items() if any(c.prompt_id == prompt_id for c in claims)]:
                self._release(key, prompt_id)

    def _release(self, key: str, prompt_id: str) -> None:
        claims = self._claims.get(key, [])
        kept = [c for c in claims if c.prompt_id != prompt_id]
        # A claim whose earlier claims are all gone runs its waiting clear now (its own write has not happened).
        for c in kept[:1]:
            if c.clear is not None:
                clear, c.clear = c.clear, None
                try:
                    clear()
                except Exception:  # the clear reports its own problems on its record; the order must go on
                    logger.exception("Run Telemetry: a deferred stale-marker clear failed")
        if kept:
            self._claims[key] = kept
        else:
            self._claims.pop(key, None)

    def open_claims(self) -> int:
        """How many claims are open (for ``GET /telemetry``-style diagnostics and tests)."""
        with self._lock:
            return sum(len(c) for c in self._claims.values())
