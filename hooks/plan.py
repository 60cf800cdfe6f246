"""What a submitted workflow asked for, next to what ComfyUI ran: the facts a marker's truth depends on.

- ``validate_prompt`` is wrapped once (``(*args, **kwargs)``; ``POST /prompt`` calls it by its module name on
  aiohttp's loop): a marker prefix that would leave the output folder refuses the **whole** prompt (ComfyUI answers
  400 naming node and input; nothing runs), and ComfyUI's ``node_errors`` (its reasons for dropping output nodes
  under partial validation) are kept for the accept hook, which runs next in the same handler without an await.
- At the prompt's start (prompt worker): the workflow's output nodes against ``execute_outputs``, the validated
  list ``PromptExecutor.execute`` receives; every output node not in it is *dropped*, with ComfyUI's reason.
- At its end (prompt worker, before the next prompt resets ComfyUI's caches): the UI outputs of output nodes that
  ran from cache (ComfyUI 0.3.75 leaves them out of the history when the prompt has no ``client_id``), and the
  prefixes of markers that never ran, read from their link source's cached output.
- ``comfy.model_management.interrupt_current_processing`` is wrapped to note the node executing when an interrupt
  hit (ComfyUI blames the next node that starts, for example a TelemetryCapture waiting on its lazy input).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..telemetry.markers import DroppedNode
from ..telemetry.paths import UnsafePrefixError, resolve_prefix

logger = logging.getLogger("run_telemetry")

WRAPPED = "__run_telemetry_wrapped__"
MARKER_NODE = "WriteDoneMarker"
PREFIX_INPUT = "filename_prefix"
SIZE_TOKENS_NEED_IMAGES = (
    "filename_prefix {text!r} uses %width%/%height%, which SaveImage takes from its frames; the marker has no images "
    "input to take them from, so it would land elsewhere: connect its images input to the frames you save"
)
CORE_MODULES = ("nodes", "comfy_extras.", "comfy_api_nodes.")
# Core string nodes whose output is a function of literal inputs: a prefix linked from them is known at submission.
STRING_SOURCES: dict[str, Callable[[Callable[[str], str | None]], str | None]] = {
    "PrimitiveString": lambda get: get("value"),
    "PrimitiveStringMultiline": lambda get: get("value"),
    "StringConcatenate": lambda get: _join(get("delimiter"), get("string_a"), get("string_b")),
}


def _join(delimiter: str | None, a: str | None, b: str | None) -> str | None:
    if delimiter is None or a is None or b is None:
        return None
    return delimiter.join((a, b))


def is_link(value: Any) -> bool:
    """A ComfyUI API-prompt link: ``[source node id, output index]``."""
    return isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[1], int)


def static_text(prompt: Mapping[str, Any], value: Any, _depth: int = 0) -> str | None:
    """The text an input will hold, when it is a literal or linked from a core string node of literals."""
    if isinstance(value, str):
        return value
    if not is_link(value) or _depth > 16 or value[1] != 0:
        return None
    source = prompt.get(str(value[0]))
    if not isinstance(source, Mapping):
        return None
    rule = STRING_SOURCES.get(str(source.get("class_type")))
    if rule is None:
        return None
    inputs = source.get("inputs") or {}
    return rule(lambda name: static_text(prompt, inputs.get(name), _depth + 1))


@dataclass
class DeclaredMarker:
    """A WriteDoneMarker of a submitted prompt: its prefix text when known before it runs, else its link."""

    node_id: str
    text: str | None
    link: tuple[str, int] | None
    sha256: bool


def declared_markers(prompt: Mapping[str, Any]) -> list[DeclaredMarker]:
    """Every WriteDoneMarker in an API prompt, with its prefix text where it is known statically."""
    found = []
    for node_id, node in prompt.items():
        if type(node) is not dict and not isinstance(node, Mapping):
            continue
        if node.get("class_type") != MARKER_NODE:
            continue
        inputs = node.get("inputs") or {}
        raw = inputs.get(PREFIX_INPUT)
        text = static_text(prompt, raw)
        link = (str(raw[0]), int(raw[1])) if text is None and is_link(raw) else None
        found.append(DeclaredMarker(str(node_id), text, link, inputs.get("sha256") is True))
    return found


@dataclass
class PromptPlan:
    """One prompt's requested output nodes and what ComfyUI did with them (filled from accept to end)."""

    prompt_id: str
    markers: list[DeclaredMarker]
    requested: dict[str, str] = field(default_factory=dict)  # output node id -> class type
    executed: list[str] = field(default_factory=list)
    dropped: list[DroppedNode] = field(default_factory=list)
    trusted: set[str] = field(default_factory=set)  # output nodes known to close their files before returning
    interrupted_node: str | None = None  # the node executing when an interrupt hit
    extra: dict[str, Any] = field(default_factory=dict)  # state of the marker steps (settle, ordering)


