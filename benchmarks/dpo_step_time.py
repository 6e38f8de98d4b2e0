"""Time of a DP-DPO step against a DP-SFT step on the default model, through the trainer.

Both train a fresh LoRA adapter (the node's defaults) on the demo bank data made from the same
records: SFT on the conversations, DPO on the preference pairs (each pair: a chosen and a
rejected pass with gradient, and two reference passes without). Every pair or example is in
every step (sample rate 1, logical batch = ``--rows``) so that both steps do the same number
of rows; rounds of ``--steps`` steps alternate between the methods so that machine noise hits
both alike. Writes ``benchmarks/results/dpo_step_time.json``.

    .venv/bin/python benchmarks/dpo_step_time.py --rows 8 --steps 2 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch

from fedtune.client_node.data import load_chat_dataset
from fedtune.client_node.dpo import pair_objective
from fedtune.client_node.preference_data import load_preference_dataset, make_pair_collate
from fedtune.client_node.trainer import DPSettings, train_round
from fedtune.demo.data import write_demo_data
from fedtune.demo.preferences import write_demo_preferences
from fedtune.platform.config import LoraSettings, ModelConfig
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.model.lora import attach_lora

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=8, help="examples or pairs per step")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "dpo_step_time.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = load_base_model(ModelConfig(spec=args.model))
    tokenizer, pad = base.tokenizer, int(base.tokenizer.pad_token_id)  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as folder:
        sft_file, _ = write_demo_data(Path(folder), domain="bank", train=args.rows, held_out=1)
        dpo_file, _ = write_demo_preferences(
            Path(folder), domain="bank", train=args.rows, held_out=1
        )
        data = {
            "sft": load_chat_dataset(sft_file, tokenizer, max_length=args.max_length),
            "dpo": load_preference_dataset(dpo_file, tokenizer, max_length=args.max_length),
        }
    objective = {
        "sft": {},
        "dpo": {"per_row_losses": pair_objective(0.1), "collate": make_pair_collate(pad)},
    }
    models = {
        "sft": attach_lora(copy.deepcopy(base.model), LoraSettings()),
        "dpo": attach_lora(base.model, LoraSettings()),
    }
    times: dict[str, list[float]] = {"sft": [], "dpo": []}
    for repeat in range(args.repeats + 1):  # the first round of each warms up
        for method in ("sft", "dpo"):
            result = train_round(
                models[method],
                data[method],
                steps=args.steps,
                batch_size=len(data[method]),
                physical_batch_size=len(data[method]),
                learning_rate=1e-2,
                pad_token_id=pad,
                device=base.device,
                dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp"),
                seed=repeat,
                progress=False,
                **objective[method],  # type: ignore[arg-type]
            )
            if repeat:
                times[method].append(result.seconds / args.steps)
            print(f"round {repeat} {method}: {result.seconds / args.steps:.2f} s/step", flush=True)

    ratios = [d / s for d, s in zip(times["dpo"], times["sft"], strict=True)]
    report = {
        "benchmark": "dpo_step_time",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "device": str(base.device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": psutil.cpu_count(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": {method: len(data[method]) for method in data},
        "step_seconds": times,
        "median_step_seconds": {m: statistics.median(v) for m, v in times.items()},
        "dpo_over_sft_median_ratio": statistics.median(ratios),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "step_seconds"}, indent=2))


if __name__ == "__main__":
    main()
