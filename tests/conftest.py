"""Fixtures: real ComfyUI servers (0.3.75 and 0.3.52) with this package linked in, shared per session."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.comfy import ComfyServer, get_install, scratch_dir  # noqa: E402

VERSIONS = ("0.3.75", "0.3.52")
TEST_NODES = Path(__file__).resolve().parent / "comfy" / "rt_test_nodes"
# A folder name unlike the project name: nothing may depend on it (ComfyUI-Manager and users rename it).
PACKAGE_FOLDER = "ComfyUI-Run.Telemetry-under-test"

_servers: dict[str, ComfyServer] = {}


def make_server(version: str, *, folder: str = PACKAGE_FOLDER, env: dict[str, str] | None = None, **kw) -> ComfyServer:
    """A new, not yet started server of ``version`` with the package and the test nodes linked in."""
    install = get_install(version)
    return ComfyServer(
        install=install,
        base_dir=scratch_dir(f"rt-comfy-{version}-"),
        packages={folder: REPO, "rt_test_nodes": TEST_NODES},
        env=env or {},
        **kw,
    )


@pytest.fixture(scope="session", params=VERSIONS, ids=[f"comfyui-{v}" for v in VERSIONS])
def comfy(request: pytest.FixtureRequest) -> Iterator[ComfyServer]:
    """A running ComfyUI of each version, shared by every test of the session."""
    version = request.param
    server = make_server(version)
    server.start()
    _servers[version] = server
    yield server
    server.stop()
    _servers.pop(version, None)
    if not os.environ.get("RT_KEEP_SERVERS"):
        shutil.rmtree(server.base_dir, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach the server log to the report of a failing real-server test."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "comfy" in getattr(item, "fixturenames", ()):
        server = item.funcargs.get("comfy") if hasattr(item, "funcargs") else None
        if isinstance(server, ComfyServer):
            report.sections.append((f"ComfyUI {server.install.version} log (tail)", server.log_tail(150)))
