"""The GPU probe chain: every provider, every fallback path, the remembered failures, the real CPU path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import types
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pynvml  # nvidia-ml-py, a requirement: its real NVMLError and constants shape the fakes
import pytest

from telemetry.models import DeviceInfo, SystemSnapshot
from telemetry.probes import (
    NVIDIA_SMI_ARGS,
    NvidiaSmiProvider,
    NvmlProvider,
    ProbeChain,
    ProbeUnavailable,
    SystemRam,
    SystemRamProvider,
    TorchCudaFunctions,
    TorchCudaProvider,
    build_gpu_block,
    build_system_block,
    default_probe_chain,
    parse_nvidia_smi_csv,
    run_command,
    torch_cuda_functions,
    visible_devices,
)

MIB = 1048576
GIB = 1 << 30
NOW = datetime(2025, 11, 21, 8, 0, 0, tzinfo=timezone.utc)
SMI_NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n\n"
)
SMI_TWO_GPUS = "0, NVIDIA GeForce RTX 3090, 24576, 23012, 1158\n1, NVIDIA GeForce RTX 3060, 12288, 11945, 187\n"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- fakes shaped like the real libraries ---------------------------------------------------------------------------


class FakeNvml(types.ModuleType):
    """A pynvml stand-in: the real NVMLError classes and NVML_ERROR_* codes, real c_nvmlMemory_t results."""

    def __init__(self, gpus: Sequence[tuple[str | bytes, str, int, int]], *, init_error: int | None = None) -> None:
        super().__init__("pynvml")
        for name in dir(pynvml):
            if name.startswith(("NVML_ERROR_", "NVMLError")):
                setattr(self, name, getattr(pynvml, name))
        self.gpus = list(gpus)  # (name, uuid, total bytes, free bytes)
        self.init_error = init_error
        self.memory_errors: dict[int, int] = {}
        self.initialised = False
        self.calls: Counter[str] = Counter()

    def _require_init(self) -> None:
        if not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.calls["nvmlShutdown"] += 1
        self._require_init()
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._require_init()
        return "560.35.03"

    def nvmlDeviceGetCount(self) -> int:
        self._require_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        self._require_init()
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return types.SimpleNamespace(index=index)

    def nvmlDeviceGetName(self, handle: Any) -> str | bytes:
        self._require_init()
        return self.gpus[handle.index][0]

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        self._require_init()
        return self.gpus[handle.index][1]

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        self._require_init()
        self.calls["nvmlDeviceGetMemoryInfo"] += 1
        if handle.index in self.memory_errors:
            raise pynvml.NVMLError(self.memory_errors[handle.index])
        _, _, total, free = self.gpus[handle.index]
        return pynvml.c_nvmlMemory_t(total=total, free=free, used=total - free)


A6000 = ("NVIDIA RTX A6000", "GPU-aaaaaaaa-1111-2222-3333-444444444444", 48 * GIB, 40 * GIB)
L4 = ("NVIDIA L4", "GPU-bbbbbbbb-5555-6666-7777-888888888888", 24 * GIB, 20 * GIB)


class FakeCuda:
    """torch.cuda's surface as the provider uses it; records which devices had their memory queried."""

    def __init__(self, devices: Sequence[tuple[str, int, int]], *, available: bool = True, current: int = 0) -> None:
        self.devices = list(devices)  # (name, total, free)
        self.available = available
        self.current = current
        self.mem_error: BaseException | None = None
        self.queried: list[int] = []

    def is_available(self) -> bool:
        return self.available

    def current_device(self) -> int:
        return self.current

    def device_count(self) -> int:
        return len(self.devices)

    def get_device_name(self, index: int) -> str:
        return self.devices[index][0]

    def mem_get_info(self, index: int) -> tuple[int, int]:
        self.queried.append(index)
        if self.mem_error is not None:
            raise self.mem_error
        _, total, free = self.devices[index]
        return free, total

    def get_device_properties(self, index: int) -> Any:
        return types.SimpleNamespace(total_memory=self.devices[index][1], name=self.devices[index][0])


def fake_torch(cuda: FakeCuda) -> Any:
    return types.SimpleNamespace(cuda=cuda)


