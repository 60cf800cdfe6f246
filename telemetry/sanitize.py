"""Client values that every record must be able to carry: checks at submission, and a reduction for what got in.

One place decides the limits (``TagLimits``): text must be valid Unicode (no lone surrogates: they cannot be written as
UTF-8, so a record holding one cannot be stored or served), nesting at most 32 levels, all tags at most 1 MB as JSON,
numbers finite and integers within 64 bits. ``tags_problem`` names the first value that breaks a limit (the POST /prompt
middleware answers 400 with it); ``clean_value`` turns anything into a value that serialises (lone surrogates escaped
as ``\\udcff`` text, non-finite numbers and huge integers as text, non-text keys as text, deeper levels replaced by a
short text), for values that reached a record by another way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["TAG_LIMITS", "TagLimits", "clean_value", "tags_problem", "text_problem"]


@dataclass(frozen=True)
class TagLimits:
    """Limits on ``extra_data.telemetry`` (shown in ``GET /telemetry`` under ``Policy.TagLimits``)."""

    max_depth: int = 32
    max_bytes: int = 1_000_000  # every tag but the story
    max_story_bytes: int = 16_000_000  # the run's story (stored once per run, not in every record)
    max_int: int = 2**63 - 1

    def as_dict(self) -> dict[str, int]:
        """Plain form for JSON."""
        return {
            "MaxDepth": self.max_depth,
            "MaxBytes": self.max_bytes,
            "MaxStoryBytes": self.max_story_bytes,
            "MaxInteger": self.max_int,
        }


TAG_LIMITS = TagLimits()


def text_problem(value: str) -> str | None:
    """Why ``value`` is not valid text (a lone surrogate, which UTF-8 cannot hold), or ``None``."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds a lone surrogate {value[exc.start]!r} at character {exc.start}; send valid Unicode text"
    return None


def _describe(value: Any) -> str:
    return type(value).__name__


def tags_problem(
    tags: Any, name: str = "extra_data.telemetry", limits: TagLimits = TAG_LIMITS
) -> tuple[str, str] | None:
    """(field, message) for the first value of ``tags`` that breaks a limit, or ``None``. Iterative: any depth is safe."""
    sizes = {"": 0, "story": 0}  # the story has a budget of its own
    story_path = f"{name}.story"
    stack: list[tuple[str, Any, int, str]] = [(name, tags, 0, name)]
    while stack:
        path, value, depth, top = stack.pop()
        part = "story" if top == story_path else ""
        size = 0
        if value is None or isinstance(value, bool):
            size += 5
        elif isinstance(value, str):
            problem = text_problem(value)
            if problem:
                return path, f"{path} {problem}"
            size += len(value.encode("utf-8")) + 2
        elif isinstance(value, int):
            if abs(value) > limits.max_int:
                return path, f"{path} is an integer beyond ±{limits.max_int} (64 bits); send it as text"
            size += 20
        elif isinstance(value, float):
            if not math.isfinite(value):
                return path, f"{path} must be a finite number, got {value!r}"
            size += 24
        elif isinstance(value, Mapping | list | tuple):
            if depth >= limits.max_depth:
                where = path if len(path) <= 120 else path[:60] + "…" + path[-40:]
                return top, (
                    f"{top} is nested deeper than the limit of {limits.max_depth} levels for tags (at {where}); "
                    "flatten it"
                )
            size += 2
            if isinstance(value, Mapping):
                for key, item in value.items():
                    if not isinstance(key, str):
                        return path, f"{path} has a key that is not text ({_describe(key)} {key!r})"
                    problem = text_problem(key)
                    if problem:
                        return path, f"{path} has a key that {problem}"
                    size += len(key.encode("utf-8")) + 4
                    stack.append((f"{path}.{key}", item, depth + 1, top if depth else f"{path}.{key}"))
            else:
                for i, item in enumerate(value):
                    stack.append((f"{path}[{i}]", item, depth + 1, top if depth else f"{path}[{i}]"))
        else:
            return path, f"{path} must be JSON (text, number, true/false, null, list or object), not {_describe(value)}"
        sizes[part] += size
        if sizes[""] > limits.max_bytes:
            return name, (
                f"{name} is larger than the limit of {limits.max_bytes} bytes (1 MB) for tags; keep large data out of them"
            )
        if sizes["story"] > limits.max_story_bytes:
            return story_path, f"{story_path} is larger than the limit of {limits.max_story_bytes} bytes for a story"
    return None


def clean_text(value: str) -> str:
    """``value`` with lone surrogates escaped as ``\\udcff`` text (valid text unchanged)."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def clean_value(value: Any, max_depth: int = TAG_LIMITS.max_depth, limits: TagLimits = TAG_LIMITS) -> Any:
    """A copy of ``value`` that any JSON serialiser accepts (see the module docstring); at most ``max_depth`` levels."""

    def walk(v: Any, depth: int) -> Any:
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, str):
            return clean_text(v)
        if isinstance(v, int):
            return int(v) if abs(v) <= limits.max_int else f"<integer of {v.bit_length()} bits>"
        if isinstance(v, float):
            return v if math.isfinite(v) else str(v)
        if isinstance(v, Mapping | list | tuple | set | frozenset):
            if depth >= max_depth:
                return f"<nested deeper than {max_depth} levels: left out>"
            if isinstance(v, Mapping):
                return {clean_text(k if isinstance(k, str) else repr(k)): walk(x, depth + 1) for k, x in v.items()}
            return [walk(x, depth + 1) for x in v]
        return f"<{_describe(v)}>"

    return walk(value, 0)
