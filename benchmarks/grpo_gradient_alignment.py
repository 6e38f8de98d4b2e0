"""How much of a GRPO step's gradient is shared across prompts, and what DP's noise leaves of it.

DP-SGD adds noise of standard deviation ``sigma * C`` in every direction of the adapter. What
survives it is the part of the prompts' gradients that points the same way: the mean gradient
``g_bar``. Per step, along ``g_bar``, the batch's sum carries about ``B * |g_bar|`` against
noise ``sigma * C``. This benchmark starts where `fedtune demo --method grpo` starts its DP-GRPO
rounds (the demo's own cold start, data, rewards and LoRA shape). It computes each training
prompt's gradient of the node's GRPO objective alone, with plain autograd, and records:

- the per-prompt norms (zero when a group's rewards were all equal);
- the mean pairwise cosine between non-zero ones;
- ``|g_bar|``, estimated without bias from the pairwise dot products (the norm of the sample
  mean would count each prompt's own part), with an upper bound two jackknife standard errors
  above;
- that per-step signal-to-noise ratio at the run's clip and at the median per-prompt norm,
  and the expected batch it would need to reach 1.

Writes ``benchmarks/results/grpo_gradient_alignment.json``.

    .venv/bin/python benchmarks/grpo_gradient_alignment.py --domain hospital --prompts 24
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedtune.client_node.grpo import GRPOSettings, GRPOStats, grpo_objective
from fedtune.client_node.prompt_data import load_prompt_dataset, make_prompt_collate
from fedtune.client_node.rewards import build_scorer
from fedtune.client_node.trainer import sample_rate_for
from fedtune.demo.grpo_demo import DEMO_REWARDS, cold_start
from fedtune.demo.verifiable import NUMERIC_TOLERANCE, write_demo_prompts
from fedtune.platform.config import GRPO_DEFAULTS, LoraSettings, ModelConfig
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.model.lora import attach_lora, load_initial_adapter
from fedtune.privacy.accounting import calibrate_noise_multiplier

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domain", choices=["hospital", "bank"], default="hospital")
    parser.add_argument("--prompts", type=int, default=24, help="training prompts measured")
    parser.add_argument("--cold-start-steps", type=int, default=16, help="the demo's: 16")
    parser.add_argument("--group", type=int, default=GRPO_DEFAULTS["grpo_group_size"])
    parser.add_argument(
        "--beta",
        type=float,
        default=0.0,
        help="KL weight; 0 (default) measures the rewards' signal alone, without the pull "
        "to the base that every prompt shares",
    )
    parser.add_argument("--batch", type=int, default=8, help="the demo's expected batch")
    parser.add_argument("--train", type=int, default=64, help="the demo's training prompts")
    parser.add_argument("--steps", type=int, default=4, help="the demo's total DP steps")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip", type=float, default=1.0, help="the run's max_grad_norm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "grpo_gradient_alignment.json")
    args = parser.parse_args()
    if args.prompts < 3:
        parser.error("--prompts must be at least 3 (pairs of non-zero gradients are needed)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as folder:
        train_file, _ = write_demo_prompts(
            Path(folder), domain=args.domain, train=args.prompts, held_out=1
        )
        cold = cold_start(
            Path(folder) / "cold_start",
            model=args.model,
            steps=args.cold_start_steps,
            examples=48,
            max_length=256,
        )
        base = load_base_model(ModelConfig(spec=args.model))
        model = attach_lora(base.model, LoraSettings())
        load_initial_adapter(model, Path(folder) / "cold_start")
        prompts = load_prompt_dataset(train_file, base.tokenizer, max_length=256)
    objective = grpo_objective(
        dataset=prompts,
        tokenizer=base.tokenizer,
        scorer=build_scorer(DEMO_REWARDS, tolerance=NUMERIC_TOLERANCE),
        settings=GRPOSettings(
            group_size=args.group,
            max_completion_tokens=GRPO_DEFAULTS["grpo_max_completion_tokens"],
            beta=args.beta,
        ),
        stats=GRPOStats(),
    )
    collate = make_prompt_collate(int(base.tokenizer.pad_token_id))  # type: ignore[attr-defined]
    parameters = [p for p in model.parameters() if p.requires_grad]
    gradients = []
    for index in range(len(prompts)):
        model.zero_grad()
        objective(model, collate([prompts[index]]), base.device).sum().backward()
        flat = torch.cat(
            [
                torch.zeros(p.numel()) if p.grad is None else p.grad.detach().flatten().cpu()
                for p in parameters
            ]
        )
        gradients.append(flat * min(1.0, args.clip / max(float(flat.norm()), 1e-12)))
        print(f"prompt {index}: gradient norm {float(gradients[-1].norm()):.4f}", flush=True)

    norms = [float(g.norm()) for g in gradients]
    nonzero = [g for g in gradients if float(g.norm()) > 0]
    stacked = torch.stack(gradients)
    dots = stacked @ stacked.T
    pairs = ~torch.eye(len(gradients), dtype=torch.bool)
    # E[g_i . g_j] over i != j is |g_bar|^2 without each prompt's own part; may come out < 0.
    mean_dot = float(dots[pairs].mean())
    shared_norm = max(mean_dot, 0.0) ** 0.5
    # Jackknife over prompts (the pairs share prompts, so they are not independent draws).
    count = len(gradients)
    leave_one_out = torch.tensor(
        [
            float(dots[keep][:, keep][pairs[keep][:, keep]].mean())
            for keep in (torch.arange(count) != i for i in range(count))
        ]
    )
    mean_dot_se = float(
        ((count - 1) / count * ((leave_one_out - leave_one_out.mean()) ** 2).sum()) ** 0.5
    )
    shared_norm_upper = max(mean_dot + 2 * mean_dot_se, 0.0) ** 0.5
    unit = torch.stack([g / g.norm() for g in nonzero])
    cosines = (unit @ unit.T)[~torch.eye(len(nonzero), dtype=torch.bool)]
    sigma = calibrate_noise_multiplier(
        target_epsilon=args.epsilon,
        delta=args.delta,
        sample_rate=sample_rate_for(args.train, args.batch),
        steps=args.steps,
        accountant="rdp",
        history=[],
    )
    median = statistics.median(n for n in norms if n > 0)

    def snr(clip: float) -> dict[str, float | None]:
        return {
            "clip": clip,
            "per_step_snr": args.batch * shared_norm / (sigma * clip),
            "per_step_snr_upper": args.batch * shared_norm_upper / (sigma * clip),
            "batch_for_snr_1": sigma * clip / shared_norm if shared_norm > 0 else None,
            "batch_for_snr_1_at_least": sigma * clip / shared_norm_upper,
        }

    output = {
        "what": "per-prompt gradients of the node's GRPO objective after the demo's cold "
        "start; the shared part (mean gradient) against DP noise",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cold_start": cold,
        "trainable_values": sum(p.numel() for p in parameters),
        "gradient_norms": norms,
        "zero_gradients": len(norms) - len(nonzero),
        "mean_pairwise_cosine_nonzero": float(cosines.mean()),
        "mean_abs_pairwise_cosine_nonzero": float(cosines.abs().mean()),
        "shared_gradient_norm": shared_norm,
        "shared_gradient_norm_upper": shared_norm_upper,
        "mean_pairwise_dot": mean_dot,
        "mean_pairwise_dot_jackknife_se": mean_dot_se,
        "pairwise_dots": dots.tolist(),
        "noise_multiplier": sigma,
        "at_run_clip": snr(args.clip),
        "at_median_norm": snr(median),
        "seconds_total": time.perf_counter() - started,
        "machine": {"platform": platform.platform(), "threads": args.threads},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    print(
        json.dumps(
            {k: v for k, v in output.items() if k not in ("gradient_norms", "pairwise_dots")},
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