class FakeRunner:
    """A process runner answering like run_command: a CompletedProcess, or the exception given."""

    def __init__(self, outcome: subprocess.CompletedProcess[str] | BaseException) -> None:
        self.outcome = outcome
        self.calls: list[tuple[list[str], float]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(argv), timeout))
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def smi(stdout: str, returncode: int = 0) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["nvidia-smi"], returncode, stdout, "")


def which_at(path: str | None) -> Any:
    return lambda name: path if name == "nvidia-smi" else None


def no_psutil() -> Any:
    raise ImportError("No module named 'psutil'")


def chain(*providers: Any, clock: Clock | None = None, **kwargs: Any) -> ProbeChain:
    return ProbeChain(list(providers), clock=clock or Clock(), now=lambda: NOW, **kwargs)


# --- NVML -----------------------------------------------------------------------------------------------------------


def test_nvml_answers_and_is_initialised_once() -> None:
    nvml = FakeNvml([A6000])
    probes = chain(NvmlProvider(nvml, env={}))
    snapshots = [probes.snapshot() for _ in range(50)]
    assert nvml.calls["nvmlInit"] == 1
    assert nvml.calls["nvmlDeviceGetMemoryInfo"] == 50  # fresh figures every time
    snap = snapshots[-1]
    assert snap.source == "nvml"
    assert snap.fallback_notes == []
    assert snap.timestamp == "2025-11-21T08:00:00.000Z"
    assert snap.driver_version == "560.35.03"
    assert snap.device == DeviceInfo(
        name="NVIDIA RTX A6000",
        type="cuda",
        index=0,
        cuda_index=0,
        vram_total=48 * GIB,
        vram_free=40 * GIB,
        vram_used=8 * GIB,
        uuid=A6000[1],
    )
    assert snap.ram_total and snap.ram_total > 0


def test_nvml_names_as_bytes_from_old_pynvml_are_decoded() -> None:
    nvml = FakeNvml([(b"Tesla T4", "GPU-cccc", 16 * GIB, 15 * GIB)])
    assert chain(NvmlProvider(nvml, env={})).snapshot().device.name == "Tesla T4"


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML Shared Library Not Found (NVML_ERROR_LIBRARY_NOT_FOUND)"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "Driver Not Loaded (NVML_ERROR_DRIVER_NOT_LOADED)"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "Insufficient Permissions (NVML_ERROR_NO_PERMISSION)"),
    ],
)
def test_nvml_init_failure_falls_back_to_torch_with_a_note(code: int, text: str) -> None:
    nvml = FakeNvml([A6000], init_error=code)
    cuda = FakeCuda([("NVIDIA RTX A6000", 48 * GIB, 39 * GIB)])
    clock = Clock()
    probes = chain(NvmlProvider(nvml, env={}), TorchCudaProvider(torch_cuda_functions(fake_torch(cuda))), clock=clock)
    snap = probes.snapshot()
    assert snap.source == "torch-cuda"
    assert snap.device.name == "NVIDIA RTX A6000" and snap.device.vram_free == 39 * GIB
    assert snap.fallback_notes == [f"nvml failed: {text}; used torch-cuda instead"]
    # Remembered: NVML is not asked again until the re-probe interval has passed, yet the note stays.
    for _ in range(20):
        assert probes.snapshot().fallback_notes == snap.fallback_notes
    assert nvml.calls["nvmlInit"] == 1
    clock.now += 299.0
    probes.snapshot()
    assert nvml.calls["nvmlInit"] == 1
    clock.now += 1.0
    nvml.init_error = None  # the driver came back
    again = probes.snapshot()
    assert nvml.calls["nvmlInit"] == 2
    assert again.source == "nvml" and again.fallback_notes == []
    assert probes.failures == {}


def test_nvml_gpu_lost_falls_back_and_names_the_error() -> None:
    nvml = FakeNvml([A6000])
    nvml.memory_errors[0] = pynvml.NVML_ERROR_GPU_IS_LOST
    snap = chain(NvmlProvider(nvml, env={}), SystemRamProvider()).snapshot()
    assert snap.source == "system-ram"
    assert snap.fallback_notes == ["nvml failed: GPU is lost (NVML_ERROR_GPU_IS_LOST); used system-ram instead"]


