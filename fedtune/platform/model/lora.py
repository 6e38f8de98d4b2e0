"""LoRA adapters: building them with PEFT, and moving their weights as plain arrays.

Federated code needs one seam only: the adapter's weights out as ``{name: ndarray}`` and back
in. Names are PEFT's own (``get_peft_model_state_dict``), so a saved adapter directory and a
federated message carry the same keys.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import PreTrainedModel

from fedtune.common.errors import FedtuneError
from fedtune.platform.config import LoraSettings
from fedtune.platform.model.families import (
    LoraTargetError,
    check_routing_frozen,
    check_targets_adapted,
    exclude_router_outputs,
    resolve_target_modules,
)


class AdapterMismatchError(FedtuneError, ValueError):
    """Adapter arrays do not fit the model's adapter (keys, shapes or values)."""


def lora_config(settings: LoraSettings, *, target_modules: list[str]) -> LoraConfig:
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter; only the adapter's parameters train.

    The targets are ``settings.target_modules`` or, when unset, the model family's default
    (:mod:`fedtune.platform.model.families`); :class:`LoraTargetError` when a target matches
    nothing, or the router or routed experts of a mixture-of-experts model.

    With ``settings.train_a`` false the A matrices keep their random initialisation and only
    B trains (FFA-LoRA, Sun et al. 2024), which halves the parameters that DP noise touches.
    """
    targets = resolve_target_modules(model, settings.target_modules)
    exclude_router_outputs(model)
    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated `is_gradient_checkpointing`; nothing to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, lora_config(settings, target_modules=targets))
    if not settings.train_a:
        for name, parameter in peft_model.named_parameters():
            if "lora_A" in name:
                parameter.requires_grad_(False)
    try:
        check_targets_adapted(peft_model, targets)
        check_routing_frozen(peft_model)
    except LoraTargetError:
        peft_model.unload()  # leave the base model as it was
        raise
    return peft_model


def adapter_arrays(model: PeftModel) -> dict[str, np.ndarray]:
    """A snapshot of the adapter's weights as float32 numpy arrays, keyed by PEFT's
    state-dict names. Copies: later training does not change what was returned."""
    state = get_peft_model_state_dict(model)
    return {
        name: tensor.detach().to("cpu", torch.float32).numpy().copy()
        for name, tensor in state.items()
    }


def load_adapter_arrays(model: PeftModel, arrays: Mapping[str, np.ndarray]) -> None:
    """Set the adapter's weights; refuses missing or extra keys, wrong shapes, non-finite values."""
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise AdapterMismatchError(
            f"adapter keys do not match: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
            f", unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    state = {}
    for name, reference in expected.items():
        value = np.asarray(arrays[name])
        if tuple(value.shape) != tuple(reference.shape):
            raise AdapterMismatchError(
                f"adapter array {name} has shape {tuple(value.shape)}, "
                f"expected {tuple(reference.shape)}"
            )
        if not np.isfinite(value).all():
            raise AdapterMismatchError(f"adapter array {name} has non-finite values")
        state[name] = torch.from_numpy(np.ascontiguousarray(value)).to(
            reference.device, reference.dtype
        )
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise AdapterMismatchError(f"PEFT did not accept adapter keys {unexpected[:3]}")


def load_initial_adapter(model: PeftModel, folder: Path) -> None:
    """Set ``model``'s adapter to the PEFT adapter saved in ``folder`` (``run.initial_adapter``):
    every LoRA matrix, A included (with FFA-LoRA the frozen A matrices are the saved ones)."""
    from peft.utils import load_peft_weights

    from fedtune.platform.config import ConfigError

    if not (folder / "adapter_model.safetensors").is_file():  # never a download from a hub
        raise ConfigError(
            f"run.initial_adapter {folder}: not a PEFT adapter (no adapter_model.safetensors)"
        )
    try:
        weights = load_peft_weights(str(folder), device="cpu")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"run.initial_adapter {folder}: not a PEFT adapter ({exc})") from None
    arrays = {name: tensor.to(torch.float32).numpy() for name, tensor in weights.items()}
    try:
        load_adapter_arrays(model, arrays)
    except AdapterMismatchError as exc:
        raise ConfigError(
            f"run.initial_adapter {folder}: does not fit the run's [lora]: {exc}"
        ) from None
