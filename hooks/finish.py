"""What happens around a prompt's end, wired into the recorder: markers, the contract block, the websocket event."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ..telemetry.atomic import MarkerWriteError, remove_stale_temps
from ..telemetry.contract import gpu_block, telemetry_block
from ..telemetry.markers import (
    DoneMarker,
    FailedMarker,
    MarkerTelemetry,
    OutputFile,
    clear_markers,
    describe_outputs,
    marker_paths,
    write_done_marker,
    write_failed_marker,
)
from ..telemetry.paths import UnsafePrefixError, resolve_prefix
from ..telemetry.records import MarkerState, PromptRecord
from ..telemetry.settle import Settle
from .plan import declared_markers as plan_markers
from .runtime import Runtime, expand_prefix

logger = logging.getLogger("run_telemetry")

MARKER_NODE = "WriteDoneMarker"
FAILED_MARKER_OUTCOMES = frozenset({"interrupted", "cancelled", "lost"})
EVENT = "telemetry.prompt"
SETTLE_KEY = "settle"
ORDER_POLL_SECONDS = 0.05


def declared_markers(prompt: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(node id, prefix text, sha256) of every WriteDoneMarker whose prefix is known before it runs."""
    return [(m.node_id, m.text, m.sha256) for m in plan_markers(prompt) if m.text is not None]


