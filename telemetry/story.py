"""Stories and workflows for the runner: load them, check them, fill a scene's placeholders.

Placeholders in the API-format workflow are filled per scene: ``{{scene.prompt}}``, ``{{scene.negative_prompt}}``,
``{{scene.prefix}}``, ``{{scene.seed}}``, ``{{scene.frames}}``, ``{{scene.id}}``, ``{{scene.title}}``, any other
key of the scene, and ``{{run.id}}``. A string that is exactly one placeholder takes the value's own type (a number
stays a number); inside longer text it is written as text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .runs import run_id_problem

PLACEHOLDER = re.compile(r"\{\{\s*(scene|run)\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class RunnerError(Exception):
    """A problem the user can fix; the message says which input and how."""


def _read_json(path: Path, what: str) -> Any:
    if not path.exists():
        raise RunnerError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise RunnerError(f"{what} {path} is not a file")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as exc:
        raise RunnerError(f"{what} file {path} is not valid JSON: {exc}") from None


def load_workflow(path: Path) -> dict[str, Any]:
    """An API-format workflow with at least one placeholder."""
    wf = _read_json(path, "workflow")
    if isinstance(wf, Mapping) and "nodes" in wf and "links" in wf:
        raise RunnerError(f"{path} is a UI workflow; export it in API format (Workflow > Export (API))")
    if not isinstance(wf, Mapping) or not all(isinstance(v, Mapping) and "class_type" in v for v in wf.values()):
        raise RunnerError(f"{path} is not an API-format workflow (an object of nodes with class_type and inputs)")
    if not PLACEHOLDER.search(json.dumps(wf)):
        raise RunnerError(
            f"workflow {path} has no placeholders: put {{{{scene.prefix}}}} in its SaveImage/WriteDoneMarker "
            "filename_prefix (and {{scene.prompt}}, {{scene.seed}} … where the scene should change the prompt)"
        )
    return dict(wf)


def load_story(path: Path) -> dict[str, Any]:
    """A story: ``{"id", "logline", "directors_vision", "scenes": [{"id", "title", "prompt", …}]}``."""
    story = _read_json(path, "scenes")
    scenes = story.get("scenes") if isinstance(story, Mapping) else story
    if not isinstance(scenes, list) or not scenes:
        raise RunnerError(f"scenes file {path} must hold a non-empty list 'scenes'")
    for i, sc in enumerate(scenes, 1):
        if not isinstance(sc, Mapping):
            raise RunnerError(f"scene {i} in {path} must be an object")
        sid = str(sc.get("id", i))
        problem = run_id_problem(sid, name=f"scene {i} id")
        if problem:
            raise RunnerError(f"{path}: {problem}")
    return dict(story) if isinstance(story, Mapping) else {"scenes": scenes}


def fill(value: Any, scene: Mapping[str, Any], run: Mapping[str, Any]) -> Any:
    """``value`` with every placeholder replaced from ``scene`` / ``run``."""
    if isinstance(value, str):
        whole = PLACEHOLDER.fullmatch(value.strip())
        if whole:
            return _lookup(whole.group(1), whole.group(2), scene, run)
        return PLACEHOLDER.sub(lambda m: str(_lookup(m.group(1), m.group(2), scene, run)), value)
    if isinstance(value, list):
        return [fill(v, scene, run) for v in value]
    if isinstance(value, Mapping):
        return {k: fill(v, scene, run) for k, v in value.items()}
    return value


def _lookup(kind: str, key: str, scene: Mapping[str, Any], run: Mapping[str, Any]) -> Any:
    source = scene if kind == "scene" else run
    if key not in source:
        raise RunnerError(f"placeholder {{{{{kind}.{key}}}}} has no value: add '{key}' to the {kind}")
    return source[key]


def scene_values(story: Mapping[str, Any], index: int, run_id: str) -> dict[str, Any]:
    """The values a scene's placeholders take (defaults for prefix, seed, frames, texts)."""
    raw = dict(story["scenes"][index])
    sid = str(raw.get("id", index + 1))
    values = {
        "id": sid,
        "title": raw.get("title", f"Scene {sid}"),
        "prompt": raw.get("prompt", ""),
        "negative_prompt": raw.get("negative_prompt", ""),
        "prefix": raw.get("prefix", f"{run_id}/scene-{sid}/frame"),
        "seed": raw.get("seed", index + 1),
        "frames": raw.get("frames", 8),
        "frame_floor": raw.get("frame_floor", 0),
    }
    values.update({k: v for k, v in raw.items() if k not in values})
    return values
