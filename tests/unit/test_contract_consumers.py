"""The contract as consumers read it: labelled fallback notes, per-attempt lines, RunId and scenes, Warnings[]."""

from __future__ import annotations

import json
import re
from typing import Any

from telemetry.models import ArtifactMetadata
from telemetry.policy import QueuePolicy
from telemetry.runs import assemble_run
from telemetry.summary import NOTE_SEPARATOR, render_summary
from telemetry.validate import validate_run


def _meta(run: ArtifactMetadata) -> dict[str, Any]:
    return json.loads(json.dumps(run.to_json_dict()))


def test_labelled_fallback_notes_count_as_present(package_run: ArtifactMetadata) -> None:
    meta = _meta(package_run)
    summary = render_summary(meta)
    assert NOTE_SEPARATOR in summary
    # Older helpers wrote `| fallback=<note>`: the note's text is on the scene's Telemetry line.
    labelled = summary.replace(NOTE_SEPARATOR, " | fallback=")
    assert validate_run(meta, labelled) == []
    # A note whose text is not on the line is still reported.
    missing = re.sub(r" \| fallback=[^|\n]*", "", labelled)
    assert any("lacks fallback note" in e for e in validate_run(meta, missing))


def test_per_attempt_lines_are_checked(package_run: ArtifactMetadata) -> None:
    meta = _meta(package_run)
    summary = render_summary(meta)
    assert validate_run(meta, summary) == []
    wrong_duration = summary.replace(
        "[Scene s1][Attempt 1] Frames=16 Duration=31.5s", "[Scene s1][Attempt 1] Frames=16 Duration=9.0s"
    )
    assert wrong_duration != summary
    errors = validate_run(meta, wrong_duration)
    assert any("[Attempt 1] Duration=9.0s does not match AttemptSummaries[0].DurationSeconds" in e for e in errors)
    wrong_frames = summary.replace("[Scene s2][Attempt 1] Frames=3 ", "[Scene s2][Attempt 1] Frames=30 ")
    assert any(
        "Frames=30 does not match AttemptSummaries[0].FrameCount=3" in e for e in validate_run(meta, wrong_frames)
    )
    dropped = "\n".join(ln for ln in summary.splitlines() if "[Scene s2][Attempt 1]" not in ln)
    assert any("no '[Scene s2][Attempt 1]' line" in e for e in validate_run(meta, dropped))


def test_a_run_without_run_id_or_scenes_is_rejected(package_run: ArtifactMetadata) -> None:
    meta = _meta(package_run)
    summary = render_summary(meta)
    no_id = {k: v for k, v in meta.items() if k != "RunId"}
    assert any("RunId is missing" in e for e in validate_run(no_id, summary))
    blank = {**meta, "RunId": "  "}
    assert any("RunId must be non-blank text" in e for e in validate_run(blank, summary))
    empty = {**meta, "Scenes": []}
    assert any("Scenes is empty" in e for e in validate_run(empty, render_summary(empty)))


def test_warnings_carry_the_frame_floor_warning_the_summary_prints(tmp_path) -> None:
    records = [
        {
            "PromptId": "p1",
            "RunId": "r",
            "SceneId": "1",
            "Tags": {"frame_floor": 10},
            "Outcome": "success",
            "QueuedAt": "2026-11-29T10:00:00.000Z",
            "EndedAt": "2026-11-29T10:00:01.000Z",
            "Markers": [{"NodeId": "4", "Prefix": "r/1", "FrameCount": 3, "State": "written"}],
        }
    ]
    meta = assemble_run("r", records, policy=QueuePolicy(), output_dir=tmp_path)
    scene = meta["Scenes"][0]
    warning = "Frame count below floor (FrameCount=3, FrameFloor=10)"
    assert warning in scene["Warnings"]
    assert f"[Scene 1] WARNING: {warning}" in render_summary(meta)
    ArtifactMetadata.model_validate(meta)
    assert validate_run(meta, render_summary(meta)) == []
