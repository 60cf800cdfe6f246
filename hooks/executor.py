"""Signature-agnostic wrappers around ComfyUI's executor: prompt start/end and per-node timings.

ComfyUI has no supported per-prompt hook (0.3.52 … 0.3.75). ``PromptExecutor.execute`` and the module-level
``execution.execute`` are wrapped once, with ``*args, **kwargs`` (``execution.execute`` takes 10 positional
arguments in 0.3.52 and 11 in 0.3.75), arguments are found by name from the original's signature, and anything
unexpected degrades to a logged warning: the user's prompt always runs exactly as without the package.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

from ..telemetry.recorder import Recorder
from .plan import Plans

logger = logging.getLogger("run_telemetry")

WRAPPED = "__run_telemetry_wrapped__"


def _arg_getter(fn: Callable[..., Any], name: str, *, skip_self: bool = False) -> Callable[[tuple, dict], Any]:
    """A cheap accessor for argument ``name`` of ``fn`` from (args, kwargs), found once from the signature."""
    params = list(inspect.signature(fn).parameters)
    if skip_self and params and params[0] == "self":
        params = params[1:]
    if name not in params:
        raise LookupError(f"{getattr(fn, '__qualname__', fn)} has no parameter {name!r} (parameters: {params})")
    idx = params.index(name)

    def get(args: tuple, kwargs: dict) -> Any:
        return args[idx] if len(args) > idx else kwargs.get(name)

    return get


def wrap_prompt_executor(
    execution: Any,
    recorder: Recorder,
    plans: Plans | None = None,
    on_worker_exit: Callable[[BaseException], None] | None = None,
) -> str:
    """Wrap ``execution.PromptExecutor.execute`` to record each prompt's start and end. Returns a status word.

    With ``plans``: the validated ``execute_outputs`` are compared with the workflow's output nodes at the start,
    and the UI outputs of cached output nodes are added to what the recorder gets at the end.
    ``on_worker_exit`` hears of a ``BaseException`` that is not an ``Exception`` (``SystemExit`` raised by a node):
    ComfyUI's prompt worker does not catch it, so its thread ends while HTTP keeps answering.
    """
    cls = getattr(execution, "PromptExecutor", None)
    original = getattr(cls, "execute", None)
    if original is None:
        raise LookupError("execution.PromptExecutor.execute not found")
    if getattr(original, WRAPPED, False):
        return "already installed"
    get_prompt = _arg_getter(original, "prompt", skip_self=True)
    get_prompt_id = _arg_getter(original, "prompt_id", skip_self=True)
    get_extra = _arg_getter(original, "extra_data", skip_self=True)
    get_outputs = _arg_getter(original, "execute_outputs", skip_self=True)

    @functools.wraps(original)
    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        prompt_id = None
        try:
            prompt_id = str(get_prompt_id(args, kwargs))
            prompt = get_prompt(args, kwargs)
            if plans is not None:
                try:
                    plans.started(prompt_id, prompt or {}, get_outputs(args, kwargs))
                except Exception:
                    logger.exception("Run Telemetry: reading the output nodes of prompt %s failed", prompt_id)
            recorder.started(prompt_id, prompt, get_extra(args, kwargs))
        except Exception:
            logger.exception("Run Telemetry: recording the start of a prompt failed")
        error: BaseException | None = None
        try:
            return original(self, *args, **kwargs)
        except BaseException as exc:  # asyncio.CancelledError, KeyboardInterrupt, SystemExit too: still recorded
            error = exc
            if not isinstance(exc, Exception) and on_worker_exit is not None:
                try:
                    on_worker_exit(exc)
                except Exception:
                    logger.exception("Run Telemetry: reporting the prompt worker's exit failed")
            raise
        finally:
            if prompt_id is not None:
                try:
                    history = getattr(self, "history_result", None)
                    if plans is not None:
                        try:
                            history = plans.ended(self, prompt_id, history)
                        except Exception:
                            logger.exception("Run Telemetry: reading the outputs of prompt %s failed", prompt_id)
                    recorder.ended(
                        prompt_id,
                        getattr(self, "status_messages", None),  # the recorder keeps its own copy
                        history,
                        exception=error,
                    )
                except Exception:
                    logger.exception("Run Telemetry: recording the end of prompt %s failed", prompt_id)

    setattr(execute, WRAPPED, True)
    cls.execute = execute
    return "installed"


def wrap_node_execute(execution: Any, recorder: Recorder, plans: Plans | None = None) -> str:
    """Wrap the module-level ``execution.execute`` (one call per node run) to time nodes.

    With ``plans``: the node about to execute is noted, so an interrupt is attributed to the node that was running.
    """
    original = getattr(execution, "execute", None)
    if original is None:
        raise LookupError("execution.execute not found")
    if getattr(original, WRAPPED, False):
        return "already installed"
    get_node = _arg_getter(original, "current_item")
    get_dynprompt = _arg_getter(original, "dynprompt")
    get_prompt_id = _arg_getter(original, "prompt_id")
    perf = time.perf_counter

    def record(args: tuple, kwargs: dict, seconds: float) -> None:
        # Once per node on the prompt worker: no lookups here; class types are resolved at the prompt's end.
        try:
            recorder.node_called(
                str(get_prompt_id(args, kwargs)),
                str(get_node(args, kwargs)),
                None,
                seconds,
                get_dynprompt(args, kwargs),
            )
        except Exception:
            logger.debug("Run Telemetry: node timing skipped", exc_info=True)

    def note(args: tuple, kwargs: dict) -> None:
        if plans is not None:
            plans.current_node = str(get_node(args, kwargs))

    def done(args: tuple, kwargs: dict, seconds: float) -> None:
        record(args, kwargs, seconds)
        if plans is not None:  # between nodes nothing executes: an interrupt then hits the next node to start
            plans.current_node = None

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def execute(*args: Any, **kwargs: Any) -> Any:
            note(args, kwargs)
            t0 = perf()
            try:
                return await original(*args, **kwargs)
            finally:
                done(args, kwargs, perf() - t0)

    else:

        @functools.wraps(original)
        def execute(*args: Any, **kwargs: Any) -> Any:
            note(args, kwargs)
            t0 = perf()
            try:
                return original(*args, **kwargs)
            finally:
                done(args, kwargs, perf() - t0)

    setattr(execute, WRAPPED, True)
    execution.execute = execute
    return "installed"