def node_reasons(node_errors: Mapping[str, Any] | None, output_id: str) -> str:
    """ComfyUI's reasons (``POST /prompt`` ``node_errors``) that made it drop output node ``output_id``."""
    reasons = []
    for node_id, entry in (node_errors or {}).items():
        if not isinstance(entry, Mapping):
            continue
        deps = [str(d) for d in entry.get("dependent_outputs") or []]
        if str(node_id) != output_id and output_id not in deps:
            continue
        for err in entry.get("errors") or []:
            if isinstance(err, Mapping):
                what = ": ".join(str(x) for x in (err.get("message"), err.get("details")) if x)
                reasons.append(f"{entry.get('class_type', '?')} {node_id}: {what}")
    return "; ".join(dict.fromkeys(reasons))


class Plans:
    """Per-prompt plans, keyed by prompt id; ``classes`` maps a class type to its node class (ComfyUI's mapping)."""

    def __init__(self, classes: Callable[[], Mapping[str, Any]], output_dir: Callable[[], Any]) -> None:
        self.classes = classes
        self.output_dir = output_dir
        self._lock = threading.Lock()
        self._plans: dict[str, PromptPlan] = {}
        self._validation: dict[str, tuple[Mapping[str, Any], list[str] | None]] = {}
        self._last: tuple[Any, Mapping[str, Any], list[str] | None] | None = None
        self.current_node: str | None = None
        self.current_prompt: str | None = None
        self.interrupts = 0  # interrupts ComfyUI was asked to make (a POST /interrupt aimed elsewhere makes none)
        self._trusted_cache: dict[str, bool] = {}

    # --- submission (aiohttp's loop) ---

    def refusal(self, prompt: Mapping[str, Any], partial: list[str] | None) -> tuple[dict, dict] | None:
        """``(error, node_errors)`` refusing a prompt whose marker prefix would leave the output folder, or None."""
        from .runtime import expand_prefix

        node_errors: dict[str, Any] = {}
        problems = []
        for m in declared_markers(prompt):
            if m.text is None or (partial is not None and m.node_id not in [str(p) for p in partial]):
                continue
            text = m.text
            sized = "%width%" in text or "%height%" in text
            if sized:
                # Known only once the frames exist: checked with a stand-in size. Every token expands to digits, so
                # the '..' or absolute parts are checkable now (unexpanded: no folder is made for a stand-in).
                text = text.replace("%width%", "1").replace("%height%", "1")
            else:
                text = expand_prefix(text)
            try:
                if sized and "images" not in ((prompt.get(m.node_id) or {}).get("inputs") or {}):
                    raise UnsafePrefixError(SIZE_TOKENS_NEED_IMAGES.format(text=m.text))
                resolve_prefix(self.output_dir(), text)
            except UnsafePrefixError as exc:
                problems.append(f"node {m.node_id} ({MARKER_NODE}) input {PREFIX_INPUT}: {exc}")
                node_errors[m.node_id] = {
                    "errors": [
                        {
                            "type": "custom_validation_failed",
                            "message": "Run Telemetry refused the marker prefix; nothing was queued",
                            "details": f"{PREFIX_INPUT} - {exc}",
                            "extra_info": {"input_name": PREFIX_INPUT},
                        }
                    ],
                    "dependent_outputs": [m.node_id],
                    "class_type": MARKER_NODE,
                }
        if not problems:
            return None
        error = {
            "type": "prompt_outputs_failed_validation",
            "message": "A marker prefix would leave the output folder or cannot name a file; the whole prompt was refused",
            "details": "\n".join(problems),
            "extra_info": {},
        }
        return error, node_errors

    def validated(self, prompt: Any, partial: Any, result: Any) -> Any:
        """After ComfyUI's ``validate_prompt``: refuse escaping marker prefixes, keep ``node_errors`` for accept."""
        if not isinstance(prompt, Mapping) or not isinstance(result, tuple) or len(result) < 4:
            return result
        targets = [str(p) for p in partial] if isinstance(partial, list | tuple) else None
        refused = self.refusal(prompt, targets)
        if refused is not None:
            error, errors = refused
            return (False, error, [], {**(result[3] or {}), **errors})
        self._last = (prompt, result[3] or {}, targets)
        return result

    def accepted(self, prompt_id: str, prompt: Mapping[str, Any]) -> None:
        """Accept hook: keep ComfyUI's ``node_errors`` of this very prompt for its start."""
        last, self._last = self._last, None
        if last is not None and last[0] is prompt:
            with self._lock:
                self._validation[prompt_id] = (last[1], last[2])
                while len(self._validation) > 10_000:  # prompts deleted from the queue never start
                    self._validation.pop(next(iter(self._validation)))

    def targets(self, prompt_id: str) -> list[str] | None:
        """The output nodes the client asked for (``partial_execution_targets``), or ``None`` for all."""
        with self._lock:
            found = self._validation.get(prompt_id)
        return found[1] if found is not None else None

    # --- prompt worker ---

    def _is_trusted(self, class_type: str, cls: Any) -> bool:
        hit = self._trusted_cache.get(class_type)
        if hit is None:
            module = str(getattr(cls, "__module__", ""))
            hit = module == CORE_MODULES[0] or module.startswith(CORE_MODULES[1:])
            self._trusted_cache[class_type] = hit
        return hit

    def started(self, prompt_id: str, prompt: Mapping[str, Any], execute_outputs: Any) -> PromptPlan:
        """The prompt starts: requested output nodes against the validated ``execute_outputs``."""
        with self._lock:
            errors, partial = self._validation.pop(prompt_id, ({}, None))
        classes = self.classes()
        executed = [str(o) for o in (execute_outputs or [])]
        plan = PromptPlan(prompt_id=prompt_id, markers=declared_markers(prompt), executed=executed)
        for node_id, node in prompt.items():
            if not isinstance(node, Mapping):
                continue
            ct = str(node.get("class_type"))
            cls = classes.get(ct)
            if cls is None or getattr(cls, "OUTPUT_NODE", False) is not True:
                continue
            node_id = str(node_id)
            if partial is not None and node_id not in partial:
                continue
            plan.requested[node_id] = ct
            if self._is_trusted(ct, cls):
                plan.trusted.add(node_id)
        done = set(executed)
        for node_id, ct in plan.requested.items():
            if node_id not in done:
                reason = node_reasons(errors, node_id) or "ComfyUI did not run it (no reason given at submission)"
                plan.dropped.append(DroppedNode(NodeId=node_id, ClassType=ct, Reason=reason))
        with self._lock:
            self._plans[prompt_id] = plan
        self.current_prompt = prompt_id
        self.current_node = None
        return plan

    def ended(self, executor: Any, prompt_id: str, history: Mapping[str, Any] | None) -> dict[str, Any]:
        """The outputs of every output node that ran, cached ones included, as ``{"outputs": {node: ui}}``."""
        self.current_prompt = None
        outputs = dict((history or {}).get("outputs") or {})
        plan = self.get(prompt_id)
        if plan is None:
            return {"outputs": outputs}
        caches = getattr(executor, "caches", None)
        for node_id in plan.executed:
            if node_id in outputs or caches is None:
                continue
            ui = _cached_ui(caches, node_id)
            if ui:
                outputs[node_id] = ui
        for m in plan.markers:
            if m.text is None and m.link is not None and caches is not None:
                m.text = _cached_text(caches, *m.link)
        return {"outputs": outputs}

    def interrupted(self) -> None:
        """An interrupt was requested: count it, note the node executing now (the prompt worker's current node)."""
        self.interrupts += 1
        plan = self.get(self.current_prompt) if self.current_prompt else None
        node = self.current_node
        if plan is not None and node is not None and plan.interrupted_node is None:
            plan.interrupted_node = node

    # --- any thread ---

    def get(self, prompt_id: str | None) -> PromptPlan | None:
        """The plan of a prompt, or ``None``."""
        if prompt_id is None:
            return None
        with self._lock:
            return self._plans.get(prompt_id)

    def forget(self, prompt_id: str) -> None:
        """Drop a finished prompt's plan."""
        with self._lock:
            self._plans.pop(prompt_id, None)
            self._validation.pop(prompt_id, None)


