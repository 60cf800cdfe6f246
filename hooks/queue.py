"""ComfyUI's prompt queue as lifecycle events: a prompt *accepted* into the queue, prompts *dequeued* unrun.

ComfyUI (0.3.52 … 0.33.0) has no hook for either. Every accepted prompt goes through ``PromptQueue.put`` (called by
``POST /prompt`` after validation, with ``(number, prompt_id, prompt, extra_data, outputs_to_execute[, sensitive])``),
and every prompt removed before it ran goes through ``PromptQueue.wipe_queue`` (``POST /queue {"clear": true}``) or
``PromptQueue.delete_queue_item`` (``POST /queue {"delete": [...]}``, and ``POST /api/jobs/{id}/cancel`` on newer
ComfyUI). The queue object's methods are wrapped once, with ``(*args, **kwargs)``:

- ``put``: the accept hooks run **before** the item reaches the queue, on the caller's thread (aiohttp's), so the
  prompt worker can never start a prompt the package has not seen accepted. Hooks must be quick (no store writes).
- ``wipe_queue`` / ``delete_queue_item``: the queued items are compared before and after under the queue's own lock
  (an ``RLock``), and the dequeue hooks get the items that went. ``delete_queue_item`` calls ``wipe_queue`` itself
  when one item is left; a re-entrancy guard reports each removal once.

Anything unexpected degrades to a logged warning and a note; ComfyUI's queue always behaves exactly as without the
package.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("run_telemetry")

WRAPPED = "__run_telemetry_wrapped__"


@dataclass(frozen=True)
class QueueItem:
    """One entry of ComfyUI's queue, by name (the tuple's layout is ComfyUI's, see ``server.py`` ``post_prompt``)."""

    number: Any
    prompt_id: str
    prompt: Mapping[str, Any]
    extra_data: Mapping[str, Any]
    outputs_to_execute: list[str]
    sensitive: Mapping[str, Any] | None = None  # 0.3.6x+: extra_data keys ComfyUI keeps out of history (API keys)

    @classmethod
    def from_tuple(cls, item: Any) -> QueueItem | None:
        """Read ``(number, prompt_id, prompt, extra_data, outputs_to_execute, ...)``; ``None`` if it is not one."""
        try:
            number, prompt_id, prompt, extra = item[0], item[1], item[2], item[3]
            outputs = item[4] if len(item) > 4 else []
            sensitive = item[5] if len(item) > 5 else None
        except (TypeError, IndexError, KeyError):
            return None
        return cls(
            number=number,
            prompt_id=str(prompt_id),
            prompt=prompt if isinstance(prompt, Mapping) else {},
            extra_data=extra if isinstance(extra, Mapping) else {},
            outputs_to_execute=[str(o) for o in outputs] if isinstance(outputs, list | tuple) else [],
            sensitive=sensitive if isinstance(sensitive, Mapping) else None,
        )


AcceptHook = Callable[[QueueItem], None]
DequeueHook = Callable[[list[QueueItem], str], None]


class QueueEvents:
    """Hooks called when ComfyUI's queue accepts a prompt or drops queued prompts unrun."""

    def __init__(self) -> None:
        self.accept_hooks: list[AcceptHook] = []
        self.dequeue_hooks: list[DequeueHook] = []
        self._guard = threading.local()

    def on_accept(self, fn: AcceptHook) -> None:
        """Call ``fn(item)`` before an accepted prompt enters the queue (aiohttp's thread; keep it quick)."""
        self.accept_hooks.append(fn)

    def on_dequeue(self, fn: DequeueHook) -> None:
        """Call ``fn(items, how)`` after queued prompts were removed unrun; ``how`` is ``"clear"`` or ``"delete"``."""
        self.dequeue_hooks.append(fn)

    def accepted(self, raw: Any) -> None:
        """Run the accept hooks for one raw queue item; a failing hook is logged, never raised."""
        item = QueueItem.from_tuple(raw)
        if item is None:
            return
        for fn in self.accept_hooks:
            try:
                fn(item)
            except Exception:
                logger.exception("Run Telemetry: accept hook %s failed for prompt %s", fn, item.prompt_id)

    def dequeued(self, raws: list[Any], how: str) -> None:
        """Run the dequeue hooks for raw queue items that were removed; a failing hook is logged, never raised."""
        items = [i for i in (QueueItem.from_tuple(r) for r in raws) if i is not None]
        if not items:
            return
        for fn in self.dequeue_hooks:
            try:
                fn(items, how)
            except Exception:
                logger.exception("Run Telemetry: dequeue hook %s failed", fn)

    def wrap(self, queue: Any) -> str:
        """Wrap ``put``, ``wipe_queue`` and ``delete_queue_item`` of ComfyUI's ``PromptQueue`` instance once."""
        put = getattr(queue, "put", None)
        if put is None:
            raise LookupError("PromptQueue.put not found")
        if getattr(put, WRAPPED, False):
            return "already installed"
        mutex = getattr(queue, "mutex", None)
        if mutex is None:
            raise LookupError("PromptQueue.mutex not found")

        @functools.wraps(put)
        def wrapped_put(item: Any, *args: Any, **kwargs: Any) -> Any:
            self.accepted(item)
            return put(item, *args, **kwargs)

        def removal(original: Callable[..., Any], how: str) -> Callable[..., Any]:
            @functools.wraps(original)
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                if getattr(self._guard, "active", False):  # delete_queue_item -> wipe_queue: report once, outside
                    return original(*args, **kwargs)
                self._guard.active = True
                try:
                    with mutex:
                        before = list(getattr(queue, "queue", []) or [])
                        result = original(*args, **kwargs)
                        after = {id(x) for x in getattr(queue, "queue", []) or []}
                finally:
                    self._guard.active = False
                gone = [x for x in before if id(x) not in after]
                if gone:
                    self.dequeued(gone, how)
                return result

            setattr(wrapped, WRAPPED, True)
            return wrapped

        setattr(wrapped_put, WRAPPED, True)
        wipe = getattr(queue, "wipe_queue", None)
        delete = getattr(queue, "delete_queue_item", None)
        queue.put = wrapped_put
        if wipe is not None:
            queue.wipe_queue = removal(wipe, "clear")
        if delete is not None:
            queue.delete_queue_item = removal(delete, "delete")
        return "installed"
