"""Read one marker path in a tight loop until a stop file appears; print counts as one JSON line.

Usage: marker_reader.py MARKER STOP_FILE. Prints ``ready`` once the loop is about to start.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from telemetry.markers import DoneMarker, MarkerReadError, parse_marker


def main() -> int:
    """Loop reading the marker; every read must be a whole, self-consistent marker."""
    marker, stop = Path(sys.argv[1]), Path(sys.argv[2])
    reads = invalid = absent = absent_after_first = 0
    seen: set[str] = set()
    errors: list[str] = []
    print("ready", flush=True)
    while not stop.exists():
        try:
            data = marker.read_bytes()
        except FileNotFoundError:
            absent += 1
            if seen:
                absent_after_first += 1
            continue
        reads += 1
        try:
            parsed = parse_marker(data)
            # A whole marker lists exactly FrameCount outputs and ends with the last one written.
            if not isinstance(parsed, DoneMarker) or len(parsed.outputs) != parsed.frame_count:
                raise MarkerReadError(marker, "inconsistent marker")
            if parsed.outputs and parsed.outputs[-1].filename != f"frame_{parsed.frame_count - 1:05}_.png":
                raise MarkerReadError(marker, "last output is not the last frame")
            seen.add(parsed.prompt_id or "")
        except MarkerReadError as exc:
            invalid += 1
            if len(errors) < 3:
                errors.append(f"{len(data)} bytes: {str(exc)[:200]}")
    result = {
        "reads": reads,
        "invalid": invalid,
        "absent": absent,
        "absent_after_first": absent_after_first,
        "versions_seen": len(seen),
        "errors": errors,
        "pid": os.getpid(),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
