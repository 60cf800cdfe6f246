"""The probe snapshot inside ComfyUI (replaced by the full probe chain once it is wired)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..telemetry.models import DeviceInfo, SystemSnapshot, utc_now_iso


def build_snapshot() -> Callable[[], dict[str, Any]]:
    """A function returning one snapshot as JSON-ready data."""

    def snapshot() -> dict[str, Any]:
        import psutil

        vm = psutil.virtual_memory()
        dev = DeviceInfo(Name="cpu", Type="cpu", VramTotal=vm.total, VramFree=vm.available)
        snap = SystemSnapshot(
            Timestamp=utc_now_iso(),
            Source="system-ram",
            Device=dev,
            Devices=[dev],
            RamTotal=vm.total,
            RamFree=vm.available,
        )
        return snap.to_json_dict()

    return snapshot
