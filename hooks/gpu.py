"""The probe chain inside ComfyUI: NVML → torch CUDA (through comfy.model_management) → nvidia-smi → system RAM."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ..telemetry.probes import TorchCudaFunctions, default_probe_chain

logger = logging.getLogger("run_telemetry")

ENV_PROBES = "RUN_TELEMETRY_PROBES"  # auto (default): system RAM only under --cpu; full: whole chain; cpu


def comfy_torch_functions() -> TorchCudaFunctions:
    """torch.cuda-shaped calls answered by ComfyUI's own model_management (its device, its free-memory view)."""
    import comfy.model_management as mm
    import torch

    def device() -> Any:
        return mm.get_torch_device()

    def mem_get_info(index: int) -> tuple[int, int]:
        dev = torch.device("cuda", index)
        return int(mm.get_free_memory(dev)), int(mm.get_total_memory(dev))

    return TorchCudaFunctions(
        is_available=lambda: getattr(device(), "type", "cpu") == "cuda",
        current_device=lambda: int(getattr(device(), "index", 0) or 0),
        device_count=torch.cuda.device_count,
        get_device_name=torch.cuda.get_device_name,
        mem_get_info=mem_get_info,
        total_memory=lambda index: int(torch.cuda.get_device_properties(index).total_memory),
    )


def build_snapshot() -> Callable[[], dict[str, Any]]:
    """A function returning one snapshot as JSON-ready data (cheap: failed providers are remembered)."""
    cpu_only = False
    try:
        from comfy.cli_args import args

        cpu_only = bool(getattr(args, "cpu", False))  # --cpu: ComfyUI computes on the CPU; report that device
    except Exception:
        logger.debug("comfy.cli_args unavailable", exc_info=True)
    mode = os.environ.get(ENV_PROBES, "auto").strip().lower()
    if mode == "full":
        cpu_only = False  # ask NVML, torch CUDA and nvidia-smi even under --cpu (diagnostics, fault tests)
    elif mode == "cpu":
        cpu_only = True
    functions = None
    if not cpu_only:
        try:
            functions = comfy_torch_functions()
        except Exception as exc:
            logger.info("Run Telemetry: torch through comfy.model_management unavailable (%s); plain torch", exc)
    chain = default_probe_chain(env=os.environ, torch_functions=functions, cpu_only=cpu_only)

    def snapshot() -> dict[str, Any]:
        return chain.snapshot().to_json_dict()

    return snapshot


def build_peak_meter() -> tuple[Callable[[], Any], Callable[[Any], tuple[int | None, str]]]:
    """(begin, end) reading torch's peak allocation without resetting it (other packages read that counter)."""

    def begin() -> Any:
        try:
            import torch

            if torch.cuda.is_available():
                return int(torch.cuda.max_memory_allocated())
        except Exception:
            logger.debug("peak begin failed", exc_info=True)
        return None

    def end(start: Any) -> tuple[int | None, str]:
        if start is None:
            return None, "unavailable: no CUDA device (CPU run)"
        import torch

        now = int(torch.cuda.max_memory_allocated())
        if now > start:
            return now, "torch.cuda.max_memory_allocated (not reset): new high-water mark set by this prompt"
        return None, "torch.cuda.max_memory_allocated (not reset): unchanged, the peak was below an earlier one"

    return begin, end
