"""Loading the base model and its tokenizer once, on the device chosen at run time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from fedtune.platform.config import ModelConfig
from fedtune.platform.model.devices import select_device
from fedtune.platform.model.fingerprint import model_dir_fingerprint
from fedtune.platform.model.hub_code import NO_HUB_CODE
from fedtune.platform.model.model_store import resolve_model_dir

# model.dtype (fedtune/platform/config.py) -> the torch dtype of the base weights.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class BaseModel:
    """A loaded base model with what identifies it."""

    model: PreTrainedModel
    tokenizer: object  # a transformers tokenizer with a chat template
    fingerprint: str
    model_dir: Path
    device: torch.device


def load_base_model(config: ModelConfig) -> BaseModel:
    """Resolve ``config.spec``, load model and tokenizer, and fingerprint the weights."""
    device = select_device(config.device)
    if config.quantization != "none" and device.type != "cuda":
        raise RuntimeError(
            f"model.quantization = '{config.quantization}' needs a CUDA device (bitsandbytes); "
            "this machine runs on CPU: set model.quantization = 'none'"
        )
    model_dir = resolve_model_dir(config.spec, cache_dir=config.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"the tokenizer in {model_dir} has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _load_weights(model_dir, config.quantization, DTYPES[config.dtype], device)
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        fingerprint=model_dir_fingerprint(model_dir),
        model_dir=model_dir,
        device=device,
    )


def _load_weights(
    model_dir: Path, quantization: str, dtype: torch.dtype, device: torch.device
) -> PreTrainedModel:
    if quantization == "none":
        # In bfloat16 only the base weights are: PEFT creates the LoRA layers in float32
        # (get_peft_model's autocast_adapter_dtype) and casts their input up, so per-example
        # gradients, clipping and noise stay float32 (tests/test_base_model.py checks it).
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **NO_HUB_CODE)
        return model.to(device)
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise RuntimeError(
            "quantized loading needs bitsandbytes: pip install 'fedtune[gpu]'"
        ) from None
    from peft import prepare_model_for_kbit_training

    if quantization == "4bit":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=bnb, device_map={"": device.index or 0}, **NO_HUB_CODE
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
