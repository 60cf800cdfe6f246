"""WriteDoneMarker: declares a done marker that is written once the whole prompt has ended."""

from __future__ import annotations

from typing import Any

from .common import ANY, CATEGORY, expand_prefix, first, get_runtime, items, prefix_problem


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

    # Every input may arrive as a ComfyUI list (a list of batches, a list of prefixes): the node sees all items
    # in one call, so FrameCount is the sum over the items, and the trigger passes through as the same list.
    INPUT_IS_LIST = True
    OUTPUT_IS_LIST = (True,)

    @classmethod
    def IS_CHANGED(cls, **_: Any) -> float:
        """Never cached: NaN never equals itself, so a re-queued workflow writes a new marker."""
        return float("nan")

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: Any = None) -> bool | str:
        """Refuse a literal prefix that would leave the output folder before the prompt is queued.

        A prefix that arrives by link is ``None`` here (ComfyUI validates before anything runs): it is checked when
        the node runs, and statically, where the link's source is a literal (see ``hooks/plan.py``).
        """
        for text in items(filename_prefix):
            if not isinstance(text, str):
                continue  # by link (None here): checked when the node runs
            problem = prefix_problem(text)
            if problem is not None:
                return problem
        return True

    def declare(
        self,
        filename_prefix: Any,
        images: Any = None,
        trigger: Any = None,
        sha256: Any = False,
        unique_id: Any = "",
    ) -> dict[str, Any]:
        """Register the marker for the end of the prompt; nothing is written yet.

        Raises ValueError (the prompt then fails, and a ``.failed`` is written where the prefix is known) for a
        prefix that is not text or would leave the output folder.
        """
        node_id = str(first(unique_id) or "")
        prefixes = [p for p in items(filename_prefix) if p is not None]
        if not prefixes or not all(isinstance(p, str) for p in prefixes):
            kinds = sorted({type(p).__name__ for p in prefixes}) or ["nothing"]
            raise ValueError(
                f"WriteDoneMarker {node_id}: filename_prefix must be text, got {', '.join(kinds)}; "
                "link a STRING (for example a PrimitiveString) or type the prefix"
            )
        batches = [b for b in items(images) if b is not None]
        if not batches and ("%width%" in prefixes[0] or "%height%" in prefixes[0]):
            raise ValueError(
                f"WriteDoneMarker {node_id}: filename_prefix {prefixes[0]!r} uses %width%/%height%, which SaveImage "
                "takes from its frames; connect the marker's images input to the frames you save"
            )
        frames = sum(int(b.shape[0]) for b in batches if hasattr(b, "shape")) if batches else None
        size = tuple(batches[0].shape[1:3]) if batches and hasattr(batches[0], "shape") else (0, 0)
        # SaveImage's own expansion (%year%, %width% ...): the marker lands beside the frames of the same text.
        prefix = expand_prefix(prefixes[0], width=int(size[1]) if size else 0, height=int(size[0]) if size else 0)
        problem = prefix_problem(prefix)
        if problem is not None:
            raise ValueError(f"WriteDoneMarker {node_id}: {problem}")
        others = sorted({p for p in prefixes[1:] if p != prefixes[0]})
        rt = get_runtime()
        if rt is not None:
            rt.declare_marker(node_id, prefix, frames, any(bool(v) for v in items(sha256)), others=others)
        ui = {"run_telemetry_marker": [{"prefix": prefix, "state": "pending", "frames": frames}]}
        passed = list(trigger) if isinstance(trigger, list) else [trigger]
        return {"ui": ui, "result": (passed,)}
