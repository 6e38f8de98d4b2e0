"""Choosing the torch device at run time."""

from __future__ import annotations

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
