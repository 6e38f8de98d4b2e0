"""Tiny, randomly initialised models and tokenizers built in the test: fast and offline;
databases to run storage tests on (SQLite, and PostgreSQL when its binaries are there)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import tomli_w
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from fedtune.demo import tiny_models
from fedtune.demo.data import write_demo_data

build_tiny_tokenizer = tiny_models.build_tiny_tokenizer


def build_tiny_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    model = tiny_models.build_tiny_model(vocab_size, family="llama", seed=seed)
    assert isinstance(model, LlamaForCausalLM)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return build_tiny_model(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A tiny model saved as a Hugging Face directory, usable as a model spec."""
    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def tiny_run_toml(
    model: Path | str,
    *,
    nodes: list[dict[str, Any]],
    run: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    privacy: dict[str, Any] | None = None,
) -> str:
    """A federated run on ``model`` that trains fast: two DP steps of 16 examples per round.

    Each node is ``{"name": ..., "domain": "hospital" | "bank", **per-node keys}`` and reads
    ``data/<domain>/train.jsonl`` and ``held_out.jsonl`` next to the run file; the output goes
    to ``out/``. ``run``, ``training`` and ``privacy`` add or override keys of those sections.
    """
    sections: dict[str, dict[str, Any]] = {
        "run": {"rounds": 2, **(run or {})},
        "model": {"spec": str(model)},
        "data": {"max_length": 160},
        "training": {
            "steps": 2,
            "batch_size": 16,
            "physical_batch_size": 8,
            "seed": 0,
            **(training or {}),
        },
        "privacy": {"target_epsilon": 8.0, **(privacy or {})},
    }
    document: dict[str, Any] = {
        **sections,
        "nodes": [
            {
                "name": node["name"],
                "train": f"data/{node.get('domain', node['name'])}/train.jsonl",
                "eval": f"data/{node.get('domain', node['name'])}/held_out.jsonl",
                **{k: v for k, v in node.items() if k not in ("name", "domain")},
            }
            for node in nodes
        ],
        "output": {"dir": "out"},
    }
    return tomli_w.dumps(document)


def tiny_node_sections(model: Path | str, data: Path) -> dict[str, dict[str, Any]]:
    """A deployed test node's node.toml tables other than [node] and [coordinator]: the tiny
    model, its data in ``data``, one thread, a seed, and a target high enough for any test."""
    return {
        "model": {"spec": str(model)},
        "data": {
            "train": str(data / "train.jsonl"),
            "eval": str(data / "held_out.jsonl"),
            "max_length": 160,
        },
        "training": {"physical_batch_size": 8, "torch_threads": 1, "seed": 0},
        "privacy": {"target_epsilon": 1000.0, "noise_multiplier": 1.0},
    }


# --- databases -------------------------------------------------------------------------------

POSTGRES_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "postgres-for-tests.sh"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server for this session: $FEDTUNE_TEST_POSTGRES_URL, else a throwaway
    cluster (scripts/postgres-for-tests.sh) stopped at the end. Skips only when PostgreSQL is
    not installed."""
    given = os.environ.get("FEDTUNE_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    directory = tempfile.mkdtemp(prefix="fedtune-postgres-", dir="/tmp")  # postgres reaches it
    started = subprocess.run(
        ["bash", str(POSTGRES_SCRIPT), "start", directory], capture_output=True, text=True
    )
    if started.returncode == 3:
        os.rmdir(directory)
        pytest.skip(
            f"PostgreSQL tests skipped: {started.stderr.strip()} (or set FEDTUNE_TEST_POSTGRES_URL)"
        )
    try:
        if started.returncode != 0:
            pytest.fail(f"{POSTGRES_SCRIPT.name} start failed: {started.stderr.strip()}")
        yield started.stdout.strip()
    finally:
        subprocess.run(["bash", str(POSTGRES_SCRIPT), "stop", directory], check=False)


@contextmanager
def new_postgres_database(server: str) -> Iterator[str]:
    """A new, empty database of its own on ``server``; dropped afterwards."""
    name = f"fedtune_test_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:  # FORCE: the test's engines may still be connected
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A new, empty database of its own on the PostgreSQL server; dropped afterwards."""
    with new_postgres_database(postgres_server) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database's URL: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fedtune.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def submitted_job() -> Any:
    """A one-round run's job, as `fedtune run start` submits it."""
    from fedtune.coordinator.job import DeploymentJob
    from fedtune.platform.config import RunConfig

    run = RunConfig.model_validate(
        {"run": {"rounds": 1}, "nodes": [{"name": "hospital"}], "output": {"dir": "out"}}
    )
    return DeploymentJob(run_id="r1", run=run)


