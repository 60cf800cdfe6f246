"""Start and stop real ComfyUI servers on 127.0.0.1 with this package linked into their ``custom_nodes``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import provision

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ComfyInstall:
    """One ComfyUI tree and the interpreter that runs it.

    ``overlays`` are folders put first on ``PYTHONPATH`` (a version's own frontend/templates pins, an extra frontend
    before them); ``frontend`` names an extra frontend overlaid on the tree's own pin.
    """

    version: str
    dir: Path
    python: Path
    overlays: tuple[Path, ...] = ()
    frontend: str | None = None

    @property
    def overlay(self) -> Path | None:
        """The first overlay folder, if any."""
        return self.overlays[0] if self.overlays else None

    @property
    def label(self) -> str:
        """``0.33.0``, or ``0.33.0-frontend-1.53.6`` with an extra frontend: names test ids and artifact folders."""
        return f"{self.version}-frontend-{self.frontend}" if self.frontend else self.version

    @property
    def version_tuple(self) -> tuple[int, ...]:
        """The version as integers, for comparisons (``0.33.0`` -> ``(0, 33, 0)``)."""
        return version_tuple(self.version)

    def has_flag(self, flag: str) -> bool:
        """Whether this tree's ``comfy/cli_args.py`` declares the command-line ``flag``."""
        args = self.dir / "comfy" / "cli_args.py"
        return args.exists() and f'"{flag}"' in args.read_text()


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.33.0"`` -> ``(0, 33, 0)``; non-numeric parts count as 0."""
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", version)[:3])


def read_version(comfy_dir: Path) -> str:
    """The ``__version__`` in a ComfyUI tree's ``comfyui_version.py``."""
    text = (comfy_dir / "comfyui_version.py").read_text()
    m = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    if not m:
        raise RuntimeError(f"no __version__ in {comfy_dir / 'comfyui_version.py'}")
    return m.group(1)


def comfyui_dir_from_env() -> Path | None:
    """``COMFYUI_DIR`` as a resolved path, or None when unset."""
    existing = os.environ.get("COMFYUI_DIR")
    return Path(existing).expanduser().resolve() if existing else None


def get_install(version: str, frontend: str | None = None) -> ComfyInstall:
    """The install for ``version``: ``COMFYUI_DIR`` when set (any version; it must be ``version``), else the cache.

    ``frontend``: an extra frontend (``provision.EXTRA_FRONTENDS``) overlaid on the version's own pins.

    Raises:
        LookupError: ``COMFYUI_DIR`` holds another version, or the version is not one the harness provisions.
    """
    cdir = comfyui_dir_from_env()
    if cdir is not None:
        found = read_version(cdir)
        if found != version:
            raise LookupError(f"COMFYUI_DIR={cdir} holds ComfyUI {found}, not {version}")
        python = Path(os.environ.get("COMFYUI_PYTHON", sys.executable))
        return ComfyInstall(found, cdir, python)
    tree = provision.provision_tree(version)
    overlays = [
        provision.provision_overlay(version, frontend) if frontend else None,
        provision.provision_overlay(version),
    ]
    python = provision.venv_python()
    if not python.exists():
        python = provision.provision_venv()
    return ComfyInstall(version, tree, python, tuple(o for o in overlays if o), frontend)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerDied(RuntimeError):
    """The ComfyUI process exited while we waited on it."""


