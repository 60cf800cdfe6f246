"""Write large done markers for one prefix in an endless loop, until killed.

Usage: marker_writer_loop.py OUTPUT_DIR PREFIX OUTPUTS. Prints ``wrote <n>`` after each whole write.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from telemetry.markers import DoneMarker, OutputFile, write_done_marker


def main() -> int:
    """Rewrite ``<prefix>.done`` forever; each marker is whole only if every output entry is present."""
    output_dir, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    outputs = [
        OutputFile(Filename=f"frame_{i:05}_.png", Subfolder="scene", Bytes=1000 + i, Sha256=f"{i:064x}")
        for i in range(count)
    ]
    seq = 0
    while True:
        marker = DoneMarker(PromptId=f"writer-{seq}", Prefix=prefix, FrameCount=count, Outputs=outputs)
        write_done_marker(output_dir, prefix, marker)
        print(f"wrote {seq}", flush=True)
        seq += 1


if __name__ == "__main__":
    sys.exit(main())
