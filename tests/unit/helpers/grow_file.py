"""Append to a file every few milliseconds until a stop file appears, like a writer still busy with a frame.

Usage: grow_file.py FILE STOP_FILE
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main() -> int:
    """Keep the file changing (size and mtime) until told to stop."""
    target, stop = Path(sys.argv[1]), Path(sys.argv[2])
    deadline = time.monotonic() + 60  # never outlive a broken test for long
    while not stop.exists() and time.monotonic() < deadline:
        with target.open("ab") as handle:
            handle.write(b"x")
        time.sleep(0.005)  # the workload's pace, not synchronisation: a frame being written slowly
    return 0


if __name__ == "__main__":
    sys.exit(main())
