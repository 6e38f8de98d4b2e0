"""`fedtune demo`: two nodes, a hospital and a bank, fine-tune the default model together with
DP-LoRA through a Flower coordinator on this machine, then print what it achieved.

Everything lands in one new folder: the demo data, ``run.toml`` (rerun it with
``fedtune simulate --config``), the coordinator's database ``fedtune.db``, the global adapter
of every round under ``adapters/round-<n>/`` and ``summary.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from fedtune.coordinator.run_summary import format_summary, run_summary
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import ConfigError, load_run_config
from fedtune.platform.db.storage import open_database
from fedtune.platform.model.devices import native_bfloat16, select_device
from fedtune.simulation import simulate

DEMO_NODES = ("hospital", "bank")


DEMO_DTYPES = ("auto", "float32", "bfloat16")


def demo_dtype(choice: str) -> str:
    """The base weights' precision for the demo's nodes: ``auto`` is bfloat16 where the device
    computes it natively (faster there; the adapter, its gradients, clipping and noise stay
    float32), else float32."""
    if choice not in DEMO_DTYPES:
        raise ConfigError(f"--dtype {choice!r}: choose one of {', '.join(DEMO_DTYPES)}")
    if choice != "auto":
        return choice
    return "bfloat16" if native_bfloat16(select_device()) else "float32"


# Chosen to finish in under 10 minutes on a 2-core CPU with SmolLM2-135M (see README).
def demo_run_config(*, rounds: int, steps: int, model: str, dtype: str) -> dict[str, Any]:
    """The simulated demo's run.toml, as data."""
    return {
        "run": {"name": "demo", "rounds": rounds},
        "model": {"spec": model, "dtype": dtype},
        "data": {"max_length": 128, "max_eval_examples": 48},
        "training": {
            "steps": steps,
            "batch_size": 32,
            "physical_batch_size": 16,
            "learning_rate": 0.01,
        },
        "privacy": {"mode": "dp", "target_epsilon": 8.0, "delta": 1e-5},
        "nodes": [
            {
                "name": name,
                "train": f"data/{name}/train.jsonl",
                "eval": f"data/{name}/held_out.jsonl",
            }
            for name in DEMO_NODES
        ],
        "output": {"dir": "."},
    }


def prepare_demo_folder(workdir: Path, *, rounds: int, steps: int, model: str) -> str:
    """Check the demo's arguments, make ``workdir`` (new or empty) with the demo data in
    ``workdir/data``; returns the model spec with a path made absolute."""
    if workdir.exists() and any(workdir.iterdir()):
        raise ConfigError(f"{workdir}: the demo needs a new or empty folder (--workdir)")
    if rounds < 1 or steps < 1:
        raise ConfigError("the demo needs at least one round of at least one step")
    workdir.mkdir(parents=True, exist_ok=True)
    for domain in DEMO_NODES:
        write_demo_data(workdir / "data", domain=domain, train=800, held_out=100)
    if "/" in model or model.startswith((".", "~")):
        model = str(Path(model).expanduser().resolve())
    return model


def run_demo(
    workdir: Path,
    *,
    rounds: int = 3,
    steps: int = 4,
    model: str = "smollm2-135m",
    dtype: str = "auto",
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the two-node demo in ``workdir`` (new or empty); returns the summary."""
    dtype = demo_dtype(dtype)
    model = prepare_demo_folder(workdir, rounds=rounds, steps=steps, model=model)
    run_toml = workdir / "run.toml"
    run_toml.write_text(
        "# The demo's run: `fedtune simulate --config run.toml` repeats it (with a new output "
        "dir).\n"
        + tomli_w.dumps(demo_run_config(rounds=rounds, steps=steps, model=model, dtype=dtype)),
        encoding="utf-8",
    )
    config = load_run_config(run_toml)
    progress(
        f"demo: nodes {', '.join(DEMO_NODES)}; {rounds} rounds of {steps} DP-SGD steps each "
        f"(epsilon 8, delta 1e-5), base weights in {dtype}, in {workdir}"
    )
    run_id = simulate(config, progress=progress)
    summary = run_summary(open_database(config.database_url), run_id)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    progress(format_summary(summary))
    progress(
        f"database {workdir / 'fedtune.db'}, adapters {workdir / 'adapters'}, summary "
        f"{workdir / 'summary.json'}\n"
        f"each node's signed epsilon ledger: {workdir / 'nodes'}/<node>/ledger.db; audit it "
        f"with `fedtune audit export --db {workdir / 'fedtune.db'} --node hospital --out "
        "hospital.jsonl`, then `fedtune audit report hospital.jsonl --out hospital.html`\n"
        f"see it all: `fedtune dashboard --db {workdir / 'fedtune.db'}`; compare the final "
        f"adapter with the base model: `fedtune abtest start --config {run_toml} --a base "
        "--b latest`"
    )
    return summary
