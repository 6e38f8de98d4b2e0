"""Held-out reward of GRPO on the default model: the base, a non-private run and a DP run
(epsilon 8), with the time of a step split into generation, reward and update.

SmolLM2-135M never writes ``<answer>…</answer>`` by itself (0 tags in 32 samples at
temperature 1 on the bank prompts), so every group's rewards are equal and GRPO has nothing to
learn from. As DeepSeek-R1 did, a short non-private supervised *cold start* on public worked
examples (another seed than the node's data: no node's privacy is spent) teaches the format
first; both GRPO runs start from that adapter. The held-out reward (greedy completion per
held-out prompt, the domain's rewards summed: right answer 1 + right format 1) is measured for
the base model, after the cold start, and after each round of each GRPO run. Everything runs
through the node's own code (:func:`fedtune.client_node.trainer.train_round`, the GRPO
objective, Opacus). Writes ``benchmarks/results/grpo_utility.json`` and ``.png``.

    .venv/bin/python benchmarks/grpo_utility.py --domain bank --rounds 2 --steps 2
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedtune.client_node.data import load_chat_dataset
from fedtune.client_node.grpo import GRPOSettings, GRPOStats, grpo_objective, held_out_reward
from fedtune.client_node.prompt_data import load_prompt_dataset, make_prompt_collate
from fedtune.client_node.rewards import build_scorer
from fedtune.client_node.trainer import DPSettings, sample_rate_for, train_round
from fedtune.demo.verifiable import NUMERIC_TOLERANCE, REWARDS, worked_examples, write_demo_prompts
from fedtune.platform.config import GRPO_DEFAULTS, LoraSettings, ModelConfig
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.model.lora import adapter_arrays, attach_lora, load_adapter_arrays
from fedtune.privacy.accounting import calibrate_noise_multiplier, epsilon_of

RESULTS = Path(__file__).parent / "results"
COLD_START_SEED = 1000  # public worked examples: not the nodes' data (seed 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domain", choices=["hospital", "bank"], default="bank")
    parser.add_argument("--train", type=int, default=64, help="training prompts")
    parser.add_argument("--held-out", type=int, default=16, help="held-out prompts")
    parser.add_argument("--cold-start-examples", type=int, default=48)
    parser.add_argument("--cold-start-steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps per round")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step (expected)")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=GRPO_DEFAULTS["grpo_max_completion_tokens"],
        help="tokens per completion",
    )
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument(
        "--cold-start-learning-rate",
        type=float,
        default=1e-2,
        help="the supervised cold start's (SFT: 1e-2 teaches the format in 12 steps)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=1e-3,
        help="GRPO's (at 1e-2 one non-private round of 4 steps took the held-out reward from "
        "0.94 to 0: the policy left the format, KL 1.4 per token)",
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=GRPO_DEFAULTS["grpo_beta"],
        help="weight of the KL to the reference (the base, adapter off); 0 leaves it out, as "
        "Dr. GRPO and DAPO do: the cold start's adapter is far from the base (KL about 1.4 a "
        "token), so the term pulls the policy back out of the format it learned",
    )
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=["non_private", "dp"],
        default=["non_private", "dp"],
        help="which runs from the cold start to measure (dp alone: compare clips or rates)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=60.0,
        help="start no new phase (cold start, round) past this: what was left is written as "
        "not measured",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "grpo_utility.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    base = load_base_model(ModelConfig(spec=args.model))
    tokenizer, pad = base.tokenizer, int(base.tokenizer.pad_token_id)  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as folder:
        train_file, held_file = write_demo_prompts(
            Path(folder), domain=args.domain, train=args.train, held_out=args.held_out
        )
        cold_file = Path(folder) / "cold_start.jsonl"
        cold_file.write_text(
            "".join(
                json.dumps(row) + "\n"
                for row in worked_examples(
                    args.domain, args.cold_start_examples, seed=COLD_START_SEED
                )
            )
        )
        prompts = load_prompt_dataset(train_file, tokenizer, max_length=args.max_length)
        held_out = load_prompt_dataset(held_file, tokenizer, max_length=args.max_length)
        cold = load_chat_dataset(cold_file, tokenizer, max_length=args.max_length)
    scorer = build_scorer(REWARDS[args.domain], tolerance=NUMERIC_TOLERANCE)
    settings = GRPOSettings(
        group_size=args.group, max_completion_tokens=args.max_tokens, beta=args.beta
    )

    def reward_of(model: Any) -> dict[str, float]:
        clock = time.perf_counter()
        scores = held_out_reward(
            model,
            held_out,
            tokenizer=tokenizer,
            scorer=scorer,
            settings=settings,
            device=base.device,
        )
        return {**scores, "seconds": time.perf_counter() - clock}

    results: dict[str, Any] = {}

    def write(final: bool) -> None:
        output = {
            "what": "held-out reward (greedy completion, rewards summed: answer + format, max "
            "2) of the base model, after a non-private cold start on public worked examples, "
            "and after each round of non-private and DP GRPO from that cold start",
            "domain": args.domain,
            "rewards": REWARDS[args.domain],
            "model": args.model,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": results,
            "complete": final,
            "not_measured": [] if final else "every phase missing from results: out of budget",
            "seconds_total": time.perf_counter() - started,
            "machine": {"platform": platform.platform(), "threads": args.threads},
            "note": "one run on a shared 2-core CPU: the times are noisy; nothing is extrapolated",
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(output, indent=2) + "\n")

    def over_budget() -> bool:
        return time.perf_counter() - started > args.budget_minutes * 60

    results["base"] = reward_of(base.model)
    print(f"base model: {results['base']}", flush=True)
    write(final=False)
    if over_budget():
        return
    model = attach_lora(base.model, LoraSettings())
    cold_result = train_round(
        model,
        cold,
        steps=args.cold_start_steps,
        batch_size=8,
        physical_batch_size=8,
        learning_rate=args.cold_start_learning_rate,
        pad_token_id=pad,
        device=base.device,
        dp=None,
        seed=0,
        progress=False,
    )
    results["cold_start"] = {
        **reward_of(model),
        "steps": args.cold_start_steps,
        "examples": len(cold),
        "train_seconds": cold_result.seconds,
    }
    print(f"after the cold start: {results['cold_start']}", flush=True)
    write(final=False)
    start_arrays = copy.deepcopy(adapter_arrays(model))

    sample_rate = sample_rate_for(len(prompts), args.batch)
    total_steps = args.rounds * args.steps
    sigma = calibrate_noise_multiplier(
        target_epsilon=args.epsilon,
        delta=args.delta,
        sample_rate=sample_rate,
        steps=total_steps,
        accountant="rdp",
        history=[],
    )
    for arm in args.arms:
        load_adapter_arrays(model, start_arrays)
        history: list[Any] = []
        curve, timing = [], {"generation": 0.0, "reward": 0.0, "update": 0.0}
        health = []
        for round_number in range(1, args.rounds + 1):
            if over_budget():
                return
            stats = GRPOStats()
            dp = (
                DPSettings(
                    noise_multiplier=sigma,
                    max_grad_norm=args.clip,
                    accountant="rdp",
                    history=history,
                )
                if arm == "dp"
                else None
            )
            result = train_round(
                model,
                prompts,
                steps=args.steps,
                batch_size=args.batch,
                physical_batch_size=args.batch,
                learning_rate=args.learning_rate,
                pad_token_id=pad,
                device=base.device,
                dp=dp,
                seed=round_number,
                progress=False,
                per_row_losses=grpo_objective(
                    dataset=prompts,
                    tokenizer=tokenizer,
                    scorer=scorer,
                    settings=settings,
                    stats=stats,
                ),
                collate=make_prompt_collate(pad),
            )
            history = result.history
            sampling = stats.seconds["generation"] + stats.seconds["reward"]
            timing["generation"] += stats.seconds["generation"]
            timing["reward"] += stats.seconds["reward"]
            timing["update"] += max(result.device_seconds - sampling, 0.0)
            health.append(stats.summary())
            curve.append({"round": round_number, **reward_of(model)})
            print(f"{arm} round {round_number}: {curve[-1]} (sampled: {health[-1]})", flush=True)
            results[arm] = {"held_out_by_round": curve, "sampled_by_round": health}
            write(final=False)
        results[arm] = {
            "held_out_by_round": curve,
            "sampled_by_round": health,
            "seconds_per_step": {k: v / total_steps for k, v in timing.items()},
            "epsilon": (
                epsilon_of(history, delta=args.delta, accountant="rdp") if arm == "dp" else None
            ),
            "noise_multiplier": sigma if arm == "dp" else None,
        }
    results["sample_rate"] = sample_rate
    write(final=True)
    output = json.loads(args.out.read_text())
    _plot(output, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


def _plot(output: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = output["results"]
    figure, axis = plt.subplots(figsize=(6, 4))
    start = results["cold_start"]["mean_reward"]
    for arm, label in (("non_private", "GRPO, non-private"), ("dp", "DP-GRPO, epsilon 8")):
        if arm not in results:
            continue
        rounds = [0] + [point["round"] for point in results[arm]["held_out_by_round"]]
        values = [start] + [point["mean_reward"] for point in results[arm]["held_out_by_round"]]
        axis.plot(rounds, values, marker="o", label=label)
    axis.axhline(results["base"]["mean_reward"], color="grey", linestyle=":", label="base model")
    axis.set_xlabel("round (0: after the cold start)")
    axis.set_ylabel("held-out reward (max 2)")
    axis.set_title(f"GRPO on {output['model']}, {output['domain']} prompts")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
