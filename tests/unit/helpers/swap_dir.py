"""Swap a folder with a symlink to another folder, atomically and repeatedly, until told to stop.

Usage: swap_dir.py FOLDER OUTSIDE STOP_FILE MAX_SWAPS MAX_SECONDS

Makes ``FOLDER.swap`` a symlink to OUTSIDE, then exchanges it with FOLDER (``renameat2(RENAME_EXCHANGE)``, one
atomic step, Linux) over and over: half the time FOLDER is the real folder, half the time a symlink leading out.
Prints ``ready`` once the first exchange succeeded, and at the end the number of exchanges as JSON; always leaves
FOLDER as the real folder. Bounded by MAX_SWAPS, MAX_SECONDS and the stop file.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

AT_FDCWD = -100
RENAME_EXCHANGE = 2


def main() -> int:
    folder, outside, stop, max_swaps, max_seconds = sys.argv[1:6]
    link = folder + ".swap"
    os.symlink(outside, link)
    libc = ctypes.CDLL(None, use_errno=True)

    def exchange() -> None:
        if libc.renameat2(AT_FDCWD, os.fsencode(folder), AT_FDCWD, os.fsencode(link), RENAME_EXCHANGE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    swaps = 0
    deadline = time.monotonic() + float(max_seconds)
    exchange()
    exchange()
    swaps += 2
    print("ready", flush=True)
    while swaps < int(max_swaps) and time.monotonic() < deadline and not os.path.exists(stop):
        exchange()
        swaps += 1
        exchange()  # back to the real folder; the two states alternate as fast as the kernel allows
        swaps += 1
    os.unlink(link)
    print(json.dumps({"swaps": swaps}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
