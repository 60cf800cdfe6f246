"""The README, CI and packaging files say what the code does."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from aiohttp import web

from telemetry.cli import build_parser
from tests.pkg import sub

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def test_ci_runs_the_readme_test_command() -> None:
    assert "scripts/dev.sh test" in README and "scripts/dev.sh demo" in README
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^exec bash scripts/dev\.sh test\b", ci, re.M)


def test_every_route_is_in_the_readme(tmp_path: Path) -> None:
    rt = sub("hooks.runtime").Runtime(user_dir=tmp_path, output_dir=lambda: tmp_path, snapshot=lambda: {}, env={})
    routes = web.RouteTableDef()
    sub("server_routes").add_routes(routes, rt)
    missing = [f"{r.method} {r.path}" for r in routes if f"{r.method} {r.path}" not in README]
    assert missing == []


def test_every_cli_command_is_in_the_readme() -> None:
    parser = build_parser()
    sub_action = next(a for a in parser._actions if a.dest == "command")
    for name in sub_action.choices:
        assert f"| `{name}" in README, name


def test_requirements_match_pyproject_and_no_duplicate_web() -> None:
    reqs = [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines() if ln.strip()]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["dependencies"] == reqs
    assert "web" not in project["tool"]["comfy"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["project"]["version"])
    init = (REPO / "__init__.py").read_text()
    assert 'WEB_DIRECTORY = "./web"' in init


def test_changelog_names_the_current_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert f"[{version}]" in (REPO / "CHANGELOG.md").read_text()


def test_every_core_subpackage_and_schema_is_installed() -> None:
    """pip installs telemetry/ as run_telemetry: each of its sub-packages must be listed, and its schemas shipped."""
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {"run_telemetry": "telemetry"}
    core = REPO / "telemetry"
    found = {".".join(("run_telemetry", *p.parent.relative_to(core).parts)) for p in core.rglob("__init__.py")}
    assert found == set(setup["packages"])
    data = setup["package-data"]["run_telemetry"]
    assert all(p.relative_to(core).match(pattern) for p in (core / "schemas").iterdir() for pattern in data)
