"""run.initial_adapter: a federated run starts from a saved PEFT adapter (a cold start
before GRPO), every LoRA matrix included; one of another shape is refused by name."""

import numpy as np
import pytest
import torch

from conftest import build_tiny_model
from fedtune.platform.config import ConfigError, LoraSettings
from fedtune.platform.model.lora import adapter_arrays, attach_lora, load_initial_adapter


def saved_adapter(tiny_tokenizer, folder, settings):
    torch.manual_seed(7)
    model = attach_lora(build_tiny_model(len(tiny_tokenizer)), settings)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    model.save_pretrained(str(folder))
    return adapter_arrays(model)


def test_a_run_starts_from_the_saved_adapter_a_and_b_matrices_alike(tiny_tokenizer, tmp_path):
    saved = saved_adapter(tiny_tokenizer, tmp_path / "cold", LoraSettings(r=4))
    torch.manual_seed(0)  # another seed: other A matrices
    model = attach_lora(build_tiny_model(len(tiny_tokenizer)), LoraSettings(r=4))

    load_initial_adapter(model, tmp_path / "cold")

    loaded = adapter_arrays(model)
    assert loaded.keys() == saved.keys()
    assert all(np.array_equal(loaded[name], saved[name]) for name in saved)


def test_an_adapter_of_another_shape_or_no_adapter_is_refused_by_name(tiny_tokenizer, tmp_path):
    saved_adapter(tiny_tokenizer, tmp_path / "r8", LoraSettings(r=8))
    model = attach_lora(build_tiny_model(len(tiny_tokenizer)), LoraSettings(r=4))

    with pytest.raises(ConfigError, match=r"run\.initial_adapter .*r8: does not fit the run's"):
        load_initial_adapter(model, tmp_path / "r8")
    with pytest.raises(ConfigError, match=r"run\.initial_adapter .*: not a PEFT adapter"):
        load_initial_adapter(model, tmp_path / "nothing")
