"""Utility under DP: how much of the non-private held-out loss gain DP-LoRA keeps.

For each logical batch size and learning rate, trains one round non-privately and at each
target epsilon (noise calibrated for that round), from the same initial adapter, on the demo
data of one node; records held-out loss before and after, and the ratio

    (base loss - loss after DP training) / (base loss - loss after non-private training)

with the same batch size and learning rate, and against the best non-private run. Writes
``benchmarks/results/dp_utility.json`` and a plot ``dp_utility.png`` next to it.

    .venv/bin/python benchmarks/dp_utility.py --batch-sizes 32 64 --learning-rates 3e-3 1e-2
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from fedtune.client_node.data import load_chat_dataset
from fedtune.client_node.evaluation import evaluate
from fedtune.client_node.trainer import DPSettings, sample_rate_for, train_round
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import LoraSettings, ModelConfig
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.model.lora import adapter_arrays, attach_lora, load_adapter_arrays
from fedtune.privacy.accounting import calibrate_noise_multiplier, epsilon_of

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domain", default="hospital")
    parser.add_argument("--train-examples", type=int, default=800)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[3e-3, 1e-2])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[3.0, 8.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--physical-batch-size", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--train-a", choices=["yes", "no"], default="yes")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "dp_utility.json")
    parser.add_argument(
        "--resume", action="store_true", help="keep the runs already in --out, add the rest"
    )
    args = parser.parse_args()

    base = load_base_model(ModelConfig(spec=args.model))
    pad_id = int(base.tokenizer.pad_token_id)  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as tmp:
        train_path, held_out_path = write_demo_data(
            Path(tmp), domain=args.domain, train=args.train_examples, held_out=args.held_out
        )
        train = load_chat_dataset(train_path, base.tokenizer, max_length=args.max_length)
        held_out = load_chat_dataset(held_out_path, base.tokenizer, max_length=args.max_length)
    lora = LoraSettings(r=args.lora_r, train_a=args.train_a == "yes")
    torch.manual_seed(args.seed)  # the same initial adapter in every invocation
    model = attach_lora(base.model, lora)
    initial = adapter_arrays(model)
    base_loss = evaluate(model, held_out, pad_token_id=pad_id, device=base.device).loss
    print(f"base held-out loss {base_loss:.4f}", flush=True)

    previous = json.loads(args.out.read_text()) if args.resume and args.out.exists() else None
    grid_keys = {"batch_sizes", "learning_rates", "epsilons", "out", "resume"}
    fixed = {k: v for k, v in vars(args).items() if k not in grid_keys}
    if previous and (
        previous["base_model_fingerprint"] != base.fingerprint
        or {k: previous["settings"].get(k) for k in fixed} != fixed
    ):
        raise SystemExit(f"{args.out} was measured with other settings; drop --resume")
    runs: list[dict] = previous["runs"] if previous else []
    report = {
        "benchmark": "dp_utility",
        "machine": {
            "platform": platform.platform(),
            "device": str(base.device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": {
            **fixed,
            "lora": lora.model_dump(),
        },
        "base_model_fingerprint": base.fingerprint,
        "train_examples": len(train),
        "held_out_examples": len(held_out),
        "base_held_out_loss": base_loss,
        "runs": runs,
    }
    for batch_size in args.batch_sizes:
        rate = sample_rate_for(len(train), batch_size)
        for learning_rate in args.learning_rates:
            for epsilon in [None, *args.epsilons]:
                key = (batch_size, learning_rate, epsilon)
                if any(_key(run) == key for run in runs):
                    continue
                load_adapter_arrays(model, initial)
                dp = None
                if epsilon is not None:
                    sigma = calibrate_noise_multiplier(
                        target_epsilon=epsilon,
                        delta=args.delta,
                        sample_rate=rate,
                        steps=args.steps,
                        accountant="rdp",
                    )
                    dp = DPSettings(noise_multiplier=sigma, max_grad_norm=1.0, accountant="rdp")
                result = train_round(
                    model,
                    train,
                    steps=args.steps,
                    batch_size=batch_size,
                    physical_batch_size=min(args.physical_batch_size, batch_size),
                    learning_rate=learning_rate,
                    pad_token_id=pad_id,
                    device=base.device,
                    dp=dp,
                    seed=args.seed,
                    progress=False,
                )
                after = evaluate(model, held_out, pad_token_id=pad_id, device=base.device).loss
                run = {
                    "batch_size": batch_size,
                    "learning_rate": learning_rate,
                    "target_epsilon": epsilon,
                    "epsilon": epsilon_of(result.history, delta=args.delta, accountant="rdp")
                    if dp
                    else None,
                    "noise_multiplier": dp.noise_multiplier if dp else None,
                    "sample_rate": result.sample_rate,
                    "held_out_loss_after": after,
                    "gain": base_loss - after,
                    "train_seconds": result.seconds,
                    "seconds_per_step": result.seconds / args.steps,
                }
                runs.append(run)
                print(json.dumps(run), flush=True)
                _add_ratios(runs)
                report["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


def _key(run: dict) -> tuple:
    return (run["batch_size"], run["learning_rate"], run["target_epsilon"])


def _add_ratios(runs: list[dict]) -> None:
    """Gain under DP over the non-private gain: same batch size and learning rate, and best."""
    plain = {_key(r)[:2]: r["gain"] for r in runs if r["target_epsilon"] is None}
    best = max(plain.values(), default=0.0)
    for run in runs:
        if run["target_epsilon"] is None:
            continue
        same = plain.get(_key(run)[:2])
        run["ratio_same_hyperparameters"] = run["gain"] / same if same and same > 0 else None
        run["ratio_best_non_private"] = run["gain"] / best if best > 0 else None


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if r["target_epsilon"] is not None]
    epsilons = sorted({r["target_epsilon"] for r in runs})
    learning_rates = sorted({r["learning_rate"] for r in runs})
    figure, axes = plt.subplots(1, len(epsilons), figsize=(5 * len(epsilons), 4), squeeze=False)
    for axis, epsilon in zip(axes[0], epsilons, strict=True):
        for learning_rate in learning_rates:
            points = sorted(
                (r["batch_size"], r["ratio_same_hyperparameters"] or 0.0)
                for r in runs
                if r["target_epsilon"] == epsilon and r["learning_rate"] == learning_rate
            )
            if not points:
                continue
            axis.plot(*zip(*points, strict=True), marker="o", label=f"lr {learning_rate:g}")
        axis.axhline(0.9, color="grey", linestyle="--", label="target 0.9")
        axis.set_title(f"epsilon {epsilon:g}, delta {report['settings']['delta']:g}")
        axis.set_xlabel("logical batch size")
        axis.set_ylabel("DP gain / non-private gain")
        axis.set_xscale("log", base=2)
        axis.legend()
    figure.suptitle(
        f"DP-LoRA utility, {report['settings']['steps']} steps, "
        f"{report['train_examples']} examples ({report['settings']['domain']})"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
