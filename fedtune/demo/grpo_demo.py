"""`fedtune demo --method grpo`: the hospital and the bank train the default model together
with DP-GRPO on prompts whose answers can be checked (triage levels, account fees), then the
held-out reward of the base model, the cold start and the final global adapter.

The default model never writes ``<answer>…</answer>`` by itself, so every group's rewards
would be equal and GRPO would learn nothing; as DeepSeek-R1 did, a short *cold start* teaches
the format first: supervised, non-private, on public worked examples (another seed than the
nodes' data, so no node's privacy is spent), saved as a PEFT adapter that the federated run
starts from (``run.initial_adapter``). Everything lands in one new folder, as for the SFT demo.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import tomli_w
import torch

from fedtune.client_node.data import load_chat_dataset
from fedtune.client_node.grpo import GRPOSettings, held_out_reward
from fedtune.client_node.prompt_data import load_prompt_dataset
from fedtune.client_node.rewards import build_scorer
from fedtune.client_node.trainer import train_round
from fedtune.coordinator.run_summary import format_summary, run_summary
from fedtune.demo.run import DEMO_NODES
from fedtune.demo.verifiable import NUMERIC_TOLERANCE, worked_examples, write_demo_prompts
from fedtune.platform.config import (
    GRPO_DEFAULTS,
    ConfigError,
    LoraSettings,
    ModelConfig,
    load_run_config,
)
from fedtune.platform.db.storage import open_database
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.model.lora import attach_lora, load_initial_adapter
from fedtune.simulation import simulate

# One reward set for both nodes: a triage level is a number too.
DEMO_REWARDS = ["answer_numeric", "format"]
COLD_START_SEED = 1000  # public worked examples: not the nodes' data (seed 0)


def grpo_demo_run_config(
    *, rounds: int, steps: int, model: str, max_length: int, group: int, max_tokens: int
) -> dict[str, Any]:
    """The GRPO demo's run.toml, as data."""
    return {
        "run": {
            "name": "demo-grpo",
            "rounds": rounds,
            "initial_adapter": "cold_start",
            "evaluate_local_model": False,
        },
        "model": {"spec": model},
        "data": {"max_length": max_length, "max_eval_examples": 16},
        "training": {
            "method": "grpo",
            "steps": steps,
            "batch_size": 8,
            "physical_batch_size": 8,
            "grpo_group_size": group,
            "grpo_max_completion_tokens": max_tokens,
            "grpo_rewards": DEMO_REWARDS,
            "grpo_numeric_tolerance": NUMERIC_TOLERANCE,
        },
        "privacy": {"mode": "dp", "target_epsilon": 8.0, "delta": 1e-5},
        "nodes": [
            {
                "name": name,
                "train": f"data/{name}/grpo_train.jsonl",
                "eval": f"data/{name}/grpo_held_out.jsonl",
            }
            for name in DEMO_NODES
        ],
        "output": {"dir": "."},
    }


