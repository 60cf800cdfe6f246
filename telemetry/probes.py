"""GPU and system-memory probes: a chain of providers that always yields a snapshot.

Order: NVML (``pynvml`` from nvidia-ml-py) → torch CUDA (plain torch, or callables backed by
``comfy.model_management`` inside ComfyUI) → ``nvidia-smi`` (about 2 s timeout) → system RAM, which always answers,
so the snapshot's device name is never blank (a CPU run reports Name "cpu", Type "cpu").

Every provider that fails before the one that answers adds a fallback note to the snapshot, worded
``"<provider> failed: <error>; used <source> instead"``. The text holds no times, so the notes of a before and an after
snapshot merge without duplicates.

:meth:`ProbeChain.snapshot` runs on ComfyUI's prompt worker thread before and after every prompt, so it stays cheap:
NVML is initialised once, and a provider that failed is not asked again (no nvidia-smi spawn, no torch import) until
``reprobe_interval`` seconds of the injected clock have passed; meanwhile its remembered failure still yields its note.

Device choice: ComfyUI computes on CUDA device ``compute_index`` (0 unless told otherwise) of the devices left visible
by ``CUDA_VISIBLE_DEVICES`` (read from an injected env mapping). NVML and nvidia-smi number devices physically in PCI
order; CUDA follows that order when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, and on machines whose GPUs are all alike either
way. Every device seen is listed in ``Devices``.

Each provider takes its outside dependency as a parameter (the nvml module, torch callables, a process runner and
``which``, a psutil-like module or a meminfo path, the clock) so tests hand in real alternatives.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from .models import DeviceInfo, GpuBlock, SnapshotSource, SystemBlock, SystemSnapshot, bytes_to_mib, iso_utc

__all__ = [
    "NVIDIA_SMI_ARGS",
    "NvidiaSmiProvider",
    "NvmlProvider",
    "ProbeChain",
    "ProbeUnavailable",
    "Provider",
    "ProviderReading",
    "RamReading",
    "SystemRam",
    "SystemRamProvider",
    "TorchCudaFunctions",
    "TorchCudaProvider",
    "build_gpu_block",
    "build_system_block",
    "default_probe_chain",
    "describe_nvml_error",
    "parse_nvidia_smi_csv",
    "run_command",
    "torch_cuda_functions",
    "visible_devices",
]

logger = logging.getLogger("run_telemetry.probes")

DEFAULT_REPROBE_INTERVAL = 300.0
DEFAULT_NVIDIA_SMI_TIMEOUT = 2.0
NVIDIA_SMI_ARGS: tuple[str, ...] = (
    "--query-gpu=index,name,memory.total,memory.free,memory.used",
    "--format=csv,noheader,nounits",
)
_MIB = 1048576
# How long to wait for a killed child to be reaped before leaving it behind: a process stuck in the driver
# (uninterruptible sleep) ignores SIGKILL, and the caller's timeout must hold anyway.
_REAP_GRACE_SECONDS = 0.5
_MAX_ERROR_CHARS = 300


class ProbeUnavailable(Exception):
    """A provider cannot answer; the message says why, for the fallback note."""


@dataclass(frozen=True)
class ProviderReading:
    """What one provider saw: the compute device and every device."""

    source: SnapshotSource
    device: DeviceInfo
    devices: list[DeviceInfo]
    driver_version: str | None = None


class Provider(Protocol):
    """One source of device memory figures; ``read`` raises on failure (ProbeUnavailable when the cause is known)."""

    name: SnapshotSource

    def read(self) -> ProviderReading:
        """The current reading."""
        ...


def _text(value: Any) -> str:
    # pynvml returns str since 11.x but bytes before; accept both.
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def visible_devices(devices: Sequence[DeviceInfo], env: Mapping[str, str]) -> list[DeviceInfo]:
    """``devices`` (physically numbered) in CUDA order after ``CUDA_VISIBLE_DEVICES``; unset means all of them.

    Entries are physical indices or ``GPU-<uuid prefix>``; like CUDA, the list stops at the first entry that names no
    device (so ``""`` and ``"-1"`` hide every GPU).
    """
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return list(devices)
    chosen: list[DeviceInfo] = []
    for token in (part.strip() for part in raw.split(",")):
        match: DeviceInfo | None = None
        if token.isdigit():
            match = next((d for d in devices if d.index == int(token)), None)
        elif token.upper().startswith("GPU-"):
            match = next((d for d in devices if d.uuid and d.uuid.upper().startswith(token.upper())), None)
        if match is None or any(d is match for d in chosen):
            break
        chosen.append(match)
    return chosen


def _pick_compute_device(devices: list[DeviceInfo], env: Mapping[str, str], compute_index: int) -> DeviceInfo:
    visible = visible_devices(devices, env)
    if compute_index >= len(visible):
        setting = env.get("CUDA_VISIBLE_DEVICES")
        where = f" with CUDA_VISIBLE_DEVICES={setting!r}" if setting is not None else ""
        raise ProbeUnavailable(f"no CUDA device {compute_index} among {len(visible)} visible{where}")
    return visible[compute_index].model_copy(update={"cuda_index": compute_index})


# --- NVML -----------------------------------------------------------------------------------------------------------


class _NoSuchError(Exception):
    """Stands in for NVMLError when the module given has none, so ``except`` clauses stay valid."""


def describe_nvml_error(exc: BaseException, nvml: Any) -> str:
    """``exc`` as text with its NVML constant name, e.g. 'Driver Not Loaded (NVML_ERROR_DRIVER_NOT_LOADED)'."""
    code = getattr(exc, "value", None)
    try:
        text = str(exc)
    except Exception:  # pynvml's __str__ calls into the library for codes it does not know
        text = f"NVML error {code}"
    name = None
    if isinstance(code, int):
        name = next((key for key in dir(nvml) if key.startswith("NVML_ERROR_") and getattr(nvml, key) == code), None)
    return f"{text} ({name})" if name else (text or f"NVML error {code}")


def _import_pynvml() -> Any:
    return importlib.import_module("pynvml")


class NvmlProvider:
    """Reads every GPU through NVML; initialises the library once and reuses it."""

    name: SnapshotSource = "nvml"

    def __init__(
        self,
        nvml: Any | None = None,
        *,
        loader: Callable[[], Any] = _import_pynvml,
        env: Mapping[str, str] | None = None,
        compute_index: int = 0,
    ) -> None:
        """``nvml`` is a pynvml-shaped module; without one, ``loader`` imports pynvml on first use."""
        self._nvml = nvml
        self._loader = loader
        self._env = os.environ if env is None else env
        self._compute_index = compute_index
        self._initialised = False

    def _module(self) -> Any:
        if self._nvml is None:
            try:
                self._nvml = self._loader()
            except ImportError as exc:
                raise ProbeUnavailable(f"pynvml (nvidia-ml-py) is not installed: {exc}") from exc
        return self._nvml

    def read(self) -> ProviderReading:
        """Query NVML, initialising it on first use and once more if NVML reports itself uninitialised."""
        nvml = self._module()
        error_cls = getattr(nvml, "NVMLError", _NoSuchError)
        uninitialised = getattr(nvml, "NVML_ERROR_UNINITIALIZED", 1)
        try:
            return self._read(nvml)
        except error_cls as exc:
            # Someone else's nvmlShutdown can drop NVML's reference count to zero under us: initialise again, once.
            if getattr(exc, "value", None) == uninitialised and self._initialised:
                self._initialised = False
                try:
                    return self._read(nvml)
                except error_cls as again:
                    raise ProbeUnavailable(describe_nvml_error(again, nvml)) from again
            raise ProbeUnavailable(describe_nvml_error(exc, nvml)) from exc

    def _read(self, nvml: Any) -> ProviderReading:
        error_cls = getattr(nvml, "NVMLError", _NoSuchError)
        if not self._initialised:
            nvml.nvmlInit()
            self._initialised = True
        try:
            driver: str | None = _text(nvml.nvmlSystemGetDriverVersion())
        except error_cls:
            driver = None
        handles: list[Any] = []
        devices: list[DeviceInfo] = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            try:
                uuid: str | None = _text(nvml.nvmlDeviceGetUUID(handle))
            except error_cls:
                uuid = None
            handles.append(handle)
            devices.append(DeviceInfo(name=_text(nvml.nvmlDeviceGetName(handle)), type="cuda", index=index, uuid=uuid))
        compute = _pick_compute_device(devices, self._env, self._compute_index)
        compute_position = next(pos for pos, dev in enumerate(devices) if dev.index == compute.index)
        for position, handle in enumerate(handles):
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except error_cls:
                if position == compute_position:
                    raise
                # Another device refusing (permissions in a container, MIG) must not hide the compute device.
                logger.debug("NVML gave no memory info for device %d", position, exc_info=True)
                continue
            devices[position] = devices[position].model_copy(
                update={"vram_total": int(memory.total), "vram_free": int(memory.free), "vram_used": int(memory.used)}
            )
        compute = devices[compute_position].model_copy(update={"cuda_index": compute.cuda_index})
        return ProviderReading(source="nvml", device=compute, devices=devices, driver_version=driver)

    def close(self) -> None:
        """Shut NVML down if this provider initialised it."""
        if self._initialised and self._nvml is not None:
            self._initialised = False
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down is best effort; the process may be exiting
                logger.debug("nvmlShutdown failed", exc_info=True)


# --- torch CUDA -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchCudaFunctions:
    """The torch.cuda calls the torch-cuda provider needs; inside ComfyUI, built on comfy.model_management."""

    is_available: Callable[[], bool]
    current_device: Callable[[], int]
    device_count: Callable[[], int]
    get_device_name: Callable[[int], str]
    # (free, total) in bytes for a device index, like torch.cuda.mem_get_info.
    mem_get_info: Callable[[int], tuple[int, int]]
    # Total bytes of another device without creating a CUDA context on it; None leaves it unknown.
    total_memory: Callable[[int], int] | None = None


def torch_cuda_functions(torch_module: Any) -> TorchCudaFunctions:
    """The provider's calls taken from a torch-like module (``torch_module.cuda``)."""
    cuda = torch_module.cuda
    return TorchCudaFunctions(
        is_available=cuda.is_available,
        current_device=cuda.current_device,
        device_count=cuda.device_count,
        get_device_name=cuda.get_device_name,
        mem_get_info=cuda.mem_get_info,
        total_memory=lambda index: int(cuda.get_device_properties(index).total_memory),
    )


