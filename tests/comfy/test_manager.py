"""Installed the way users install it: ComfyUI-Manager (the pip package ComfyUI 0.33.0 ships, ``--enable-manager``)
installs Run Telemetry through its own install-from-git-URL route, from a local clone, then ComfyUI restarts."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace

import pytest

from harness import provision
from harness.comfy import REPO, ComfyServer, get_install, scratch_dir
from tests.comfy import workflows as wf
from tests.conftest import SOLO

pytestmark = pytest.mark.comfy

# Loopback listen plus this flag is what Manager 4.2 asks before it clones from a URL (independent of
# security_level); offline network mode and the bundled node list keep it from fetching GitHub's channel files;
# plain pip (not uv) installs the requirements into ComfyUI's own Python.
MANAGER_CONFIG = """[default]
use_uv = False
network_mode = offline
db_mode = local
security_level = normal
allow_git_url_install = True
file_logging = False
"""


def test_manager_installs_the_package_from_a_git_url_and_it_loads_after_restart() -> None:
    install = get_install(SOLO)
    if not (install.dir / "manager_requirements.txt").exists():
        pytest.skip(f"ComfyUI {install.version} ships no ComfyUI-Manager package")
    install = replace(install, overlays=(*install.overlays, provision.provision_manager()))
    base = scratch_dir("rt-manager-")
    clone = base / "src" / "run-telemetry"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    (base / "user" / "__manager").mkdir(parents=True)
    (base / "user" / "__manager" / "config.ini").write_text(MANAGER_CONFIG)
    server = ComfyServer(
        install=install, base_dir=base, packages={}, extra_args=["--enable-manager", "--enable-manager-legacy-ui"]
    )
    server.start()
    try:
        assert server.request("GET", "/v2/manager/version") == (200, "V4.2.2")
        assert "WriteDoneMarker" not in server.get("/object_info")
        # Manager's is_valid_url wants a host: file://localhost/<path> is a file URL git clones from.
        url = f"file://localhost{clone}"
        status, body = server.request(
            "POST", "/v2/customnode/install/git_url", url.encode(), timeout=600, headers={"Content-Type": "text/plain"}
        )
        assert status == 200, (status, body, server.log_tail(60))
        installed = base / "custom_nodes" / "run-telemetry"
        assert (installed / ".git").is_dir() and (installed / "__init__.py").is_file()
        log = server.log_text()
        assert f"Install: {url}" in log and "Installation was successful." in log
        # Manager resolved every requirement through pip in ComfyUI's Python (already satisfied here: no download).
        # Manager prints each pip command as a Python list, wrapped at its own width: compare with white space folded.
        flat = " ".join(log.split())
        for req in (REPO / "requirements.txt").read_text().split():
            assert f"'install', '{req}'" in flat, req

        server.restart()
        info = server.get("/object_info")
        assert {"WriteDoneMarker", "TelemetryCapture"} <= set(info)
        assert "IMPORT FAILED" not in server.log_text()[server.log_text().rfind("=== start") :]
        status = server.get("/telemetry")
        assert status["ComfyUI"]["Version"] == install.version
        assert not [h for h, how in status["ComfyUI"]["Hooks"].items() if how.startswith("degraded")]
        pid = server.queue(wf.frames("manager/frame"))
        code, rec = server.request("GET", f"/telemetry/prompts/{pid}/wait?timeout=60", timeout=70)
        assert code == 200 and rec["Outcome"] == "success" and rec["Markers"][0]["State"] == "written"
        assert (server.output_dir / "manager" / "frame.done").is_file()
    finally:
        server.stop()
        if not os.environ.get("RT_KEEP_SERVERS"):
            shutil.rmtree(base, ignore_errors=True)
