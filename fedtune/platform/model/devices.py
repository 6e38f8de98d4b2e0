"""Choosing the torch device at run time, and timing compute on it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch


def select_device(preference: Literal["auto", "cpu", "cuda"] = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU. Asking for CUDA without one is an error."""
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise RuntimeError("model.device = 'cuda' was asked for, but no CUDA device is available")
    return torch.device("cpu")


CPUINFO = Path("/proc/cpuinfo")  # Linux: the CPU's instruction-set flags


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA device that supports it, or a
    CPU with AVX-512 BF16 or AMX instructions (read from Linux's /proc/cpuinfo). Elsewhere
    bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = CPUINFO.read_text().split()
    except OSError:  # not Linux
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA runs kernels asynchronously: a clock read
    without this measures the queueing, not the compute). Nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DeviceClock:
    """Seconds spent in blocks of compute on one device, summed over ``with clock:`` blocks;
    the device is synchronised before the clock is read at each block's start and end."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self._started: float | None = None

    def __enter__(self) -> DeviceClock:
        synchronize(self.device)
        self._started = time.perf_counter()
        return self

    def __exit__(self, *_exc: object) -> None:
        synchronize(self.device)
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
        self._started = None
