"""Node adapters: V1 node classes (stable across ComfyUI 0.3.52 … 0.3.75) calling into the telemetry core."""

from __future__ import annotations

from .capture import TelemetryCapture
from .marker import WriteDoneMarker

NODE_CLASS_MAPPINGS = {
    "WriteDoneMarker": WriteDoneMarker,
    "TelemetryCapture": TelemetryCapture,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WriteDoneMarker": "Write Done Marker",
    "TelemetryCapture": "Telemetry Capture",
}
