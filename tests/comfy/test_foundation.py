"""The package loads in real ComfyUI (every version of the matrix), declares its nodes, and answers /telemetry."""

from __future__ import annotations

import re
import uuid

import pytest

from harness.comfy import ComfyServer
from tests.comfy import workflows as wf
from tests.conftest import PACKAGE_FOLDER, make_server

pytestmark = pytest.mark.comfy


def our_problems(log: str) -> list[str]:
    """IMPORT FAILED lines and traceback blocks of the server log that concern this package."""
    found = [ln for ln in log.splitlines() if "IMPORT FAILED" in ln and PACKAGE_FOLDER in ln]
    for block in log.split("Traceback (most recent call last):")[1:]:
        head = block.split("\n\n", 1)[0]
        if re.search(r"ValueError: (WriteDoneMarker|TelemetryCapture) \S+: ", head):
            continue  # a bad input value caught when the node ran: the user's prompt error, raised on purpose
        if PACKAGE_FOLDER in head or "run_telemetry" in head.lower() or "Run Telemetry" in head:
            found.append("Traceback:" + head[:800])
    return found


@pytest.mark.smoke
def test_package_loads_without_import_failure_or_traceback(comfy: ComfyServer) -> None:
    log = comfy.log_text()
    assert our_problems(log) == [], comfy.log_tail()
    # ComfyUI lists the time each custom node folder took; ours must be there, loaded.
    assert re.search(r"seconds: .*" + re.escape(PACKAGE_FOLDER), log), comfy.log_tail()


def test_nodes_declared_with_inputs_descriptions_and_tooltips(comfy: ComfyServer) -> None:
    info = comfy.get("/object_info")
    marker, capture = info["WriteDoneMarker"], info["TelemetryCapture"]
    assert marker["output_node"] is True
    assert capture["output_node"] is False
    assert set(marker["input"]["required"]) == {"filename_prefix"}
    assert {"images", "trigger", "sha256"} <= set(marker["input"]["optional"])
    # API-format prompts may leave the tags out: only the measured value is required.
    assert set(capture["input"]["required"]) == {"value"}
    assert set(capture["input"]["optional"]) == {"run_id", "scene_id", "label", "frame_floor"}
    assert capture["input"]["required"]["value"][1].get("lazy") is True
    for node in (marker, capture):
        assert node["description"], node
        assert node["category"] == "Run Telemetry"
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node['name']}.{name} has no tooltip"


@pytest.mark.smoke
@pytest.mark.parametrize("path", ["/telemetry", "/api/telemetry"])
def test_status_route_answers_a_real_snapshot(comfy: ComfyServer, path: str) -> None:
    body = comfy.get(path)
    snap = body["Snapshot"]
    stats = comfy.get("/system_stats")
    # --cpu: the device is the CPU and its "VRAM" is system RAM, as /system_stats says too.
    assert snap["Device"]["Type"] == "cpu"
    assert snap["Device"]["Name"].strip()
    assert snap["Source"] == "system-ram"
    total = snap["Device"]["VramTotal"]
    assert abs(total - stats["system"]["ram_total"]) <= 0.01 * stats["system"]["ram_total"]
    assert 0 < snap["Device"]["VramFree"] <= total
    assert isinstance(body["FallbackNotes"], list)
    assert isinstance(body["Prompts"], list)


def test_web_extension_is_served(comfy: ComfyServer) -> None:
    status, listing = comfy.request("GET", "/extensions")
    assert status == 200
    ours = [u for u in listing if f"/extensions/{PACKAGE_FOLDER}/" in u]
    assert ours, listing
    texts = []
    for url in ours:
        status, text = comfy.request("GET", url)
        assert status == 200, url
        texts.append(text)
    # Helper modules may register nothing (each file must be harmless alone); the features do register.
    assert any("registerExtension" in t for t in texts)


def test_unusable_store_folder_degrades_loudly_and_comfyui_still_starts(tmp_path) -> None:
    """A store path that cannot be created: ComfyUI starts, the nodes load, the package runs on an in-memory store and
    says so (log, ``GET /telemetry``, health), and markers are still written."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the telemetry folder should be")
    server = make_server(env={"RUN_TELEMETRY_DIR": str(blocker / "telemetry")})
    try:
        server.start()
        log = server.log_text()
        assert not [ln for ln in log.splitlines() if "IMPORT FAILED" in ln and PACKAGE_FOLDER in ln]
        info = server.get("/object_info")
        assert "WriteDoneMarker" in info and "TelemetryCapture" in info
        status, _ = server.request("GET", "/system_stats")
        assert status == 200
        store = server.get("/telemetry")["Store"]
        assert store["Ok"] is False and store["Mode"] == "memory", store
        assert "Run Telemetry" in log and str(blocker) in log
        code, health = server.request("GET", "/telemetry/health")
        assert code == 200 and health["Status"] == "degraded", health
        prefix = f"memstore-{uuid.uuid4().hex[:6]}/frame"
        pid = server.queue(wf.frames(prefix, count=1))
        code, rec = server.request("GET", f"/telemetry/prompts/{pid}/wait?timeout=60", timeout=70)
        assert code == 200 and rec["Outcome"] == "success", rec
        assert (server.output_dir / f"{prefix}.done").is_file()
    finally:
        server.stop()
