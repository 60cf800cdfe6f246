"""run-summary.txt: rendering from metadata, parsing back, and the round trip through the validator."""

from __future__ import annotations

import re
from typing import Any

import pytest

from telemetry.models import ArtifactMetadata
from telemetry.summary import format_number, parse_summary, render_summary
from telemetry.validate import validate_run

TIME_PREFIX = re.compile(r"^\[\d{2}:\d{2}:\d{2}\] ")


def test_rendered_summary_of_the_legacy_run_validates(legacy_metadata: dict[str, Any]) -> None:
    text = render_summary(legacy_metadata)
    assert validate_run(legacy_metadata, text) == []


def test_rendered_summary_of_a_package_run_validates(package_run: ArtifactMetadata) -> None:
    text = render_summary(package_run)
    assert validate_run(package_run.to_json_dict(), text) == []
    # The run exercises the bounded poll limit, both warnings and the fallback note.
    assert "pollLimit=5 |" in text
    assert "[Scene s2] WARNING: Frame count below floor (FrameCount=3, FrameFloor=16)" in text
    assert "[Scene s2] HISTORY ERROR: history not retrieved" in text
    assert " | note=nvml failed: NVML Shared Library Not Found" in text


def test_render_is_reproducible_and_every_line_after_the_title_is_timed(package_run: ArtifactMetadata) -> None:
    text = render_summary(package_run)
    assert text == render_summary(package_run.to_json_dict())
    title, *lines = text.splitlines()
    assert title == "Run summary: RunId=run-2025-11-21 Timestamp=2025-11-21T09:00:00.000+01:00"
    assert lines and all(TIME_PREFIX.match(line) for line in lines)
    # Header lines carry the run's Timestamp in UTC; scene lines their QueueEnd.
    assert lines[0].startswith("[08:00:00] Queue policy: sceneRetries=0, historyMaxWait=300s,")
    assert lines[1] == "[08:00:00] [LLM] Health check: success (url=http://localhost:11434, models=2, override=default)"
    assert "[08:01:31] [Scene s1][Attempt 1] Frames=16 Duration=31.5s Prefix=run/s1/frame" in lines
    assert any(line.startswith("[08:02:31] [Scene s2] Telemetry: ") for line in lines)


def test_telemetry_line_matches_the_contract_example(legacy_metadata: dict[str, Any]) -> None:
    line = next(x for x in render_summary(legacy_metadata).splitlines() if "[Scene scene-001] Telemetry:" in x)
    assert line == (
        "[10:23:44] [Scene scene-001] Telemetry: DurationSeconds=45.2s | MaxWaitSeconds=600s | PollIntervalSeconds=2s"
        " | HistoryAttempts=3 | pollLimit=unbounded | SceneRetryBudget=1 | PostExecutionTimeoutSeconds=30s"
        " | ExecutionSuccessDetected=true | ExecutionSuccessAt=10:23:44 | HistoryExitReason=success"
        " | VRAMBeforeMB=24000MB | VRAMAfterMB=22600MB | VRAMDeltaMB=-1400MB | gpu=NVIDIA GeForce RTX 4090"
    )


def test_notes_with_line_breaks_stay_on_the_line_and_still_validate(legacy_metadata: dict[str, Any]) -> None:
    notes = ["nvml failed: first line\r\nsecond line; used nvidia-smi instead", "a | note=looking note"]
    legacy_metadata["Scenes"][0]["Telemetry"]["System"]["FallbackNotes"] = notes
    text = render_summary(legacy_metadata)
    line = next(x for x in text.splitlines() if "[Scene scene-001] Telemetry:" in x)
    assert line.endswith(
        " | gpu=NVIDIA GeForce RTX 4090 | note=nvml failed: first line second line; used nvidia-smi instead"
        " | note=a | note=looking note"
    )
    assert validate_run(legacy_metadata, text) == []


def test_no_llm_line_without_a_health_check_and_a_skipped_line_when_skipped(legacy_metadata: dict[str, Any]) -> None:
    del legacy_metadata["LLMHealthInfo"]
    assert "[LLM]" not in render_summary(legacy_metadata)
    legacy_metadata["LLMHealthInfo"] = {"Skipped": True}
    assert "] [LLM] Health check: skipped\n" in render_summary(legacy_metadata)


def test_scene_without_attempt_summaries_gets_one_attempt_line(legacy_metadata: dict[str, Any]) -> None:
    scene = legacy_metadata["Scenes"][0]
    scene["AttemptSummaries"] = []
    text = render_summary(legacy_metadata)
    assert (
        "[10:23:44] [Scene scene-001][Attempt 1] Frames=25 Duration=45.2s Prefix=video/20251120-102201/scene-001/frame"
        in text
    )


def test_parse_legacy_summary(legacy_summary: str) -> None:
    parsed = parse_summary(legacy_summary)
    assert parsed.title == "ComfyUI story run 20251120-102201 (story-lighthouse-07)"
    assert parsed.queue_policy == {
        "sceneRetries": "1",
        "historyMaxWait": "600s",
        "historyPollInterval": "2s",
        "historyMaxAttempts": "unbounded",
        "postExecutionTimeout": "30s",
    }
    assert set(parsed.telemetry) == {"scene-001", "scene-002", "scene-003"}
    second = parsed.telemetry["scene-002"]
    assert second.fields["DurationSeconds"] == "61.3s" and second.fields["gpu"] == "NVIDIA GeForce RTX 4090"
    assert second.notes == [
        "nvidia-smi timed out after 5s; VRAM read from Get-Counter '\\GPU Adapter Memory(*)\\Dedicated Usage'",
        "GPU name from Win32_VideoController",
    ]
    assert parsed.telemetry["scene-001"].notes == []
    assert parsed.frame_floor_warnings == {"scene-002", "scene-003"}
    assert parsed.history_warnings == {"scene-003"}


def test_a_summary_without_title_keeps_its_first_line(legacy_summary: str) -> None:
    untitled = legacy_summary.split("\n", 1)[1]
    parsed = parse_summary(untitled)
    assert parsed.title == "" and parsed.queue_policy is not None


def test_the_last_telemetry_line_of_a_scene_counts() -> None:
    text = "title\n[00:00:01] [Scene a] Telemetry: pollLimit=3\n[00:00:02] [Scene a] Telemetry: pollLimit=unbounded\n"
    assert parse_summary(text).telemetry["a"].fields == {"pollLimit": "unbounded"}


@pytest.mark.parametrize(
    ("value", "text"), [(24000, "24000"), (24000.0, "24000"), (-1400.25, "-1400.2"), (0.04, "0"), (2048.5, "2048.5")]
)
def test_format_number(value: float, text: str) -> None:
    assert format_number(value) == text