def test_nvml_reinitialises_once_after_someone_else_shut_it_down() -> None:
    nvml = FakeNvml([A6000])
    probes = chain(NvmlProvider(nvml, env={}))
    assert probes.snapshot().source == "nvml"
    nvml.initialised = False  # another package's nvmlShutdown dropped NVML's reference count to zero
    snap = probes.snapshot()
    assert snap.source == "nvml" and snap.fallback_notes == []
    assert nvml.calls["nvmlInit"] == 2


def test_nvml_missing_module_is_a_fallback_note() -> None:
    def missing() -> Any:
        raise ImportError("No module named 'pynvml'")

    snap = chain(NvmlProvider(loader=missing, env={})).snapshot()
    assert snap.source == "system-ram"
    assert snap.fallback_notes[0].startswith("nvml failed: pynvml (nvidia-ml-py) is not installed")


def test_nvml_close_shuts_down_once() -> None:
    nvml = FakeNvml([A6000])
    probes = chain(NvmlProvider(nvml, env={}))
    probes.snapshot()
    probes.close()
    probes.close()
    assert nvml.calls["nvmlShutdown"] == 1


@pytest.mark.parametrize(
    ("setting", "physical", "cuda_index"),
    [(None, 0, 0), ("1", 1, 0), ("1,0", 1, 0), ("GPU-bbbbbbbb", 1, 0), ("0,1", 0, 0)],
)
def test_nvml_reports_the_device_cuda_computes_on(setting: str | None, physical: int, cuda_index: int) -> None:
    nvml = FakeNvml([A6000, L4])
    env = {} if setting is None else {"CUDA_VISIBLE_DEVICES": setting}
    snap = chain(NvmlProvider(nvml, env=env)).snapshot()
    assert snap.device.index == physical and snap.device.cuda_index == cuda_index
    assert snap.device.name == [A6000, L4][physical][0]
    assert [d.name for d in snap.devices] == ["NVIDIA RTX A6000", "NVIDIA L4"]  # every device, physical order


def test_nvml_other_device_refusing_memory_info_does_not_hide_the_compute_device() -> None:
    nvml = FakeNvml([A6000, L4])
    nvml.memory_errors[0] = pynvml.NVML_ERROR_NO_PERMISSION
    snap = chain(NvmlProvider(nvml, env={"CUDA_VISIBLE_DEVICES": "1"})).snapshot()
    assert snap.source == "nvml" and snap.device.vram_free == 20 * GIB
    assert snap.devices[0].vram_free is None


def test_hidden_gpus_fall_through_to_system_ram() -> None:
    nvml = FakeNvml([A6000])
    snap = chain(NvmlProvider(nvml, env={"CUDA_VISIBLE_DEVICES": ""})).snapshot()
    assert snap.source == "system-ram" and snap.device.name == "cpu" and snap.device.type == "cpu"
    assert snap.fallback_notes == [
        "nvml failed: no CUDA device 0 among 0 visible with CUDA_VISIBLE_DEVICES=''; used system-ram instead"
    ]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("0,1", [0, 1]), ("1,0", [1, 0]), ("0,7,1", [0]), ("-1", []), ("", []), ("1,1", [1]), ("GPU-AAAA", [0])],
)
def test_visible_devices_follows_cuda_rules(setting: str, expected: list[int]) -> None:
    devices = [DeviceInfo(name=n, type="cuda", index=i, uuid=u) for i, (n, u, _, _) in enumerate([A6000, L4])]
    assert [d.index for d in visible_devices(devices, {"CUDA_VISIBLE_DEVICES": setting})] == expected


# --- torch CUDA -----------------------------------------------------------------------------------------------------


def test_torch_reads_only_the_compute_device_memory() -> None:
    cuda = FakeCuda([("NVIDIA RTX A6000", 48 * GIB, 40 * GIB), ("NVIDIA L4", 24 * GIB, 20 * GIB)], current=1)
    snap = chain(TorchCudaProvider(torch_cuda_functions(fake_torch(cuda)))).snapshot()
    assert snap.source == "torch-cuda"
    assert snap.device.name == "NVIDIA L4" and snap.device.vram_free == 20 * GIB and snap.device.index == 1
    # Asking another device's free memory would create a CUDA context on it.
    assert cuda.queried == [1]
    assert snap.devices[0].vram_total == 48 * GIB and snap.devices[0].vram_free is None


