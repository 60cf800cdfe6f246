"""Faults at the probe seams and on disk, inside a real ComfyUI: prompts still complete, notes are recorded, and no
unhandled exception of the package appears in the server log.

Probe seams (``RUN_TELEMETRY_PROBES=full`` asks the whole chain even under ``--cpu``): on this machine NVML's library
is really missing and torch CUDA is really unavailable; nvidia-smi is a real script put first on PATH that hangs (and
starts a child that would outlive it), fails with NVIDIA's own text and exit code 9, prints garbage, or is absent.
NVML errors at init and mid-run are covered at the unit level (tests/unit/test_probes.py, fake pynvml).
Disk: a tmpfs as ComfyUI's output folder, filled up, then remounted read-only. (The store's own disk faults are in
test_isolation.py.)
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness.comfy import ComfyServer, wait_until
from tests.conftest import PACKAGE_FOLDER, make_server

from .helpers import check_done_marker, marker_prompt, package_tracebacks, temp_files, uniq, wait_record

pytestmark = pytest.mark.comfy

NVIDIA_FAIL = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)
SCRIPTS = {
    # Hangs, and starts a child that would outlive a plain kill of the script: the timeout must end both. ComfyUI's
    # own start-up (cuda_malloc.py) runs `nvidia-smi -L` without a timeout, before any custom node loads: that call
    # gets a plain failure, or ComfyUI itself would never start.
    "hang": '#!/bin/sh\n[ "$1" = "-L" ] && exit 1\necho $$ > "{dir}/pids"\nsleep 3600 &\necho $! >> "{dir}/pids"\nwait\n',
    "fail": f'#!/bin/sh\necho "{NVIDIA_FAIL}"\nexit 9\n',
    "garbage": "#!/bin/sh\necho 'Segmentation fault (core dumped) ... ??? 0xdeadbeef'\nexit 0\n",
}
EXPECTED_SMI_NOTE = {
    "hang": "did not answer within 2 s",
    "fail": "exited with code 9: NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver",
    "garbage": "unexpected line",
    "missing": "nvidia-smi not found on PATH",
}


def probe_server(mode: str, tmp: Path) -> ComfyServer:
    """A server asking the whole probe chain, with nvidia-smi behaving as ``mode`` says."""
    env = {"RUN_TELEMETRY_PROBES": "full"}
    bindir = tmp / f"bin-{mode}"
    bindir.mkdir()
    if mode in SCRIPTS:
        script = bindir / "nvidia-smi"
        script.write_text(SCRIPTS[mode].format(dir=bindir))
        script.chmod(0o755)
    path = os.environ.get("PATH", "")
    if mode == "missing":
        # Only folders without an nvidia-smi: on a machine that has one, this still makes it missing.
        path = os.pathsep.join(d for d in path.split(os.pathsep) if d and not (Path(d) / "nvidia-smi").exists())
    env["PATH"] = os.pathsep.join([str(bindir), path])
    return make_server(env=env)


@pytest.mark.parametrize("mode", ["hang", "fail", "garbage", "missing"])
def test_probe_faults_keep_prompts_completing(mode: str, tmp_path: Path) -> None:
    server = probe_server(mode, tmp_path)
    try:
        server.start()
        walls = []
        for i in range(3):
            t0 = time.monotonic()
            rec = wait_record(server, server.queue(marker_prompt(f"probe-{mode}/{uniq(str(i))}")))
            walls.append(time.monotonic() - t0)
            check_done_marker(server.output_dir, rec)
            notes = " | ".join(rec["FallbackNotes"])
            assert "nvml failed" in notes and "torch-cuda failed" in notes, notes
            assert EXPECTED_SMI_NOTE[mode] in notes, notes
            gpu = rec["Telemetry"]["GPU"]
            assert gpu["Name"] == "cpu" and gpu["VramBeforeMB"] > 0, gpu
        print(f"probe fault {mode}: wall time per prompt (queue → wait route) {[round(w, 3) for w in walls]} s")
        status = server.get("/telemetry")
        assert status["Snapshot"]["Source"] == "system-ram"
        if mode == "hang":
            # The 2 s timeout holds and is paid once (failures are remembered for 300 s), not per prompt.
            assert max(walls[1:]) < 1.5, walls
            assert walls[0] < 2.0 + 3.0, walls
            pids = [int(p) for p in (tmp_path / "bin-hang" / "pids").read_text().split()]
            assert len(pids) == 2

            def gone() -> bool:
                for pid in pids:
                    try:
                        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    except (FileNotFoundError, ProcessLookupError):
                        continue
                    if state != "Z":
                        return False
                return True

            wait_until(gone, 10, what="the hanging nvidia-smi and its child to be killed")
        assert package_tracebacks(server.log_text(), PACKAGE_FOLDER) == []
    finally:
        server.stop()


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (tests run as root), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {path} (the reliability tests run as root): {mounted.stderr.decode()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; return the filler file."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    try:
        while os.write(fd, b"\0"):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def test_full_then_read_only_output_folder(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "out", "2m") as out:
        server = make_server(extra_args=["--output-directory", str(out)])
        try:
            server.start()
            # A marker written before the fault, that the faulty prompts of the same prefix try to replace.
            ok = wait_record(server, server.queue(marker_prompt("full/frame", color=7)))
            check_done_marker(out, ok)
            filler = fill(out)

            # Full: frames go to the temp folder (PreviewImage), the marker cannot be written. (A fresh prefix:
            # removing an earlier marker of the same prefix would free the page the new one needs.)
            rec = wait_record(server, server.queue(marker_prompt("full/new", color=1, save=False)))
            assert rec["Outcome"] == "success" and rec["Markers"][0]["State"] == "error", rec["Markers"]
            assert any("could not be written" in n and "No space left" in n for n in rec["FallbackNotes"])
            # Full: SaveImage itself fails; the prompt is an error, its .failed cannot be written either.
            rec = wait_record(server, server.queue(marker_prompt("full/saved", color=2)))
            assert rec["Outcome"] == "error" and rec["Markers"][0]["State"] == "error", rec
            assert any("could not be written" in n for n in rec["FallbackNotes"])
            assert not (out / "full" / "saved.failed").exists() and not (out / "full" / "saved.done").exists()

            # Read-only: the same, and the stale marker cannot even be removed at the start.
            filler.unlink()
            subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
            rec = wait_record(server, server.queue(marker_prompt("full/frame", color=3, save=False)))
            assert rec["Outcome"] == "success" and rec["Markers"][0]["State"] == "error", rec["Markers"]
            notes = " | ".join(rec["FallbackNotes"])
            assert "Read-only file system" in notes and "could not remove the previous marker" in notes, notes
            rec = wait_record(server, server.queue(marker_prompt("full/ro-saved", color=4)))
            assert rec["Outcome"] == "error" and rec["Markers"][0]["State"] == "error"

            # Writable again: the next prompt writes its marker, and nothing partial was left behind.
            subprocess.run(["mount", "-o", "remount,rw", str(out)], check=True)
            rec = wait_record(server, server.queue(marker_prompt("full/frame", color=5)))
            check_done_marker(out, rec)
            assert temp_files(out) == []
            # The routes still answer, and the package logged the failures without an unhandled exception.
            assert server.get("/telemetry?limit=10")["Prompts"]
            assert package_tracebacks(server.log_text(), PACKAGE_FOLDER) == []
            assert "marker for prefix 'full/new' could not be written" in server.log_text()
        finally:
            server.stop()