def _cached_entry(caches: Any, node_id: str) -> Any:
    """ComfyUI's output-cache entry of a node (``get`` is a coroutine on newer ComfyUI: run it here, after the
    prompt's own event loop has ended, on the prompt worker)."""
    outputs = getattr(caches, "outputs", None)
    found = outputs.get(node_id) if outputs is not None else None
    if inspect.iscoroutine(found):
        try:
            found = asyncio.run(found)
        except RuntimeError:  # a loop is running on this thread (a persistent-loop ComfyUI): not readable here
            found.close()
            return None
    return found


def _cached_ui(caches: Any, node_id: str) -> dict[str, Any] | None:
    """A node's UI output from ComfyUI's caches: ``caches.ui`` (0.3.52) or the output entry's ``ui`` (0.3.75+)."""
    try:
        ui_cache = getattr(caches, "ui", None)
        entry = ui_cache.get(node_id) if ui_cache is not None else getattr(_cached_entry(caches, node_id), "ui", None)
        out = entry.get("output") if isinstance(entry, Mapping) else None
        return dict(out) if isinstance(out, Mapping) else None
    except Exception:
        logger.debug("Run Telemetry: no cached UI output for node %s", node_id, exc_info=True)
        return None


def _cached_text(caches: Any, node_id: str, index: int) -> str | None:
    """The first item of output ``index`` of a node that ran, from ComfyUI's output cache, if it is text."""
    try:
        entry = _cached_entry(caches, node_id)
        data = getattr(entry, "outputs", entry)
        value = data[index] if data is not None and index < len(data) else None
        value = value[0] if isinstance(value, list | tuple) and value else value
        return value if isinstance(value, str) else None
    except Exception:
        logger.debug("Run Telemetry: no cached output %s:%s", node_id, index, exc_info=True)
        return None