def test_torch_from_injected_callables_like_the_comfyui_adapter() -> None:
    functions = TorchCudaFunctions(
        is_available=lambda: True,
        current_device=lambda: 0,
        device_count=lambda: 1,
        get_device_name=lambda index: "NVIDIA GeForce RTX 4090",
        mem_get_info=lambda index: (23 * GIB, 24 * GIB),
    )
    snap = chain(TorchCudaProvider(functions)).snapshot()
    assert (snap.source, snap.device.vram_free, snap.device.vram_total) == ("torch-cuda", 23 * GIB, 24 * GIB)


def test_torch_without_cuda_and_with_a_cuda_error_fall_back_with_notes() -> None:
    off = FakeCuda([], available=False)
    assert chain(TorchCudaProvider(torch_cuda_functions(fake_torch(off)))).snapshot().fallback_notes == [
        "torch-cuda failed: CUDA is not available to torch; used system-ram instead"
    ]
    broken = FakeCuda([("NVIDIA L4", 24 * GIB, 20 * GIB)])
    broken.mem_error = RuntimeError(
        "CUDA error: an illegal memory access was encountered\n"
        "CUDA kernel errors might be asynchronously reported at some other API call"
    )
    snap = chain(TorchCudaProvider(torch_cuda_functions(fake_torch(broken)))).snapshot()
    assert snap.fallback_notes == [
        "torch-cuda failed: RuntimeError: CUDA error: an illegal memory access was encountered CUDA kernel errors "
        "might be asynchronously reported at some other API call; used system-ram instead"
    ]


def test_torch_not_installed_is_imported_once_per_reprobe() -> None:
    attempts: list[int] = []

    def missing() -> Any:
        attempts.append(1)
        raise ImportError("No module named 'torch'")

    clock = Clock()
    probes = chain(TorchCudaProvider(loader=missing), clock=clock)
    for _ in range(10):
        assert "torch is not installed" in probes.snapshot().fallback_notes[0]
    assert len(attempts) == 1
    clock.now += 300.0
    probes.snapshot()
    assert len(attempts) == 2


# --- nvidia-smi -----------------------------------------------------------------------------------------------------


def test_nvidia_smi_success_parses_real_csv() -> None:
    runner = FakeRunner(smi(SMI_TWO_GPUS))
    snap = chain(NvidiaSmiProvider(runner=runner, which=which_at("/usr/bin/nvidia-smi"), env={})).snapshot()
    assert runner.calls == [(["/usr/bin/nvidia-smi", *NVIDIA_SMI_ARGS], 2.0)]
    assert NVIDIA_SMI_ARGS == (
        "--query-gpu=index,name,memory.total,memory.free,memory.used",
        "--format=csv,noheader,nounits",
    )
    assert snap.source == "nvidia-smi"
    assert snap.device.name == "NVIDIA GeForce RTX 3090"
    assert (snap.device.vram_total, snap.device.vram_free, snap.device.vram_used) == (
        24576 * MIB,
        23012 * MIB,
        1158 * MIB,
    )
    assert [d.index for d in snap.devices] == [0, 1]


def test_nvidia_smi_respects_cuda_visible_devices() -> None:
    runner = FakeRunner(smi(SMI_TWO_GPUS))
    provider = NvidiaSmiProvider(runner=runner, which=which_at("nvidia-smi"), env={"CUDA_VISIBLE_DEVICES": "1"})
    assert chain(provider).snapshot().device.name == "NVIDIA GeForce RTX 3060"


@pytest.mark.parametrize(
    ("which", "outcome", "error"),
    [
        (None, smi(SMI_TWO_GPUS), "nvidia-smi not found on PATH"),
        ("/usr/bin/nvidia-smi", FileNotFoundError(2, "No such file or directory"), "nvidia-smi not found at"),
        ("/usr/bin/nvidia-smi", PermissionError(13, "Permission denied"), "nvidia-smi could not start"),
        (
            "/usr/bin/nvidia-smi",
            smi(SMI_NO_DRIVER, returncode=9),
            "nvidia-smi exited with code 9: NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver",
        ),
        (
            "/usr/bin/nvidia-smi",
            subprocess.TimeoutExpired(["nvidia-smi"], 2.0),
            "nvidia-smi did not answer within 2 s",
        ),
        ("/usr/bin/nvidia-smi", smi("0, NVIDIA GH200, [N/A], [N/A], [N/A]\n"), "no memory figures for GPU 0"),
        ("/usr/bin/nvidia-smi", smi("Segmentation fault\n"), "unexpected line"),
        ("/usr/bin/nvidia-smi", smi(""), "listed no GPU"),
    ],
    ids=["absent", "vanished", "no-permission", "no-driver", "hang", "n/a-memory", "garbage", "empty"],
)
def test_nvidia_smi_failures_fall_back_with_a_note(which: str | None, outcome: Any, error: str) -> None:
    runner = FakeRunner(outcome)
    snap = chain(NvidiaSmiProvider(runner=runner, which=which_at(which), env={})).snapshot()
    assert snap.source == "system-ram" and snap.device.name == "cpu"
    (note,) = snap.fallback_notes
    assert note.startswith("nvidia-smi failed: ") and error in note and note.endswith("; used system-ram instead")
    if which is None:
        assert runner.calls == []  # nothing to spawn


