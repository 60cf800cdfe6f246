"""API-format workflows that need no model weights (EmptyImage, ImageInvert, SaveImage …)."""

from __future__ import annotations

from typing import Any

Prompt = dict[str, Any]


def frames(prefix: str, *, count: int = 3, size: int = 64, color: int = 0x336699, marker: bool = True) -> Prompt:
    """EmptyImage(batch=count) -> ImageInvert -> SaveImage(prefix) [+ WriteDoneMarker(prefix)]."""
    p: Prompt = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": count, "color": color},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }
    if marker:
        p["4"] = {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": prefix, "images": ["2", 0]}}
    return p


def with_sleep(prompt: Prompt, seconds: float, *, started_file: str = "") -> Prompt:
    """Insert an RTTestSleep between the image source ("1") and its consumer ("2")."""
    p = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    p["10"] = {
        "class_type": "RTTestSleep",
        "inputs": {"image": ["1", 0], "seconds": seconds, "started_file": started_file},
    }
    p["2"]["inputs"]["image"] = ["10", 0]
    return p


def with_raise(prompt: Prompt, message: str = "boom") -> Prompt:
    """Insert an RTTestRaise between the image source and its consumer."""
    p = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    p["11"] = {"class_type": "RTTestRaise", "inputs": {"image": ["1", 0], "message": message}}
    p["2"]["inputs"]["image"] = ["11", 0]
    return p


def with_cancel(prompt: Prompt) -> Prompt:
    """Insert an RTTestCancel (raises asyncio.CancelledError) between the image source and its consumer."""
    p = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    p["13"] = {"class_type": "RTTestCancel", "inputs": {"image": ["1", 0]}}
    p["2"]["inputs"]["image"] = ["13", 0]
    return p


def with_capture(prompt: Prompt, *, run_id: str = "", scene_id: str = "", label: str = "render") -> Prompt:
    """Insert a TelemetryCapture between ImageInvert ("2") and SaveImage ("3")."""
    p = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in prompt.items()}
    p["12"] = {
        "class_type": "TelemetryCapture",
        "inputs": {"value": ["2", 0], "run_id": run_id, "scene_id": scene_id, "label": label, "frame_floor": 0},
    }
    p["3"]["inputs"]["images"] = ["12", 0]
    return p