@dataclass
class ComfyServer:
    """A real ComfyUI process with its own base directory (custom_nodes, output, input, user, temp)."""

    install: ComfyInstall
    base_dir: Path
    packages: Mapping[str, Path] = field(default_factory=lambda: {"run-telemetry": REPO})
    extra_args: Iterable[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _log_offset_at_start: int = 0

    @property
    def url(self) -> str:
        """Base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        """The server's output folder."""
        return self.base_dir / "output"

    @property
    def user_dir(self) -> Path:
        """The server's user folder."""
        return self.base_dir / "user"

    def link_packages(self) -> None:
        """Link each package into ``custom_nodes`` under the folder name chosen for it."""
        custom = self.base_dir / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        for name, src in self.packages.items():
            dest = custom / name
            if dest.is_symlink() or dest.exists():
                continue
            dest.symlink_to(Path(src).resolve(), target_is_directory=True)

    def start(self, timeout: float = 180.0) -> ComfyServer:
        """Start the process and return once ``GET /system_stats`` answers."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.link_packages()
        if not self.port:
            self.port = free_port()
        self.log_path = self.base_dir / "comfyui.log"
        env = dict(os.environ)
        env.pop("COMFYUI_DIR", None)
        env.update(self.env)
        if self.install.overlays:
            paths = [*map(str, self.install.overlays), env.get("PYTHONPATH")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [
            str(self.install.python),
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            "--disable-auto-launch",
            *self.extra_args,
        ]
        if self.install.has_flag("--database-url") and "--database-url" not in cmd:
            # ComfyUI's own SQLite database: by default in the tree's user/ folder, shared by every server of
            # that tree and logged as an error at start; each server keeps its own beside its other folders.
            (self.base_dir / "user").mkdir(parents=True, exist_ok=True)
            cmd += ["--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}"]
        log = open(self.log_path, "ab")  # handed to the child; closed here once it has it
        self._log_offset_at_start = self.log_path.stat().st_size
        log.write(f"\n=== start {' '.join(cmd)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            cmd, cwd=self.install.dir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        wait_until(self._ready, timeout, what=f"ComfyUI {self.install.version} on port {self.port} to answer")
        return self

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise ServerDied(f"ComfyUI exited with {self.proc.returncode if self.proc else None}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the process by its id: SIGTERM, then SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def kill9(self) -> None:
        """Kill the process with SIGKILL, as a crash would, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self, timeout: float = 180.0) -> ComfyServer:
        """Start again on the same port and base directory."""
        self.stop()
        return self.start(timeout)

    def log_text(self) -> str:
        """Everything the server printed since it was created."""
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def log_tail(self, n: int = 80) -> str:
        """The last ``n`` lines of the server log."""
        return "\n".join(self.log_text().splitlines()[-n:])

    # --- HTTP helpers (stdlib only, so bench scripts and the demo can use them too) ---

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 30.0, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        """Send a request; return (status, parsed JSON or text)."""
        return http_json(method, self.url + path, body, timeout, headers)

    def get(self, path: str, timeout: float = 30.0) -> Any:
        """GET a JSON route that must answer 200."""
        status, data = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise AssertionError(f"GET {path} -> {status}: {data}")
        return data

    def queue(self, prompt: dict[str, Any], *, client_id: str | None = None, extra_data: dict | None = None) -> str:
        """POST /prompt and return the prompt id."""
        body: dict[str, Any] = {"prompt": prompt}
        if client_id:
            body["client_id"] = client_id
        if extra_data:
            body["extra_data"] = extra_data
        status, data = self.request("POST", "/prompt", body)
        if status != 200:
            raise AssertionError(f"POST /prompt -> {status}: {data}")
        return str(data["prompt_id"])

    def history(self, prompt_id: str) -> dict[str, Any]:
        """``/history/{id}`` entry for the prompt, or ``{}`` while it has not ended."""
        data = self.get(f"/history/{prompt_id}")
        return data.get(prompt_id, {})

    def wait_history(self, prompt_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Wait (condition with deadline) until the prompt is in ``/history`` and return its entry."""
        found: dict[str, Any] = {}

        def done() -> bool:
            found.update(self.history(prompt_id))
            return bool(found)

        wait_until(done, timeout, what=f"prompt {prompt_id} in /history", interval=0.05)
        return found

    def interrupt(self) -> None:
        """POST /interrupt."""
        self.request("POST", "/interrupt", {})


def http_json(
    method: str, url: str, body: Any = None, timeout: float = 30.0, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    """A JSON HTTP call with the standard library; returns (status, JSON or text)."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def wait_until(cond: Callable[[], bool], timeout: float, *, what: str = "condition", interval: float = 0.1) -> None:
    """Poll ``cond`` until it is true; raise TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def scratch_dir(prefix: str = "rt-comfy-") -> Path:
    """A new temporary folder for one server's base directory."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def new_client_id() -> str:
    """A websocket client id, as the frontend would send."""
    return uuid.uuid4().hex
