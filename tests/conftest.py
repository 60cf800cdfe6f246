"""Fixtures: real ComfyUI servers with this package linked in, shared per session, over the version matrix.

The matrix (``harness/provision.py`` ``VERSIONS``): the whole real-server suite on the oldest and newest supported
ComfyUI (0.3.52, 0.33.0), the tests marked ``smoke`` on 0.3.75 and 0.8.0, the browser tests also on 0.3.75's
frontend (1.32.9) and on frontend 1.53.6 overlaid on 0.33.0. A test that takes the ``comfy`` fixture runs on every
full-suite version without further ado; its id names the version (``[comfyui-0.33.0]``).
``COMFYUI_DIR=<tree>`` replaces the matrix with that one tree, of any version, running everything.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.comfy import ComfyServer, comfyui_dir_from_env, get_install, read_version, scratch_dir  # noqa: E402
from harness.provision import EXTRA_FRONTENDS  # noqa: E402
from harness.provision import VERSIONS as PROVISIONED  # noqa: E402

TEST_NODES = Path(__file__).resolve().parent / "comfy" / "rt_test_nodes"
# A folder name unlike the project name: nothing may depend on it (ComfyUI-Manager and users rename it).
PACKAGE_FOLDER = "ComfyUI-Run.Telemetry-under-test"


@dataclass(frozen=True)
class Target:
    """One entry of the matrix: a ComfyUI version, maybe an extra frontend, and which tests run on it.

    ``runs``: None for every test, else the markers a test needs (any of them) to run here.
    """

    version: str
    frontend: str | None = None
    runs: frozenset[str] | None = None

    @property
    def id(self) -> str:
        return f"comfyui-{self.version}" + (f"-frontend-{self.frontend}" if self.frontend else "")

    def selects(self, item: pytest.Item) -> bool:
        return self.runs is None or any(item.get_closest_marker(m) for m in self.runs)


def _matrix() -> tuple[Target, ...]:
    cdir = comfyui_dir_from_env()
    if cdir is not None:
        return (Target(read_version(cdir)),)
    out = []
    for version, spec in PROVISIONED.items():
        if spec["suite"] == "full":
            out.append(Target(version))
        else:
            # 0.3.75 also carries frontend 1.32.9 for the browser tests.
            runs = {"smoke", "browser"} if version == "0.3.75" else {"smoke"}
            out.append(Target(version, runs=frozenset(runs)))
    for fe, version in EXTRA_FRONTENDS.items():
        out.append(Target(version, fe, frozenset({"browser"})))
    return tuple(out)


MATRIX = _matrix()
# Versions that run the whole suite: tests that start servers of their own use these (oldest first).
VERSIONS = tuple(t.version for t in MATRIX if t.runs is None)
# The version a single-server test starts: the newest of the full suite (or COMFYUI_DIR's).
SOLO = VERSIONS[-1]

_servers: dict[str, ComfyServer] = {}


def make_server(
    version: str | None = None,
    *,
    folder: str = PACKAGE_FOLDER,
    env: dict[str, str] | None = None,
    frontend: str | None = None,
    **kw,
) -> ComfyServer:
    """A new, not yet started server of ``version`` (default ``SOLO``) with the package and the test nodes linked."""
    install = get_install(version or SOLO, frontend)
    return ComfyServer(
        install=install,
        base_dir=scratch_dir(f"rt-comfy-{install.label}-"),
        packages={folder: REPO, "rt_test_nodes": TEST_NODES},
        env=env or {},
        **kw,
    )


@pytest.fixture(scope="session", params=MATRIX, ids=[t.id for t in MATRIX])
def comfy(request: pytest.FixtureRequest) -> Iterator[ComfyServer]:
    """A running ComfyUI of each matrix entry, shared by every test of the session."""
    target: Target = request.param
    server = make_server(target.version, frontend=target.frontend)
    server.start()
    _servers[target.id] = server
    yield server
    server.stop()
    _servers.pop(target.id, None)
    if not os.environ.get("RT_KEEP_SERVERS"):
        shutil.rmtree(server.base_dir, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep, on smoke and frontend-only matrix entries, only the tests marked for them."""
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        target = callspec.params.get("comfy") if callspec else None
        (keep if not isinstance(target, Target) or target.selects(item) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach the server log to the report of a failing real-server test."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "comfy" in getattr(item, "fixturenames", ()):
        server = item.funcargs.get("comfy") if hasattr(item, "funcargs") else None
        if isinstance(server, ComfyServer):
            report.sections.append((f"ComfyUI {server.install.label} log (tail)", server.log_tail(150)))
