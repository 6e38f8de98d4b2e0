import numpy as np
import pytest
import torch
from peft import PeftModel

from conftest import build_tiny_model
from fedtune.platform.config import LoraSettings
from fedtune.platform.model.lora import (
    AdapterMismatchError,
    adapter_arrays,
    attach_lora,
    load_adapter_arrays,
)


def randomise_adapter(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_only_lora_parameters_train(tiny_tokenizer):
    model = attach_lora(build_tiny_model(len(tiny_tokenizer)), LoraSettings(r=4))

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    assert trainable
    assert all("lora_A" in n or "lora_B" in n for n in trainable)


def test_train_a_false_trains_only_b_matrices(tiny_tokenizer):
    model = attach_lora(build_tiny_model(len(tiny_tokenizer)), LoraSettings(train_a=False))

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    assert trainable and all("lora_B" in n for n in trainable)


def test_adapter_arrays_round_trip_gives_identical_outputs(tiny_tokenizer):
    source = attach_lora(build_tiny_model(len(tiny_tokenizer)), LoraSettings(r=4))
    randomise_adapter(source)
    target = attach_lora(build_tiny_model(len(tiny_tokenizer)), LoraSettings(r=4))
    tokens = torch.randint(0, len(tiny_tokenizer), (2, 12))
    assert not torch.equal(logits(source, tokens), logits(target, tokens))

    load_adapter_arrays(target, adapter_arrays(source))

    assert torch.equal(logits(source, tokens), logits(target, tokens))


def test_saved_adapter_loads_with_plain_peft(tmp_path, tiny_tokenizer):
    model = attach_lora(build_tiny_model(len(tiny_tokenizer)), LoraSettings(r=4))
    randomise_adapter(model)
    tokens = torch.randint(0, len(tiny_tokenizer), (1, 10))
    model.save_pretrained(tmp_path / "adapter")

    loaded = PeftModel.from_pretrained(build_tiny_model(len(tiny_tokenizer)), tmp_path / "adapter")

    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert torch.equal(logits(model, tokens), logits(loaded, tokens))


def test_wrong_keys_shapes_or_values_are_refused(tiny_tokenizer):
    model = attach_lora(build_tiny_model(len(tiny_tokenizer)), LoraSettings(r=4))
    arrays = adapter_arrays(model)
    name = next(iter(arrays))

    with pytest.raises(AdapterMismatchError, match="missing"):
        load_adapter_arrays(model, {k: v for k, v in arrays.items() if k != name})
    with pytest.raises(AdapterMismatchError, match="shape"):
        load_adapter_arrays(model, {**arrays, name: np.zeros((1, 1), np.float32)})
    bad = arrays[name].copy()
    bad.flat[0] = np.nan
    with pytest.raises(AdapterMismatchError, match="non-finite"):
        load_adapter_arrays(model, {**arrays, name: bad})


def test_train_b_only_keeps_a_fixed_through_dp_training(tmp_path, tiny_tokenizer):
    from fedtune.client_node.data import load_chat_dataset
    from fedtune.client_node.trainer import DPSettings, train_round
    from fedtune.demo.data import write_demo_data

    train, _ = write_demo_data(tmp_path, domain="bank", train=24, held_out=2)
    dataset = load_chat_dataset(train, tiny_tokenizer, max_length=160)
    model = attach_lora(build_tiny_model(len(tiny_tokenizer)), LoraSettings(r=4, train_a=False))
    before = adapter_arrays(model)

    train_round(
        model, dataset, steps=2, batch_size=8, physical_batch_size=8, learning_rate=1e-2,
        pad_token_id=tiny_tokenizer.pad_token_id, device=torch.device("cpu"),
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp"),
        seed=0, progress=False,
    )  # fmt: skip

    after = adapter_arrays(model)
    assert all(np.array_equal(before[k], after[k]) for k in before if "lora_A" in k)
    assert all(not np.array_equal(before[k], after[k]) for k in before if "lora_B" in k)


def test_adapter_arrays_are_a_snapshot_that_later_changes_do_not_touch(tiny_tokenizer):
    model = attach_lora(build_tiny_model(len(tiny_tokenizer)), LoraSettings(r=4))
    snapshot = adapter_arrays(model)
    copy_of_snapshot = {k: v.copy() for k, v in snapshot.items()}

    randomise_adapter(model)

    assert all(np.array_equal(snapshot[k], copy_of_snapshot[k]) for k in snapshot)
    assert not all(np.array_equal(snapshot[k], v) for k, v in adapter_arrays(model).items())
