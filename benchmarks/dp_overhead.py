"""Step time and peak memory of DP-LoRA against non-private LoRA, in one process, interleaved.

Two copies of the default model with identical adapters train on the same fixed batch
(8 sequences x 128 tokens of demo data, assistant tokens labelled): one with a plain AdamW
step, one through Opacus exactly as the node trainer does it (per-example gradients in
``GRAD_SAMPLE_MODE``, clipping, noise). Steps alternate so that machine noise hits both alike.
Peak memory is the highest resident set size seen during a step above the size before it (on
CPU; on CUDA, torch's peak allocation). Writes ``benchmarks/results/dp_overhead.json``.

    .venv/bin/python benchmarks/dp_overhead.py --steps 10
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedtune.client_node.data import tokenize_conversation
from fedtune.client_node.losses import sequence_losses
from fedtune.client_node.trainer import GRAD_SAMPLE_MODE
from fedtune.demo.data import generate_examples
from fedtune.platform.config import LoraSettings, ModelConfig
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.model.lora import attach_lora

RESULTS = Path(__file__).parent / "results"


def fixed_batch(tokenizer, *, batch: int, length: int) -> dict[str, torch.Tensor]:
    """``batch`` rows of exactly ``length`` tokens: demo conversations back to back."""
    examples = iter(generate_examples("hospital", 10_000))
    rows_ids, rows_labels = [], []
    for _ in range(batch):
        ids: list[int] = []
        labels: list[int] = []
        while len(ids) < length:
            item = tokenize_conversation(next(examples)["messages"], tokenizer, max_length=length)
            ids += item.input_ids
            labels += item.labels
        rows_ids.append(ids[:length])
        rows_labels.append(labels[:length])
    input_ids = torch.tensor(rows_ids)
    return {
        "input_ids": input_ids,
        "labels": torch.tensor(rows_labels),
        "attention_mask": torch.ones_like(input_ids),
    }


class PeakMemory:
    """Highest memory seen while the block runs, above what was in use when it started."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.highest = self.start
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.highest = max(self.highest, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak = self.highest - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "dp_overhead.json")
    args = parser.parse_args()

    base = load_base_model(ModelConfig(spec=args.model))
    device = base.device
    lora = LoraSettings(r=args.lora_r, target_modules=args.target_modules)
    torch.manual_seed(0)
    plain_model = attach_lora(copy.deepcopy(base.model), lora)
    dp_model = copy.deepcopy(plain_model)
    batch = fixed_batch(base.tokenizer, batch=args.batch, length=args.length)

    plain_model.train()
    plain_optimizer = torch.optim.AdamW(
        [p for p in plain_model.parameters() if p.requires_grad], lr=1e-3
    )

    def plain_step() -> None:
        plain_optimizer.zero_grad(set_to_none=True)
        sequence_losses(plain_model, batch, device).mean().backward()
        plain_optimizer.step()

    dp_model.train()
    loader = DataLoader(TensorDataset(torch.arange(args.batch)), batch_size=args.batch)
    _, dp_optimizer, _ = PrivacyEngine().make_private(
        module=dp_model,
        optimizer=torch.optim.AdamW([p for p in dp_model.parameters() if p.requires_grad], lr=1e-3),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        grad_sample_mode=GRAD_SAMPLE_MODE,
        wrap_model=False,
    )

    def dp_step() -> None:
        dp_optimizer.zero_grad(set_to_none=True)
        sequence_losses(dp_model, batch, device).mean().backward()
        dp_optimizer.step()

    modes: dict[str, Callable[[], None]] = {"non_private": plain_step, "dp": dp_step}
    times: dict[str, list[float]] = {name: [] for name in modes}
    memory: dict[str, list[int]] = {name: [] for name in modes}
    for index in range(args.warmup + args.steps):
        for name, step in modes.items():
            with PeakMemory(device) as peak:
                started = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - started
            if index >= args.warmup:
                times[name].append(elapsed)
                memory[name].append(peak.peak)
        print(
            f"step {index + 1}: "
            + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in modes if times[n]),
            flush=True,
        )

    summary = {
        name: {
            "median_step_seconds": statistics.median(times[name]),
            "mean_step_seconds": statistics.fmean(times[name]),
            "tokens_per_second": args.batch * args.length / statistics.median(times[name]),
            "peak_step_memory_mib": max(memory[name]) / 2**20,
            "step_seconds": times[name],
        }
        for name in modes
    }
    ratios = [d / p for d, p in zip(times["dp"], times["non_private"], strict=True)]
    report = {
        "benchmark": "dp_overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": psutil.cpu_count(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "grad_sample_mode": GRAD_SAMPLE_MODE,
        "trainable_parameters": sum(p.numel() for p in dp_model.parameters() if p.requires_grad),
        "modes": summary,
        "dp_over_non_private_median_ratio": statistics.median(ratios),
        "target_ratio": 1.15,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "modes"}, indent=2))
    for name, values in summary.items():
        print(name, {k: v for k, v in values.items() if k != "step_seconds"})


if __name__ == "__main__":
    main()
