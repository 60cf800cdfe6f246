"""Test and demo harness: provision a pinned real ComfyUI and run it on the CPU with this package linked in."""
