"""The contract models and the committed JSON Schema."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from telemetry import cli
from telemetry.models import (
    ArtifactMetadata,
    GpuBlock,
    Telemetry,
    bytes_to_mib,
    iso_utc,
    parse_iso8601,
    poll_limit_text,
)
from telemetry.schema import SCHEMA_PATH, generate_schema, load_schema, render_schema, schema_drift

REPO = Path(__file__).resolve().parents[2]


def test_legacy_run_parses_and_keeps_unknown_fields(legacy_metadata: dict[str, Any]) -> None:
    run = ArtifactMetadata.model_validate(legacy_metadata)
    assert [s.scene_id for s in run.scenes] == ["scene-001", "scene-002", "scene-003"]
    assert run.scenes[0].telemetry.gpu.vram_delta_mb == -1400
    dumped = run.to_json_dict()
    assert dumped["HelperVersion"] == "1.4.2"
    assert dumped["Scenes"][0]["Telemetry"]["CpuPercentAvg"] == 19.4
    assert dumped["Scenes"][0]["Telemetry"]["GPU"]["Driver"] == "566.14"
    # An older snapshot shape survives untouched.
    assert dumped["Scenes"][0]["Telemetry"]["System"]["Before"]["RamFreeMB"] == 41211


def test_dump_uses_contract_names_and_leaves_out_unset_fields(package_run: ArtifactMetadata) -> None:
    data = package_run.to_json_dict()
    telemetry = data["Scenes"][0]["Telemetry"]
    assert {"DurationSeconds", "pollLimit", "HistoryExitReason", "GPU", "System"} <= telemetry.keys()
    assert {"VramBeforeMB", "VramAfterMB", "VramDeltaMB", "PeakVramMB", "Source"} <= telemetry["GPU"].keys()
    assert telemetry["System"]["Before"]["Device"]["CudaIndex"] == 0
    assert "ForcedCopyDebugPath" not in telemetry  # None is left out, not written as null
    assert "duration_seconds" not in telemetry
    # The dump reads back into an equal model.
    assert ArtifactMetadata.model_validate(data) == package_run


@pytest.mark.parametrize(("limit", "expected"), [(0, "unbounded"), (5, "5")])
def test_poll_limit_is_derived_from_the_attempt_limit(
    legacy_metadata: dict[str, Any], limit: int, expected: str
) -> None:
    raw = copy.deepcopy(legacy_metadata["Scenes"][0]["Telemetry"])
    raw["HistoryAttemptLimit"] = limit
    del raw["pollLimit"]
    assert Telemetry.model_validate(raw).to_json_dict()["pollLimit"] == expected
    assert poll_limit_text(limit) == expected


@pytest.mark.parametrize("field", ["DurationSeconds", "HistoryExitReason", "GPU", "System", "SceneRetryBudget"])
def test_telemetry_requires_what_the_validator_requires(legacy_metadata: dict[str, Any], field: str) -> None:
    raw = copy.deepcopy(legacy_metadata["Scenes"][0]["Telemetry"])
    del raw[field]
    with pytest.raises(ValidationError, match=field):
        Telemetry.model_validate(raw)


def test_gpu_block_requires_name_and_mb_figures() -> None:
    with pytest.raises(ValidationError, match="VramDeltaMB"):
        GpuBlock.model_validate({"Name": "cpu", "VramBeforeMB": 1, "VramAfterMB": 1})
    with pytest.raises(ValidationError, match="Name"):
        GpuBlock.model_validate({"VramBeforeMB": 1, "VramAfterMB": 1, "VramDeltaMB": 0})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-11-20T10:23:44.0917263Z", datetime(2025, 11, 20, 10, 23, 44, 91726, tzinfo=timezone.utc)),
        ("2025-11-20T11:23:44+01:00", datetime(2025, 11, 20, 10, 23, 44, tzinfo=timezone.utc)),
        ("2025-11-20T05:53:44.5-0430", datetime(2025, 11, 20, 10, 23, 44, 500000, tzinfo=timezone.utc)),
        ("2025-11-20 10:23:44", datetime(2025, 11, 20, 10, 23, 44, tzinfo=timezone.utc)),
        ("2025-11-20T10:23Z", datetime(2025, 11, 20, 10, 23, tzinfo=timezone.utc)),
    ],
)
def test_parse_iso8601_reads_both_writers(text: str, expected: datetime) -> None:
    assert parse_iso8601(text) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "10:23:44", "2025-11-20", "2025-13-40T10:00:00Z"])
def test_parse_iso8601_rejects_what_is_not_a_time(text: str) -> None:
    with pytest.raises(ValueError):
        parse_iso8601(text)


def test_iso_utc_writes_utc_with_z() -> None:
    moment = datetime(2025, 11, 20, 11, 23, 44, 91726, tzinfo=timezone(timedelta(hours=1)))
    assert iso_utc(moment) == "2025-11-20T10:23:44.091Z"
    assert iso_utc(datetime(2025, 1, 2, 3, 4, 5)) == "2025-01-02T03:04:05.000Z"
    assert parse_iso8601(iso_utc(moment)) == moment.replace(microsecond=91000)


def test_bytes_to_mib_divides_by_1048576_and_keeps_one_decimal() -> None:
    assert bytes_to_mib(25165824000) == 24000
    assert bytes_to_mib(1048576 * 1.25) == 1.2  # round half to even on the decimal
    assert bytes_to_mib(123456789) == 117.7


# --- the JSON Schema --------------------------------------------------------------------------------------------


def test_committed_schema_equals_what_the_models_generate() -> None:
    assert json.loads(SCHEMA_PATH.read_text(encoding="utf-8")) == generate_schema()
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render_schema()
    assert schema_drift() is None


def test_schema_drift_is_reported_for_a_changed_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    schema = load_schema()
    schema["$defs"]["GpuBlock"]["required"].remove("Name")
    stale = tmp_path / "stale.schema.json"
    stale.write_text(render_schema(schema), encoding="utf-8")
    assert "differs" in (schema_drift(stale) or "")
    assert cli.main(["schema", "--check", "--schema-file", str(stale)]) == 1
    assert "differs" in capsys.readouterr().err
    assert "does not exist" in (schema_drift(tmp_path / "absent.json") or "")


def test_schema_write_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out" / "schema.json"
    assert cli.main(["schema", "--write", "--schema-file", str(target)]) == 0
    assert cli.main(["schema", "--check", "--schema-file", str(target)]) == 0
    assert json.loads(target.read_text(encoding="utf-8")) == generate_schema()


def test_schema_cli_as_a_process_prints_and_checks() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "telemetry", "schema"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == generate_schema()
    checked = subprocess.run(
        [sys.executable, "-m", "telemetry", "schema", "--check"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stderr


def test_load_schema_returns_an_independent_copy() -> None:
    first = load_schema()
    first["$defs"].clear()
    assert load_schema()["$defs"]


def test_schema_accepts_legacy_and_package_runs(legacy_metadata: dict[str, Any], package_run: ArtifactMetadata) -> None:
    schema = load_schema()
    jsonschema.validate(legacy_metadata, schema)
    jsonschema.validate(package_run.to_json_dict(), schema)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("Scenes", 0, "Telemetry", "HistoryExitReason"), "timeout"),
        (("Scenes", 0, "Telemetry", "GPU", "VramBeforeMB"), "24000MB"),
        (("Scenes", 0, "Telemetry", "System", "FallbackNotes"), "one note"),
        (("Scenes", 1, "Telemetry", "FLF2VSource"), "sideways"),
        (("QueueConfig", "HistoryMaxAttempts"), "0"),
    ],
)
def test_schema_rejects_wrong_types(legacy_metadata: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = legacy_metadata
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(legacy_metadata, load_schema())


@pytest.mark.parametrize(
    "path",
    [
        ("Scenes", 0, "Telemetry"),
        ("Scenes", 0, "Telemetry", "ExecutionSuccessDetected"),
        ("Scenes", 0, "Telemetry", "GPU", "Name"),
        ("Scenes", 0, "SceneId"),
        ("QueueConfig",),
    ],
)
def test_schema_requires_contract_fields(legacy_metadata: dict[str, Any], path: tuple[Any, ...]) -> None:
    target: Any = legacy_metadata
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    with pytest.raises(jsonschema.ValidationError, match="is a required property"):
        jsonschema.validate(legacy_metadata, load_schema())
