"""A real ComfyUI (the newest full-suite version) with the package, shared by the reliability tests that need no special start-up."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from harness.comfy import ComfyServer
from tests.conftest import make_server

MAX_UPLOAD_MB = 1


@pytest.fixture(scope="session")
def rel_server() -> Iterator[ComfyServer]:
    """ComfyUI (newest full-suite version) with ``--max-upload-size 1`` (MB), so an oversized body is cheap to send."""
    server = make_server(extra_args=["--max-upload-size", str(MAX_UPLOAD_MB)])
    server.start()
    yield server
    server.stop()
    if not os.environ.get("RT_KEEP_SERVERS"):
        shutil.rmtree(server.base_dir, ignore_errors=True)
