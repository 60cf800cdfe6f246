"""The queue policy: read from ComfyUI's environment, overridable per run, invalid values noted and defaulted."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

logger = logging.getLogger("run_telemetry.policy")

# knob -> (environment variable, default, key accepted in extra_data.telemetry.policy)
KNOBS: dict[str, tuple[str, int, str]] = {
    "max_wait_seconds": ("SCENE_MAX_WAIT_SECONDS", 600, "max_wait_seconds"),
    "history_max_attempts": ("SCENE_HISTORY_MAX_ATTEMPTS", 0, "history_max_attempts"),
    "poll_interval_seconds": ("SCENE_HISTORY_POLL_INTERVAL_SECONDS", 2, "poll_interval_seconds"),
    "post_execution_timeout_seconds": ("SCENE_POST_EXECUTION_TIMEOUT_SECONDS", 30, "post_execution_timeout_seconds"),
    "scene_retry_budget": ("SCENE_RETRY_BUDGET", 1, "scene_retry_budget"),
    "output_settle_seconds": ("RUN_TELEMETRY_OUTPUT_SETTLE_SECONDS", 1, "output_settle_seconds"),
}
# Knobs that take fractions of a second; the others are whole numbers.
FRACTIONAL: frozenset[str] = frozenset({"output_settle_seconds"})


@dataclass(frozen=True)
class QueuePolicy:
    """How long to wait, how often to poll, how many attempts, how many requeues."""

    max_wait_seconds: int = 600
    history_max_attempts: int = 0  # 0 = unbounded
    poll_interval_seconds: int = 2
    post_execution_timeout_seconds: int = 30
    scene_retry_budget: int = 1
    # A listed file that may still be written after its node returned is complete once its size and mtime stay
    # unchanged this long (bounded by post_execution_timeout_seconds).
    output_settle_seconds: float = 1.0

    def queue_config(self) -> dict[str, int]:
        """The contract's ``QueueConfig`` object."""
        return {
            "SceneRetryBudget": self.scene_retry_budget,
            "HistoryMaxWaitSeconds": self.max_wait_seconds,
            "HistoryMaxAttempts": self.history_max_attempts,
            "HistoryPollIntervalSeconds": self.poll_interval_seconds,
            "PostExecutionTimeoutSeconds": self.post_execution_timeout_seconds,
        }

    def as_dict(self) -> dict[str, float]:
        """Plain form for JSON."""
        return asdict(self)


def _parse(name: str, raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError("not a number")
    if isinstance(raw, int | float):
        val = float(raw)
    else:
        text = str(raw).strip()
        if not text:
            raise ValueError("empty")
        val = float(text)
    if math.isnan(val) or math.isinf(val):
        raise ValueError("not a finite number")
    if val < 0:
        raise ValueError("negative")
    if name in FRACTIONAL:
        return val
    if val != int(val):
        raise ValueError("not a whole number")
    return int(val)


def policy_from_env(env: Mapping[str, str]) -> tuple[QueuePolicy, list[str]]:
    """The policy from environment variables, and one note per invalid value (whose default is used)."""
    values: dict[str, float] = {}
    notes: list[str] = []
    for knob, (var, default, _) in KNOBS.items():
        raw = env.get(var)
        if raw is None:
            continue
        try:
            values[knob] = _parse(knob, raw)
        except ValueError as exc:
            note = f"invalid {var}={raw!r} ({exc}); using the default {default}"
            logger.error("Run Telemetry: %s", note)
            notes.append(note)
    return QueuePolicy(**values), notes


def apply_overrides(base: QueuePolicy, overrides: Mapping[str, Any] | None) -> tuple[QueuePolicy, list[str]]:
    """``base`` with a run's ``extra_data.telemetry.policy`` applied; invalid overrides are noted and ignored."""
    if not overrides:
        return base, []
    changes: dict[str, float] = {}
    notes: list[str] = []
    aliases = {key: knob for knob, (_, _, key) in KNOBS.items()}
    aliases.update({var: knob for knob, (var, _, _) in KNOBS.items()})
    for key, raw in overrides.items():
        knob = aliases.get(str(key))
        if knob is None:
            notes.append(f"unknown policy key {key!r} ignored (known: {', '.join(sorted(KNOBS))})")
            continue
        try:
            changes[knob] = _parse(knob, raw)
        except ValueError as exc:
            notes.append(f"invalid policy {key}={raw!r} ({exc}); keeping {getattr(base, knob)}")
    return replace(base, **changes), notes