@pytest.fixture
def app_folder(tmp_path: Path, submitted_job: Any) -> Path:
    """The Flower app folder `fedtune run start` submits (its bundle is built from it)."""
    from fedtune.coordinator.superlink import write_app

    folder = tmp_path / "app"
    write_app(folder, submitted_job)
    return folder


# --- one simulated federated run, shared ----------------------------------------------------

FEDERATED_BANK_CAP = 3.5  # the bank spends about 3.1 in round 1 and would pass 3.5 in round 2


@dataclass(frozen=True)
class FederatedRun:
    """A 2-round DP run of the hospital and the bank (the bank declining round 2 at its cap)
    in Flower's Simulation Engine, then an A/B test of its final adapter against the base
    model. Tests only read it: the coordinator's database must stay as the run left it."""

    workdir: Path
    config: Any  # fedtune.platform.config.RunConfig
    run_id: str
    test_id: str
    url: str
    path: Path  # the coordinator's SQLite file


@pytest.fixture(scope="session")
def federated_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> FederatedRun:
    from fedtune.coordinator.abtest import AbTestPlan
    from fedtune.coordinator.versions import resolve_version
    from fedtune.platform.config import load_run_config
    from fedtune.platform.db.storage import open_database
    from fedtune.simulation import simulate, simulate_abtest

    workdir = tmp_path_factory.mktemp("federated-run")
    write_demo_data(workdir / "data", domain="hospital", train=48, held_out=8)
    write_demo_data(workdir / "data", domain="bank", train=48, held_out=8)
    (workdir / "run.toml").write_text(
        tiny_run_toml(
            tiny_model_dir,
            run={"name": "federated-run"},
            nodes=[
                {"name": "hospital"},
                {"name": "bank", "target_epsilon": 4.0, "epsilon_cap": FEDERATED_BANK_CAP},
            ],
        )
    )
    config = load_run_config(workdir / "run.toml")
    run_id = simulate(config, progress=lambda line: None)
    engine = open_database(config.database_url)
    final = resolve_version(engine, "latest")
    plan = AbTestPlan(
        version_a=resolve_version(engine, "base"),
        version_b=final,
        base_model_fingerprint=final.base_model_fingerprint or "",
        metrics=("loss",),
        max_examples=6,
        max_new_tokens=8,
    )
    test_id = simulate_abtest(config, plan, progress=lambda line: None)
    engine.dispose()
    path = config.output.dir / "fedtune.db"
    assert path.is_file(), f"the run left no database at {path}"
    return FederatedRun(workdir, config, run_id, test_id, config.database_url, path)


# --- one simulated run with planned training, recorded in PostgreSQL, shared -----------------


@dataclass(frozen=True)
class PlannedPostgresRun:
    """A 2-round DP run of the hospital (48 examples) and the bank (32) in Flower's Simulation
    Engine with ``steps`` and ``batch_size`` "auto", its coordinator database in PostgreSQL.
    One simulation for two behaviours (the planner's choice, the PostgreSQL records): each
    costs a Ray start and two rounds of training. Tests only read it."""

    config: Any  # fedtune.platform.config.RunConfig
    run_id: str
    progress: list[str]


@pytest.fixture(scope="session")
def planned_postgres_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, postgres_server: str
) -> Iterator[PlannedPostgresRun]:
    from fedtune.platform.config import load_run_config
    from fedtune.simulation import simulate

    workdir = tmp_path_factory.mktemp("planned-postgres-run")
    write_demo_data(workdir / "data", domain="hospital", train=48, held_out=6)
    write_demo_data(workdir / "data", domain="bank", train=32, held_out=6)
    with new_postgres_database(postgres_server) as url:
        (workdir / "run.toml").write_text(
            tiny_run_toml(
                tiny_model_dir,
                run={"name": "auto"},
                nodes=[{"name": "hospital"}, {"name": "bank"}],
                training={"steps": "auto", "batch_size": "auto"},
            )
            + f'database = "{url}"\n'
        )
        config = load_run_config(workdir / "run.toml")
        lines: list[str] = []
        run_id = simulate(config, progress=lines.append)
        yield PlannedPostgresRun(config, run_id, lines)
