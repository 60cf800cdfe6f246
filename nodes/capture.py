"""TelemetryCapture: a pass-through node that tags the prompt and records a VRAM span around its input."""

from __future__ import annotations

from typing import Any

from .common import ANY, CATEGORY, first, get_runtime, id_problem, items


class TelemetryCapture:
    """Tags the prompt with its run and scene and measures what feeds ``value`` (seconds, VRAM before/after)."""

    DESCRIPTION = (
        "Pass-through node: tags the prompt with a run and scene, and records a span (seconds, VRAM before, after "
        "and delta) around the execution of whatever feeds its input. Outputs its input unchanged."
    )
    CATEGORY = CATEGORY
    FUNCTION = "capture"
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("value",)
    OUTPUT_TOOLTIPS = ("The input, unchanged.",)
    SEARCH_ALIASES = ["telemetry", "vram", "run", "scene"]
    # ``value`` may be a ComfyUI list (a list of batches): one span around all of it, passed through as the list.
    INPUT_IS_LIST = True
    OUTPUT_IS_LIST = (True,)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """Declared inputs: the measured value (lazy, so the span starts before it is computed) and tags."""
        return {
            "required": {
                "value": (
                    ANY,
                    {
                        "lazy": True,
                        "tooltip": "Anything (image, latent, model …). What produces it is measured; it passes through.",
                    },
                ),
            },
            # Optional: API-format prompts may leave any of them out (the defaults apply).
            "optional": {
                "run_id": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Run this prompt belongs to (letters, digits, . _ -). Empty: not part of a run.",
                    },
                ),
                "scene_id": (
                    "STRING",
                    {"default": "", "tooltip": "Scene of the run this prompt renders. Empty: not tagged."},
                ),
                "label": (
                    "STRING",
                    {"default": "span", "tooltip": "Name of the span in the prompt's telemetry record."},
                ),
                "frame_floor": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 1_000_000,
                        "tooltip": "Fewest frames the scene must produce; the run summary warns below it. 0: none.",
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, run_id: Any = "", scene_id: Any = "") -> bool | str:
        """Refuse a run or scene id a run folder cannot have (path parts), as for ``extra_data.telemetry``.

        ``INPUT_IS_LIST`` makes ComfyUI hand validation lists too (``_async_map_node_over_list``): the first item counts.
        """
        for name, value in (("run_id", first(run_id)), ("scene_id", first(scene_id))):
            if value is None or (isinstance(value, str) and not value.strip()):
                continue  # empty: not tagged; None: linked, known only at run time (not used as a tag)
            problem = id_problem(value.strip() if isinstance(value, str) else value, name)
            if problem:
                return f"TelemetryCapture {problem}"
        return True

    def check_lazy_status(self, value: Any = None, label: Any = "span", unique_id: Any = "", **_: Any) -> list[str]:
        """Called before ``value`` is evaluated: open the span, then ask ComfyUI for the input."""
        rt = get_runtime()
        if rt is not None:
            rt.span_start(str(first(unique_id) or ""), str(first(label) or "span"))
        return ["value"] if all(v is None for v in items(value)) else []

    def capture(
        self,
        value: Any,
        label: Any = "span",
        unique_id: Any = "",
        run_id: Any = "",
        scene_id: Any = "",
        frame_floor: Any = 0,
        **_: Any,
    ) -> tuple[list[Any]]:
        """Close the span, apply tags that arrived by link, and pass the value (every item of a list) through.

        Raises ValueError naming the input for a run or scene id that is not usable (checked here because a linked
        value is unknown when ComfyUI validates the prompt).
        """
        node_id = str(first(unique_id) or "")
        tags = {"run_id": first(run_id), "scene_id": first(scene_id), "frame_floor": first(frame_floor)}
        for key in ("run_id", "scene_id"):
            if tags[key] not in (None, ""):
                problem = id_problem(tags[key], key)
                if problem is not None:
                    raise ValueError(f"TelemetryCapture {node_id}: {problem}")
        floor = tags["frame_floor"]
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, int) or floor < 0):
            raise ValueError(f"TelemetryCapture {node_id}: frame_floor must be a whole number >= 0, got {floor!r}")
        rt = get_runtime()
        if rt is not None:
            rt.span_end(node_id, str(first(label) or "span"))
            rt.recorder.tag_running(tags, prompt_id=rt.current_prompt_id())
        return (items(value),)
