"""Shared unit-test data: the older helper's run on disk, and a run built the way this package builds one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from telemetry.models import (
    ArtifactMetadata,
    AttemptSummary,
    DeviceInfo,
    LLMHealthInfo,
    QueueConfig,
    Scene,
    SystemSnapshot,
    Telemetry,
)
from telemetry.probes import build_gpu_block, build_system_block

FIXTURES = Path(__file__).resolve().parent / "fixtures"
LEGACY_RUN = FIXTURES / "legacy-run"
GIB = 1 << 30


@pytest.fixture
def legacy_metadata() -> dict[str, Any]:
    """The older PowerShell helper's artifact-metadata.json (UTF-8 with BOM, CRLF), parsed."""
    return json.loads((LEGACY_RUN / "artifact-metadata.json").read_text(encoding="utf-8-sig"))


@pytest.fixture
def legacy_summary() -> str:
    """The older helper's run-summary.txt as text (BOM removed, CRLF kept)."""
    return (LEGACY_RUN / "run-summary.txt").read_bytes().decode("utf-8-sig")


def _snapshot(at: str, free: int, notes: list[str], source: str = "torch-cuda") -> SystemSnapshot:
    device = DeviceInfo(
        name="NVIDIA RTX A6000", type="cuda", index=1, cuda_index=0, vram_total=48 * GIB, vram_free=free
    )
    other = DeviceInfo(name="NVIDIA RTX A6000", type="cuda", index=0, vram_total=48 * GIB)
    return SystemSnapshot(
        timestamp=at,
        source=source,
        device=device,
        devices=[other, device],
        ram_total=128 * GIB,
        ram_free=96 * GIB,
        fallback_notes=notes,
    )


def build_package_run() -> ArtifactMetadata:
    """A two-scene run as this package writes it: snapshots, fallback notes, a bounded poll limit, both warnings."""
    note = "nvml failed: NVML Shared Library Not Found (NVML_ERROR_LIBRARY_NOT_FOUND); used torch-cuda instead"
    scenes = []
    for number, (limit, attempts, reason, retrieved) in enumerate(
        [(5, 2, "success", True), (5, 5, "attemptLimit", False)], start=1
    ):
        before = _snapshot(f"2025-11-21T08:0{number}:00.000Z", 40 * GIB + 123456, [note])
        after = _snapshot(f"2025-11-21T08:0{number}:30.500Z", 31 * GIB + 654321, [note])
        success = reason == "success"
        telemetry = Telemetry(
            duration_seconds=30.46 + number,
            queue_start=f"2025-11-21T08:0{number}:00.000Z",
            queue_end=f"2025-11-21T08:0{number}:31.250Z",
            max_wait_seconds=300,
            poll_interval_seconds=1,
            history_attempts=attempts,
            history_attempt_limit=limit,
            history_exit_reason=reason,
            execution_success_detected=success,
            execution_success_at=f"2025-11-21T08:0{number}:29.900Z" if success else None,
            post_execution_timeout_seconds=15,
            history_post_execution_timeout_reached=False,
            scene_retry_budget=0,
            gpu=build_gpu_block(before, after, peak_used_bytes=17 * GIB, peak_source="torch.cuda.max_memory_allocated"),
            system=build_system_block(before, after),
            prompt_id=f"prompt-{number}",
        )
        scenes.append(
            Scene(
                scene_id=f"s{number}",
                title=f"Shot {number}",
                frame_floor=16,
                frame_count=16 if success else 3,
                frame_prefix=f"run/s{number}/frame",
                success=success,
                meets_frame_floor=success,
                history_retrieved=retrieved,
                history_errors=[] if retrieved else ["gave up after 5 polls\nlast status: running"],
                attempts_run=1,
                attempt_summaries=[
                    AttemptSummary(
                        attempt=1,
                        success=success,
                        frame_count=16 if success else 3,
                        duration_seconds=30.46 + number,
                        frame_prefix=f"run/s{number}/frame",
                        queue_end=f"2025-11-21T08:0{number}:31.250Z",
                    )
                ],
                telemetry=telemetry,
            )
        )
    return ArtifactMetadata(
        run_id="run-2025-11-21",
        timestamp="2025-11-21T09:00:00.000+01:00",
        queue_config=QueueConfig(
            scene_retry_budget=0,
            history_max_wait_seconds=300,
            history_max_attempts=5,
            history_poll_interval_seconds=1,
            post_execution_timeout_seconds=15,
        ),
        llm_health_info=LLMHealthInfo(url="http://localhost:11434", status="success", models=2),
        scenes=scenes,
        generator="run-telemetry test",
    )


@pytest.fixture
def package_run() -> ArtifactMetadata:
    """A run built from this package's models and probe helpers."""
    return build_package_run()
