"""The run validator: the older helper's run passes, each broken variant fails with exit 2 naming scene and field."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from telemetry import cli
from telemetry.validate import validate_run, validate_run_dir

from .conftest import LEGACY_RUN

REPO = Path(__file__).resolve().parents[2]

Mutation = Callable[[dict[str, Any], list[str]], None]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m telemetry ARGS`` as a real process, from the repo."""
    return subprocess.run(
        [sys.executable, "-m", "telemetry", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def write_run(folder: Path, metadata: Any, summary: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "artifact-metadata.json").write_text(json.dumps(metadata, indent=2), encoding="utf-8")
    (folder / "run-summary.txt").write_text(summary, encoding="utf-8")
    return folder


# --- mutations: one per check -----------------------------------------------------------------------------------


def telemetry(index: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda meta: meta["Scenes"][index]["Telemetry"]


def delete(index: int, *path: str) -> Mutation:
    def mutate(meta: dict[str, Any], lines: list[str]) -> None:
        target = telemetry(index)(meta)
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def set_value(index: int, *path: str, value: Any) -> Mutation:
    def mutate(meta: dict[str, Any], lines: list[str]) -> None:
        target = telemetry(index)(meta)
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def set_scene(index: int, key: str, value: Any) -> Mutation:
    """Set a scene field; None removes it."""

    def mutate(meta: dict[str, Any], lines: list[str]) -> None:
        if value is None:
            del meta["Scenes"][index][key]
        else:
            meta["Scenes"][index][key] = value

    return mutate


def edit_summary(old: str, new: str, *, scene: str | None = None) -> Mutation:
    def mutate(meta: dict[str, Any], lines: list[str]) -> None:
        hits = [i for i, line in enumerate(lines) if old in line and (scene is None or f"[Scene {scene}]" in line)]
        assert hits, f"fixture has no line with {old!r}"
        lines[hits[0]] = lines[hits[0]].replace(old, new, 1)

    return mutate


def drop_line(fragment: str) -> Mutation:
    def mutate(meta: dict[str, Any], lines: list[str]) -> None:
        before = len(lines)
        lines[:] = [line for line in lines if fragment not in line]
        assert len(lines) < before, f"fixture has no line with {fragment!r}"

    return mutate


def both(*mutations: Mutation) -> Mutation:
    def mutate(meta: dict[str, Any], lines: list[str]) -> None:
        for mutation in mutations:
            mutation(meta, lines)

    return mutate


NUMERIC = [
    "DurationSeconds",
    "MaxWaitSeconds",
    "PollIntervalSeconds",
    "HistoryAttempts",
    "HistoryAttemptLimit",
    "PostExecutionTimeoutSeconds",
    "SceneRetryBudget",
]

CASES: list[tuple[str, Mutation, str]] = [
    ("telemetry-missing", set_scene(1, "Telemetry", None), "Scene scene-002: Telemetry is missing"),
    *[(f"{name}-missing", delete(1, name), f"Scene scene-002: Telemetry.{name} is missing") for name in NUMERIC],
    (
        "duration-not-numeric",
        set_value(0, "DurationSeconds", value="45.2s"),
        "Scene scene-001: Telemetry.DurationSeconds must be a number, found '45.2s'",
    ),
    (
        "attempts-bool",
        set_value(2, "HistoryAttempts", value=True),
        "Scene scene-003: Telemetry.HistoryAttempts must be a number, found true",
    ),
    (
        "exit-reason-unknown",
        set_value(2, "HistoryExitReason", value="timeout"),
        "Scene scene-003: Telemetry.HistoryExitReason 'timeout' is not one of success, maxWait, attemptLimit, "
        "postExecution, unknown",
    ),
    ("exit-reason-missing", delete(2, "HistoryExitReason"), "Scene scene-003: Telemetry.HistoryExitReason is missing"),
    (
        "success-detected-missing",
        delete(0, "ExecutionSuccessDetected"),
        "Scene scene-001: Telemetry.ExecutionSuccessDetected is missing",
    ),
    (
        "success-at-unset",
        set_value(0, "ExecutionSuccessAt", value=None),
        "Scene scene-001: Telemetry.ExecutionSuccessAt is not set although ExecutionSuccessDetected is true",
    ),
    (
        "success-at-not-iso",
        set_value(1, "ExecutionSuccessAt", value="yesterday"),
        "Scene scene-002: Telemetry.ExecutionSuccessAt 'yesterday' is not an ISO 8601 time",
    ),
    (
        "post-execution-reached-missing",
        delete(2, "HistoryPostExecutionTimeoutReached"),
        "Scene scene-003: Telemetry.HistoryPostExecutionTimeoutReached is missing",
    ),
    ("gpu-name-blank", set_value(0, "GPU", "Name", value="  "), "Scene scene-001: Telemetry.GPU.Name is blank"),
    ("gpu-name-missing", delete(1, "GPU", "Name"), "Scene scene-002: Telemetry.GPU.Name is missing"),
    ("gpu-missing", delete(1, "GPU"), "Scene scene-002: Telemetry.GPU is missing"),
    *[
        (
            f"{key}-not-numeric",
            set_value(2, "GPU", key, value="2048MB"),
            f"Scene scene-003: Telemetry.GPU.{key} must be a number, found '2048MB'",
        )
        for key in ("VramBeforeMB", "VramAfterMB", "VramDeltaMB")
    ],
    (
        "fallback-notes-not-a-list",
        set_value(1, "System", "FallbackNotes", value="GPU name from Win32_VideoController"),
        "Scene scene-002: Telemetry.System.FallbackNotes must be a list, found 'GPU name from Win32_VideoController'",
    ),
    (
        "fallback-notes-missing",
        delete(0, "System", "FallbackNotes"),
        "Scene scene-001: Telemetry.System.FallbackNotes is missing",
    ),
    (
        "metadata-poll-limit-mismatch",
        set_value(0, "pollLimit", value="5"),
        "Scene scene-001: Telemetry.pollLimit '5' does not match Telemetry.HistoryAttemptLimit=0",
    ),
    # --- summary against metadata ---
    (
        "telemetry-line-missing",
        drop_line("[Scene scene-002] Telemetry:"),
        "Scene scene-002: run-summary.txt has no '[Scene scene-002] Telemetry:' line",
    ),
    (
        "summary-poll-limit-mismatch",
        both(set_value(2, "HistoryAttemptLimit", value=5), set_value(2, "pollLimit", value="5")),
        "Scene scene-003: run-summary.txt pollLimit=unbounded does not match Telemetry.HistoryAttemptLimit=5",
    ),
    (
        "summary-retry-budget-mismatch",
        edit_summary("SceneRetryBudget=1", "SceneRetryBudget=2", scene="scene-001"),
        "Scene scene-001: run-summary.txt SceneRetryBudget=2 does not match Telemetry.SceneRetryBudget=1",
    ),
    (
        "summary-duration-mismatch",
        edit_summary("DurationSeconds=45.2s", "DurationSeconds=45.3s"),
        "Scene scene-001: run-summary.txt DurationSeconds=45.3s does not match Telemetry.DurationSeconds=45.187",
    ),
    (
        "summary-fallback-note-missing",
        edit_summary(" | note=GPU name from Win32_VideoController", ""),
        "Scene scene-002: run-summary.txt Telemetry line lacks fallback note 'GPU name from Win32_VideoController'",
    ),
    (
        "metadata-fallback-note-not-in-summary",
        set_value(0, "System", "FallbackNotes", value=["nvml failed: Driver Not Loaded; used nvidia-smi instead"]),
        "Scene scene-001: run-summary.txt Telemetry line lacks fallback note 'nvml failed: Driver Not Loaded",
    ),
    ("queue-policy-missing", drop_line("Queue policy:"), "run-summary.txt has no 'Queue policy:' line"),
    (
        "queue-policy-retries",
        edit_summary("sceneRetries=1", "sceneRetries=2"),
        "run-summary.txt Queue policy sceneRetries=2 does not match QueueConfig.SceneRetryBudget=1",
    ),
    (
        "queue-policy-max-wait",
        edit_summary("historyMaxWait=600s", "historyMaxWait=300s"),
        "run-summary.txt Queue policy historyMaxWait=300s does not match QueueConfig.HistoryMaxWaitSeconds=600",
    ),
    (
        "queue-policy-poll-interval",
        edit_summary("historyPollInterval=2s", "historyPollInterval=5s"),
        "run-summary.txt Queue policy historyPollInterval=5s does not match QueueConfig.HistoryPollIntervalSeconds=2",
    ),
    (
        "queue-policy-max-attempts",
        edit_summary("historyMaxAttempts=unbounded", "historyMaxAttempts=10"),
        "run-summary.txt Queue policy historyMaxAttempts=10 does not match QueueConfig.HistoryMaxAttempts=0",
    ),
    (
        "queue-policy-post-execution",
        edit_summary("postExecutionTimeout=30s", "postExecutionTimeout=60s"),
        "run-summary.txt Queue policy postExecutionTimeout=60s does not match QueueConfig.PostExecutionTimeoutSeconds=30",
    ),
    (
        "queue-policy-key-missing",
        edit_summary(", postExecutionTimeout=30s", ""),
        "run-summary.txt Queue policy has no postExecutionTimeout= (QueueConfig.PostExecutionTimeoutSeconds=30)",
    ),
    (
        "frame-floor-warning-missing",
        drop_line("[Scene scene-002] WARNING: Frame count below floor"),
        "Scene scene-002: run-summary.txt has no 'WARNING: Frame count below floor' line although FrameCount=22 < "
        "FrameFloor=25",
    ),
    (
        "frame-floor-newly-below",
        set_scene(0, "FrameCount", 20),
        "Scene scene-001: run-summary.txt has no 'WARNING: Frame count below floor' line although FrameCount=20",
    ),
    (
        "history-warning-missing",
        drop_line("[Scene scene-003] HISTORY ERROR"),
        "Scene scene-003: run-summary.txt has no 'HISTORY WARNING' or 'HISTORY ERROR' line although HistoryRetrieved "
        "is false",
    ),
    (
        "history-newly-not-retrieved",
        set_scene(1, "HistoryRetrieved", False),
        "Scene scene-002: run-summary.txt has no 'HISTORY WARNING' or 'HISTORY ERROR' line",
    ),
    # --- the JSON Schema ---
    (
        "schema-flf2v-source",
        set_value(1, "FLF2VSource", value="sideways"),
        "Scene scene-002: Telemetry.FLF2VSource: 'sideways' is not one of ['keyframe', 'last-frame'] (JSON Schema)",
    ),
    (
        "schema-queue-config-type",
        lambda meta, lines: meta["QueueConfig"].__setitem__("HistoryMaxWaitSeconds", "600"),
        "artifact-metadata.json: QueueConfig.HistoryMaxWaitSeconds: '600' is not of type 'integer' (JSON Schema)",
    ),
    (
        "schema-scene-id-missing",
        lambda meta, lines: meta["Scenes"][2].pop("SceneId"),
        "Scene #3: SceneId: 'SceneId' is a required property (JSON Schema)",
    ),
    (
        "schema-history-errors-not-list",
        set_scene(2, "HistoryErrors", "History for prompt not available"),
        "Scene scene-003: HistoryErrors: 'History for prompt not available' is not of type 'array' (JSON Schema)",
    ),
]


@pytest.fixture
def legacy_lines(legacy_summary: str) -> list[str]:
    return legacy_summary.splitlines()


def test_legacy_run_is_valid(legacy_metadata: dict[str, Any], legacy_summary: str) -> None:
    assert validate_run(legacy_metadata, legacy_summary) == []
    report = validate_run_dir(LEGACY_RUN)
    assert report.valid and report.errors == [] and report.scene_count == 3


@pytest.mark.parametrize(("mutation", "expected"), [(m, e) for _, m, e in CASES], ids=[c[0] for c in CASES])
def test_each_broken_variant_fails_with_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    legacy_metadata: dict[str, Any],
    legacy_lines: list[str],
    mutation: Mutation,
    expected: str,
) -> None:
    assert validate_run(legacy_metadata, "\n".join(legacy_lines)) == []  # the variant differs by this one change
    mutation(legacy_metadata, legacy_lines)
    errors = validate_run(copy.deepcopy(legacy_metadata), "\n".join(legacy_lines))
    assert any(expected in error for error in errors), errors
    run_dir = write_run(tmp_path / "run", legacy_metadata, "\n".join(legacy_lines) + "\n")
    assert cli.main(["validate", str(run_dir)]) == 2
    out = capsys.readouterr().out
    assert expected in out
    assert out.splitlines() == errors  # one failed check per line, nothing else on stdout


def test_every_failed_check_is_listed(legacy_metadata: dict[str, Any], legacy_lines: list[str]) -> None:
    chosen = [
        "gpu-name-blank",
        "telemetry-missing",
        "exit-reason-unknown",
        "queue-policy-missing",
        "schema-history-errors-not-list",
    ]
    cases = {name: (mutation, expected) for name, mutation, expected in CASES}
    for name in chosen:
        cases[name][0](legacy_metadata, legacy_lines)
    errors = validate_run(legacy_metadata, "\n".join(legacy_lines))
    for name in chosen:
        assert any(cases[name][1] in error for error in errors), (name, errors)
    assert len(errors) == len(set(errors)) == len(chosen)


def test_schema_findings_do_not_repeat_a_check(legacy_metadata: dict[str, Any], legacy_summary: str) -> None:
    del legacy_metadata["Scenes"][0]["Telemetry"]["DurationSeconds"]
    legacy_metadata["Scenes"][0]["Telemetry"]["GPU"]["VramAfterMB"] = "x"
    errors = validate_run(legacy_metadata, legacy_summary)
    assert errors == [
        "Scene scene-001: Telemetry.DurationSeconds is missing",
        "Scene scene-001: Telemetry.GPU.VramAfterMB must be a number, found 'x'",
    ]


def test_top_level_not_an_object() -> None:
    assert validate_run([1, 2], "") == ["artifact-metadata.json: the top level must be a JSON object, found list"]


def test_utf16_summary_from_windows_powershell_is_read(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(LEGACY_RUN, run_dir)
    text = (LEGACY_RUN / "run-summary.txt").read_bytes().decode("utf-8-sig")
    (run_dir / "run-summary.txt").write_bytes(text.encode("utf-16"))  # with BOM, as Out-File writes it
    assert validate_run_dir(run_dir).valid


def test_json_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "--json", str(LEGACY_RUN)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {"RunDir": str(LEGACY_RUN), "Valid": True, "Errors": [], "SceneCount": 3}


# --- as a real process --------------------------------------------------------------------------------------------


def test_cli_process_valid_run_exits_0() -> None:
    result = run_cli("validate", str(LEGACY_RUN))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid run (3 scenes)" in result.stdout


def test_cli_process_broken_run_exits_2_listing_each_check(
    tmp_path: Path, legacy_metadata: dict[str, Any], legacy_summary: str
) -> None:
    legacy_metadata["Scenes"][0]["Telemetry"]["GPU"]["Name"] = ""
    legacy_metadata["Scenes"][2]["Telemetry"]["HistoryExitReason"] = "timeout"
    run_dir = write_run(tmp_path / "run", legacy_metadata, legacy_summary.replace("sceneRetries=1", "sceneRetries=3"))
    result = run_cli("validate", str(run_dir))
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        "Scene scene-001: Telemetry.GPU.Name is blank",
        "Scene scene-003: Telemetry.HistoryExitReason 'timeout' is not one of success, maxWait, attemptLimit, "
        "postExecution, unknown",
        "run-summary.txt Queue policy sceneRetries=3 does not match QueueConfig.SceneRetryBudget=1",
    ]
    assert "Traceback" not in result.stdout + result.stderr


def _broken_json(run_dir: Path) -> None:
    (run_dir / "artifact-metadata.json").write_text('{"RunId": "x",\n  "Scenes": [}', encoding="utf-8")


def _no_metadata(run_dir: Path) -> None:
    (run_dir / "artifact-metadata.json").unlink()


def _no_summary(run_dir: Path) -> None:
    (run_dir / "run-summary.txt").unlink()


def _binary_summary(run_dir: Path) -> None:
    (run_dir / "run-summary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd")


def _metadata_is_a_folder(run_dir: Path) -> None:
    (run_dir / "artifact-metadata.json").unlink()
    (run_dir / "artifact-metadata.json").mkdir()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_broken_json, "artifact-metadata.json is not valid JSON: Expecting value at line 2, column 14."),
        (_no_metadata, "artifact-metadata.json is missing from "),
        (_no_summary, "run-summary.txt is missing from "),
        (_binary_summary, "run-summary.txt is not UTF-8 text (byte 0x89 at offset 0 does not decode)."),
        (_metadata_is_a_folder, "artifact-metadata.json is a folder, not a file."),
    ],
    ids=["malformed-json", "missing-metadata", "missing-summary", "unreadable-summary", "metadata-is-a-folder"],
)
def test_cli_process_unreadable_input_is_one_sentence(
    tmp_path: Path, damage: Callable[[Path], None], message: str
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(LEGACY_RUN, run_dir)
    damage(run_dir)
    result = run_cli("validate", str(run_dir))
    assert result.returncode == 2
    assert len(result.stdout.splitlines()) == 1 and message in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_cli_process_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    result = run_cli("validate", str(missing))
    assert result.returncode != 0
    assert result.stdout.strip() == f"Run folder {missing} does not exist."
    assert "Traceback" not in result.stdout + result.stderr
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    result = run_cli("validate", str(a_file))
    assert result.returncode == 2 and "is not a folder" in result.stdout
