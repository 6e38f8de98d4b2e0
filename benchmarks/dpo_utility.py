"""Utility of DP-DPO on the default model: held-out preference accuracy and reward margin of
the base model, non-private DPO and DP-DPO at each target epsilon, and the time of a DPO step
against an SFT step on the same records.

One node's demo preference pairs (``--domain``): ``--train`` pairs to train on and
``--held-out`` other pairs to evaluate on, made from the same generator as the SFT demo data.
Every training starts from the same fresh LoRA adapter (the node's defaults) and runs
``--steps`` steps of logical batch ``--batch-size`` (Poisson sampling under DP, noise
calibrated so that the steps end at the target epsilon, RDP, ``--delta``). Evaluation is
the product's (:mod:`fedtune.client_node.preference_eval`): the implicit DPO reward against
the base model (the base's is 0 by definition, so its accuracy is 0); beside it, the
*likelihood* accuracy (the share of pairs whose chosen answer the model finds more likely than
the rejected one, summed log-probabilities), which the base model has too. An SFT training of
the same shape on the same records' conversations gives the time per step to compare.
Trainings that would not fit in ``--budget-minutes`` (projected from the first one) are
written as "not measured". Writes ``benchmarks/results/dpo_utility.json`` and, when
matplotlib is installed, a plot.

    .venv/bin/python benchmarks/dpo_utility.py --budget-minutes 25
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedtune.client_node.data import load_chat_dataset
from fedtune.client_node.dpo import answer_logprobs, pair_objective, reference_logprobs
from fedtune.client_node.preference_data import (
    PreferenceDataset,
    load_preference_dataset,
    make_pair_collate,
    split_pair_batch,
)
from fedtune.client_node.preference_eval import evaluate_preferences
from fedtune.client_node.trainer import DPSettings, train_round
from fedtune.demo.data import write_demo_data
from fedtune.demo.preferences import write_demo_preferences
from fedtune.platform.config import LoraSettings, ModelConfig
from fedtune.platform.model.base_model import BaseModel, load_base_model
from fedtune.platform.model.lora import attach_lora
from fedtune.privacy.accounting import calibrate_noise_multiplier, epsilon_of

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domain", default="bank")
    parser.add_argument("--train", type=int, default=16, help="training pairs")
    parser.add_argument("--held-out", type=int, default=16, help="held-out pairs")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--epsilons", type=float, nargs="*", default=[8.0, 3.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-minutes", type=float, default=25.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-non-private", action="store_true")
    parser.add_argument("--skip-sft", action="store_true", help="no SFT step-time training")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="combine these reports (runs of the same settings split over processes) into "
        "--out instead of measuring",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "dpo_utility.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = merged(args.merge) if args.merge else run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report["results"], indent=2))


@torch.no_grad()
def likelihood_accuracy(
    model: Any, pairs: PreferenceDataset, *, pad: int, device: torch.device, adapter: bool
) -> float:
    """Share of pairs whose chosen answer has the higher summed log-probability."""
    model.eval()
    loader = DataLoader(pairs, batch_size=8, collate_fn=make_pair_collate(pad))
    preferred = []
    for batch in loader:
        chosen, rejected = split_pair_batch(batch)
        score = reference_logprobs if not adapter else answer_logprobs
        gap = score(model, chosen, device) - score(model, rejected, device)
        preferred += (gap > 0).tolist()
    return sum(preferred) / len(preferred)


def evaluate(
    name: str, model: Any, held_out: PreferenceDataset, *, base: BaseModel, args: Any, adapter: bool
) -> dict[str, Any]:
    pad = int(base.tokenizer.pad_token_id)  # type: ignore[attr-defined]
    result = evaluate_preferences(
        model, held_out, beta=args.beta, pad_token_id=pad, device=base.device, adapter=adapter
    )
    return {
        "model": name,
        "preference_accuracy": result.accuracy,
        "reward_margin": result.mean_margin,
        "likelihood_accuracy": likelihood_accuracy(
            model, held_out, pad=pad, device=base.device, adapter=adapter
        ),
        "held_out_pairs": result.pairs,
    }


def run(args: Any) -> dict[str, Any]:
    started = time.monotonic()
    budget_s = args.budget_minutes * 60
    base = load_base_model(ModelConfig(spec=args.model))
    tokenizer, pad = base.tokenizer, int(base.tokenizer.pad_token_id)  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as folder:
        write_demo_preferences(
            Path(folder), domain=args.domain, train=args.train, held_out=args.held_out, seed=1
        )
        write_demo_data(Path(folder), domain=args.domain, train=args.train, held_out=1, seed=1)
        domain = Path(folder) / args.domain
        train = load_preference_dataset(
            domain / "preferences_train.jsonl", tokenizer, max_length=args.max_length
        )
        held_out = load_preference_dataset(
            domain / "preferences_held_out.jsonl", tokenizer, max_length=args.max_length
        )
        sft = load_chat_dataset(domain / "train.jsonl", tokenizer, max_length=args.max_length)
    sample_rate = args.batch_size / len(train)
    lora = LoraSettings()
    torch.manual_seed(args.seed)
    model = attach_lora(base.model, lora)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    results = [evaluate("base", model, held_out, base=base, args=args, adapter=False)]
    print(f"base: {results[0]}", flush=True)

    plans: list[tuple[str, float | None]] = (
        [] if args.skip_non_private else [("non-private DPO", None)]
    )
    plans += [(f"DP-DPO epsilon {e:g}", e) for e in args.epsilons]
    step_seconds: dict[str, list[float]] = {"dpo": [], "sft": []}
    not_measured: list[dict[str, Any]] = []
    first_training_s: float | None = None

    def fits() -> bool:
        if first_training_s is None:
            return True
        return time.monotonic() - started + first_training_s <= budget_s

    for name, epsilon in plans:
        if not fits():
            not_measured.append({"model": name, "reason": "did not fit in --budget-minutes"})
            continue
        model.load_state_dict(initial, strict=False)
        dp = None
        if epsilon is not None:
            sigma = calibrate_noise_multiplier(
                target_epsilon=epsilon,
                delta=args.delta,
                sample_rate=sample_rate,
                steps=args.steps,
                accountant="rdp",
            )
            dp = DPSettings(
                noise_multiplier=sigma, max_grad_norm=args.max_grad_norm, accountant="rdp"
            )
        t0 = time.monotonic()
        trained = train_round(
            model,
            train,
            steps=args.steps,
            batch_size=args.batch_size,
            physical_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            pad_token_id=pad,
            device=base.device,
            dp=dp,
            seed=args.seed,
            progress=False,
            per_row_losses=pair_objective(args.beta),
            collate=make_pair_collate(pad),
        )
        first_training_s = first_training_s or time.monotonic() - t0
        step_seconds["dpo"].append(trained.seconds / args.steps)
        row = evaluate(name, model, held_out, base=base, args=args, adapter=True)
        row.update(
            epsilon=(
                epsilon_of(trained.history, delta=args.delta, accountant="rdp") if dp else None
            ),
            noise_multiplier=dp.noise_multiplier if dp else None,
            train_losses=trained.train_losses,
            seconds_per_step=trained.seconds / args.steps,
        )
        results.append(row)
        print(f"{name}: {row}", flush=True)

    if args.skip_sft:
        pass
    elif fits():  # SFT of the same shape on the same records: time per step only
        model.load_state_dict(initial, strict=False)
        sigma = calibrate_noise_multiplier(
            target_epsilon=args.epsilons[0] if args.epsilons else 8.0,
            delta=args.delta,
            sample_rate=args.batch_size / len(sft),
            steps=args.steps,
            accountant="rdp",
        )
        trained = train_round(
            model,
            sft,
            steps=args.steps,
            batch_size=args.batch_size,
            physical_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            pad_token_id=pad,
            device=base.device,
            dp=DPSettings(
                noise_multiplier=sigma, max_grad_norm=args.max_grad_norm, accountant="rdp"
            ),
            seed=args.seed,
            progress=False,
        )
        step_seconds["sft"].append(trained.seconds / args.steps)
    else:
        not_measured.append({"model": "DP-SFT step time", "reason": "did not fit"})

    dpo, sft_times = step_seconds["dpo"], step_seconds["sft"]
    return {
        "benchmark": "dpo_utility",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "device": str(base.device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "note": "CPU shared with other processes: times are one noisy run",
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"train_pairs": len(train), "held_out_pairs": len(held_out), "sft": len(sft)},
        "definitions": {
            "preference_accuracy": "share of held-out pairs whose implicit DPO reward "
            "beta*log(pi/pi_base) is higher for the chosen answer (base: 0 by definition)",
            "reward_margin": "mean of the chosen answer's implicit reward minus the rejected's",
            "likelihood_accuracy": "share of held-out pairs whose chosen answer has the higher "
            "summed log-probability under the model",
        },
        "results": results,
        "not_measured": not_measured,
        "step_seconds": step_seconds,
        "median_step_seconds": {
            "dpo": statistics.median(dpo) if dpo else None,
            "sft": statistics.median(sft_times) if sft_times else None,
        },
        "dpo_over_sft": (
            statistics.median(dpo) / statistics.median(sft_times) if dpo and sft_times else None
        ),
        "seconds": time.monotonic() - started,
    }


def merged(paths: list[Path]) -> dict[str, Any]:
    """Reports of one benchmark split over processes (same settings but the parts each
    measured), as one: results in order, base once, what one part did not measure but
    another did is measured."""
    reports = [json.loads(path.read_text()) for path in paths]
    first = reports[0]
    results: dict[str, Any] = {}
    steps: dict[str, list[float]] = {"dpo": [], "sft": []}
    for report in reports:
        for row in report["results"]:
            results.setdefault(row["model"], row)
        for method in steps:
            steps[method] += report["step_seconds"][method]
    missing = {
        item["model"]: item
        for report in reports
        for item in report["not_measured"]
        if item["model"] not in results
    }
    if steps["sft"]:
        missing.pop("DP-SFT step time", None)
    dpo, sft = steps["dpo"], steps["sft"]
    return {
        **first,
        "parts": [str(path) for path in paths],
        "parts_settings": [report["settings"] for report in reports],
        "results": list(results.values()),
        "not_measured": list(missing.values()),
        "step_seconds": steps,
        "median_step_seconds": {
            "dpo": statistics.median(dpo) if dpo else None,
            "sft": statistics.median(sft) if sft else None,
        },
        "dpo_over_sft": statistics.median(dpo) / statistics.median(sft) if dpo and sft else None,
        "seconds": max(report["seconds"] for report in reports),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    rows = report["results"]
    names = [r["model"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.4
    positions = range(len(rows))
    left.bar(
        [p - width / 2 for p in positions],
        [r["preference_accuracy"] for r in rows],
        width,
        label="implicit reward (vs base)",
    )
    left.bar(
        [p + width / 2 for p in positions],
        [r["likelihood_accuracy"] for r in rows],
        width,
        label="likelihood",
    )
    left.set_xticks(list(positions), names, rotation=20, ha="right")
    left.set_ylim(0, 1)
    left.set_ylabel("held-out preference accuracy")
    left.legend()
    right.bar(names, [r["reward_margin"] for r in rows])
    right.set_ylabel(f"mean reward margin (beta {report['settings']['beta']:g})")
    right.tick_params(axis="x", rotation=20)
    settings = report["settings"]
    figure.suptitle(
        f"DPO on {settings['model']}: {report['data']['train_pairs']} pairs, "
        f"{settings['steps']} steps of {settings['batch_size']}, "
        f"{report['data']['held_out_pairs']} held-out pairs"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
