"""The canary audit on the default model: exposure of planted secrets and the one-run lower
bound on epsilon, without DP and with DP at each target epsilon (same plan, same canaries).

One node's data: ``--examples`` demo conversations of ``--domain``, plus the canaries of
`fedtune audit canaries` (``--secrets`` secrets planted ``--repeats`` times each for exposure,
``--membership`` canaries each planted with probability 1/2 for the bound). Every training
has ``--steps`` steps of logical batch ``--batch-size`` from the same initial adapter. The
non-private training runs once (it does not depend on epsilon). Trainings that would not
fit in ``--budget-minutes`` (projected from the first one) are written as "not measured".
Writes ``benchmarks/results/canary_audit.json`` and, when matplotlib is installed, a plot.

    .venv/bin/python benchmarks/canary_audit.py --budget-minutes 15
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedtune.client_node.canary_audit import CanaryOptions, audit_canaries
from fedtune.demo.data import generate_examples
from fedtune.platform.config import ModelConfig, NodeConfig
from fedtune.platform.model.base_model import load_base_model

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domain", default="hospital")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--secrets", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--membership", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=63)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--physical-batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-minutes", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "canary_audit.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    print(plot(report, args.out.with_suffix(".png")))


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + 60 * args.budget_minutes
    base = load_base_model(ModelConfig(spec=args.model, device="cpu"))
    options = CanaryOptions(
        secrets=args.secrets,
        repeats=args.repeats,
        membership=args.membership,
        candidates=args.candidates,
        seed=args.seed,  # the same canaries and candidates at every epsilon
    )
    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = node_config(args, Path(tmp))
        first_seconds = None
        for index, epsilon in enumerate(args.epsilons):
            trainings = 2 if index == 0 else 1
            if first_seconds is not None and time.monotonic() + first_seconds > deadline:
                points.append(
                    {
                        "mode": "dp",
                        "target_epsilon": epsilon,
                        "status": "not measured",
                        "why": "past --budget-minutes",
                    }
                )
                continue
            began = time.monotonic()
            privacy = config.privacy.model_copy(update={"target_epsilon": epsilon})
            result = audit_canaries(
                config.model_copy(update={"privacy": privacy}),
                base=base,
                options=options,
                progress=True,
                non_private=index == 0,
            )
            first_seconds = first_seconds or (time.monotonic() - began) / trainings
            for run_ in result["runs"]:
                points.append(point(run_, epsilon if run_["mode"] == "dp" else None))
                print(json.dumps(points[-1]), flush=True)
            if index == 0:
                setting = {k: result[k] for k in ("base_model", "data_set", "options", "training")}
    return {
        "benchmark": "canary_audit",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "device": str(base.device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "audit": setting,
        "points": points,
        "seconds": time.monotonic() - started,
    }


def node_config(args: argparse.Namespace, folder: Path) -> NodeConfig:
    rows = generate_examples(args.domain, args.examples, seed=args.seed)
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return NodeConfig.model_validate(
        {
            "node": {"name": "benchmark", "state_dir": folder / "state"},
            "model": {"spec": args.model, "device": "cpu"},
            "data": {"train": train, "eval": train, "max_length": args.max_length},
            "training": {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "physical_batch_size": args.physical_batch_size,
                "learning_rate": args.learning_rate,
            },
            "privacy": {"target_epsilon": 8.0, "delta": args.delta, "planned_rounds": 1},
        },
        strict=False,
    )


def point(run_: dict[str, Any], target: float | None) -> dict[str, Any]:
    member = run_["membership"]
    return {
        "mode": run_["mode"],
        "target_epsilon": target,
        "status": "measured",
        "epsilon": run_["epsilon"],
        "noise_multiplier": run_["noise_multiplier"],
        "epsilon_lower_bound": member["epsilon_lower_bound"],
        "membership_guesses": member["guesses"],
        "membership_correct": member["correct"],
        "membership_score_means": run_["membership_scores"],
        "exposure_sampled_mean": run_["exposure_sampled_mean"],
        "exposure_extrapolated_mean": run_["exposure_extrapolated_mean"],
        "exposure_sampled_max_possible": run_["exposure_sampled_max_possible"],
        "secrets": [
            {k: s[k] for k in ("rank_in_sample", "exposure_sampled", "exposure_extrapolated")}
            for s in run_["secrets"]
        ],
        "train_loss_first": run_["train_loss_first"],
        "train_loss_last": run_["train_loss_last"],
        "seconds": run_["seconds"],
    }


def plot(report: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: JSON only"
    measured = sorted(
        (p for p in report["points"] if p["status"] == "measured"),
        key=lambda p: -math.inf if p["epsilon"] is None else -p["epsilon"],
    )
    labels = ["no DP" if p["epsilon"] is None else f"ε = {p['target_epsilon']:g}" for p in measured]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [p["exposure_extrapolated_mean"] for p in measured], color="#b42318")
    left.bar(labels, [p["exposure_sampled_mean"] for p in measured], color="#0969da", width=0.4)
    left.set_ylabel("mean exposure of the secrets (bits)")
    left.set_title("exposure: extrapolated (red), in the sample (blue)")
    right.bar(labels, [p["epsilon_lower_bound"] for p in measured], color="#1a7f37")
    for x, p in enumerate(measured):
        if p["epsilon"] is not None:
            right.plot([x - 0.4, x + 0.4], [p["epsilon"]] * 2, color="black")
        right.annotate(
            f"{p['epsilon_lower_bound']:.2f} ({p['membership_correct']}/{p['membership_guesses']})",
            (x, p["epsilon_lower_bound"]),
            ha="center",
            va="bottom",
        )
    right.set_ylabel("ε lower bound, 95% (bars); accounted ε (lines)")
    right.set_title("one-run membership audit")
    figure.suptitle(f"canary audit, {report['settings']['model']} on CPU")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return f"wrote {path}"


if __name__ == "__main__":
    main()