def wrap_validate_prompt(execution: Any, plans: Plans) -> str:
    """Wrap ``execution.validate_prompt`` once (async in 0.3.52 … 0.33.0; a plain function is handled too)."""
    original = getattr(execution, "validate_prompt", None)
    if original is None:
        raise LookupError("execution.validate_prompt not found")
    if getattr(original, WRAPPED, False):
        return "already installed"
    params = list(inspect.signature(original).parameters)
    if "prompt" not in params:
        raise LookupError(f"execution.validate_prompt has no 'prompt' parameter ({params})")
    p_idx = params.index("prompt")
    t_idx = params.index("partial_execution_list") if "partial_execution_list" in params else None

    def after(args: tuple, kwargs: dict, result: Any) -> Any:
        try:
            prompt = args[p_idx] if len(args) > p_idx else kwargs.get("prompt")
            partial = None
            if t_idx is not None:
                partial = args[t_idx] if len(args) > t_idx else kwargs.get("partial_execution_list")
            return plans.validated(prompt, partial, result)
        except Exception:
            logger.exception("Run Telemetry: checking a submitted prompt failed; ComfyUI's answer stands")
            return result

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def validate_prompt(*args: Any, **kwargs: Any) -> Any:
            return after(args, kwargs, await original(*args, **kwargs))

    else:

        @functools.wraps(original)
        def validate_prompt(*args: Any, **kwargs: Any) -> Any:
            return after(args, kwargs, original(*args, **kwargs))

    setattr(validate_prompt, WRAPPED, True)
    execution.validate_prompt = validate_prompt
    return "installed"


def wrap_interrupt(model_management: Any, plans: Plans) -> str:
    """Wrap ``comfy.model_management.interrupt_current_processing`` once to note the executing node."""
    original = getattr(model_management, "interrupt_current_processing", None)
    if original is None:
        raise LookupError("comfy.model_management.interrupt_current_processing not found")
    if getattr(original, WRAPPED, False):
        return "already installed"

    @functools.wraps(original)
    def interrupt_current_processing(*args: Any, **kwargs: Any) -> Any:
        value = args[0] if args else kwargs.get("value", True)
        if value:
            try:
                plans.interrupted()
            except Exception:
                logger.debug("Run Telemetry: interrupt not attributed", exc_info=True)
        return original(*args, **kwargs)

    setattr(interrupt_current_processing, WRAPPED, True)
    model_management.interrupt_current_processing = interrupt_current_processing
    return "installed"
