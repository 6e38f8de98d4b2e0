"""The utility study: how much of the non-private held-out loss gain DP-LoRA keeps, as a
node's data grows and as nodes join a consortium, with the planner's choices.

Two parts, each point trained from the same initial adapter and scored on one shared
held-out set of the domain:

- **data size**: one node with N examples (``--sizes``), the planner's logical batch and
  steps (``fedtune privacy plan``: ``--epochs`` passes over the data in one round), at each
  target epsilon and without DP for the same steps; ratio = DP gain / non-private gain.
- **consortium**: K nodes (``--nodes``) of ``--per-node`` examples each (different examples
  of the same domain), ``--rounds`` rounds of federated averaging (each node trains from the
  global adapter with the planner's plan for its data over the rounds, the global adapter is
  the example-weighted mean); the global model's gain at each epsilon per node, against one
  node alone (K = 1) and against non-private federated training with the same K.

- **sweep** (``--parts sweep``, run first when asked): the learning rate and the clip norm at
  ``--sweep-examples`` examples and the largest ``--epsilons``, and the learning rate without
  DP; the data-size and consortium points then train with the best of each (DP points with
  the best DP pair, non-private points with the best non-private rate), so a ratio compares
  each side at its own best setting.

Points that do not fit in ``--budget-minutes`` are written as ``"not measured"``, never
extrapolated. The JSON is rewritten after every point (a run cut short keeps what it
measured). Writes ``benchmarks/results/dp_utility_study.json`` and a plot beside it.

    .venv/bin/python benchmarks/dp_utility_study.py --sizes 800 --nodes 1 2 --budget-minutes 60
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.client_node.data import ChatDataset, load_chat_dataset
from fedtune.client_node.evaluation import evaluate
from fedtune.client_node.trainer import DPSettings, train_round
from fedtune.demo.data import generate_examples
from fedtune.platform.config import LoraSettings, ModelConfig
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.model.lora import adapter_arrays, attach_lora, load_adapter_arrays
from fedtune.privacy.accounting import epsilon_of
from fedtune.privacy.planner import make_plan
from fedtune.privacy.training_defaults import DP_LEARNING_RATE, DP_MAX_GRAD_NORM

RESULTS = Path(__file__).parent / "results"
HELD_OUT_SEED = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domain", default="hospital")
    parser.add_argument("--sizes", type=int, nargs="*", default=[800, 3_200, 12_800])
    parser.add_argument("--nodes", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--per-node", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[3.0, 8.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--learning-rate", type=float, default=DP_LEARNING_RATE)
    parser.add_argument("--clip", type=float, default=DP_MAX_GRAD_NORM)
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--physical-batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--budget-minutes", type=float, default=60.0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=["sizes", "consortium"], help="in this order"
    )
    parser.add_argument("--sweep-examples", type=int, default=800)
    parser.add_argument("--sweep-learning-rates", type=float, nargs="+", default=SWEEP_RATES)
    parser.add_argument("--sweep-clips", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument(
        "--tf32", action="store_true", help="TensorFloat-32 matrix products on CUDA (faster)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "dp_utility_study.json")
    args = parser.parse_args()
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = run_study(args, save=lambda report: save(report, args.out))
    save(report, args.out)
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")


PARTS = ("sweep", "sizes", "consortium")
SWEEP_RATES = [3e-3, 1e-2, 3e-2, 1e-1]


def save(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


class Study:
    """The model, the initial adapter and the shared held-out set; trains and scores."""

    def __init__(self, args: argparse.Namespace, folder: Path):
        self.args = args
        self.folder = folder
        self.base = load_base_model(ModelConfig(spec=args.model, device=args.device))
        self.pad_id = int(self.base.tokenizer.pad_token_id)  # type: ignore[attr-defined]
        torch.manual_seed(args.seed)
        self.model = attach_lora(self.base.model, LoraSettings(r=8, train_a=False))
        self.initial = adapter_arrays(self.model)
        self.held_out = self.dataset("held-out", args.held_out, seed=HELD_OUT_SEED)
        self.base_loss = self.loss()
        self.deadline = time.monotonic() + 60.0 * args.budget_minutes
        # (learning rate, clip) for DP points and the rate for non-private ones; the sweep
        # replaces them with the best it measured.
        self.dp_setting = (args.learning_rate, args.clip)
        self.plain_rate = args.learning_rate

    def dataset(self, name: str, examples: int, *, seed: int) -> ChatDataset:
        path = self.folder / f"{name}.jsonl"
        rows = generate_examples(self.args.domain, examples, seed=seed)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return load_chat_dataset(path, self.base.tokenizer, max_length=self.args.max_length)

    def loss(self) -> float:
        held_out = evaluate(
            self.model, self.held_out, pad_token_id=self.pad_id, device=self.base.device
        )
        return held_out.loss

    def train(
        self,
        data: ChatDataset,
        *,
        batch: int,
        steps: int,
        sigma: float | None,
        learning_rate: float | None = None,
        clip: float | None = None,
    ) -> tuple[dict[str, np.ndarray], float]:
        """Train the adapter loaded now; its arrays after, and the seconds it took. The
        learning rate and clip default to the study's current best for the DP or the
        non-private side."""
        dp_rate, dp_clip = self.dp_setting
        if learning_rate is None:
            learning_rate = dp_rate if sigma else self.plain_rate
        dp = (
            DPSettings(
                noise_multiplier=sigma,
                max_grad_norm=dp_clip if clip is None else clip,
                accountant="rdp",
            )
            if sigma
            else None
        )
        result = train_round(
            self.model,
            data,
            steps=steps,
            batch_size=batch,
            physical_batch_size=min(self.args.physical_batch_size, batch),
            learning_rate=learning_rate,
            pad_token_id=self.pad_id,
            device=self.base.device,
            dp=dp,
            seed=None,
            progress=False,
        )
        return adapter_arrays(self.model), result.seconds

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline


def run_study(
    args: argparse.Namespace, *, save: Callable[[dict[str, Any]], None] = lambda _: None
) -> dict[str, Any]:
    """Every part asked for, in order; ``save`` gets the report so far after each point."""
    with tempfile.TemporaryDirectory() as tmp:
        study = Study(args, Path(tmp))
        print(f"base held-out loss {study.base_loss:.4f}", flush=True)
        report = header(study)
        for part in args.parts:
            points: list[dict[str, Any]] = report.setdefault(PART_KEYS[part], [])
            for point in part_points(study, part):
                points.append(point)
                save(report)
            if part == "sweep":
                report["chosen"] = choose_settings(study, points)
        add_ratios(report.get("data_size", []), key="examples")
        add_ratios(report.get("consortium", []), key="nodes")
    return report


PART_KEYS = {"sweep": "sweep", "sizes": "data_size", "consortium": "consortium"}


def part_points(study: Study, part: str) -> Iterator[dict[str, Any]]:
    args = study.args
    if part == "sweep":
        epsilon = max(args.epsilons)
        data = study.dataset("sweep", args.sweep_examples, seed=args.seed)
        for rate in args.sweep_learning_rates:
            yield sweep_point(study, data, None, rate, None)
            for clip in args.sweep_clips:
                yield sweep_point(study, data, epsilon, rate, clip)
    elif part == "sizes":
        for n in args.sizes:
            for eps in [None, *args.epsilons]:
                yield data_size_point(study, n, eps)
    else:
        for k in args.nodes:
            for eps in [None, *args.epsilons]:
                yield consortium_point(study, k, eps)


def header(study: Study) -> dict[str, Any]:
    args = study.args
    return {
        "benchmark": "dp_utility_study",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "device": str(study.base.device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "base_model_fingerprint": study.base.fingerprint,
        "base_held_out_loss": study.base_loss,
    }


def sweep_point(
    study: Study, data: ChatDataset, epsilon: float | None, rate: float, clip: float | None
) -> dict[str, Any]:
    point: dict[str, Any] = {
        "examples": len(data),
        "target_epsilon": epsilon,
        "learning_rate": rate,
        "clip": clip,
    }
    if study.out_of_time():
        return {**point, "status": "not measured", "why": "past --budget-minutes"}
    args = study.args
    plan = make_plan(len(data), epsilon=epsilon or 8.0, delta=args.delta, epochs=args.epochs)
    load_adapter_arrays(study.model, study.initial)
    sigma = plan.noise_multiplier if epsilon is not None else None
    _, seconds = study.train(
        data,
        batch=plan.batch_size,
        steps=plan.steps_per_round,
        sigma=sigma,
        learning_rate=rate,
        clip=clip,
    )
    after = study.loss()
    point.update(
        status="measured",
        batch_size=plan.batch_size,
        steps=plan.steps_per_round,
        noise_multiplier=sigma,
        held_out_loss_after=after,
        gain=study.base_loss - after,
        seconds=seconds,
    )
    print(json.dumps(point), flush=True)
    return point


def choose_settings(study: Study, sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """The best measured (rate, clip) with DP and rate without; the study uses them next."""
    measured = [p for p in sweep if p["status"] == "measured"]
    private = [p for p in measured if p["target_epsilon"] is not None]
    plain = [p for p in measured if p["target_epsilon"] is None]
    if private:
        best = max(private, key=lambda p: p["gain"])
        study.dp_setting = (best["learning_rate"], best["clip"])
    if plain:
        study.plain_rate = max(plain, key=lambda p: p["gain"])["learning_rate"]
    return {
        "dp_learning_rate": study.dp_setting[0],
        "dp_clip": study.dp_setting[1],
        "non_private_learning_rate": study.plain_rate,
    }


def data_size_point(study: Study, examples: int, epsilon: float | None) -> dict[str, Any]:
    point: dict[str, Any] = {"examples": examples, "target_epsilon": epsilon}
    if study.out_of_time():
        return {**point, "status": "not measured", "why": "past --budget-minutes"}
    args = study.args
    plan = make_plan(examples, epsilon=epsilon or 8.0, delta=args.delta, epochs=args.epochs)
    data = study.dataset(f"node-{examples}", examples, seed=args.seed)
    load_adapter_arrays(study.model, study.initial)
    sigma = plan.noise_multiplier if epsilon is not None else None
    _, seconds = study.train(data, batch=plan.batch_size, steps=plan.steps_per_round, sigma=sigma)
    after = study.loss()
    point.update(
        status="measured",
        batch_size=plan.batch_size,
        steps=plan.steps_per_round,
        learning_rate=study.dp_setting[0] if sigma else study.plain_rate,
        clip=study.dp_setting[1] if sigma else None,
        noise_multiplier=sigma,
        epsilon=epsilon_of(
            [(sigma, plan.sample_rate, plan.steps_per_round)], delta=args.delta, accountant="rdp"
        )
        if sigma
        else None,
        held_out_loss_after=after,
        gain=study.base_loss - after,
        seconds=seconds,
    )
    print(json.dumps(point), flush=True)
    return point


def consortium_point(study: Study, nodes: int, epsilon: float | None) -> dict[str, Any]:
    point: dict[str, Any] = {"nodes": nodes, "target_epsilon": epsilon}
    if study.out_of_time():
        return {**point, "status": "not measured", "why": "past --budget-minutes"}
    args = study.args
    plan = make_plan(
        args.per_node,
        epsilon=epsilon or 8.0,
        delta=args.delta,
        rounds=args.rounds,
        epochs=args.epochs,
    )
    data = [
        study.dataset(f"member-{k}", args.per_node, seed=args.seed + 1 + k) for k in range(nodes)
    ]
    sigma = plan.noise_multiplier if epsilon is not None else None
    global_arrays, seconds = dict(study.initial), 0.0
    for _ in range(args.rounds):
        updates = []
        for member in data:
            load_adapter_arrays(study.model, global_arrays)
            arrays, took = study.train(
                member, batch=plan.batch_size, steps=plan.steps_per_round, sigma=sigma
            )
            updates.append((arrays, len(member)))
            seconds += took
        total = sum(weight for _, weight in updates)
        global_arrays = {
            name: sum(arrays[name] * (weight / total) for arrays, weight in updates)
            for name in global_arrays
        }
    load_adapter_arrays(study.model, global_arrays)
    after = study.loss()
    point.update(
        status="measured",
        per_node=args.per_node,
        rounds=args.rounds,
        batch_size=plan.batch_size,
        steps_per_round=plan.steps_per_round,
        learning_rate=study.dp_setting[0] if sigma else study.plain_rate,
        clip=study.dp_setting[1] if sigma else None,
        noise_multiplier=sigma,
        epsilon_per_node=plan.epsilon_after[-1] if sigma else None,
        held_out_loss_after=after,
        gain=study.base_loss - after,
        seconds=seconds,
    )
    print(json.dumps(point), flush=True)
    return point


def add_ratios(points: list[dict[str, Any]], *, key: str) -> None:
    """DP gain over the non-private gain of the same ``key`` (data size or node count); for
    the consortium also over one node alone at the same epsilon."""
    plain = {
        p[key]: p["gain"]
        for p in points
        if p["target_epsilon"] is None and p["status"] == "measured"
    }
    alone = {
        p["target_epsilon"]: p["gain"]
        for p in points
        if key == "nodes" and p.get(key) == 1 and p["status"] == "measured"
    }
    for point in points:
        if point["status"] != "measured" or point["target_epsilon"] is None:
            continue
        same = plain.get(point[key])
        point["ratio_to_non_private"] = point["gain"] / same if same and same > 0 else None
        if key == "nodes":
            single = alone.get(point["target_epsilon"])
            point["gain_over_one_node"] = point["gain"] / single if single and single > 0 else None


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, part, key, label in (
        (axes[0], "data_size", "examples", "examples per node"),
        (axes[1], "consortium", "nodes", "nodes (each with per_node examples)"),
    ):
        for epsilon in report["settings"]["epsilons"]:
            points = sorted(
                (p[key], p.get("ratio_to_non_private") or 0.0)
                for p in report.get(part, [])
                if p["target_epsilon"] == epsilon and p["status"] == "measured"
            )
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=f"epsilon {epsilon:g}")
        axis.set_xscale("log", base=2)
        axis.set_xlabel(label)
        axis.set_ylabel("DP gain / non-private gain")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
