import pytest
import torch
from safetensors.torch import save_file

from fedtune.platform.config import ModelConfig
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.model.fingerprint import model_dir_fingerprint
from fedtune.platform.model.model_store import ModelSpecError, resolve_model_dir


def test_local_directory_loads_with_fingerprint(tiny_model_dir):
    base = load_base_model(ModelConfig(spec=str(tiny_model_dir), device="cpu"))

    assert base.model_dir == tiny_model_dir
    assert base.device == torch.device("cpu")
    assert base.fingerprint == model_dir_fingerprint(tiny_model_dir)
    assert base.fingerprint.startswith("sha256:")


def test_fingerprint_ignores_sharding_but_sees_a_changed_weight(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    tensors = load_file(tiny_model_dir / "model.safetensors")
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    save_file({n: tensors[n] for n in names[::2]}, sharded / "model-1.safetensors")
    save_file({n: tensors[n] for n in names[1::2]}, sharded / "model-2.safetensors")
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    tensors[names[0]] = tensors[names[0]].clone()
    tensors[names[0]].view(-1)[0] += 1e-3
    save_file(tensors, changed / "model.safetensors")

    assert model_dir_fingerprint(sharded) == model_dir_fingerprint(tiny_model_dir)
    assert model_dir_fingerprint(changed) != model_dir_fingerprint(tiny_model_dir)


def test_unknown_spec_is_refused_with_the_aliases(tmp_path):
    with pytest.raises(ModelSpecError, match="smollm2-135m"):
        resolve_model_dir(str(tmp_path / "nothing-here"))


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelSpecError, match=r"no config\.json"):
        resolve_model_dir(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_quantized_loading_is_refused_on_cpu(tiny_model_dir):
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        load_base_model(ModelConfig(spec=str(tiny_model_dir), quantization="4bit"))


def test_a_loaded_model_runs_no_kernels_from_the_hub(tiny_model_dir, monkeypatch):
    """transformers 5.2x kernelizes by default, and on CUDA that fetches code from the
    Hugging Face hub (seen on an H200); a node's model must never do that."""
    import kernels

    fetched = []
    monkeypatch.setattr(kernels, "kernelize", lambda *a, **k: fetched.append(a))
    base = load_base_model(ModelConfig(spec=str(tiny_model_dir), device="cpu"))
    base.model.train()
    base.model.eval()

    assert base.model.use_kernels is False
    assert base.model.kernels_mode is None
    assert fetched == []
