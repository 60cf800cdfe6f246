"""run-summary.txt from plain metadata: the same text the contract model gives, and parsing it back as before."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from telemetry.models import ArtifactMetadata, parse_iso8601
from telemetry.summary import (
    FIELD_SEPARATOR,
    NOTE_SEPARATOR,
    ParsedSummary,
    TelemetryLine,
    iso_clock,
    parse_summary,
    render_summary,
)

# Values a mutated field takes: every JSON type, edge numbers, times, text with line breaks.
PALETTE: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2.5,
    -2.5,
    3.0,
    float("nan"),
    float("inf"),
    10**20,
    "",
    "x",
    "12",
    "line\nbreak",
    "2026-01-01T00:00:00.000Z",
    "2026-02-30T00:00:00.000Z",
    [],
    ["a"],
    [1],
    {},
    {"QueueEnd": "2026-01-01T05:00:00Z"},
]
DELETE = object()

# Fields every scene shows on its lines whatever their values (AttemptSummaries are present in both fixtures).
SHOWN = [
    ("SceneId",),
    ("FrameCount",),
    ("FrameFloor",),
    ("FramePrefix",),
    ("HistoryRetrieved",),
    ("AttemptSummaries",),
    ("AttemptSummaries", 0, "Attempt"),
    ("AttemptSummaries", 0, "FrameCount"),
    ("AttemptSummaries", 0, "DurationSeconds"),
    ("AttemptSummaries", 0, "FramePrefix"),
    ("AttemptSummaries", 0, "QueueEnd"),
    ("Telemetry",),
    *[
        ("Telemetry", key)
        for key in (
            "DurationSeconds",
            "MaxWaitSeconds",
            "PollIntervalSeconds",
            "HistoryAttempts",
            "HistoryAttemptLimit",
            "SceneRetryBudget",
            "PostExecutionTimeoutSeconds",
            "ExecutionSuccessDetected",
            "HistoryExitReason",
            "QueueEnd",
            "GPU",
            "System",
        )
    ],
    *[("Telemetry", "GPU", key) for key in ("Name", "VramBeforeMB", "VramAfterMB", "VramDeltaMB")],
    ("Telemetry", "System", "FallbackNotes"),
]


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path in ``obj`` (lists: their first two items), snapshots left out."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj[:2]) if isinstance(obj, list) else ()
    for key, value in items:
        if key in ("Before", "After"):
            continue
        yield (*prefix, key)
        yield from paths(value, (*prefix, key))


def mutated(meta: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(meta)
    target = out
    for key in path[:-1]:
        target = target[key]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except ValidationError:
        return "invalid", None


def variants(base: dict[str, Any]) -> Iterator[tuple[tuple[Any, ...], Any, dict[str, Any]]]:
    for path in paths(base["Scenes"], ("Scenes",)):
        for value in [*PALETTE, DELETE]:
            yield path, value, mutated(base, path, value)


@pytest.fixture(params=["legacy", "package"])
def base(request: pytest.FixtureRequest, legacy_metadata: dict[str, Any], package_run: ArtifactMetadata) -> dict:
    return legacy_metadata if request.param == "legacy" else package_run.to_json_dict()


def test_plain_rendering_equals_the_models_whenever_the_model_accepts(base: dict[str, Any]) -> None:
    compared = rejected_shown = 0
    for path, value, meta in variants(base):
        via_model = outcome(lambda m: render_summary(ArtifactMetadata.model_validate(m)), meta)
        plain = outcome(render_summary, meta)
        if via_model[0] == "ok":
            assert plain == via_model, (path, value)
            compared += 1
        elif path[2:] in SHOWN:
            # A field the summary shows, in a form the model refuses: rendering refuses it the same way.
            assert plain == ("invalid", None), (path, value)
            rejected_shown += 1
    assert compared > 300 and rejected_shown > 100  # the variants exercise both sides


def test_a_field_the_summary_does_not_show_is_not_validated(legacy_metadata: dict[str, Any]) -> None:
    legacy_metadata["Scenes"][0]["Title"] = 5  # the model wants text; no line shows the title
    with pytest.raises(ValidationError):
        ArtifactMetadata.model_validate(legacy_metadata)
    text = render_summary(legacy_metadata)
    legacy_metadata["Scenes"][0]["Title"] = "5"
    assert text == render_summary(legacy_metadata)


def test_run_level_fields_are_still_validated(legacy_metadata: dict[str, Any]) -> None:
    legacy_metadata["QueueConfig"]["HistoryMaxAttempts"] = -1
    with pytest.raises(ValidationError, match="HistoryMaxAttempts"):
        render_summary(legacy_metadata)
    del legacy_metadata["Scenes"]
    with pytest.raises(ValidationError, match="Scenes"):
        render_summary(legacy_metadata)


@pytest.mark.parametrize(
    "text",
    [
        "2026-01-01T10:23:44.123Z",
        "2026-01-01T23:59:59.999Z",
        "2026-02-30T10:00:00.000Z",
        "2026-01-01T24:00:00.000Z",
        "2026-01-01T10:60:00.000Z",
        "2025-11-20T10:23:44.4821337Z",
        "2025-11-20T10:23:44+01:00",
        "2025-11-20 10:23",
        " 2025-11-20T10:23:44.000Z ",
        "2026-01-01T1٠:00:00.000Z",
        "yesterday",
        "",
    ],
)
def test_iso_clock_agrees_with_parse_iso8601(text: str) -> None:
    try:
        expected: str | None = parse_iso8601(text).strftime("%H:%M:%S")
    except ValueError:
        expected = None
    assert iso_clock(text) == expected


# --- parsing: the same result as the regular-expression-only parser it replaced -----------------------------------

_TIME = re.compile(r"^\[(\d{2}:\d{2}:\d{2})\] ")
_ATTEMPT = re.compile(
    r"^\[Scene (?P<id>.+?)\]\[Attempt (?P<n>\d+)\] Frames=(?P<frames>\S*) Duration=(?P<duration>\S*?)s?(?: |$)"
)
_TEL = re.compile(r"^\[Scene (?P<id>.+?)\] Telemetry: (?P<body>.*)$")
_FLOOR = re.compile(r"^\[Scene (?P<id>.+?)\] WARNING: Frame count below floor\b")
_HIST = re.compile(r"^\[Scene (?P<id>.+?)\] HISTORY (?:WARNING|ERROR)\b")


def reference_parse(text: str) -> ParsedSummary:
    """The parser as it was before the fixed-text tests were put in front of the expressions."""

    def pairs(body: str, separator: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for part in body.split(separator):
            key, eq, value = part.partition("=")
            if eq:
                out.setdefault(key.strip(), value.strip())
        return out

    raw_lines = text.splitlines()
    has_title = bool(raw_lines) and not _TIME.match(raw_lines[0])
    parsed = ParsedSummary(title=raw_lines[0] if has_title else "")
    for raw in raw_lines[1:] if has_title else raw_lines:
        content = _TIME.sub("", raw, count=1)
        parsed.lines.append(content)
        if content.startswith("Queue policy: "):
            parsed.queue_policy = pairs(content[len("Queue policy: ") :], ",")
        elif match := _ATTEMPT.match(content):
            parsed.attempts[(match["id"], int(match["n"]))] = (match["frames"], match["duration"])
        elif match := _TEL.match(content):
            body = match["body"]
            head, _, tail = body.partition(NOTE_SEPARATOR)
            notes = tail.split(NOTE_SEPARATOR) if tail or NOTE_SEPARATOR in body else []
            parsed.telemetry[match["id"]] = TelemetryLine(
                scene_id=match["id"], text=body, fields=pairs(head, FIELD_SEPARATOR), notes=notes
            )
        elif match := _FLOOR.match(content):
            parsed.frame_floor_warnings.add(match["id"])
        elif match := _HIST.match(content):
            parsed.history_warnings.add(match["id"])
    return parsed


TRICKY = "\n".join(
    [
        "[00:00:01] Queue policy: sceneRetries=1 , historyMaxWait = 600s,historyMaxWait=1s, bare",
        "[00:00:02] [Scene a][Attempt 1] Frames=1 Prefix=x] Telemetry: pollLimit=3",
        "[00:00:03] [Scene b] Telemetry:  pollLimit = 5  |  pollLimit=7 | x | =y | note=kept | note=",
        "[00:00:04] [Scene c] Telemetry: a=1 | note=",
        "[00:00:05] [Scene ] Telemetry: a=1",
        "[Scene d] Telemetry: untimed=1",
        "[00:00:06][Scene e] Telemetry: unspaced=1",
        "[١٢:٠٠:٠٠] [Scene f] WARNING: Frame count below floor (FrameCount=1, FrameFloor=2)",
        "[00:00:07] [Scene g] WARNING: Frame count below floorish",
        "[00:00:08] [Scene h] HISTORY WARNINGS are not a history line",
        "[00:00:09] [Scene i] HISTORY ERROR: history not retrieved",
        "[00:00:10] [Scene j] HISTORY WARNING",
        "[00:00:11] [Scene k\u2028l] Telemetry: split=by the separator",
        "[00:00:12] [Scene] Telemetry: no id",
        "[00:00:13] [Scene m] Telemetry: first=1",
        "[00:00:14] [Scene m] Telemetry: first=2",
        "\x0c[00:00:15] [Scene n] Telemetry: after a form feed",
    ]
)


@pytest.mark.parametrize("has_title", [True, False])
def test_parse_summary_matches_the_reference_parser(
    has_title: bool, legacy_summary: str, package_run: ArtifactMetadata, legacy_metadata: dict[str, Any]
) -> None:
    for text in (legacy_summary, render_summary(package_run), render_summary(legacy_metadata), TRICKY):
        if not has_title:
            text = text.split("\n", 1)[1]
        assert parse_summary(text) == reference_parse(text)
    parsed = parse_summary(TRICKY)
    assert set(parsed.telemetry) == {"a][Attempt 1] Frames=1 Prefix=x", "b", "c", "d", "n", "m"}
    assert parsed.telemetry["b"].fields == {"pollLimit": "5", "": "y"} and parsed.telemetry["b"].notes == ["kept", ""]
    assert parsed.telemetry["m"].fields == {"first": "2"}
    assert parsed.frame_floor_warnings == {"f"} and parsed.history_warnings == {"i", "j"}
    assert parsed.queue_policy == {"sceneRetries": "1", "historyMaxWait": "600s"}
