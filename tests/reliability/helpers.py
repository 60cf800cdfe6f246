"""Helpers of the reliability tests: records, markers, log checks, workflows."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from harness.comfy import REPO, ComfyServer
from telemetry.atomic import is_temp_name
from telemetry.markers import read_marker
from telemetry.records import FINAL_OUTCOMES

TRACEBACK = "Traceback (most recent call last)"


def uniq(name: str) -> str:
    """``name`` with a short random suffix."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


def marker_prompt(prefix: str, *, color: int = 0x336699, size: int = 8, save: bool = True) -> dict[str, Any]:
    """EmptyImage → ImageInvert → SaveImage(prefix) (or PreviewImage, to the temp folder) + WriteDoneMarker(prefix)."""
    out = (
        {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}
        if save
        else {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}
    )
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": size, "height": size, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": out,
        "4": {"class_type": "WriteDoneMarker", "inputs": {"filename_prefix": prefix, "images": ["2", 0]}},
    }


def with_sleep(prompt: dict[str, Any], seconds: float, started_file: str) -> dict[str, Any]:
    """Put an RTTestSleep between the image source and ImageInvert."""
    p = json.loads(json.dumps(prompt))
    p["10"] = {
        "class_type": "RTTestSleep",
        "inputs": {"image": ["1", 0], "seconds": seconds, "started_file": started_file},
    }
    p["2"]["inputs"]["image"] = ["10", 0]
    return p


def wait_record(server: ComfyServer, prompt_id: str, timeout: float = 120) -> dict[str, Any]:
    """The wait route's final record (200), failing the test on 202/404."""
    status, body = server.request("GET", f"/telemetry/prompts/{prompt_id}/wait?timeout={timeout}", timeout=timeout + 10)
    assert status == 200, (prompt_id, status, body)
    assert body["Outcome"] in FINAL_OUTCOMES
    return body


def _frame_owner(line: str, package_folder: str) -> str:
    m = re.search(r'File "([^"]+)"', line)
    if not m:
        return ""
    path = m.group(1)
    if package_folder in path or path.startswith(str(REPO) + os.sep):
        return "package"
    if "site-packages" not in path and "/comfyui-" in path:
        return "comfyui"
    return ""  # Python, aiohttp, torch …: called by whoever is above it


def package_tracebacks(log: str, package_folder: str) -> list[str]:
    """Every traceback in a server log whose innermost ComfyUI-or-package frame is this package's: an error of ours.

    The package's middleware sits in every request's stack, so a traceback that merely passes through it (ComfyUI's
    own handler failing) is ComfyUI's, and one raised by a library the package called (json) is the package's.
    """
    blocks = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if TRACEBACK not in line:
            continue
        block = [line]
        for nxt in lines[i + 1 :]:
            block.append(nxt)
            if not nxt.startswith((" ", "\t")):
                break  # the exception line
        owners = [o for o in (_frame_owner(b, package_folder) for b in block) if o]
        if owners and owners[-1] == "package":
            blocks.append("\n".join(block))
    return blocks


def temp_files(root: Path) -> list[Path]:
    """Temp files of the atomic writer anywhere under ``root`` (a partial marker or run file)."""
    return [p for p in root.rglob("*") if is_temp_name(p.name)]


def check_done_marker(output_dir: Path, record: dict[str, Any], temp_dir: Path | None = None) -> None:
    """A success record's marker exists, parses, names the prompt, and lists complete files."""
    assert record["Outcome"] == "success", record["Outcome"]
    assert record["Markers"], record
    for m in record["Markers"]:
        assert m["State"] == "written", m
        path = Path(m["Path"])
        assert path.is_relative_to(output_dir.resolve()) or path.is_relative_to(output_dir), path
        marker = json.loads(path.read_text())
        read_marker(path)  # the package's own reader accepts it too
        assert marker["Kind"] == "done" and marker["PromptId"] == record["PromptId"], marker
        assert marker["FrameCount"] == len(marker["Outputs"]) >= 1
        for out in marker["Outputs"]:
            root = temp_dir if out["Type"] == "temp" and temp_dir is not None else output_dir
            if out["Type"] not in ("output", "temp") or (out["Type"] == "temp" and temp_dir is None):
                continue
            f = root / out["Subfolder"] / out["Filename"]
            assert f.stat().st_size == out["Bytes"] > 0, (f, out)


def log_errors(log: str) -> list[str]:
    """Lines where the package logged an exception with logger.exception (its own 'failed' messages)."""
    return [line for line in log.splitlines() if re.search(r"Run Telemetry: .*failed", line) and "ERROR" in line]