def test_nvidia_smi_is_not_spawned_again_until_the_reprobe_interval() -> None:
    runner = FakeRunner(smi(SMI_NO_DRIVER, returncode=9))
    clock = Clock()
    probes = chain(NvidiaSmiProvider(runner=runner, which=which_at("/usr/bin/nvidia-smi"), env={}), clock=clock)
    for _ in range(25):
        assert probes.snapshot().fallback_notes  # the remembered failure still explains the fallback
    assert len(runner.calls) == 1
    clock.now += 299.9
    probes.snapshot()
    assert len(runner.calls) == 1
    clock.now += 0.1
    probes.snapshot()
    assert len(runner.calls) == 2


def test_parse_nvidia_smi_name_with_commas() -> None:
    (device,) = parse_nvidia_smi_csv("3, NVIDIA A100-SXM4-80GB, MIG 1g.10gb, 81920, 80000, 1920\n")
    assert (device.index, device.name, device.vram_free) == (3, "NVIDIA A100-SXM4-80GB, MIG 1g.10gb", 80000 * MIB)


# --- nvidia-smi as a real process -----------------------------------------------------------------------------------


def fake_smi(tmp_path: Path, body: str) -> str:
    """An executable nvidia-smi stand-in that runs ``body`` under this Python."""
    script = tmp_path / "nvidia-smi"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body), encoding="utf-8")
    script.chmod(0o755)
    return str(script)


posix_only = pytest.mark.skipif(os.name != "posix", reason="a script stands in for nvidia-smi through its shebang")


@posix_only
def test_real_process_success_and_driver_failure(tmp_path: Path) -> None:
    ok = fake_smi(tmp_path, f"import sys\nsys.stdout.write({SMI_TWO_GPUS!r})\n")
    snap = chain(NvidiaSmiProvider(which=which_at(ok), env={})).snapshot()
    assert snap.source == "nvidia-smi" and snap.device.vram_free == 23012 * MIB

    failing = fake_smi(tmp_path, f"import sys\nsys.stdout.write({SMI_NO_DRIVER!r})\nsys.exit(9)\n")
    snap = chain(NvidiaSmiProvider(which=which_at(failing), env={})).snapshot()
    assert "nvidia-smi exited with code 9: NVIDIA-SMI has failed" in snap.fallback_notes[0]


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # killed and awaiting a reaper counts as dead


