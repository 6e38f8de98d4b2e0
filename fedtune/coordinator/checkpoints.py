"""Global adapter checkpoints in standard PEFT format (``PeftModel.from_pretrained`` loads
them), one folder per round, with the SHA-256 of the weights.

With a key (``output.encryption_key_file``) the weights are stored encrypted at rest with
AES-256-GCM, bound to their round (``adapter_model.safetensors.aesgcm``); the SHA-256 is of the
plaintext, and ``fedtune model export`` writes a plain copy that PEFT loads."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from peft import PeftModel

from fedtune.common.errors import AlreadyExistsError, FedtuneError, MissingFileError
from fedtune.platform.config import LoraSettings
from fedtune.platform.model.lora import load_adapter_arrays
from fedtune.platform.security.encryption import decrypt_file, encrypt_bytes

WEIGHTS_FILE = "adapter_model.safetensors"
ENCRYPTED_WEIGHTS_FILE = WEIGHTS_FILE + ".aesgcm"


def _associated_data(folder: Path) -> bytes:
    """What an encrypted weights file is bound to: its round folder's name."""
    return f"{folder.name}/{WEIGHTS_FILE}".encode()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class AdapterCheckpointer:
    """Writes global adapters through the coordinator's own copy of the base model + adapter,
    so that every checkpoint carries PEFT's own ``adapter_config.json``."""

    def __init__(self, model: PeftModel, directory: Path, *, key: bytes | None = None):
        self.model = model
        self.directory = directory
        self.key = key

    def save(self, server_round: int, arrays: Mapping[str, np.ndarray]) -> tuple[Path, str]:
        """Write round ``server_round``'s adapter; returns its folder and weights' SHA-256.
        An existing folder is never overwritten."""
        target = self.directory / f"round-{server_round}"
        if target.exists():
            raise AlreadyExistsError(f"{target} exists; checkpoints are never overwritten")
        load_adapter_arrays(self.model, arrays)
        if self.key is None:
            self.model.save_pretrained(str(target))
            return target, sha256_of(target / WEIGHTS_FILE)
        from peft import get_peft_model_state_dict
        from safetensors.torch import save

        target.mkdir(parents=True)
        self.model.peft_config["default"].save_pretrained(str(target))
        state = {k: v.contiguous() for k, v in get_peft_model_state_dict(self.model).items()}
        weights = save(state, metadata={"format": "pt"})
        encrypt_bytes(
            weights,
            target / ENCRYPTED_WEIGHTS_FILE,
            self.key,
            associated_data=_associated_data(target),
        )
        return target, hashlib.sha256(weights).hexdigest()


class CheckpointIntegrityError(FedtuneError, RuntimeError):
    """A checkpoint's weights no longer match the SHA-256 recorded when it was written."""


class CheckpointKeyMissingError(FedtuneError, ValueError):
    """A checkpoint is encrypted and no key was given."""


def checkpoint_weights(
    path: Path,
    *,
    sha256: str,
    key: bytes | None = None,
    key_option: str = "output.encryption_key_file",
) -> bytes:
    """A stored global adapter's safetensors bytes (decrypted), after checking its SHA-256.
    ``key_option``: where the caller's user gives the key, named when it is missing."""
    encrypted = path / ENCRYPTED_WEIGHTS_FILE
    if encrypted.is_file():
        if key is None:
            raise CheckpointKeyMissingError(
                f"{encrypted} is encrypted; give its key with {key_option} to read it"
            )
        weights = encrypted
        data = decrypt_file(encrypted, key, associated_data=_associated_data(path))
    else:
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise MissingFileError(f"{weights}: checkpoint weights are missing")
        data = weights.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise CheckpointIntegrityError(
            f"{weights} has SHA-256 {actual}, but {sha256} was recorded: it changed on disk"
        )
    return data


def read_checkpoint(
    path: Path, *, sha256: str, key: bytes | None = None
) -> tuple[dict[str, np.ndarray], LoraSettings]:
    """A stored global adapter's arrays and LoRA shape, after checking its SHA-256."""
    from safetensors.numpy import load

    arrays = load(checkpoint_weights(path, sha256=sha256, key=key))
    config = json.loads((path / "adapter_config.json").read_text())
    lora = LoraSettings(
        r=config["r"],
        alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0),
        target_modules=sorted(config["target_modules"]),
    )
    return dict(arrays), lora


def export_checkpoint(
    path: Path,
    out: Path,
    *,
    sha256: str,
    key: bytes | None = None,
    key_option: str = "output.encryption_key_file",
) -> Path:
    """A plain copy of a stored global adapter in ``out`` (new) that
    ``PeftModel.from_pretrained`` loads: decrypted, after checking its SHA-256."""
    weights = checkpoint_weights(path, sha256=sha256, key=key, key_option=key_option)
    if out.exists() and any(out.iterdir()):
        raise AlreadyExistsError(f"{out} already exists and is not empty; it is not overwritten")
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_bytes((path / "adapter_config.json").read_bytes())
    (out / WEIGHTS_FILE).write_bytes(weights)
    return out
