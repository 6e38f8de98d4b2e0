"""scripts/gpu-check.sh, the one prepared script a GPU session runs, tried on CPU with the
tiny Qwen2 (its figures mean nothing here; its checks, verdicts and "not checked" do), and
the ordering check (opacus #820) shown able to fail."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from fedtune.client_node.data import ChatDataset, tokenize_conversation
from fedtune.demo.data import generate_examples
from fedtune.demo.tiny_models import build_tiny_model
from fedtune.platform.config import LoraSettings
from fedtune.platform.model.lora import attach_lora

ROOT = Path(__file__).parent.parent


def gpu_check() -> ModuleType:
    """benchmarks/gpu_check.py as a module (benchmarks/ is no package)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # its dataclass looks itself up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.mark.integration
def test_the_script_passes_on_cpu_and_says_what_it_did_not_check(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "FEDTUNE_CACHE_DIR": str(tmp_path / "c")}
    env.pop("OUT", None)
    command = ["bash", "scripts/gpu-check.sh", "--device", "cpu", "--out", str(tmp_path)]
    options = ["--models", "tiny-qwen2", "--precisions", "float32,bfloat16,4bit"]

    done = subprocess.run(
        [*command, *options, "--examples", "16"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert (tmp_path / "gpu_check_cpu.log").is_file()
    assert report["summary"]["passed"] == ["tiny-qwen2/float32", "tiny-qwen2/bfloat16"]
    assert report["summary"]["failed"] == {}
    assert "needs CUDA" in report["configurations"]["tiny-qwen2/4bit"]["not checked"]
    assert "NOT CHECKED  tiny-qwen2/4bit" in done.stdout
    for precision in ("float32", "bfloat16"):
        checks = report["configurations"][f"tiny-qwen2/{precision}"]["checks"]
        ran = {name for name, check in checks.items() if "passed" in check}
        assert ran == {
            "device",
            "per_example_clipping",
            "clipping",
            "noised_round",
            "adapter_reload",
            "ordering",
        }
        assert all(checks[name]["passed"] for name in ran)
        assert checks["device"]["adapter_dtypes"] == ["torch.float32"]
        clipping = checks["per_example_clipping"]
        assert clipping["grad_sample_dtype"] == "torch.float32"
        assert clipping["norm_after_clipping_max"] <= clipping["clip"] * (1 + 1e-4)
        assert clipping["norm_before_clipping_min"] > clipping["clip"]
        for order in ("lora_then_device", "device_then_lora"):
            trained = checks["ordering"][order]
            assert trained["adapter_changed"]
            assert trained["loss_after"] < trained["loss_before"]


@pytest.fixture(scope="module")
def examples(tiny_tokenizer) -> ChatDataset:
    conversations = [e["messages"] for e in generate_examples("hospital", 8, seed=3)]
    rows = [tokenize_conversation(c, tiny_tokenizer, max_length=160) for c in conversations]
    return ChatDataset(rows, source=Path("hospital.jsonl"))


def test_the_ordering_check_passes_when_the_adapter_trains(tiny_tokenizer, examples):
    model = attach_lora(build_tiny_model(len(tiny_tokenizer), family="qwen2"), LoraSettings())

    check = gpu_check().adapter_trains(
        model, examples, pad=tiny_tokenizer.pad_token_id, device=torch.device("cpu")
    )

    assert check["passed"] and check["adapter_changed"]


def test_the_ordering_check_fails_when_the_adapter_does_not_train(tiny_tokenizer, examples):
    """The symptom of opacus #820: training runs, the loss may even fall (here a base layer
    trains instead), but the LoRA weights stay where they were."""
    model = attach_lora(build_tiny_model(len(tiny_tokenizer), family="qwen2"), LoraSettings())
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("layers.0.self_attn.o_proj" in name)

    check = gpu_check().adapter_trains(
        model, examples, pad=tiny_tokenizer.pad_token_id, device=torch.device("cpu")
    )

    assert check["passed"] is False
    assert check["adapter_changed"] is False


def test_a_frozen_adapter_is_a_failed_check_not_a_crash(tiny_tokenizer, examples):
    model = attach_lora(build_tiny_model(len(tiny_tokenizer), family="qwen2"), LoraSettings())
    for parameter in model.parameters():
        parameter.requires_grad_(False)

    check = gpu_check().adapter_trains(
        model, examples, pad=tiny_tokenizer.pad_token_id, device=torch.device("cpu")
    )

    assert check["passed"] is False
    assert "no trainable" in check["error"]


def test_a_failed_check_is_counted_as_failed_and_not_checked_stays_visible():
    summary = gpu_check().summarize(
        {
            "m/float32": {"checks": {"ordering": {"passed": False}}, "seconds": 1.0},
            "m/4bit": {"not checked": "bitsandbytes not installed"},
        }
    )

    assert summary["failed"] == {"m/float32": ["ordering"]}
    assert summary["passed"] == []
    assert summary["not checked"] == {"m/4bit": "bitsandbytes not installed"}
