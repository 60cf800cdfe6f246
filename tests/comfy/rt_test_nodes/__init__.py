"""Test-only ComfyUI nodes: a sleep (slow prompts, interrupts), a node that raises, a node that fails N times."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path


def _interrupt_point() -> None:
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


class RTTestSleep:
    """Passes an image through after ``seconds``; interruptible."""

    CATEGORY = "rt_test"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "seconds": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 3600.0, "step": 0.01}),
            },
            "optional": {"started_file": ("STRING", {"default": ""})},
        }

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")

    def run(self, image, seconds, started_file=""):
        if started_file:
            Path(started_file).write_text(str(os.getpid()))
        done = threading.Event()
        deadline = time.monotonic() + seconds
        while not done.wait(min(0.02, max(0.0, deadline - time.monotonic()))):
            _interrupt_point()
            if time.monotonic() >= deadline:
                break
        return (image,)


class RTTestRaise:
    """Raises RuntimeError with the given message."""

    CATEGORY = "rt_test"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "message": ("STRING", {"default": "boom"})}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")

    def run(self, image, message):
        raise RuntimeError(message)


class RTTestFlaky:
    """Fails while the counter file named by ``key`` holds fewer than ``failures`` attempts, then passes."""

    CATEGORY = "rt_test"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "counter_file": ("STRING", {"default": ""}),
                "failures": ("INT", {"default": 1, "min": 0, "max": 100}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")

    def run(self, image, counter_file, failures):
        path = Path(counter_file)
        n = int(path.read_text()) if path.exists() else 0
        path.write_text(str(n + 1))
        if n < failures:
            raise RuntimeError(f"flaky failure {n + 1} of {failures}")
        return (image,)


class RTTestExit:
    """Raises SystemExit: ComfyUI's prompt worker does not catch it, so its thread ends (HTTP keeps answering)."""

    CATEGORY = "rt_test"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "code": ("INT", {"default": 3, "min": 0, "max": 255})}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")

    def run(self, image, code):
        raise SystemExit(code)


class RTTestCancel:
    """Raises ``asyncio.CancelledError`` (a BaseException): ComfyUI's executor does not catch it, so it leaves
    ``PromptExecutor.execute`` as a cancelled event loop would (and ends that server's prompt worker thread)."""

    CATEGORY = "rt_test"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")

    def run(self, image):
        raise asyncio.CancelledError("cancelled by the test node")


NODE_CLASS_MAPPINGS = {
    "RTTestSleep": RTTestSleep,
    "RTTestRaise": RTTestRaise,
    "RTTestFlaky": RTTestFlaky,
    "RTTestExit": RTTestExit,
    "RTTestCancel": RTTestCancel,
}

from .marker_cases import NODE_CLASS_MAPPINGS as _MARKER_CASES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_MARKER_CASES)
