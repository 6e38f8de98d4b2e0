"""Global adapter checkpoints encrypted at rest: never in the clear on disk, readable with the
key only, bound to their round, and exportable as a plain PEFT folder."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.coordinator.checkpoints import (
    ENCRYPTED_WEIGHTS_FILE,
    WEIGHTS_FILE,
    AdapterCheckpointer,
    export_checkpoint,
    read_checkpoint,
)
from fedtune.platform.config import LoraSettings
from fedtune.platform.model.lora import adapter_arrays, attach_lora
from fedtune.platform.security.encryption import DecryptionError, generate_key_file, load_key


@pytest.fixture
def saved(tmp_path, tiny_model_dir):
    key = load_key(generate_key_file(tmp_path / "checkpoint.key"))
    torch.manual_seed(0)
    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings())
    arrays = {k: v + 0.25 for k, v in adapter_arrays(model).items()}
    checkpointer = AdapterCheckpointer(model, tmp_path / "adapters", key=key)
    first = checkpointer.save(1, arrays)
    second = checkpointer.save(2, {k: v * 2 for k, v in arrays.items()})
    return key, arrays, first, second


def test_an_encrypted_checkpoint_holds_no_plain_weights_and_reads_back_with_the_key(saved):
    key, arrays, (path, sha), _ = saved

    read, lora = read_checkpoint(path, sha256=sha, key=key)

    assert (path / ENCRYPTED_WEIGHTS_FILE).is_file() and not (path / WEIGHTS_FILE).exists()
    assert lora.r == LoraSettings().r
    assert read.keys() == arrays.keys()
    assert all(np.array_equal(read[k], arrays[k]) for k in arrays)


def test_without_the_key_or_with_another_it_cannot_be_read(saved, tmp_path):
    _, _, (path, sha), _ = saved
    other = load_key(generate_key_file(tmp_path / "other.key"))

    with pytest.raises(Exception, match="encrypted"):
        read_checkpoint(path, sha256=sha)
    with pytest.raises(DecryptionError):
        read_checkpoint(path, sha256=sha, key=other)


def test_a_checkpoint_moved_to_another_round_fails_to_decrypt(saved):
    key, _, (first, sha), (second, _) = saved
    shutil.copy(first / ENCRYPTED_WEIGHTS_FILE, second / ENCRYPTED_WEIGHTS_FILE)

    with pytest.raises(DecryptionError, match="round-2"):
        read_checkpoint(second, sha256=sha, key=key)


def test_an_export_loads_with_peft(saved, tmp_path, tiny_model_dir):
    key, _, (path, sha), _ = saved

    out = export_checkpoint(path, tmp_path / "export", sha256=sha, key=key)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out)
    )

    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert loaded and all(torch.allclose(v, torch.full_like(v, 0.25)) for v in loaded.values())