def _import_torch() -> Any:
    return importlib.import_module("torch")


class TorchCudaProvider:
    """Reads the compute device through torch CUDA (or callables shaped like it)."""

    name: SnapshotSource = "torch-cuda"

    def __init__(
        self,
        functions: TorchCudaFunctions | None = None,
        *,
        loader: Callable[[], Any] = _import_torch,
        compute_index: int | None = None,
    ) -> None:
        """Without ``functions``, ``loader`` imports torch on first use; ``compute_index`` defaults to the current device."""
        self._functions = functions
        self._loader = loader
        self._compute_index = compute_index

    def _fns(self) -> TorchCudaFunctions:
        if self._functions is None:
            try:
                module = self._loader()
            except ImportError as exc:
                raise ProbeUnavailable(f"torch is not installed: {exc}") from exc
            self._functions = torch_cuda_functions(module)
        return self._functions

    def read(self) -> ProviderReading:
        """Free and total memory of the compute device; the others are listed with their total when known."""
        fns = self._fns()
        if not fns.is_available():
            raise ProbeUnavailable("CUDA is not available to torch")
        index = fns.current_device() if self._compute_index is None else self._compute_index
        free, total = fns.mem_get_info(index)
        compute = DeviceInfo(
            name=_text(fns.get_device_name(index)),
            type="cuda",
            index=index,
            cuda_index=index,
            vram_total=int(total),
            vram_free=int(free),
            vram_used=int(total) - int(free),
        )
        devices: list[DeviceInfo] = []
        for other in range(int(fns.device_count())):
            if other == index:
                devices.append(compute)
                continue
            # Asking mem_get_info of another device would create a CUDA context there; total needs none.
            other_total: int | None = None
            if fns.total_memory is not None:
                try:
                    other_total = int(fns.total_memory(other))
                except Exception:
                    logger.debug("torch gave no total memory for device %d", other, exc_info=True)
            name = _text(fns.get_device_name(other))
            devices.append(DeviceInfo(name=name, type="cuda", index=other, cuda_index=other, vram_total=other_total))
        if not devices:
            devices.append(compute)
        return ProviderReading(source="torch-cuda", device=compute, devices=devices)


