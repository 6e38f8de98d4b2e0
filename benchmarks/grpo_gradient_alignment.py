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
- that per-step signal-to-noise ratio at the run's clip and at the median per-prompt norm
  (the gradients clipped there, so the signal shrinks with the noise), and the expected batch
  it would need to reach 1.

Writes ``benchmarks/results/grpo_gradient_alignment.json``; ``--reanalyse`` recomputes a
results file's figures from the dot products it holds.

    .venv/bin/python benchmarks/grpo_gradient_alignment.py --domain hospital --prompts 24
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
    parser.add_argument(
        "--reanalyse",
        type=Path,
        metavar="JSON",
        help="recompute a results file's figures from its measured dot products, no model",
    )
    args = parser.parse_args()
    if args.reanalyse is not None:
        reanalyse(args.reanalyse)
        return
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

    stacked = torch.stack(gradients)
    sigma = noise_multiplier(args)
    output = {
        "what": "per-prompt gradients of the node's GRPO objective after the demo's cold "
        "start; the shared part (mean gradient) against DP noise",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cold_start": cold,
        "trainable_values": sum(p.numel() for p in parameters),
        **analyse(stacked @ stacked.T, clip=args.clip, batch=args.batch, sigma=sigma),
        "seconds_total": time.perf_counter() - started,
        "machine": {"platform": platform.platform(), "threads": args.threads},
    }
    write(output, args.out)


def noise_multiplier(args: argparse.Namespace) -> float:
    """The demo's sigma: its epsilon over its DP steps at its sample rate."""
    return calibrate_noise_multiplier(
        target_epsilon=args.epsilon,
        delta=args.delta,
        sample_rate=sample_rate_for(args.train, args.batch),
        steps=args.steps,
        accountant="rdp",
        history=[],
    )


def clipped(dots: torch.Tensor, clip: float) -> torch.Tensor:
    """The dot products of the same gradients clipped to ``clip`` (each scaled by
    min(1, clip / norm), so clipping again at a smaller norm is exact)."""
    norms = dots.diagonal().clamp_min(0).sqrt()
    scale = (clip / norms.clamp_min(1e-12)).clamp(max=1.0)
    return dots * scale[:, None] * scale[None, :]


def shared_part(dots: torch.Tensor) -> tuple[float, float]:
    """|g_bar|^2 estimated as the mean of g_i . g_j over i != j (without each prompt's own
    part; may come out < 0), and its jackknife standard error over prompts (the pairs share
    prompts, so they are not independent draws)."""
    count = len(dots)
    pairs = ~torch.eye(count, dtype=torch.bool)
    mean_dot = float(dots[pairs].mean())
    leave_one_out = torch.tensor(
        [
            float(dots[keep][:, keep][pairs[keep][:, keep]].mean())
            for keep in (torch.arange(count) != i for i in range(count))
        ]
    )
    se = float(((count - 1) / count * ((leave_one_out - leave_one_out.mean()) ** 2).sum()) ** 0.5)
    return mean_dot, se


def analyse(dots: torch.Tensor, *, clip: float, batch: int, sigma: float) -> dict[str, Any]:
    """Everything the JSON says about the gradients, from their pairwise dot products (measured
    at the run's clip)."""
    norms = dots.diagonal().clamp_min(0).sqrt()
    nonzero = norms > 0
    unit = dots[nonzero][:, nonzero] / (norms[nonzero][:, None] * norms[nonzero][None, :])
    cosines = unit[~torch.eye(int(nonzero.sum()), dtype=torch.bool)]
    mean_dot, se = shared_part(dots)

    def snr(at: float) -> dict[str, float | None]:
        # Clipping at ``at`` scales the signal too: the shared part is re-estimated there.
        dot, dot_se = shared_part(clipped(dots, at))
        shared, upper = max(dot, 0.0) ** 0.5, max(dot + 2 * dot_se, 0.0) ** 0.5
        return {
            "clip": at,
            "shared_gradient_norm": shared,
            "shared_gradient_norm_upper": upper,
            "per_step_snr": batch * shared / (sigma * at),
            "per_step_snr_upper": batch * upper / (sigma * at),
            "batch_for_snr_1": sigma * at / shared if shared > 0 else None,
            "batch_for_snr_1_at_least": sigma * at / upper if upper > 0 else None,
        }

    return {
        "gradient_norms": norms.tolist(),
        "zero_gradients": int((~nonzero).sum()),
        "mean_pairwise_cosine_nonzero": float(cosines.mean()),
        "mean_abs_pairwise_cosine_nonzero": float(cosines.abs().mean()),
        "shared_gradient_norm": max(mean_dot, 0.0) ** 0.5,
        "shared_gradient_norm_upper": max(mean_dot + 2 * se, 0.0) ** 0.5,
        "mean_pairwise_dot": mean_dot,
        "mean_pairwise_dot_jackknife_se": se,
        "pairwise_dots": dots.tolist(),
        "noise_multiplier": sigma,
        "at_run_clip": snr(clip),
        "at_median_norm": snr(float(norms[nonzero].quantile(0.5))),
    }


def reanalyse(path: Path) -> None:
    """Recompute the analysis of a results file from its measured dot products (no model)."""
    output = json.loads(path.read_text())
    settings = argparse.Namespace(**output["settings"])
    sigma = noise_multiplier(settings)
    dots = torch.tensor(output["pairwise_dots"], dtype=torch.float64)
    output.update(analyse(dots, clip=settings.clip, batch=settings.batch, sigma=sigma))
    write(output, path)


def write(output: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(output, indent=2) + "\n")
    print(
        json.dumps(
            {k: v for k, v in output.items() if k not in ("gradient_norms", "pairwise_dots")},
            indent=2,
        )
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
