"""Share of a federated round's time spent outside the nodes' local work.

Runs whole simulated federations (``fedtune.simulation.simulate``, Flower's Simulation Engine)
with 2, 4 and 8 nodes and reads every round back from the run's database. A round's time is the
coordinator's wall time from sending the train messages to having every evaluation reply; the
nodes' local work is what they report themselves: the wall time of each message's handler
(``node-seconds``: DP-SGD training, privacy accounting and the ledger, held-out evaluation),
of which training alone is ``train-seconds``. The rest is overhead: messaging through Flower
and Ray, (de)serialising adapters, validation, aggregation, checkpointing, database writes.

On a machine where the simulated nodes share the CPUs they run one after another (one Ray actor
holding all cores, fedtune's default), so local work adds up; ``concurrent_nodes`` in the
result says so. Round 1 also loads the base model in the worker; it is reported apart from the
steady-state rounds.

``--model tiny`` (the default) is a randomly initialised 2-layer Llama with SmolLM2's tokenizer
(needs the model cache, ``fedtune model fetch``); pass ``--model smollm2-135m`` for the real one.
Results merge into ``benchmarks/results/round_overhead.json``, keyed by model and node count::

    .venv/bin/python benchmarks/round_overhead.py --nodes 2 4 8
    .venv/bin/python benchmarks/round_overhead.py --model smollm2-135m --nodes 2 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from fedtune.common.database import transaction
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import load_run_config
from fedtune.platform.db.storage import NodeMetric, Round, open_database
from fedtune.platform.model.model_store import resolve_model_dir
from fedtune.simulation import simulate

RESULTS = Path(__file__).parent / "results"
TARGET_SHARE = 0.10  # for 2 nodes with the default model (issue "Federation")


def tiny_model(folder: Path) -> str:
    """A 2-layer, 64-wide Llama with SmolLM2's tokenizer and chat template, saved in ``folder``."""
    source = resolve_model_dir("smollm2-135m")
    config = AutoConfig.from_pretrained(source)
    config.update(
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
        }
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


def write_run(folder: Path, *, model: str, nodes: int, rounds: int, steps: int, batch: int) -> Path:
    entries = []
    for index in range(nodes):
        domain = ("hospital", "bank")[index % 2]
        train, held_out = write_demo_data(
            folder / f"node-{index}", domain=domain, train=400, held_out=48, seed=index
        )
        entries.append(
            f'[[nodes]]\nname = "node-{index}"\ntrain = "{train}"\neval = "{held_out}"\n'
        )
    run = folder / "run.toml"
    run.write_text(
        f'[run]\nname = "round-overhead"\nrounds = {rounds}\n\n'
        f'[model]\nspec = "{model}"\n\n'
        "[data]\nmax_length = 128\nmax_eval_examples = 48\n\n"
        f"[training]\nsteps = {steps}\nbatch_size = {batch}\nphysical_batch_size = 16\n\n"
        '[privacy]\nmode = "dp"\ntarget_epsilon = 8.0\ndelta = 1e-5\n\n'
        + "\n".join(entries)
        + '\n[output]\ndir = "out"\n'
    )
    return run


def measure(run_toml: Path) -> dict[str, Any]:
    config = load_run_config(run_toml)
    started = time.perf_counter()
    run_id = simulate(config, progress=lambda line: None)
    total = time.perf_counter() - started
    with transaction(open_database(config.database_url)) as session:
        rounds = session.scalars(select(Round).where(Round.run_id == run_id)).all()
        metrics = session.scalars(select(NodeMetric).where(NodeMetric.run_id == run_id)).all()
        per_round = []
        for row in sorted(rounds, key=lambda r: r.number):
            mine = [m.metrics for m in metrics if m.round == row.number]
            on_nodes = sum(m.get("node-seconds") or 0.0 for m in mine)
            training = sum(m.get("train-seconds") or 0.0 for m in mine)
            evaluating = sum(m.get("evaluate-seconds") or 0.0 for m in mine)
            seconds = row.seconds or 0.0
            overhead = seconds - on_nodes
            per_round.append(
                {
                    "round": row.number,
                    "seconds": seconds,
                    "node_seconds": on_nodes,
                    "node_training_seconds": training,
                    "node_evaluation_seconds": evaluating,
                    "node_other_seconds": on_nodes - training - evaluating,
                    "overhead_seconds": overhead,
                    "overhead_share": overhead / seconds if seconds else None,
                }
            )
    steady = [r for r in per_round if r["round"] > 1]
    share = statistics.mean(r["overhead_share"] for r in steady) if steady else None
    return {
        "run_seconds": total,
        "rounds": per_round,
        "steady_state_overhead_share": share,
        "steady_state_overhead_seconds": (
            statistics.mean(r["overhead_seconds"] for r in steady) if steady else None
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' or a model spec")
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="DP-SGD steps per node and round")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "round_overhead.json")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 includes model loading)")

    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report.update(benchmark="round_overhead", target_share_2_nodes_default_model=TARGET_SHARE)
    results: dict[str, Any] = report.setdefault("results", {})
    with tempfile.TemporaryDirectory(prefix="round-overhead-") as scratch:
        model = tiny_model(Path(scratch) / "tiny") if args.model == "tiny" else args.model
        for nodes in args.nodes:
            folder = Path(scratch) / f"nodes-{nodes}"
            run_toml = write_run(
                folder,
                model=model,
                nodes=nodes,
                rounds=args.rounds,
                steps=args.steps,
                batch=args.batch,
            )
            outcome = measure(run_toml)
            entry = {
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "device": "cuda" if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__,
                },
                "settings": {
                    "model": args.model,
                    "nodes": nodes,
                    "rounds": args.rounds,
                    "steps": args.steps,
                    "batch": args.batch,
                    "concurrent_nodes": 1,
                },
                **outcome,
            }
            key = f"{args.model}/{nodes}-nodes"
            results[key] = entry
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            share = outcome["steady_state_overhead_share"]
            seconds = outcome["steady_state_overhead_seconds"]
            print(
                f"{key}: steady-state overhead {share:.1%} of a round ({seconds:.2f} s), "
                f"run {outcome['run_seconds']:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