@posix_only
def test_hanging_nvidia_smi_times_out_and_its_children_die(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    hang = fake_smi(
        tmp_path,
        f"""
        import subprocess, sys, time
        # A grandchild that keeps our stdout open, as a wedged driver helper would.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(60)
        """,
    )
    timeout = 0.5
    probes = chain(NvidiaSmiProvider(which=which_at(hang), env={}, timeout=timeout))
    started = time.monotonic()
    snap = probes.snapshot()
    elapsed = time.monotonic() - started
    assert elapsed < timeout + 1.5, f"the timeout did not hold: {elapsed:.2f}s"
    assert snap.source == "system-ram"
    assert snap.fallback_notes == ["nvidia-smi failed: nvidia-smi did not answer within 0.5 s; used system-ram instead"]
    if Path("/proc").is_dir():
        grandchild = int(pid_file.read_text())
        deadline = time.monotonic() + 5
        while not _dead(grandchild) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _dead(grandchild)


@posix_only
def test_run_command_timeout_holds(tmp_path: Path) -> None:
    script = fake_smi(tmp_path, "import time\ntime.sleep(60)\n")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_command([script], 0.3)
    assert time.monotonic() - started < 0.3 + 1.5


# --- system RAM, for real -------------------------------------------------------------------------------------------


def test_system_ram_with_psutil_is_real() -> None:
    psutil = pytest.importorskip("psutil")
    reading = SystemRam(psutil=psutil, meminfo_path=None).read()
    assert reading.source == "psutil"
    assert reading.total == psutil.virtual_memory().total
    assert reading.available is not None and 0 < reading.available <= reading.total


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux /proc/meminfo")
def test_system_ram_on_linux_reads_proc_meminfo_first_and_agrees_with_psutil() -> None:
    psutil = pytest.importorskip("psutil")
    reading = SystemRam().read()
    vm = psutil.virtual_memory()
    assert reading.source == "/proc/meminfo"
    assert reading.total == vm.total  # both are MemTotal
    assert reading.available is not None and abs(reading.available - vm.available) <= vm.total * 0.02


def test_meminfo_parser_takes_only_whole_kib_lines(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        8000000 kB\nSwapMemAvailable:  1 kB\nMemAvailable:    2500000 kB\n")
    reading = SystemRam(psutil_loader=None, meminfo_path=meminfo, sysconf=None).read()
    assert (reading.total, reading.available, reading.source) == (8000000 * 1024, 2500000 * 1024, "/proc/meminfo")
    meminfo.write_text("MemTotal: lots\n")
    assert SystemRam(psutil_loader=None, meminfo_path=meminfo, sysconf=None).read().source == "none"


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="Linux /proc/meminfo")
def test_system_ram_without_psutil_reads_proc_meminfo() -> None:
    loads: list[int] = []

    def loader() -> Any:
        loads.append(1)
        return no_psutil()

    ram = SystemRam(psutil_loader=loader)
    reading = ram.read()
    ram.read()
    assert loads == []  # /proc/meminfo answered: psutil is not even imported
    assert reading.source == "/proc/meminfo"
    sysconf_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert reading.total is not None and abs(reading.total - sysconf_total) <= sysconf_total * 0.01
    assert reading.available is not None and 0 < reading.available <= reading.total


@pytest.mark.skipif(not hasattr(os, "sysconf"), reason="os.sysconf")
def test_missing_psutil_is_tried_once_then_sysconf(tmp_path: Path) -> None:
    loads: list[int] = []

    def loader() -> Any:
        loads.append(1)
        return no_psutil()

    ram = SystemRam(psutil_loader=loader, meminfo_path=tmp_path / "absent")
    assert [ram.read().source, ram.read().source] == ["sysconf", "sysconf"]
    assert loads == [1]


@pytest.mark.skipif(not hasattr(os, "sysconf"), reason="os.sysconf")
def test_system_ram_without_psutil_or_meminfo_uses_sysconf(tmp_path: Path) -> None:
    reading = SystemRam(psutil_loader=None, meminfo_path=tmp_path / "absent").read()
    assert reading.source == "sysconf"
    assert reading.total == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_meminfo_of_an_old_kernel_estimates_available(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        8000000 kB\nMemFree:         1000000 kB\nCached:          2000000 kB\n")
    reading = SystemRam(psutil_loader=None, meminfo_path=meminfo, sysconf=None).read()
    assert (reading.total, reading.available) == (8000000 * 1024, 3000000 * 1024)


def test_no_ram_source_still_names_the_cpu() -> None:
    ram = SystemRam(psutil_loader=None, meminfo_path=None, sysconf=None)
    snap = chain(ram=ram).snapshot()
    assert (snap.source, snap.device.name, snap.device.type, snap.device.vram_free) == (
        "system-ram",
        "cpu",
        "cpu",
        None,
    )


def test_default_chain_on_this_machine_answers_with_notes_for_every_failed_provider() -> None:
    """The real chain (real pynvml, real PATH, real RAM) with every GPU hidden: the CPU path, for real."""
    hidden = {"CUDA_VISIBLE_DEVICES": ""}
    unavailable = TorchCudaFunctions(
        is_available=lambda: False,
        current_device=lambda: 0,
        device_count=lambda: 0,
        get_device_name=lambda index: "",
        mem_get_info=lambda index: (0, 0),
    )
    probes = default_probe_chain(env=hidden, torch_functions=unavailable)
    try:
        snap = probes.snapshot()
    finally:
        probes.close()
    assert snap.source == "system-ram" and snap.device.name == "cpu"
    assert snap.device.vram_total and snap.device.vram_total > 0
    assert [note.split(" failed: ")[0] for note in snap.fallback_notes] == ["nvml", "torch-cuda", "nvidia-smi"]
    assert all(note.endswith("; used system-ram instead") for note in snap.fallback_notes)


def test_real_pynvml_without_a_driver_is_a_note() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVIDIA driver")
    snap = chain(NvmlProvider(pynvml, env={})).snapshot()
    assert snap.source == "system-ram"
    assert "(NVML_ERROR_" in snap.fallback_notes[0]


def test_cpu_only_chain_asks_no_gpu_provider() -> None:
    snap = default_probe_chain(cpu_only=True).snapshot()
    assert (snap.source, snap.device.name, snap.fallback_notes) == ("system-ram", "cpu", [])


def test_a_provider_raising_anything_never_breaks_the_snapshot() -> None:
    class Broken:
        name = "nvml"

        def read(self) -> Any:
            raise AttributeError("module 'pynvml' has no attribute 'nvmlDeviceGetCount'")

    snap = chain(Broken()).snapshot()
    assert snap.source == "system-ram"
    assert snap.fallback_notes == [
        "nvml failed: AttributeError: module 'pynvml' has no attribute 'nvmlDeviceGetCount'; used system-ram instead"
    ]


def test_probe_unavailable_is_an_exception() -> None:
    assert issubclass(ProbeUnavailable, Exception)


# --- snapshots → contract blocks ------------------------------------------------------------------------------------


def snapshot(free: int, *, source: str = "nvml", name: str = "NVIDIA RTX A6000", notes: list[str] | None = None) -> Any:
    device = DeviceInfo(name=name, type="cuda", index=0, vram_total=48 * GIB, vram_free=free)
    return SystemSnapshot(
        timestamp="2025-11-21T08:00:00.000Z", source=source, device=device, devices=[device], fallback_notes=notes or []
    )


def test_gpu_block_from_before_and_after() -> None:
    block = build_gpu_block(snapshot(24000 * MIB), snapshot(22600 * MIB), peak_used_bytes=9 * GIB, peak_source="torch")
    assert (block.vram_free_before, block.vram_free_after) == (24000 * MIB, 22600 * MIB)
    assert (block.vram_before_mb, block.vram_after_mb, block.vram_delta_mb) == (24000, 22600, -1400)
    assert (block.name, block.type, block.index, block.source) == ("NVIDIA RTX A6000", "cuda", 0, "nvml")
    assert (block.peak_used_bytes, block.peak_used_mb, block.peak_source) == (9 * GIB, 9216, "torch")


def test_gpu_block_delta_agrees_with_the_rounded_figures() -> None:
    before, after = int(1000.26 * MIB), int(999.94 * MIB)
    block = build_gpu_block(snapshot(before), snapshot(after))
    assert (block.vram_before_mb, block.vram_after_mb) == (1000.3, 999.9)
    assert block.vram_delta_mb == -0.4  # not round((after - before) / MiB, 1) == -0.3


def test_system_block_merges_notes_and_flags_mixed_sources() -> None:
    note = "nvml failed: GPU is lost (NVML_ERROR_GPU_IS_LOST); used nvidia-smi instead"
    before = snapshot(10 * GIB, source="nvml")
    after = snapshot(9 * GIB, source="nvidia-smi", notes=[note])
    system = build_system_block(before, after)
    assert system.fallback_notes[0] == note
    assert "memory before came from nvml" in system.fallback_notes[1]
    assert build_gpu_block(before, after).source == "nvml/nvidia-smi"
    same = build_system_block(snapshot(1, notes=[note]), snapshot(2, notes=[note]))
    assert same.fallback_notes == [note]


def test_gpu_block_for_a_cpu_run_names_the_cpu() -> None:
    ram = SystemRam(psutil_loader=None, meminfo_path=None, sysconf=None)
    cpu = chain(ram=ram).snapshot()
    block = build_gpu_block(cpu, cpu)
    assert (block.name, block.type, block.vram_before_mb, block.vram_delta_mb) == ("cpu", "cpu", 0, 0)
