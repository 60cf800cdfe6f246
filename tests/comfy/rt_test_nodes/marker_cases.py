"""Test-only nodes for the marker cases (shared/cases M4, interrupts): late writers and a node deaf to interrupts."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path


class RTTestLateSave:
    """Output node that reports its PNGs at once and writes them from a thread later, in two halves (an encoder)."""

    CATEGORY = "rt_test"
    FUNCTION = "run"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "late"}),
                "delay": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 600.0, "step": 0.01}),
            }
        }

    def run(self, images, filename_prefix, delay):
        import folder_paths
        import numpy as np
        from PIL import Image

        out = folder_paths.get_output_directory()
        full, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, out, images[0].shape[1], images[0].shape[0]
        )
        jobs, results = [], []
        for image in images:
            name = f"{filename}_{counter:05}_.png"
            arr = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
            jobs.append((os.path.join(full, name), arr))
            results.append({"filename": name, "subfolder": subfolder, "type": "output"})
            counter += 1

        def writer():
            time.sleep(delay)
            for path, arr in jobs:
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG", compress_level=0)
                data = buf.getvalue()
                with open(path, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    time.sleep(delay)
                    fh.write(data[len(data) // 2 :])

        threading.Thread(target=writer, daemon=True).start()
        return {"ui": {"images": results}}


class RTTestBusy:
    """Passes an image through after ``seconds`` of work that never looks at ComfyUI's interrupt flag."""

    CATEGORY = "rt_test"
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 600.0, "step": 0.01}),
                "started_file": ("STRING", {"default": ""}),
            }
        }

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")

    def run(self, image, seconds, started_file):
        if started_file:
            Path(started_file).write_text("started")
        threading.Event().wait(seconds)
        return (image,)


class RTTestText:
    """Returns its text: a STRING link source that is not one of ComfyUI's primitives (known only at run time)."""

    CATEGORY = "rt_test"
    FUNCTION = "run"
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""})}}

    def run(self, text):
        return (text,)


NODE_CLASS_MAPPINGS = {"RTTestLateSave": RTTestLateSave, "RTTestBusy": RTTestBusy, "RTTestText": RTTestText}
