"""Global adapter checkpoints in standard PEFT format (``PeftModel.from_pretrained`` loads
them), one folder per round, with the SHA-256 of the weights file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from peft import PeftModel

from fedtune.platform.config import LoraSettings
from fedtune.platform.lora import load_adapter_arrays

WEIGHTS_FILE = "adapter_model.safetensors"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class AdapterCheckpointer:
    """Writes global adapters through the coordinator's own copy of the base model + adapter,
    so that every checkpoint carries PEFT's own ``adapter_config.json``."""

    def __init__(self, model: PeftModel, directory: Path):
        self.model = model
        self.directory = directory

    def save(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> tuple[Path, str]:
        """Write round ``server_round``'s adapter; returns its folder and weights' SHA-256.
        An existing folder is never overwritten."""
        target = self.directory / f"round-{server_round}"
        if target.exists():
            raise FileExistsError(f"{target} exists; checkpoints are never overwritten")
        load_adapter_arrays(self.model, arrays)
        self.model.save_pretrained(str(target))
        return target, sha256_of(target / WEIGHTS_FILE)


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint's weights no longer match the SHA-256 recorded when it was written."""


def read_checkpoint(path: Path, *, sha256: str) -> tuple[dict[str, np.ndarray], LoraSettings]:
    """A stored global adapter's arrays and LoRA shape, after checking its SHA-256."""
    from safetensors.numpy import load_file

    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: checkpoint weights are missing")
    actual = sha256_of(weights)
    if actual != sha256:
        raise CheckpointIntegrityError(
            f"{weights} has SHA-256 {actual}, but {sha256} was recorded: it changed on disk"
        )
    config = json.loads((path / "adapter_config.json").read_text())
    lora = LoraSettings(
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        target_modules=sorted(config["target_modules"]),
    )
    return dict(load_file(str(weights))), lora
