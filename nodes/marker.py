"""WriteDoneMarker: declares a done marker that is written once the whole prompt has ended."""

from __future__ import annotations

from typing import Any

from .common import ANY, CATEGORY, get_runtime, prefix_problem


class WriteDoneMarker:
    """Output node: after the prompt ends, writes ``<prefix>.done`` (or ``.failed``) atomically in the output folder."""

    DESCRIPTION = (
        "Writes <output>/<filename_prefix>.done once the whole prompt has ended successfully and every output "
        "node has returned (temp file, fsync, rename), listing every file the prompt saved. On error or interrupt "
        "it writes <filename_prefix>.failed instead. Never cached: every run writes a new marker."
    )
    CATEGORY = CATEGORY
    FUNCTION = "declare"
    OUTPUT_NODE = True
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("trigger",)
    OUTPUT_TOOLTIPS = ("The trigger input, unchanged, so the node can sit in the middle of any branch.",)
    SEARCH_ALIASES = ["done", "marker", "complete", "sentinel"]

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        """Declared inputs: where the marker goes, what counts as frames, an optional trigger and hashing."""
        return {
            "required": {
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "ComfyUI",
                        "tooltip": "Relative to the output folder, may contain sub-folders (scene01/frame). "
                        "The marker is <output>/<prefix>.done; use the prefix your Save node uses.",
                    },
                ),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Frames of this prompt; the batch size is the marker's FrameCount."}),
                "trigger": (ANY, {"tooltip": "Any value, to hang the marker off a branch; passed through."}),
                "sha256": (
                    "BOOLEAN",
                    {"default": False, "tooltip": "Also record a SHA-256 of every output file in the marker."},
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **_: Any) -> float:
        """Never cached: NaN never equals itself, so a re-queued workflow writes a new marker."""
        return float("nan")

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: str = "ComfyUI") -> bool | str:
        """Refuse a prefix that would leave the output folder before the prompt is queued."""
        problem = prefix_problem(filename_prefix)
        return True if problem is None else problem

    def declare(
        self,
        filename_prefix: str,
        images: Any = None,
        trigger: Any = None,
        sha256: bool = False,
        unique_id: str = "",
    ) -> dict[str, Any]:
        """Register the marker for the end of the prompt; nothing is written yet."""
        frames = int(images.shape[0]) if images is not None and hasattr(images, "shape") else None
        rt = get_runtime()
        if rt is not None:
            rt.declare_marker(str(unique_id), filename_prefix, frames, bool(sha256))
        ui = {"run_telemetry_marker": [{"prefix": filename_prefix, "state": "pending", "frames": frames}]}
        return {"ui": ui, "result": (trigger,)}
