"""Fingerprints that let nodes prove they train the same base model on a known data set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

# Config keys that describe the software that wrote a config, not the model itself.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype"}


def model_dir_fingerprint(model_dir: Path) -> str:
    """SHA-256 over a model directory's config and every weight (name, dtype, shape, bytes).

    Hashes tensors, not files, so the same weights give the same fingerprint however they are
    sharded; it is read from disk, so a node that loads the model quantised (QLoRA) still
    proves the same base. Needs the weights in safetensors form.
    """
    weight_files = sorted(model_dir.glob("*.safetensors"))
    if not weight_files:
        raise ValueError(f"{model_dir} has no .safetensors weights to fingerprint")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True).encode())
    handles = [safe_open(str(path), framework="pt") for path in weight_files]
    names = sorted((name, index) for index, handle in enumerate(handles) for name in handle.keys())  # noqa: SIM118
    for name, index in names:
        tensor = handles[index].get_tensor(name).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def file_fingerprint(path: Path) -> str:
    """SHA-256 of a file's bytes (used for data sets and downloaded model files)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()