# --- nvidia-smi -----------------------------------------------------------------------------------------------------

Runner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    if os.name == "posix":
        try:
            # The child leads its own session (start_new_session), so this also ends anything it started.
            os.killpg(proc.pid, signal.SIGKILL)
            return
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.kill()
    except OSError:
        pass


def run_command(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` capturing text output; raise TimeoutExpired after ``timeout`` s even if the child will not die."""
    extra: dict[str, Any] = {}
    if os.name == "posix":
        extra["start_new_session"] = True
    else:
        extra["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        **extra,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        try:
            proc.wait(timeout=_REAP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) ignored SIGKILL; leaving it behind", argv[0], proc.pid)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        raise subprocess.TimeoutExpired(list(argv), timeout) from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)


def _smi_number(value: str) -> int | None:
    value = value.strip()
    # nvidia-smi prints "[N/A]" or "[Not Supported]" for memory some devices do not report.
    if not value or value.startswith("["):
        return None
    return int(float(value))


def parse_nvidia_smi_csv(text: str) -> list[DeviceInfo]:
    """Devices from ``nvidia-smi --query-gpu=index,name,memory.total,memory.free,memory.used`` CSV (MiB, no units)."""
    devices: list[DeviceInfo] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) < 5:
            raise ProbeUnavailable(f"nvidia-smi printed an unexpected line: {line.strip()!r}")
        # A name may hold commas; the index leads and the three memory columns close the line.
        total, free, used = (_smi_number(p) for p in parts[-3:])
        try:
            index = int(parts[0].strip())
        except ValueError:
            raise ProbeUnavailable(f"nvidia-smi printed an unexpected line: {line.strip()!r}") from None
        devices.append(
            DeviceInfo(
                name=",".join(parts[1:-3]).strip(),
                type="cuda",
                index=index,
                vram_total=None if total is None else total * _MIB,
                vram_free=None if free is None else free * _MIB,
                vram_used=None if used is None else used * _MIB,
            )
        )
    if not devices:
        raise ProbeUnavailable("nvidia-smi listed no GPU")
    return devices


class NvidiaSmiProvider:
    """Reads every GPU by running nvidia-smi with a timeout."""

    name: SnapshotSource = "nvidia-smi"

    def __init__(
        self,
        *,
        runner: Runner = run_command,
        which: Callable[[str], str | None] = shutil.which,
        env: Mapping[str, str] | None = None,
        compute_index: int = 0,
        timeout: float = DEFAULT_NVIDIA_SMI_TIMEOUT,
    ) -> None:
        """``runner(argv, timeout)`` behaves like :func:`run_command`; ``which`` finds the executable."""
        self._runner = runner
        self._which = which
        self._env = os.environ if env is None else env
        self._compute_index = compute_index
        self._timeout = timeout

    def read(self) -> ProviderReading:
        """Run nvidia-smi once and parse its CSV."""
        path = self._which("nvidia-smi")
        if path is None:
            raise ProbeUnavailable("nvidia-smi not found on PATH")
        try:
            proc = self._runner([path, *NVIDIA_SMI_ARGS], self._timeout)
        except subprocess.TimeoutExpired:
            raise ProbeUnavailable(f"nvidia-smi did not answer within {self._timeout:g} s") from None
        except FileNotFoundError:
            raise ProbeUnavailable(f"nvidia-smi not found at {path}") from None
        except OSError as exc:
            raise ProbeUnavailable(f"nvidia-smi could not start: {exc}") from None
        if proc.returncode != 0:
            output = f"{proc.stdout or ''}\n{proc.stderr or ''}"
            first = next((line.strip() for line in output.splitlines() if line.strip()), "no output")
            raise ProbeUnavailable(f"nvidia-smi exited with code {proc.returncode}: {first}")
        devices = parse_nvidia_smi_csv(proc.stdout or "")
        compute = _pick_compute_device(devices, self._env, self._compute_index)
        if compute.vram_free is None or compute.vram_total is None:
            raise ProbeUnavailable(f"nvidia-smi reports no memory figures for GPU {compute.index} ({compute.name})")
        return ProviderReading(source="nvidia-smi", device=compute, devices=devices)


# --- system RAM -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RamReading:
    """System RAM in bytes and where the figures came from; None when no source answered."""

    total: int | None
    available: int | None
    source: str


_OS_SYSCONF: Callable[[str], int] | None = getattr(os, "sysconf", None)  # absent on Windows


def _import_psutil() -> Any:
    return importlib.import_module("psutil")


class SystemRam:
    """Reads system RAM: /proc/meminfo (Linux), else psutil, else os.sysconf."""

    def __init__(
        self,
        *,
        psutil: Any | None = None,
        psutil_loader: Callable[[], Any] | None = _import_psutil,
        meminfo_path: str | Path | None = "/proc/meminfo",
        sysconf: Callable[[str], int] | None = _OS_SYSCONF,
    ) -> None:
        """``psutil`` is a psutil-like module; without it ``psutil_loader`` is tried once (None: never)."""
        self._psutil = psutil
        self._psutil_loader = psutil_loader if psutil is None else None
        self._meminfo_path = None if meminfo_path is None else os.fspath(meminfo_path)
        self._sysconf = sysconf

    def _psutil_module(self) -> Any | None:
        if self._psutil is None and self._psutil_loader is not None:
            loader, self._psutil_loader = self._psutil_loader, None  # try the import once only
            try:
                self._psutil = loader()
            except ImportError:
                logger.debug("psutil is not installed; reading system RAM another way")
        return self._psutil

    def read(self) -> RamReading:
        """Total and available RAM in bytes."""
        # /proc/meminfo first: it is what psutil reads on Linux (MemAvailable), at a third of the cost; this runs
        # twice per prompt on ComfyUI's worker under --cpu.
        if self._meminfo_path is not None:
            reading = self._read_meminfo(self._meminfo_path)
            if reading is not None:
                return reading
        module = self._psutil_module()
        if module is not None:
            try:
                memory = module.virtual_memory()
                return RamReading(int(memory.total), int(memory.available), "psutil")
            except Exception:
                logger.debug("psutil.virtual_memory failed", exc_info=True)
        if self._sysconf is not None:
            try:
                page = int(self._sysconf("SC_PAGE_SIZE"))
                total = int(self._sysconf("SC_PHYS_PAGES")) * page
                # Free pages only: less than "available" (which counts reclaimable cache), the best sysconf offers.
                free = int(self._sysconf("SC_AVPHYS_PAGES")) * page
                return RamReading(total, free, "sysconf")
            except (ValueError, OSError):
                logger.debug("os.sysconf gave no RAM figures", exc_info=True)
        return RamReading(None, None, "none")

    @staticmethod
    def _read_meminfo(path: str) -> RamReading | None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.read(fd, 65536)
            finally:
                os.close(fd)
        except OSError:
            return None

        def kib(key: bytes) -> int | None:
            # "Key:   12345 kB" at the start of a line
            at = data.find(b"\n" + key + b":")
            if at < 0:
                if not data.startswith(key + b":"):
                    return None
                at = -1
            start = at + len(key) + 2
            end = data.find(b"\n", start)
            fields = data[start : end if end >= 0 else len(data)].split()
            try:
                return int(fields[0]) * 1024 if fields and fields[-1] == b"kB" else None
            except ValueError:
                return None

        total = kib(b"MemTotal")
        if total is None:
            return None
        available = kib(b"MemAvailable")
        if available is None:
            # MemAvailable exists since Linux 3.14; before that, free + page cache is the usual estimate.
            available = (kib(b"MemFree") or 0) + (kib(b"Cached") or 0)
        return RamReading(total, available, "/proc/meminfo")


class SystemRamProvider:
    """The last resort: system RAM stands in for VRAM, as ComfyUI itself does on the CPU. Never fails."""

    name: SnapshotSource = "system-ram"

    def __init__(self, ram: SystemRam | None = None) -> None:
        """``ram`` reads the figures; a default SystemRam when omitted."""
        self.ram = ram or SystemRam()

    def read(self) -> ProviderReading:
        """The CPU as the compute device, with RAM figures as its memory."""
        reading = self.ram.read()
        used = None if reading.total is None or reading.available is None else reading.total - reading.available
        device = DeviceInfo(
            name="cpu", type="cpu", index=None, vram_total=reading.total, vram_free=reading.available, vram_used=used
        )
        return ProviderReading(source="system-ram", device=device, devices=[device])


# --- the chain ------------------------------------------------------------------------------------------------------


@dataclass
class _Failure:
    error: str
    at: float


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class ProbeChain:
    """Asks providers in order and returns the first answer as a SystemSnapshot; system RAM answers last."""

    providers: Sequence[Provider]
    ram: SystemRam = field(default_factory=SystemRam)
    clock: Callable[[], float] = time.monotonic
    now: Callable[[], datetime] = _utc_now
    reprobe_interval: float = DEFAULT_REPROBE_INTERVAL
    _failures: dict[str, _Failure] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def snapshot(self) -> SystemSnapshot:
        """The current snapshot; never raises, and skips providers that failed within ``reprobe_interval``."""
        with self._lock:
            failed: list[tuple[str, str]] = []
            reading: ProviderReading | None = None
            for provider in self.providers:
                reading = self._ask(provider, failed)
                if reading is not None:
                    break
            if reading is None:
                reading = SystemRamProvider(self.ram).read()
            ram = self.ram.read() if reading.source != "system-ram" else None
            notes = [f"{name} failed: {error}; used {reading.source} instead" for name, error in failed]
            return SystemSnapshot(
                timestamp=iso_utc(self.now()),
                source=reading.source,
                device=reading.device,
                devices=reading.devices,
                ram_total=reading.device.vram_total if ram is None else ram.total,
                ram_free=reading.device.vram_free if ram is None else ram.available,
                driver_version=reading.driver_version,
                fallback_notes=notes,
            )

    def _ask(self, provider: Provider, failed: list[tuple[str, str]]) -> ProviderReading | None:
        now = self.clock()
        known = self._failures.get(provider.name)
        if known is not None and now - known.at < self.reprobe_interval:
            failed.append((provider.name, known.error))
            return None
        try:
            reading = provider.read()
        except Exception as exc:  # telemetry must never fail a prompt, whatever a library raises
            error = str(exc) if isinstance(exc, ProbeUnavailable) else f"{type(exc).__name__}: {exc}"
            # Notes land on one summary line: CUDA errors span several lines and can run long.
            error = " ".join(error.split())
            if len(error) > _MAX_ERROR_CHARS:
                error = error[: _MAX_ERROR_CHARS - 3] + "..."
            if known is None or known.error != error:
                logger.info("%s unavailable: %s", provider.name, error)
            self._failures[provider.name] = _Failure(error, now)
            failed.append((provider.name, error))
            return None
        if known is not None:
            logger.info("%s answers again", provider.name)
            del self._failures[provider.name]
        return reading

    @property
    def failures(self) -> dict[str, str]:
        """Provider name → last error, for providers currently remembered as failed."""
        with self._lock:
            return {name: failure.error for name, failure in self._failures.items()}

    def close(self) -> None:
        """Release what providers hold (NVML)."""
        for provider in self.providers:
            close = getattr(provider, "close", None)
            if callable(close):
                close()


def default_probe_chain(
    *,
    env: Mapping[str, str] | None = None,
    torch_functions: TorchCudaFunctions | None = None,
    cpu_only: bool = False,
    compute_index: int = 0,
    clock: Callable[[], float] = time.monotonic,
    reprobe_interval: float = DEFAULT_REPROBE_INTERVAL,
    nvidia_smi_timeout: float = DEFAULT_NVIDIA_SMI_TIMEOUT,
) -> ProbeChain:
    """The standard chain NVML → torch CUDA → nvidia-smi → system RAM; ``cpu_only`` keeps only system RAM."""
    env = os.environ if env is None else env
    providers: list[Provider] = []
    if not cpu_only:
        providers = [
            NvmlProvider(env=env, compute_index=compute_index),
            TorchCudaProvider(torch_functions),
            NvidiaSmiProvider(env=env, compute_index=compute_index, timeout=nvidia_smi_timeout),
        ]
    return ProbeChain(providers, clock=clock, reprobe_interval=reprobe_interval)


# --- snapshots → contract blocks ------------------------------------------------------------------------------------


def build_gpu_block(
    before: SystemSnapshot,
    after: SystemSnapshot,
    *,
    peak_used_bytes: int | None = None,
    peak_source: str | None = None,
) -> GpuBlock:
    """The contract's ``GPU`` block from snapshots taken before and after a prompt (delta = after − before)."""
    device = after.device
    # A free figure is missing only when no RAM source answered either; the contract wants numbers, so 0 (with the
    # snapshot's notes saying why).
    before_mb = bytes_to_mib(before.device.vram_free or 0)
    after_mb = bytes_to_mib(device.vram_free or 0)
    source = before.source if before.source == after.source else f"{before.source}/{after.source}"
    return GpuBlock(
        name=(device.name or before.device.name or "").strip() or "unknown",
        type=device.type,
        index=device.index,
        vram_total=device.vram_total,
        vram_free_before=before.device.vram_free,
        vram_free_after=device.vram_free,
        vram_before_mb=before_mb,
        vram_after_mb=after_mb,
        # From the rounded figures, so the three numbers in the file and the summary agree exactly.
        vram_delta_mb=round(after_mb - before_mb, 1),
        source=source,
        uuid=device.uuid,
        driver_version=after.driver_version,
        peak_used_bytes=peak_used_bytes,
        peak_used_mb=None if peak_used_bytes is None else bytes_to_mib(peak_used_bytes),
        peak_source=peak_source,
    )


def build_system_block(before: SystemSnapshot, after: SystemSnapshot) -> SystemBlock:
    """The contract's ``System`` block: both snapshots and their fallback notes, each note once, in order."""
    notes = list(dict.fromkeys([*before.fallback_notes, *after.fallback_notes]))
    if (before.source, before.device.name) != (after.source, after.device.name):
        notes.append(
            f"memory before came from {before.source} ({before.device.name}), after from {after.source} "
            f"({after.device.name}); VramDeltaMB compares different sources"
        )
    return SystemBlock(before=before, after=after, fallback_notes=notes)