def cold_start(
    folder: Path, *, model: str, steps: int, examples: int, max_length: int
) -> dict[str, Any]:
    """Train and save (in ``folder``) the cold-start adapter: non-private SFT on public
    worked examples of both domains, with the run's LoRA shape and adapter seed."""
    rows = [
        row
        for domain in DEMO_NODES
        for row in worked_examples(domain, examples // len(DEMO_NODES), seed=COLD_START_SEED)
    ]
    folder.mkdir(parents=True)
    data_file = folder / "worked_examples.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    base = load_base_model(ModelConfig(spec=model))
    data = load_chat_dataset(data_file, base.tokenizer, max_length=max_length)
    torch.manual_seed(0)  # run.adapter_seed: the run's A matrices
    adapted = attach_lora(base.model, LoraSettings())
    result = train_round(
        adapted,
        data,
        steps=steps,
        batch_size=min(8, len(data)),
        physical_batch_size=min(8, len(data)),
        learning_rate=0.01,
        pad_token_id=int(base.tokenizer.pad_token_id),  # type: ignore[attr-defined]
        device=base.device,
        dp=None,
        seed=0,
        progress=False,
    )
    adapted.save_pretrained(str(folder))
    return {"examples": len(data), "steps": steps, "seconds": result.seconds}


def held_out_rewards(
    workdir: Path, *, model: str, adapters: dict[str, Path | None], max_length: int, max_tokens: int
) -> dict[str, dict[str, float]]:
    """Per node, the held-out reward (greedy completion, answer + format, max 2) of each
    labelled adapter (None: the base model)."""
    base = load_base_model(ModelConfig(spec=model))
    tokenizer = base.tokenizer
    scorer = build_scorer(DEMO_REWARDS, tolerance=NUMERIC_TOLERANCE)
    settings = GRPOSettings(max_completion_tokens=max_tokens)
    prompts = {
        name: load_prompt_dataset(
            workdir / "data" / name / "grpo_held_out.jsonl",
            tokenizer,
            max_length=max_length,
            limit=16,
        )
        for name in DEMO_NODES
    }
    scores: dict[str, dict[str, float]] = {name: {} for name in DEMO_NODES}
    peft_model = attach_lora(base.model, LoraSettings())
    for label, folder in adapters.items():
        if folder is not None:
            load_initial_adapter(peft_model, folder)
        for name, data in prompts.items():
            with peft_model.disable_adapter() if folder is None else nullcontext():
                scores[name][label] = held_out_reward(
                    peft_model,
                    data,
                    tokenizer=tokenizer,
                    scorer=scorer,
                    settings=settings,
                    device=base.device,
                )["mean_reward"]
    return scores


def run_grpo_demo(
    workdir: Path,
    *,
    rounds: int = 2,
    steps: int = 2,
    model: str = "smollm2-135m",
    train: int = 64,
    held_out: int = 16,
    cold_start_steps: int = 16,
    cold_start_examples: int = 48,
    group: int = 4,
    max_tokens: int = GRPO_DEFAULTS["grpo_max_completion_tokens"],
    max_length: int = 256,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the two-node GRPO demo in ``workdir`` (new or empty); returns the summary with
    the held-out rewards."""
    if workdir.exists() and any(workdir.iterdir()):
        raise ConfigError(f"{workdir}: the demo needs a new or empty folder (--workdir)")
    if rounds < 1 or steps < 1:
        raise ConfigError("the demo needs at least one round of at least one step")
    workdir.mkdir(parents=True, exist_ok=True)
    if "/" in model or model.startswith((".", "~")):
        model = str(Path(model).expanduser().resolve())
    for domain in DEMO_NODES:
        write_demo_prompts(workdir / "data", domain=domain, train=train, held_out=held_out)
    progress(f"demo (GRPO): cold start on {cold_start_examples} public worked examples")
    cold = cold_start(
        workdir / "cold_start",
        model=model,
        steps=cold_start_steps,
        examples=cold_start_examples,
        max_length=max_length,
    )
    run_toml = workdir / "run.toml"
    run_toml.write_text(
        "# The GRPO demo's run: `fedtune simulate --config run.toml` repeats it (with a new "
        "output dir).\n"
        + tomli_w.dumps(
            grpo_demo_run_config(
                rounds=rounds,
                steps=steps,
                model=model,
                max_length=max_length,
                group=group,
                max_tokens=max_tokens,
            )
        ),
        encoding="utf-8",
    )
    config = load_run_config(run_toml)
    progress(
        f"demo (GRPO): nodes {', '.join(DEMO_NODES)}; {rounds} rounds of {steps} DP-GRPO steps "
        f"({group} completions per prompt, epsilon 8, delta 1e-5) in {workdir}"
    )
    run_id = simulate(config, progress=progress)
    summary = run_summary(open_database(config.database_url), run_id)
    rewards = held_out_rewards(
        workdir,
        model=model,
        adapters={
            "base": None,
            "cold_start": workdir / "cold_start",
            "final": workdir / "adapters" / f"round-{rounds}",
        },
        max_length=max_length,
        max_tokens=max_tokens,
    )
    summary["grpo"] = {"cold_start": cold, "held_out_reward": rewards}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    progress(format_summary(summary))
    for name, scores in rewards.items():
        progress(
            f"held-out reward at {name} (answer + format, max 2): base {scores['base']:.3f}, "
            f"after the cold start {scores['cold_start']:.3f}, after {rounds} DP-GRPO rounds "
            f"{scores['final']:.3f}"
        )
    progress(f"see the rounds' rewards: `fedtune dashboard --db {workdir / 'fedtune.db'}`")
    return summary
