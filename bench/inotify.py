"""A minimal Linux inotify watcher (ctypes, no dependency): when did a file name appear in a folder, by time.time()."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
import time
from pathlib import Path

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class Watcher:
    """Watches one folder on a thread blocked in read(); records the first time each name was moved in or created."""

    def __init__(self, folder: Path, mask: int = IN_MOVED_TO | IN_CREATE) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._fd = libc.inotify_init1(IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        wd = libc.inotify_add_watch(self._fd, str(folder).encode(), mask)
        if wd < 0:
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch({folder}) failed")
        self.seen: dict[str, float] = {}
        self._cond = threading.Condition()
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="bench-inotify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            data = os.read(self._fd, 65536)
            now = time.time()
            offset = 0
            names = []
            while offset + _EVENT.size <= len(data):
                _wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                names.append(raw.rstrip(b"\0").decode(errors="replace"))
                offset += _EVENT.size + length
            with self._cond:
                for name in names:
                    self.seen.setdefault(name, now)
                self._cond.notify_all()

    def wait_for(self, name: str, timeout: float) -> float:
        """The time.time() at which ``name`` appeared; raises TimeoutError after ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: name in self.seen, timeout):
                raise TimeoutError(f"{name} did not appear within {timeout:g} s")
            return self.seen[name]

    def close(self) -> None:
        """Stop the thread and close the descriptors."""
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in (self._fd, self._stop_r, self._stop_w):
            os.close(fd)
