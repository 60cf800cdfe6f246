"""``python -m telemetry run``: drive a story through a ComfyUI that has this package, one prompt per scene.

Placeholders in the API-format workflow are filled per scene: ``{{scene.prompt}}``, ``{{scene.negative_prompt}}``,
``{{scene.prefix}}``, ``{{scene.seed}}``, ``{{scene.frames}}``, ``{{scene.id}}``, ``{{scene.title}}``, any other
key of the scene, and ``{{run.id}}``. A string that is exactly one placeholder takes the value's own type (a number
stays a number); inside longer text it is written as text.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .runs import run_id_problem

PLACEHOLDER = re.compile(r"\{\{\s*(scene|run)\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class RunnerError(Exception):
    """A problem the user can fix; the message says which input and how."""


@dataclass
class RunResult:
    """What a run ended with."""

    exit_code: int
    run_id: str
    run_dir: str | None = None
    failed_scenes: list[str] = field(default_factory=list)
    summary: str | None = None


class Client:
    """A tiny JSON client of one ComfyUI server (standard library only)."""

    def __init__(self, base: str, timeout: float = 30.0) -> None:
        self.base = base.rstrip("/")
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> tuple[int, Any]:
        """(status, JSON or text); raises RunnerError when the server cannot be reached."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RunnerError(f"cannot reach ComfyUI at {self.base}: {reason}") from None
        text = raw.decode("utf-8", errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text


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


class Progress:
    """One line per scene: a bar of elapsed time against the scene's budget, redrawn on a terminal."""

    def __init__(self, out: TextIO, label: str, budget: float) -> None:
        self.out, self.label, self.budget = out, label, max(budget, 1.0)
        self.t0 = time.monotonic()
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.state = ""

    def update(self, state: str) -> None:
        """Redraw with ``state`` (on a non-terminal only state changes are printed)."""
        elapsed = time.monotonic() - self.t0
        if self.tty:
            filled = int(20 * min(1.0, elapsed / self.budget))
            bar = "#" * filled + "." * (20 - filled)
            self.out.write(f"\r{self.label} [{bar}] {state:<12} {elapsed:6.1f}s")
            self.out.flush()
        elif state != self.state:
            self.out.write(f"{self.label} {state} ({elapsed:.1f}s)\n")
            self.out.flush()
        self.state = state

    def done(self, text: str) -> None:
        """Finish the line."""
        if self.tty:
            self.out.write("\r" + " " * 79 + "\r")
        self.out.write(f"{self.label} {text}\n")
        self.out.flush()


def wait_final(client: Client, prompt_id: str, max_wait: float, progress: Progress) -> dict[str, Any] | None:
    """Wait through the wait route until the prompt ends; ``None`` after ``max_wait`` seconds."""
    deadline = time.monotonic() + max_wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        status, body = client.call(
            "GET", f"/telemetry/prompts/{prompt_id}/wait?timeout={min(left, 1.0):.3f}", timeout=left + 30
        )
        if status == 200:
            return body
        if status == 202:
            progress.update(str(body.get("Outcome", "queued")))
            continue
        raise RunnerError(f"waiting for prompt {prompt_id} failed: HTTP {status}: {body}")


def preflight(client: Client, out: TextIO) -> dict[str, Any]:
    """Server reachable, this package's routes present, a GPU snapshot printed."""
    status, _ = client.call("GET", "/system_stats")
    if status != 200:
        raise RunnerError(f"{client.base} answered /system_stats with HTTP {status}: is it ComfyUI?")
    status, tel = client.call("GET", "/telemetry?limit=1")
    if status != 200 or not isinstance(tel, Mapping):
        raise RunnerError(f"Run Telemetry is not installed on {client.base} (GET /telemetry answered {status})")
    dev = (tel.get("Snapshot") or {}).get("Device") or {}
    total, free = dev.get("VramTotal") or 0, dev.get("VramFree") or 0
    out.write(
        f"Preflight: {client.base} ok; device {dev.get('Name')} ({dev.get('Type')}), "
        f"{free / 1048576:.0f} MiB free of {total / 1048576:.0f} MiB via {(tel.get('Snapshot') or {}).get('Source')}\n"
    )
    for note in tel.get("FallbackNotes") or []:
        out.write(f"  note: {note}\n")
    return dict(tel)


def run_story(
    *,
    server: str,
    workflow: Path,
    scenes: Path,
    run_id: str | None = None,
    out: TextIO = sys.stdout,
    max_wait: float | None = None,
    policy: Mapping[str, Any] | None = None,
) -> RunResult:
    """Run every scene of a story, wait for each, finalize the run, print its summary."""
    run_id = run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    problem = run_id_problem(run_id, name="--run-id")
    if problem:
        raise RunnerError(problem)
    wf = load_workflow(Path(workflow))
    story = load_story(Path(scenes))
    client = Client(server)
    tel = preflight(client, out)
    budget = float(max_wait or ((tel.get("Policy") or {}).get("max_wait_seconds") or 600))
    story_tag = {k: v for k, v in story.items() if k != "scenes"}
    failed: list[str] = []
    n = len(story["scenes"])
    out.write(f"Run {run_id}: {n} scene(s)\n")
    for i in range(n):
        values = scene_values(story, i, run_id)
        prompt = fill(wf, values, {"id": run_id})
        tags: dict[str, Any] = {
            "run_id": run_id,
            "scene_id": values["id"],
            "title": values["title"],
            "prompt": values["prompt"],
            "negative_prompt": values["negative_prompt"],
            "frame_floor": int(values["frame_floor"] or 0),
            "prefix": values["prefix"],
        }
        if story_tag:
            tags["story"] = story_tag
        if policy:
            tags["policy"] = dict(policy)
        status, body = client.call("POST", "/prompt", {"prompt": prompt, "extra_data": {"telemetry": tags}})
        if status != 200:
            raise RunnerError(f"ComfyUI refused scene {values['id']}: HTTP {status}: {json.dumps(body)[:800]}")
        pid = str(body["prompt_id"])
        progress = Progress(out, f"[scene {i + 1}/{n} {values['id']}]", budget)
        progress.update("queued")
        while True:
            rec = wait_final(client, pid, budget, progress)
            if rec is None:
                progress.done(f"gave up after {budget:.0f}s (prompt {pid} still pending)")
                failed.append(values["id"])
                break
            if rec.get("Outcome") == "success":
                markers = ",".join(m.get("State", "?") for m in rec.get("Markers") or []) or "none"
                progress.done(
                    f"success in {rec.get('DurationSeconds', 0):.2f}s, attempt {rec.get('Attempt', 1)}, marker {markers}"
                )
                break
            err = (rec.get("Error") or {}).get("Message") or rec.get("Outcome")
            if rec.get("RetriedBy"):
                progress.done(f"attempt {rec.get('Attempt', 1)} {rec.get('Outcome')}: {err}; retrying")
                pid = str(rec["RetriedBy"])
                progress = Progress(out, f"[scene {i + 1}/{n} {values['id']}]", budget)
                continue
            progress.done(f"{rec.get('Outcome')} after {rec.get('Attempt', 1)} attempt(s): {err}")
            failed.append(values["id"])
            break
    status, fin = client.call("POST", f"/telemetry/runs/{urllib.parse.quote(run_id)}/finalize", {}, timeout=120)
    if status != 200:
        raise RunnerError(f"finalizing run {run_id} failed: HTTP {status}: {fin}")
    _, summary = client.call("GET", f"/telemetry/runs/{urllib.parse.quote(run_id)}/run-summary.txt")
    out.write("\n" + (summary if isinstance(summary, str) else json.dumps(summary)) + "\n")
    out.write(f"Run folder: {fin['RunDir']}  (valid: {fin['Valid']})\n")
    for p in fin.get("Problems") or []:
        out.write(f"  problem: {p}\n")
    code = 0 if not failed and fin.get("Valid") else 1
    return RunResult(code, run_id, fin["RunDir"], failed, summary if isinstance(summary, str) else None)


def _handle(args: argparse.Namespace) -> int:
    try:
        result = run_story(
            server=args.server,
            workflow=Path(args.workflow),
            scenes=Path(args.scenes),
            run_id=args.run_id,
            max_wait=args.max_wait,
        )
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.failed_scenes:
        print(f"failed scenes: {', '.join(result.failed_scenes)}", file=sys.stderr)
    return result.exit_code


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``run`` sub-command."""
    p = subparsers.add_parser("run", help="run a story's scenes through ComfyUI and finalize the run")
    p.add_argument("--server", required=True, help="ComfyUI base URL, e.g. http://127.0.0.1:8188")
    p.add_argument("--workflow", required=True, help="API-format workflow with {{scene.…}} placeholders")
    p.add_argument("--scenes", required=True, help="story JSON with a 'scenes' list")
    p.add_argument("--run-id", help="run id (letters, digits, . _ -); default run-<UTC time>")
    p.add_argument("--max-wait", type=float, help="seconds to wait per scene (default: the server's policy)")
    p.set_defaults(func=_handle)
