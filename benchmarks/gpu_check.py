"""The GPU path, checked: DP-LoRA on CUDA per model and precision (run by scripts/gpu-check.sh).

Configurations: models {smollm2-135m (the real default model), tiny-qwen2 (a random 2-layer,
64-wide Qwen2 built here, so that something runs even without the real model)} x precisions
{float32, bfloat16 (base weights; the adapter stays float32), 4bit (QLoRA through
bitsandbytes: CUDA only)}. A configuration that cannot run here is recorded as
``{"not checked": reason}``: visible, but no failure. For each one, measured and written to
JSON:

- device: the model and its adapter live on the device asked for;
- per_example_clipping: Opacus' hooks give each example's own float32 gradient on the device,
  and Opacus' clipping leaves every one of them at norm <= the clip, in its own direction;
- clipping: one SGD step (lr 1, no noise, every example) moves the adapter by at most the
  clip norm, while the same step unclipped moves it far more;
- noised_round: a noised DP round runs; time per DP step, peak GPU memory (None on CPU);
- adapter_reload: the saved adapter loads with plain ``PeftModel.from_pretrained`` on the
  device and gives the same logits;
- cuda_matches_cpu: the held-out loss of the same weights agrees between CUDA and CPU;
- ordering (opacus #820, LoRA silently not updating when the model moves to the device after
  ``get_peft_model``): LoRA attached on a CPU model that moves to the device afterwards, and
  the other order; a few DP steps must change the adapter and lower the loss.

Imports fedtune's node code and Opacus, PEFT, pydantic; not Flower (a GPU image lacks it).

    python benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --models tiny-qwen2 --precisions float32
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from peft import PeftModel
from torch.utils.data import DataLoader

from fedtune.client_node.data import ChatDataset, load_chat_dataset, make_collate
from fedtune.client_node.evaluation import evaluate
from fedtune.client_node.losses import sequence_losses
from fedtune.client_node.trainer import GRAD_SAMPLE_MODE, DPSettings, train_round
from fedtune.demo.data import generate_examples
from fedtune.demo.tiny_models import save_tiny_model_dir
from fedtune.platform.config import LoraSettings, ModelConfig
from fedtune.platform.model.base_model import BaseModel, load_base_model
from fedtune.platform.model.lora import adapter_arrays, attach_lora, load_adapter_arrays
from fedtune.platform.model.model_store import BUILTIN_MODELS, default_cache_dir

RESULTS = Path(__file__).parent / "results"
MODELS = ("smollm2-135m", "tiny-qwen2")
PRECISIONS = ("float32", "bfloat16", "4bit")
VERSIONS_OF = ("torch", "transformers", "peft", "opacus", "pydantic", "bitsandbytes")
# Relative agreement of CUDA and CPU held-out losses: float32 kernels differ in summation
# order only; bfloat16 rounds every activation (8 bits of mantissa).
LOSS_AGREEMENT = {"float32": 1e-3, "bfloat16": 3e-2}
Check = dict[str, Any]


@dataclass(frozen=True)
class Setting:
    """One configuration: which model, in which precision, on which device."""

    model: str
    precision: str
    device: str
    spec: str
    examples: int

    @property
    def name(self) -> str:
        return f"{self.model}/{self.precision}"

    def model_config(self, *, device: str | None = None) -> ModelConfig:
        quantized = self.precision == "4bit"
        return ModelConfig(
            spec=self.spec,
            device=device or self.device,  # type: ignore[arg-type]
            dtype="float32" if quantized else self.precision,  # type: ignore[arg-type]
            quantization="4bit" if quantized else "none",
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    summary = report["summary"]
    print("\n".join(summary_lines(summary)))
    print(f"written: {args.out}")
    return 1 if summary["failed"] else 0


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What a reader of the log needs: each configuration's verdict, its time per DP step
    and peak GPU memory, and every check that did not run, with the reason."""
    lines = []
    for name, timing in summary["timings"].items():
        verdict = "FAIL" if name in summary["failed"] else "PASS"
        memory = timing["peak_gpu_memory_mib"]
        step = timing["seconds_per_dp_step"]
        lines.append(
            f"{verdict:12} {name:24} "
            + (f"{step:.3f} s per DP step, " if step is not None else "")
            + (f"peak GPU memory {memory:.0f} MiB" if memory is not None else "no GPU memory")
            + (f"; failed: {', '.join(summary['failed'][name])}" if verdict == "FAIL" else "")
        )
    lines += [f"NOT CHECKED  {name}: {why}" for name, why in summary["not checked"].items()]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument(
        "--offline",
        action="store_true",
        help="no network here: a built-in model not already on disk is not checked",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args(argv)
    args.models = split(args.models, MODELS, "--models")
    args.precisions = split(args.precisions, PRECISIONS, "--precisions")
    return args


def split(value: str, known: tuple[str, ...], option: str) -> list[str]:
    chosen = [item.strip() for item in value.split(",") if item.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown or not chosen:
        raise SystemExit(f"{option}: unknown {unknown or 'empty'}; choose from {', '.join(known)}")
    return chosen


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every chosen configuration, each in isolation: one that fails or raises does not stop
    the others."""
    started = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "gpu_check",
        "device": args.device,
        "machine": machine(args.device),
        "configurations": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        specs = {"smollm2-135m": "smollm2-135m"}
        if "tiny-qwen2" in args.models:
            specs["tiny-qwen2"] = str(save_tiny_model_dir(folder / "tiny-qwen2", family="qwen2"))
        for model in args.models:
            for precision in args.precisions:
                setting = Setting(model, precision, args.device, specs[model], args.examples)
                print(f"== {setting.name} on {args.device}", flush=True)
                absent = args.offline and model_absent(setting.spec)
                result = (
                    {"not checked": absent}
                    if absent
                    else check_configuration(setting, folder / setting.name.replace("/", "-"))
                )
                report["configurations"][setting.name] = result
    report["seconds"] = time.monotonic() - started
    report["summary"] = summarize(report["configurations"])
    return report


def machine(device: str) -> dict[str, Any]:
    on_cuda = device == "cuda" and torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if on_cuda else None,
        "versions": {name: version_of(name) for name in VERSIONS_OF},
    }


def version_of(module: str) -> str | None:
    """The module's version; None when it is not installed."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except Exception as error:  # installed, but its binary does not load here
        return f"does not import: {type(error).__name__}"


def model_absent(spec: str) -> str | None:
    """Why a built-in model cannot be had without network, or None when it is on disk."""
    builtin = BUILTIN_MODELS.get(spec)
    if builtin is None:
        return None
    cache = default_cache_dir()
    converted = cache / "models" / spec / "fedtune-converted.json"
    gguf = cache / "downloads" / Path(builtin.gguf_member).name
    if converted.is_file() or gguf.is_file():
        return None
    return f"{spec}: neither {gguf} nor a converted copy is here, and there is no network"


def not_checked(setting: Setting) -> str | None:
    """Why ``setting`` cannot run here, or None."""
    if setting.precision != "4bit":
        return None
    if setting.device != "cuda":
        return "4-bit QLoRA needs CUDA (bitsandbytes); this run is on CPU"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # ImportError, or a library that fails to load its binary
        return f"bitsandbytes not installed ({type(error).__name__}: {error})"
    return None


def check_configuration(setting: Setting, folder: Path) -> dict[str, Any]:
    reason = not_checked(setting)
    if reason is not None:
        return {"not checked": reason}
    started = time.monotonic()
    checks: dict[str, Check] = {}
    result: dict[str, Any] = {"checks": checks}
    try:
        base = load_base_model(setting.model_config())
        result["load_seconds"] = time.monotonic() - started
        folder.mkdir(parents=True)
        run_checks(setting, base, folder, checks)
    except Exception as error:  # recorded, so that the other configurations still run
        checks["error"] = {"passed": False, "error": repr(error), "trace": traceback.format_exc()}
    result["seconds"] = time.monotonic() - started
    return result


def run_checks(setting: Setting, base: BaseModel, folder: Path, checks: dict[str, Check]) -> None:
    pad = int(base.tokenizer.pad_token_id)  # type: ignore[attr-defined]
    device = base.device
    data = dataset(folder / "train.jsonl", base.tokenizer, setting.examples, seed=0)
    held_out = dataset(folder / "held.jsonl", base.tokenizer, 32, seed=10_000)
    torch.manual_seed(0)
    model = attach_lora(base.model, LoraSettings(r=8, train_a=False))
    checks["device"] = {
        "passed": device.type == setting.device
        and all(p.device.type == setting.device for p in model.parameters()),
        "device": str(device),
        "adapter_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
    }
    initial = adapter_arrays(model)
    checks["per_example_clipping"] = per_example_clipping(
        model, data, pad=pad, device=device, clip=1e-3
    )
    checks["clipping"] = update_clipping(model, data, initial, pad=pad, device=device)
    load_adapter_arrays(model, initial)
    checks["noised_round"] = noised_round(model, data, pad=pad, device=device)
    checks["adapter_reload"], loaded = adapter_reload(
        model, held_out, folder, precision=setting.precision, device=device
    )
    checks["cuda_matches_cpu"] = cuda_matches_cpu(setting, loaded, held_out, pad=pad)
    del model, loaded, base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    checks["ordering"] = ordering(setting, data, pad=pad)


def per_example_clipping(
    model: PeftModel, data: ChatDataset, *, pad: int, device: torch.device, clip: float
) -> Check:
    """Each example's gradient (Opacus' hooks, on ``device``) through Opacus' own clipping,
    one example at a time: every clipped gradient has norm <= ``clip`` and is the example's
    gradient scaled by min(1, clip / norm)."""
    rows = min(16, len(data))
    parameters = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(data, batch_size=rows, collate_fn=make_collate(pad))
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine()
    hooks, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(parameters, lr=0.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,
        grad_sample_mode=GRAD_SAMPLE_MODE,
        wrap_model=False,
    )
    assert isinstance(optimizer, DPOptimizer)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            sequence_losses(model, next(iter(loader)), device).mean().backward()
        samples = [p.grad_sample.detach().clone() for p in parameters]  # type: ignore[attr-defined]
        raw = torch.stack([s.flatten(1).norm(dim=1) for s in samples], dim=1).norm(dim=1)
        clipped_norms, direction_errors = [], []
        for row in range(rows):
            for parameter, sample in zip(parameters, samples, strict=True):
                alone = torch.zeros_like(sample)
                alone[row] = sample[row]
                parameter.grad_sample = alone  # type: ignore[attr-defined]
                parameter.summed_grad = None  # type: ignore[attr-defined]
            optimizer.clip_and_accumulate()
            clipped = torch.cat([p.summed_grad.flatten() for p in parameters])  # type: ignore[attr-defined]
            expected = torch.cat([s[row].flatten() for s in samples])
            expected = expected * min(1.0, clip / float(raw[row]))
            clipped_norms.append(float(clipped.norm()))
            direction_errors.append(float((clipped - expected).norm() / expected.norm()))
    finally:
        hooks.cleanup()
        for parameter in parameters:
            parameter.grad = None
            for name in ("grad_sample", "summed_grad"):
                if hasattr(parameter, name):
                    delattr(parameter, name)
    return {
        "passed": max(clipped_norms) <= clip * (1 + 1e-4)
        and max(direction_errors) < 1e-3
        and float(raw.min()) > clip,  # every example was clipped: the check saw clipping work
        "clip": clip,
        "examples": rows,
        "grad_sample_device": str(samples[0].device),
        "grad_sample_dtype": str(samples[0].dtype),
        "norm_before_clipping_min": float(raw.min()),
        "norm_before_clipping_max": float(raw.max()),
        "norm_after_clipping_max": max(clipped_norms),
        "relative_error_to_scaled_gradient_max": max(direction_errors),
    }


def update_clipping(
    model: PeftModel, data: ChatDataset, initial: dict[str, Any], *, pad: int, device: torch.device
) -> Check:
    def step_norm(clip: float) -> float:
        load_adapter_arrays(model, initial)
        start = flat(model)
        train_round(
            model,
            data,
            steps=1,
            batch_size=len(data),
            physical_batch_size=16,
            learning_rate=1.0,
            optimizer="sgd",
            pad_token_id=pad,
            device=device,
            dp=DPSettings(noise_multiplier=0.0, max_grad_norm=clip, accountant="rdp"),
            seed=0,
            progress=False,
        )
        return float((flat(model) - start).norm())

    clip = 1e-4
    clipped, unclipped = step_norm(clip), step_norm(1e6)
    return {
        "passed": clipped <= clip * (1 + 1e-4) and unclipped > 100 * clip,
        "clip": clip,
        "update_norm_clipped": clipped,
        "update_norm_unclipped": unclipped,
    }


def noised_round(model: PeftModel, data: ChatDataset, *, pad: int, device: torch.device) -> Check:
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    batch = min(64, len(data))
    result = train_round(
        model,
        data,
        steps=4,
        batch_size=batch,
        physical_batch_size=64,
        learning_rate=1e-2,
        pad_token_id=pad,
        device=device,
        dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp"),
        seed=None,
        progress=False,
    )
    return {
        "passed": len(result.history) == 1 and result.steps == 4,
        "expected_batch": batch,
        "seconds_per_step": result.seconds / result.steps,
        "device_seconds_per_step": result.device_seconds / result.steps,
        "tokens_per_second": result.tokens / result.device_seconds,
        "peak_gpu_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None,
    }


def adapter_reload(
    model: PeftModel, held_out: ChatDataset, folder: Path, *, precision: str, device: torch.device
) -> tuple[Check, PeftModel]:
    logits = logits_of(model, held_out, device)
    model.save_pretrained(folder / "adapter")
    plain_base = model.unload()  # the base weights without LoRA layers
    # PEFT puts the loaded adapter beside the base weights; a 4-bit model stays where
    # bitsandbytes put it (moving it again is not what a node does).
    loaded = PeftModel.from_pretrained(plain_base, folder / "adapter")
    if precision != "4bit":
        loaded = loaded.to(device)
    reloaded = logits_of(loaded, held_out, device)
    with loaded.disable_adapter():
        without = logits_of(loaded, held_out, device)
    difference = float((logits - reloaded).abs().max())
    effect = float((logits - without).abs().max())
    # Logits of the same weights before saving and after reloading: identical in float32 so
    # far (CPU, H200); in half precision allow one rounding step (2**-7) of the largest logit.
    tolerance = 1e-4 if precision == "float32" else 2**-7 * float(logits.abs().max())
    check = {
        "passed": difference <= tolerance < effect,
        "max_abs_logit_diff": difference,
        "tolerance": tolerance,
        "max_abs_logit_change_from_the_adapter": effect,
    }
    return check, loaded


def cuda_matches_cpu(
    setting: Setting, loaded: PeftModel, held_out: ChatDataset, *, pad: int
) -> Check:
    if setting.device != "cuda":
        return {"not checked": "this run is on CPU: nothing to compare with"}
    if setting.precision == "4bit":
        return {"not checked": "4-bit weights run on CUDA only"}
    cuda_loss = evaluate(loaded, held_out, pad_token_id=pad, device=torch.device("cuda")).loss
    cpu = torch.device("cpu")
    cpu_loss = evaluate(loaded.to(cpu), held_out, pad_token_id=pad, device=cpu).loss
    relative = abs(cpu_loss - cuda_loss) / abs(cpu_loss)
    return {
        "passed": relative < LOSS_AGREEMENT[setting.precision],
        "held_out_loss_cuda": cuda_loss,
        "held_out_loss_cpu": cpu_loss,
        "relative_difference": relative,
        "tolerance": LOSS_AGREEMENT[setting.precision],
    }


def ordering(setting: Setting, data: ChatDataset, *, pad: int) -> Check:
    """opacus #820: the adapter must train whether LoRA is attached before or after the
    model moves to the device."""
    device = torch.device(setting.device)

    def lora_then_device() -> PeftModel:
        base = load_base_model(setting.model_config(device="cpu"))
        torch.manual_seed(0)
        return attach_lora(base.model, LoraSettings(r=8, train_a=True)).to(device)

    def device_then_lora() -> PeftModel:
        base = load_base_model(setting.model_config())
        torch.manual_seed(0)
        return attach_lora(base.model, LoraSettings(r=8, train_a=True))

    orders: dict[str, Check] = {}
    builders: dict[str, Callable[[], PeftModel]] = {"device_then_lora": device_then_lora}
    if setting.precision == "4bit":
        orders["lora_then_device"] = {
            "not checked": "4-bit weights load straight onto the GPU (no CPU copy to move)"
        }
    else:
        builders["lora_then_device"] = lora_then_device
    for name, build in builders.items():
        orders[name] = adapter_trains(build(), data, pad=pad, device=device)
    return {
        "passed": all(check.get("passed", True) for check in orders.values()),
        **orders,
    }


def adapter_trains(
    model: PeftModel, data: ChatDataset, *, pad: int, device: torch.device, steps: int = 5
) -> Check:
    """A few DP steps (clipping on, little noise, every example each step) must change the
    adapter on ``device`` and lower the training loss."""
    try:
        before = flat(model)
        loss_before = evaluate(model, data, pad_token_id=pad, device=device).loss
        train_round(
            model,
            data,
            steps=steps,
            batch_size=len(data),
            physical_batch_size=16,
            learning_rate=1e-2,
            pad_token_id=pad,
            device=device,
            dp=DPSettings(noise_multiplier=0.1, max_grad_norm=1.0, accountant="rdp"),
            seed=0,
            progress=False,
        )
        change = float((flat(model) - before).norm())
        loss_after = evaluate(model, data, pad_token_id=pad, device=device).loss
    except Exception as error:
        return {"passed": False, "error": repr(error)}
    return {
        "passed": change > 0 and loss_after < loss_before,
        "adapter_changed": change > 0,
        "adapter_change_norm": change,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "adapter_device": str(next(p for n, p in model.named_parameters() if "lora_" in n).device),
    }


def summarize(configurations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Which configurations passed, which failed (and on which checks), what was not
    checked and why, and the time and memory of each configuration's DP steps."""
    passed: list[str] = []
    failed: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    timings: dict[str, dict[str, Any]] = {}
    for name, result in configurations.items():
        if "not checked" in result:
            skipped[name] = result["not checked"]
            continue
        checks = result["checks"]
        for check, outcome in checks.items():
            if "not checked" in outcome:
                skipped[f"{name}: {check}"] = outcome["not checked"]
            for part, value in outcome.items():
                if isinstance(value, dict) and "not checked" in value:
                    skipped[f"{name}: {check}.{part}"] = value["not checked"]
        bad = [check for check, outcome in checks.items() if outcome.get("passed") is False]
        if bad:
            failed[name] = bad
        else:
            passed.append(name)
        round_ = checks.get("noised_round", {})
        timings[name] = {
            "seconds": result.get("seconds"),
            "seconds_per_dp_step": round_.get("seconds_per_step"),
            "peak_gpu_memory_mib": round_.get("peak_gpu_memory_mib"),
        }
    return {"passed": passed, "failed": failed, "not checked": skipped, "timings": timings}


def dataset(path: Path, tokenizer: Any, examples: int, *, seed: int) -> ChatDataset:
    rows = generate_examples("hospital", examples, seed=seed)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return load_chat_dataset(path, tokenizer, max_length=128)


def flat(model: PeftModel) -> torch.Tensor:
    return torch.cat([torch.from_numpy(a).flatten() for a in adapter_arrays(model).values()])


@torch.no_grad()
def logits_of(model: Any, data: ChatDataset, device: torch.device) -> torch.Tensor:
    input_ids = data[0][0].unsqueeze(0).to(device)
    model.eval()
    return model(input_ids=input_ids).logits.float().cpu()


if __name__ == "__main__":
    raise SystemExit(main())