def _parse_iso(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def clean_cut_off_temps(rt: Runtime) -> None:
    """Finish the markers of prompts cut off by the last stop (their writer is gone), before any prompt is accepted.

    The temp files a kill left beside them are removed, and every declared prefix that holds no marker of the prompt
    gets its ``.failed`` (``Outcome: "error"``, the cut-off note as ``Message``): a consumer waiting on the prefix of
    a prompt killed while it ran, or while its files settled, is answered. A marker the kill let through is kept.
    """
    for prompt_id in getattr(rt, "cut_off", None) or ():
        try:
            rec = rt.store.get(prompt_id)
            changed = False
            for m in rec.Markers if rec else ():
                if not m.Prefix:
                    continue
                for path in marker_paths(resolve_prefix(rt.output_dir(), m.Prefix)):
                    remove_stale_temps(path)
                changed |= _fail_cut_off_marker(rt, rec, m)
            if changed:
                rt.store.put(rec)
        except Exception as exc:  # best effort: a leftover temp file is hidden and harmless to readers
            logger.warning("Run Telemetry: could not clean up after cut-off prompt %s: %s", prompt_id, exc)


def _fail_cut_off_marker(rt: Runtime, rec: PromptRecord, m: MarkerState) -> bool:
    """Write ``.failed`` for a cut-off prompt's marker unless its prefix holds a marker of this prompt; changed?"""
    if m.State not in ("pending", "error"):
        return False
    out = rt.output_dir()
    for path in marker_paths(resolve_prefix(out, m.Prefix)):
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("PromptId") == rec.PromptId:
                return False  # written before the kill: whole (atomic rename)
        except (OSError, ValueError, AttributeError):
            continue
    note = next((n for n in reversed(rec.FallbackNotes) if "stopped" in n), "ComfyUI stopped before it finished")
    marker = FailedMarker(PromptId=rec.PromptId, Prefix=m.Prefix, Outcome="error", Message=note)
    try:
        result = write_failed_marker(out, m.Prefix, marker)
    except (MarkerWriteError, UnsafePrefixError, OSError) as exc:
        m.State, m.Error = "error", f"cut off by the last stop; its .failed could not be written: {exc}"
        return True
    m.State, m.Outcome, m.Path = "failed", "error", str(result.path)
    return True


def _expand(text: str) -> str:
    """A prefix text with SaveImage's tokens expanded (ComfyUI's helper); unchanged when that is unavailable."""
    try:
        return expand_prefix(text)
    except Exception:
        return text


def _key(rt: Runtime, prefix: str, prompt_id: str | None = None) -> str | None:
    """The ordering key of a prefix: its resolved base path, or ``None`` for a prefix that is refused.

    With ``prompt_id`` the key is resolved once per prompt and prefix (``PrefixOrder.key_of``): the claim at
    acceptance, the claim again when the node runs, the order gate and the write use one key, and neither the
    prompt worker nor the writer walks the path again (each resolution is two ``realpath`` walks).
    """

    def resolve() -> str | None:
        try:
            return str(resolve_prefix(rt.output_dir(), prefix))
        except (UnsafePrefixError, OSError):
            return None

    if prompt_id is None:
        return resolve()
    return rt.prefix_order.key_of(prompt_id, prefix, resolve)


def _clear(rt: Runtime, rec: PromptRecord, prefix: str) -> None:
    """Claim ``prefix`` for this prompt and remove the markers earlier prompts left there.

    The clear runs now, or, while an earlier-accepted prompt has still to write its marker at this prefix, right
    after that write (``PrefixOrder``). Once per prompt and prefix.
    """
    key = _key(rt, prefix, rec.PromptId)
    if key is None:
        return  # refused with a clear message at submission or when the node runs; nothing to clear

    def clear() -> None:
        try:
            clear_markers(rt.output_dir(), prefix, base=Path(key))
        except (UnsafePrefixError, FileNotFoundError):
            pass
        except MarkerWriteError as exc:
            rec.FallbackNotes.append(f"could not remove the previous marker for {prefix!r}: {exc}")

    rt.prefix_order.claim(key, rec.PromptId, clear, order=rec.Seq)


def _declare(rt: Runtime, rec: PromptRecord, prompt: Mapping[str, Any], targets: list[str] | None) -> None:
    """Put the prompt's markers on its record (prefix text known before it runs, else "") and claim their prefixes."""
    known = {m.NodeId for m in rec.Markers}
    for m in plan_markers(prompt):
        if m.node_id in known or (targets is not None and m.node_id not in targets):
            continue  # partial execution: only the requested output nodes
        prefix = ""
        if m.text is not None and "%width%" not in m.text and "%height%" not in m.text:
            prefix = _expand(m.text)
        rec.Markers.append(MarkerState(NodeId=m.node_id, Prefix=prefix, Sha256=m.sha256))
        if prefix:
            _clear(rt, rec, prefix)


def install_finishers(rt: Runtime) -> None:
    """Wire the marker steps, the contract block and the websocket event into the runtime's recorder."""
    rec_ = rt.recorder
    clean_cut_off_temps(rt)

    def declare_at_accept(rec: PromptRecord, item: Any) -> None:
        """At acceptance: declare the prompt's markers and clear stale ones at their prefixes (in prefix order)."""
        targets = None
        if rt.plans is not None:
            rt.plans.accepted(item.prompt_id, item.prompt)  # ComfyUI's validation result of this very prompt
            targets = rt.plans.targets(item.prompt_id)
        _declare(rt, rec, item.prompt, targets)

    def clear_stale_markers(rec: PromptRecord, prompt: Mapping[str, Any]) -> None:
        """At start, for a prompt not seen accepted: the same (markers declared, stale ones cleared)."""
        plan = rt.plans.get(rec.PromptId) if rt.plans is not None else None
        _declare(rt, rec, prompt, list(plan.requested) if plan is not None and plan.requested else None)

    def declared(prompt_id: str | None, node_id: str, prefix: str, others: list[str]) -> None:
        """A marker node ran: its prefix may be known only now (by link, tokens): claim it, clear what is stale."""
        rec = rt.recorder.live_record(prompt_id)
        if rec is None:
            return
        _clear(rt, rec, prefix)
        for other in others:
            rec.FallbackNotes.append(
                f"WriteDoneMarker {node_id} got a list of prefixes; its marker is at {prefix!r}, none at {other!r}"
            )

    rec_.add_accept_hook(declare_at_accept)
    rec_.add_start_hook(clear_stale_markers)
    rt.declare_hooks.append(declared)
    rec_.add_gate("marker order", lambda rec: marker_order(rt, rec))
    rec_.add_gate("output settle", lambda rec: settle_outputs(rt, rec))
    # Markers first: the contract block reads their state (DoneMarker*, postExecution).
    rec_.add_finisher("done marker", lambda rec: write_markers(rt, rec))
    rec_.add_finisher("contract telemetry", lambda rec: build_contract(rt, rec))
    rec_.add_finisher("release prefixes", lambda rec: rt.prefix_order.release(rec.PromptId))
    if rt.plans is not None:
        plans = rt.plans
        rec_.add_finisher("forget plan", lambda rec: plans.forget(rec.PromptId))
    if rt.send is not None:
        send = rt.send

        def emit(rec: PromptRecord) -> None:
            send(EVENT, rec.summary())

        rec_.add_listener(emit)


def build_contract(rt: Runtime, rec: PromptRecord) -> None:
    """Fill ``rec.Telemetry`` in the contract's shape (per-attempt ``Telemetry`` of artifact-metadata.json)."""
    policy, _ = rt.run_policy(rec.RunId)
    rec.Telemetry = telemetry_block(rec, policy, history_attempts=rt.waits().get(rec.PromptId, 0))


def _roots(rt: Runtime) -> dict[str, Path]:
    roots = getattr(rt, "folder_roots", None)
    if roots is None:
        return {"output": Path(rt.output_dir())}
    try:
        return dict(roots())
    except Exception as exc:
        logger.warning("Run Telemetry: ComfyUI's temp/input folders unknown: %s", exc)
        return {"output": Path(rt.output_dir())}


def _listed(rt: Runtime, rec: PromptRecord) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """The prompt's file entries the marker lists (types with a known folder), and the folders by type."""
    roots = _roots(rt)
    items = []
    for o in rec.Outputs:
        if o.Type not in roots:
            note = f"output {o.Subfolder}/{o.Filename} of type {o.Type!r} left out of the marker: no folder known"
            if note not in rec.FallbackNotes:
                rec.FallbackNotes.append(note)
            continue
        items.append({"filename": o.Filename, "subfolder": o.Subfolder, "type": o.Type, "node": o.NodeId})
    return items, roots


def marker_order(rt: Runtime, rec: PromptRecord) -> float | None:
    """Gate: hold this prompt's markers while an earlier prompt that has ended still writes one at the same prefix."""
    order = rt.prefix_order
    order.ended(rec.PromptId)
    for m in rec.Markers:
        key = _key(rt, m.Prefix, rec.PromptId) if m.Prefix else None
        if key is not None and order.must_wait(key, rec.PromptId):
            return ORDER_POLL_SECONDS
    return None


def settle_outputs(rt: Runtime, rec: PromptRecord) -> float | None:
    """Gate: hold the markers until every listed file is present and no longer growing, or the timeout passed.

    Files of output nodes known to close them before returning (ComfyUI's own save nodes) are taken as they are
    when present; any other listed file, and every missing one, must keep its size and mtime for the policy's
    settle window. Past the post-execution timeout, counted from ``execution_success``, the unsettled files are
    kept for :func:`write_markers` (``.failed`` with ``Outcome: outputsIncomplete``).
    """
    plan = rt.plans.get(rec.PromptId) if rt.plans is not None else None
    if plan is None or not rec.Markers or rec.Outcome != "success" or plan.dropped:
        return None
    state = plan.extra.get(SETTLE_KEY)
    now = time.monotonic()
    if state is None:
        policy, _ = rt.run_policy(rec.RunId)
        items, roots = _listed(rt, rec)
        watch = []
        for it in items:
            path = Path(roots[it["type"]]) / it["subfolder"] / it["filename"]
            if it["node"] not in plan.trusted or not path.is_file():
                watch.append(path)
        if not watch:
            return None
        success_at = _parse_iso(rec.ExecutionSuccessAt) or time.time()
        left = float(policy.post_execution_timeout_seconds) - max(0.0, time.time() - success_at)
        state = plan.extra[SETTLE_KEY] = Settle.of(
            watch, window=float(policy.output_settle_seconds), deadline=now + max(0.0, left)
        )
    verdict, delay = state.poll(now)
    if verdict == "waiting":
        return delay
    if verdict == "timeout":
        plan.extra["incomplete"] = [str(p) for p in state.pending()]
    return None


def _interrupted_node(rt: Runtime, rec: PromptRecord) -> None:
    """Name the node that was executing when the interrupt hit (ComfyUI names the next node that started)."""
    plan = rt.plans.get(rec.PromptId) if rt.plans is not None else None
    node = plan.interrupted_node if plan is not None else None
    if rec.Outcome != "interrupted" or node is None or rec.Error is None or rec.Error.NodeId == node:
        return
    class_type = next((n.ClassType for n in rec.Nodes if n.NodeId == node), "")
    rec.FallbackNotes.append(
        f"interrupted while node {node} ({class_type}) was executing; ComfyUI named node {rec.Error.NodeId} "
        f"({rec.Error.NodeType}), the next node to start"
    )
    rec.Error.NodeId, rec.Error.NodeType = node, class_type or rec.Error.NodeType


def write_markers(rt: Runtime, rec: PromptRecord) -> None:
    """At the end: ``.done`` when the prompt produced everything asked for, ``.failed`` otherwise, per marker."""
    if not rec.Markers:
        return
    plan = rt.plans.get(rec.PromptId) if rt.plans is not None else None
    _interrupted_node(rt, rec)
    out = rt.output_dir()
    gpu = gpu_block(rec)
    summary = MarkerTelemetry(
        DurationSeconds=rec.DurationSeconds,
        VramBeforeMB=gpu.get("VramBeforeMB"),
        VramAfterMB=gpu.get("VramAfterMB"),
        VramDeltaMB=gpu.get("VramDeltaMB"),
        Gpu=gpu.get("Name"),
    )
    success_at = _parse_iso(rec.ExecutionSuccessAt)
    items, roots = _listed(rt, rec)
    dropped = list(plan.dropped) if plan is not None else []
    incomplete = set(plan.extra.get("incomplete") or ()) if plan is not None else set()
    texts = {m.node_id: m.text for m in plan.markers} if plan is not None else {}
    for m in rec.Markers:
        if not m.Prefix and texts.get(m.NodeId):
            m.Prefix = _expand(str(texts[m.NodeId]))  # by link from a node that ran, read at the end
        if not m.Prefix:
            m.State = "error"
            m.Error = "the prefix arrives by link and was never computed (the prompt ended before its source ran)"
            rec.FallbackNotes.append(f"no marker for WriteDoneMarker {m.NodeId}: {m.Error}")
            continue
        if rec.Outcome != "success" and rec.RetriedBy:
            m.State = "skipped"
            m.Error = f"no .failed written: the scene is retried as prompt {rec.RetriedBy}"
            continue
        try:
            outputs = describe_outputs(out, items, sha256=m.Sha256, roots=roots) if rec.Outcome == "success" else []
            missing = [o for o in outputs if o.missing]
            late = [o for o in outputs if _path(roots, o) in incomplete]
            marker: DoneMarker | FailedMarker
            if rec.Outcome == "success" and not dropped and not missing and not late:
                frames = m.FrameCount if m.FrameCount is not None else len(outputs)
                marker = DoneMarker(
                    PromptId=rec.PromptId, Prefix=m.Prefix, FrameCount=frames, Outputs=outputs, Telemetry=summary
                )
                result = _ordered(rt, rec, m.Prefix, lambda mk=marker, p=m.Prefix: write_done_marker(out, p, mk))
                m.State, m.Outcome = "written", None
            else:
                marker = _failed(rec, m, dropped, [*missing, *(o for o in late if not o.missing)], summary)
                result = _ordered(rt, rec, m.Prefix, lambda mk=marker, p=m.Prefix: write_failed_marker(out, p, mk))
                m.State, m.Outcome = "failed", marker.outcome
            m.Path = str(result.path)
            if success_at is not None and rec.Outcome == "success":
                m.WaitSeconds = round(max(0.0, time.time() - success_at), 6)
            if result.fallback_note:
                rec.FallbackNotes.append(result.fallback_note)
        except (MarkerWriteError, UnsafePrefixError, OSError) as exc:
            m.State = "error"
            m.Error = str(exc)
            rec.FallbackNotes.append(f"marker for prefix {m.Prefix!r} could not be written: {exc}")
            logger.error("Run Telemetry: marker for prefix %r could not be written: %s", m.Prefix, exc)


def _ordered(rt: Runtime, rec: PromptRecord, prefix: str, write: Any) -> Any:
    """Run ``write()`` in the prefix's order (clears of later prompts waiting on it run right after); its result."""
    key = _key(rt, prefix, rec.PromptId)
    if key is None:
        return write()
    box: list[Any] = []
    rt.prefix_order.write(key, rec.PromptId, lambda: box.append(write()))
    return box[0]


def _path(roots: Mapping[str, Path], o: OutputFile) -> str:
    return str(Path(roots.get(o.folder_type, "")) / o.subfolder / o.filename)


def _failed(
    rec: PromptRecord, m: MarkerState, dropped: list[Any], incomplete: list[OutputFile], summary: MarkerTelemetry
) -> FailedMarker:
    """The ``.failed`` marker of a prompt that did not produce what was asked for, and the record's notes."""
    if rec.Outcome != "success":
        err = rec.Error
        return FailedMarker(
            PromptId=rec.PromptId,
            Prefix=m.Prefix,
            Outcome=rec.Outcome if rec.Outcome in FAILED_MARKER_OUTCOMES else "error",
            Node=err.NodeId if err else None,
            NodeType=err.NodeType if err else None,
            Message=(err.Message if err and err.Message else rec.Outcome),
            Dropped=dropped,
            Telemetry=summary,
        )
    if dropped:
        names = ", ".join(f"{d.node_id} ({d.class_type}): {d.reason}" for d in dropped)
        message = f"ComfyUI did not run {len(dropped)} output node(s) of the submitted workflow: {names}"
        if message not in rec.FallbackNotes:
            rec.FallbackNotes.append(message)
        return FailedMarker(
            PromptId=rec.PromptId,
            Prefix=m.Prefix,
            Outcome="validation",
            Node=dropped[0].node_id,
            NodeType=dropped[0].class_type,
            Message=message,
            Dropped=dropped,
            Telemetry=summary,
        )
    names = ", ".join(
        f"{o.subfolder}/{o.filename}".lstrip("/") + (" (missing)" if o.missing else "") for o in incomplete
    )
    message = f"{len(incomplete)} output file(s) still missing or growing at the post-execution timeout: {names}"
    if message not in rec.FallbackNotes:
        rec.FallbackNotes.append(message)
    return FailedMarker(
        PromptId=rec.PromptId,
        Prefix=m.Prefix,
        Outcome="outputsIncomplete",
        Message=message,
        Incomplete=incomplete,
        Telemetry=summary,
    )
