"""Bad input against a real ComfyUI with the package: schemathesis over /telemetry/openapi.json, a path-traversal
corpus for marker prefixes and run ids, and oversized and malformed bodies."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from harness.comfy import ComfyServer
from tests.conftest import PACKAGE_FOLDER

from .conftest import MAX_UPLOAD_MB
from .helpers import check_done_marker, marker_prompt, package_tracebacks, uniq, wait_record

pytestmark = pytest.mark.comfy

MIN_REQUESTS = 1000


def raw_request(server: ComfyServer, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """Send ``path`` exactly as given (no client-side normalisation of '..' or percent escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        hdrs = {"Content-Length": str(len(body or b""))} | dict(headers or {})
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            try:
                conn.send(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may answer (413) and close before reading everything
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def known_ids(rel_server: ComfyServer) -> dict[str, str]:
    """A finished prompt tagged with a run that has been finalized: real ids for the generated requests."""
    run_id = uniq("rel-run")
    pid = rel_server.queue(
        marker_prompt(f"{run_id}/frame"), extra_data={"telemetry": {"run_id": run_id, "scene_id": "1"}}
    )
    check_done_marker(rel_server.output_dir, wait_record(rel_server, pid))
    status, body = rel_server.request("POST", f"/telemetry/runs/{run_id}/finalize")
    assert status == 200 and body["Valid"], body
    return {"prompt_id": pid, "run_id": run_id}


def test_schemathesis_finds_no_server_error(rel_server: ComfyServer, known_ids: dict, tmp_path: Path) -> None:
    schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert schemathesis, "schemathesis is a dev requirement (requirements-dev.txt)"
    # The served document, with the real ids as examples, so generated requests also reach the 200 paths.
    doc: dict[str, Any] = rel_server.get("/telemetry/openapi.json")
    for item in doc["paths"].values():
        for op in item.values():
            for param in op.get("parameters", []):
                if param["name"] in known_ids:
                    param["example"] = known_ids[param["name"]]
    schema = tmp_path / "openapi.json"
    schema.write_text(json.dumps(doc))
    har = tmp_path / "requests.har"
    cmd = [
        schemathesis,
        "run",
        str(schema),
        "--url",
        rel_server.url,
        "--checks",
        "not_a_server_error",
        "--mode",
        "all",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "200",
        "--seed",
        "20261124",
        "--generation-database",
        "none",
        "--workers",
        "2",
        "--request-timeout",
        "30",
        "--suppress-health-check",
        "all",
        "--no-color",
        "--report",
        "har",
        "--report-har-path",
        str(har),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"})
    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = Counter(e["response"]["status"] for e in entries)
    print(f"schemathesis: {len(entries)} requests, statuses {dict(sorted(statuses.items()))}")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert len(entries) >= MIN_REQUESTS, (len(entries), proc.stdout[-3000:])
    server_errors = [(e["request"]["method"], e["request"]["url"]) for e in entries if e["response"]["status"] >= 500]
    assert server_errors == []
    assert statuses[200] > 0  # the real ids were used
    assert package_tracebacks(rel_server.log_text(), PACKAGE_FOLDER) == []


TRAVERSAL_RUN_IDS = [
    "..",
    "../..",
    "%2e%2e",
    "%2e%2e%2f%2e%2e%2fetc",
    "..%2f..%2foutside",
    "..%5c..%5coutside",
    "%252e%252e",
    "....%2f%2f",
    ".hidden",
    "-rf",
    "~root",
    "a%00b",
    "%00",
    "%EF%BC%8E%EF%BC%8E",  # fullwidth dots
    "a" * 129,
    "a%2fb",
    "C:%5cWindows",
    "%2fetc%2fpasswd",
]
RUN_SUFFIXES = ["", "/artifact-metadata.json", "/run-summary.txt"]


def test_run_id_traversal_is_refused(rel_server: ComfyServer, known_ids: dict) -> None:
    # Files a traversal would reach if a run id were joined to a path unchecked.
    secret = b"SECRET-run-telemetry-reliability"
    planted = [
        rel_server.output_dir / "telemetry" / "artifact-metadata.json",
        rel_server.output_dir / "artifact-metadata.json",
        rel_server.base_dir / "artifact-metadata.json",
        rel_server.output_dir / "telemetry" / "run-summary.txt",
    ]
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secret)
    before = {p for p in rel_server.base_dir.rglob("*")}
    seen = Counter()
    for run_id in TRAVERSAL_RUN_IDS:
        for prefix in ("/telemetry/runs/", "/api/telemetry/runs/"):
            for suffix in RUN_SUFFIXES:
                status, body = raw_request(rel_server, "GET", prefix + run_id + suffix)
                seen[status] += 1
                # 400 (the package's id check), 404, or 403 from aiohttp's own guard against a raw '..' segment.
                assert status in (400, 403, 404), (run_id, suffix, status, body[:200])
                assert secret not in body
            status, body = raw_request(rel_server, "POST", prefix + run_id + "/finalize")
            seen[status] += 1
            assert status in (400, 403, 404, 405), (run_id, status, body[:200])
    after = {p for p in rel_server.base_dir.rglob("*")}
    created = [p for p in after - before if "telemetry/runs" in str(p) and known_ids["run_id"] not in str(p)]
    assert created == []
    for path in planted:
        assert path.read_bytes() == secret
        path.unlink()
    print(f"run-id traversal corpus: {sum(seen.values())} requests, statuses {dict(seen)}")
    assert package_tracebacks(rel_server.log_text(), PACKAGE_FOLDER) == []


TRAVERSAL_PREFIXES = [
    "..",
    "../x",
    "./../x",
    "a/./../../x",
    "a/b/../../../x",
    "a\\..\\..\\x",
    "..\\x",
    "/etc/x",
    "//server/share/x",
    "\\\\server\\share\\x",
    "C:\\x",
    "C:x",
    "bad\x00name",
    "a\nb/../../x",
    "",
    "/",
    ".",
    "a/",
    "a/" * 60 + "../" * 61 + "x",
]
# Odd but inside the output folder: accepted, and the marker lands inside.
# A name longer than the file system allows is accepted too: SaveImage then fails, and so does the marker (noted).
INSIDE_PREFIXES = [
    "%2e%2e/x",
    "\uff0e\uff0e/x",
    "a/../b",
    "~/x",
    "sp ace/frame",
    "unicode-\u00e9\u4e2d/frame",
    "...x/frame",
    "x" * 5000,
]


@pytest.mark.parametrize("prefix", TRAVERSAL_PREFIXES + INSIDE_PREFIXES, ids=lambda p: repr(p)[:40])
def test_marker_prefix_corpus_stays_inside_output(rel_server: ComfyServer, prefix: str) -> None:
    outer = rel_server.base_dir
    before = {str(p) for p in outer.rglob("*")}
    prompt = marker_prompt(f"safe-{uniq('p')}/frame")
    prompt["4"]["inputs"]["filename_prefix"] = prefix
    status, body = rel_server.request("POST", "/prompt", {"prompt": prompt})
    assert status in (200, 400), (status, body)
    if prefix in TRAVERSAL_PREFIXES:
        assert "4" in body.get("node_errors", {}), body  # refused at validation, naming the marker node
    if status == 200:
        rec = wait_record(rel_server, body["prompt_id"])
        for m in rec["Markers"]:
            if m["Path"]:
                resolved = Path(os.path.realpath(m["Path"]))
                assert resolved.is_relative_to(Path(os.path.realpath(rel_server.output_dir))), m
    after = {str(p) for p in outer.rglob("*")}
    new = [p for p in after - before if p.endswith((".done", ".failed"))]
    output = str(Path(os.path.realpath(rel_server.output_dir)))
    assert all(os.path.realpath(p).startswith(output + os.sep) for p in new), new
    assert not Path("/etc/x.done").exists() and not Path("/x.done").exists()


BAD_TAGS = [
    ({"run_id": "../x"}, "run_id"),
    ({"run_id": ".."}, "run_id"),
    ({"run_id": "a/b"}, "run_id"),
    ({"run_id": "a\\b"}, "run_id"),
    ({"run_id": "%2e%2e"}, "run_id"),
    ({"run_id": "x" * 129}, "run_id"),
    ({"run_id": ["a"]}, "run_id"),
    ({"run_id": {"a": 1}}, "run_id"),
    ({"run_id": True}, "run_id"),
    ({"run_id": 1.5}, "run_id"),
    ({"scene_id": "../../etc"}, "scene_id"),
    ({"scene_id": "\u0000"}, "scene_id"),
    ({"frame_floor": -1}, "frame_floor"),
    ({"frame_floor": "3"}, "frame_floor"),
    ({"frame_floor": 1.5}, "frame_floor"),
    ({"frame_floor": True}, "frame_floor"),
    ({"policy": []}, "policy"),
    ({"policy": {"max_wait_seconds": -1}}, "policy"),
    ({"policy": {"max_wait_seconds": "soon"}}, "policy"),
    ({"policy": {"scene_retry_budget": 1e309}}, "policy"),
]


@pytest.mark.parametrize("tags,param", BAD_TAGS, ids=lambda v: repr(v)[:30])
def test_bad_run_tags_get_400_naming_the_parameter(rel_server: ComfyServer, tags: dict, param: str) -> None:
    body = {"prompt": marker_prompt(f"tags-{uniq('t')}"), "extra_data": {"telemetry": tags}}
    raw = json.dumps(body).replace("Infinity", "1e309").encode()
    status, data = raw_request(rel_server, "POST", "/prompt", raw, {"Content-Type": "application/json"})
    assert status == 400, (status, data[:300])
    err = json.loads(data)["error"]
    assert param in err["parameter"] and err["message"], err


def test_oversized_and_malformed_bodies_get_4xx(rel_server: ComfyServer, known_ids: dict) -> None:
    big = (
        b'{"prompt": {}, "extra_data": {"telemetry": {"run_id": "' + b"x" * (MAX_UPLOAD_MB * 1024 * 1024 + 10) + b'"}}}'
    )
    results = {}
    # The package's middleware reads POST /prompt bodies: an oversized one is refused before ComfyUI sees it.
    for path in ("/prompt", "/api/prompt"):
        status, _ = raw_request(rel_server, "POST", path, big, {"Content-Type": "application/json"})
        results[f"oversized {path}"] = status
        assert status == 413, status
    # The package's own POST route takes no body: anything sent with it is ignored, never a 5xx.
    for label, body in (
        ("oversized", big),
        ("malformed", b"{not json"),
        ("binary", bytes(range(256)) * 64),
        ("deep", b"[" * 100_000),
    ):
        for run_id, expected in ((known_ids["run_id"], 200), ("no-such-run", 404), ("..", 400)):
            status, data = raw_request(
                rel_server, "POST", f"/telemetry/runs/{run_id}/finalize", body, {"Content-Type": "application/json"}
            )
            results[f"{label} finalize {run_id}"] = status
            assert status in (expected, 403 if run_id == ".." else expected), (label, run_id, status, data[:200])
    # Malformed JSON on POST /prompt: ComfyUI's own handler answers it (500 in 0.3.75, with or without the package);
    # the package's middleware must not be the one that fails.
    for label, body in (("malformed", b"{not json"), ("deep", b"[" * 100_000), ("utf-16", '{"a": 1}'.encode("utf-16"))):
        status, _ = raw_request(rel_server, "POST", "/prompt", body, {"Content-Type": "application/json"})
        results[f"{label} /prompt (ComfyUI's handler)"] = status
        assert status in (400, 500), status
    # Bad query values on the package's routes: 400 naming the parameter.
    for path in (
        "/telemetry?limit=1e3",
        "/telemetry?limit=%00",
        "/telemetry?limit=99999999999999999999999",
        f"/telemetry/prompts/{known_ids['prompt_id']}/wait?timeout=inf",
        f"/telemetry/prompts/{known_ids['prompt_id']}/wait?timeout=-0.1",
        f"/telemetry/prompts/{known_ids['prompt_id']}/wait?timeout=1e400",
        f"/telemetry/prompts/{known_ids['prompt_id']}/wait?timeout=%F0%9F%92%A5",
    ):
        status, data = raw_request(rel_server, "GET", path)
        results[path] = status
        assert status == 400 and json.loads(data)["parameter"] in ("limit", "timeout"), (path, status, data[:200])
    print(f"bodies and parameters: {results}")
    assert package_tracebacks(rel_server.log_text(), PACKAGE_FOLDER) == []
