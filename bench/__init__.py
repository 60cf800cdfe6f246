"""Benchmarks against real ComfyUI: each module prints ratios measured side by side in one run, with the machine."""
