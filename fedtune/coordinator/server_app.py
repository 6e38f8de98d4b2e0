"""The coordinator's Flower ServerApp: one federated run of DP-LoRA fine-tuning.

It loads the base model (to fingerprint it and to write PEFT checkpoints), builds the initial
global adapter, registers the run in the database, and drives :class:`ValidatingFedAvg` for the
configured rounds: train on the sampled nodes, aggregate, checkpoint, evaluate on every node.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from sqlalchemy.engine import Engine

from fedtune.common.database import transaction
from fedtune.common.errors import AlreadyExistsError
from fedtune.coordinator.abtest import AbTestPlan, abtest_report, format_abtest, run_abtest
from fedtune.coordinator.checkpoints import AdapterCheckpointer
from fedtune.coordinator.ledger_check import LedgerCheck
from fedtune.coordinator.recorder import RunRecorder
from fedtune.coordinator.run_protections import run_protections
from fedtune.coordinator.strategy import ValidatingFedAvg
from fedtune.coordinator.versions import list_versions, production_version, resolve_version
from fedtune.platform.config import GRPO_DEFAULTS, RunConfig, TrainingSettings
from fedtune.platform.db.storage import Run, open_database
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.model.lora import adapter_arrays, attach_lora, load_initial_adapter
from fedtune.platform.wire.messages import TrainInstructions, arrays_to_record
from fedtune.privacy.ledger_store import add_public_key
from fedtune.privacy.signing import NodeKey, load_public_key, public_key_text


@dataclass
class RunSetup:
    """What a federated run holds from start to end, in simulation and in deployment."""

    engine: Engine
    run_id: str
    keys: dict[str, Ed25519PublicKey]
    fingerprint: str
    initial: dict[str, np.ndarray]  # the initial global adapter
    recorder: RunRecorder
    config: RunConfig
    training: TrainingSettings  # the run's, "auto" until plan_training resolves it

    def ledger_check(self) -> LedgerCheck:
        return LedgerCheck(
            engine=self.engine,
            run_id=self.run_id,
            enrolled=self.keys,
            training_method=self.training.method,
        )

    @property
    def instructions(self) -> TrainInstructions:
        """The round's plan every node gets."""
        steps, batch_size = self.training.steps, self.training.batch_size
        if steps == "auto" or batch_size == "auto":
            raise RuntimeError("the run's training is planned from the nodes' data sizes first")
        return TrainInstructions(
            run_id=self.run_id,
            base_model_fingerprint=self.fingerprint,
            steps=steps,
            batch_size=batch_size,
            learning_rate=self.training.learning_rate,
            optimizer=self.training.optimizer,
            planned_rounds=self.config.run.rounds,
            lora=self.config.lora,
            evaluate_local_model=self.config.run.evaluate_local_model,
            method=self.training.method,
            dpo_beta=self.training.dpo_beta,
            upload_dtype=self.config.aggregation.plain_upload,
            grpo={key: getattr(self.training, key) for key in GRPO_DEFAULTS},
        )

    def plan_training(self, examples: int, *, progress: Callable[[str], None] = print) -> None:
        """Resolve ``"auto"`` training settings for the smallest node's ``examples`` (one
        plan for every node: a larger node then samples less of its data per step), print the
        choice and record it with the run (``Run.config["planned_training"]``)."""
        if not self.training.is_planned:
            return
        self.training = self.training.planned(
            examples, privacy=self.config.privacy, rounds=self.config.run.rounds
        )
        chosen = {
            "examples": examples,
            "batch_size": self.training.batch_size,
            "steps": self.training.steps,
            "physical_batch_size": self.training.physical_batch_size,
        }
        progress(
            f"planned training (privacy planner, smallest node {examples} examples): logical "
            f"batch {chosen['batch_size']}, {chosen['steps']} steps per round"
        )
        with transaction(self.engine) as session:
            run = session.get(Run, self.run_id)
            if run is not None:
                run.config = {**run.config, "planned_training": chosen}


def prepare_run(
    config: RunConfig,
    *,
    run_id: str,
    flower_run_id: str | None,
    enrolled: Mapping[str, str],
    resuming: bool = False,
    deployment: dict[str, Any] | None = None,
    progress: Callable[[str], None] = print,
) -> RunSetup:
    """Load the base model (fingerprint, checkpoint writer), build the initial adapter,
    register the run (or reopen it when ``resuming``) and the enrolled keys. ``deployment``:
    the coordinator's facts of a deployed run (None: a simulation), recorded with the run's
    protections."""
    engine = open_database(config.database_url)
    keys = {name: load_public_key(value) for name, value in enrolled.items()}
    adapters = config.output.dir / "adapters"
    if not resuming and adapters.exists() and any(adapters.iterdir()):
        raise AlreadyExistsError(f"{adapters} already holds checkpoints; use a new output.dir")
    # The coordinator only averages and saves: CPU and full precision are enough (whatever
    # precision the nodes load their base weights in, the adapter is float32).
    base = load_base_model(
        config.model.model_copy(
            update={"device": "cpu", "quantization": "none", "dtype": "float32"}
        )
    )
    torch.manual_seed(config.run.adapter_seed)
    model = attach_lora(base.model, config.lora)
    if config.run.initial_adapter is not None:
        load_initial_adapter(model, config.run.initial_adapter)
    initial = adapter_arrays(model)
    if resuming:
        _reopen_run(engine, run_id, flower_run_id=flower_run_id, fingerprint=base.fingerprint)
    else:
        _register_run(
            engine,
            config,
            run_id=run_id,
            flower_run_id=flower_run_id,
            fingerprint=base.fingerprint,
            protections=run_protections(config, deployment=deployment),
        )
    with transaction(engine) as session:
        for name, key in keys.items():
            add_public_key(session, name, public_key_text(key))
    progress(f"run {run_id}: {config.run.rounds} rounds, base model {base.fingerprint[:23]}...")
    recorder = RunRecorder(
        engine,
        run_id=run_id,
        rounds=config.run.rounds,
        witness=NodeKey.load_or_create(config.witness_key_path),
        checkpointer=AdapterCheckpointer(model, adapters, key=config.output.checkpoint_key()),
        progress=progress,
    )
    return RunSetup(
        engine=engine,
        run_id=run_id,
        keys=keys,
        fingerprint=base.fingerprint,
        initial=initial,
        recorder=recorder,
        config=config,
        training=config.training,
    )


def run_federation(
    grid: Grid,
    config: RunConfig,
    *,
    run_id: str,
    flower_run_id: str | None = None,
    enrolled: Mapping[str, str] | None = None,
    examples: int | None = None,
    progress: Callable[[str], None] = print,
) -> None:
    """Run ``config``'s rounds over the nodes reachable through ``grid`` with Flower's
    strategy loop (the simulation's path); results go to the database at
    ``config.database_url`` and checkpoints under ``OUTPUT_DIR/adapters``.

    ``enrolled`` maps node names to their Ed25519 public keys (base64 or key files); default:
    each ``[[nodes]]`` entry's ``public_key``. A node without one cannot contribute.
    ``examples``: the smallest node's training-set size, for ``"auto"`` training settings.
    """
    setup = prepare_run(
        config,
        run_id=run_id,
        flower_run_id=flower_run_id,
        enrolled=enrolled if enrolled is not None else _configured_keys(config),
        progress=progress,
    )
    if setup.training.is_planned:
        if examples is None:
            raise ValueError('training "auto" needs the nodes\' training-set sizes')
        setup.plan_training(examples, progress=progress)
    min_nodes = config.run.min_nodes or len(config.nodes)
    strategy = ValidatingFedAvg(
        observer=setup.recorder,
        upload_dtype=config.aggregation.plain_upload,
        ledger_check=setup.ledger_check(),
        receipts=setup.recorder.receipt_for,
        fraction_train=config.run.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=min(min_nodes, max(1, int(config.run.fraction_train * min_nodes))),
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )
    try:
        strategy.start(
            grid=grid,
            initial_arrays=arrays_to_record(setup.initial),
            num_rounds=config.run.rounds,
            train_config=setup.instructions.to_record(),
            evaluate_config=setup.instructions.to_record(),
        )
    except BaseException as exc:
        finish_run(setup.engine, run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finish_run(setup.engine, run_id, status="finished")
    if config.run.ab_test_against_production:
        ab_test_final_against_production(
            grid, setup.engine, config, run_id, setup.fingerprint, progress
        )


def ab_test_final_against_production(
    grid: Grid,
    engine: Engine,
    config: RunConfig,
    run_id: str,
    fingerprint: str,
    progress: Callable[[str], None],
) -> None:
    in_production = production_version(engine)
    if in_production is None:
        progress("no model version is in production: the final adapter is not A/B-tested")
        return
    final = max(
        (v for v in list_versions(engine) if v.run_id == run_id), key=lambda v: v.round or 0
    )
    plan = AbTestPlan(
        version_a=resolve_version(engine, in_production),
        version_b=final,
        base_model_fingerprint=fingerprint,
        metrics=tuple(config.run.ab_test_metrics),
        dpo_beta=config.training.dpo_beta,
        run_id=run_id,
        checkpoint_key=config.output.checkpoint_key(),
    )
    test_id = run_abtest(grid, engine, plan, progress=progress)
    progress(format_abtest(abtest_report(engine, test_id)))


def _configured_keys(config: RunConfig) -> dict[str, str]:
    return {node.name: node.public_key for node in config.nodes if node.public_key is not None}


def _register_run(
    engine: Engine,
    config: RunConfig,
    *,
    run_id: str,
    flower_run_id: str | None,
    fingerprint: str,
    protections: dict[str, Any],
) -> None:
    with transaction(engine) as session:
        session.add(
            Run(
                id=run_id,
                name=config.run.name,
                flower_run_id=flower_run_id,
                status="running",
                rounds_planned=config.run.rounds,
                base_model_spec=config.model.spec,
                base_model_fingerprint=fingerprint,
                config=json.loads(config.model_dump_json()),
                protections=protections,
            )
        )


def _reopen_run(
    engine: Engine, run_id: str, *, flower_run_id: str | None, fingerprint: str
) -> None:
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise ValueError(f"no run {run_id} to resume in the database")
        if run.base_model_fingerprint != fingerprint:
            raise ValueError(
                f"run {run_id} trained base model {run.base_model_fingerprint}; the coordinator "
                f"now holds {fingerprint}"
            )
        run.status = "running"
        run.error = None
        run.finished_at = None
        if flower_run_id is not None:
            run.flower_run_id = flower_run_id


def finish_run(engine: Engine, run_id: str, *, status: str, error: str | None = None) -> None:
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        if run is not None:
            run.status = status
            run.error = error
            run.finished_at = datetime.now(UTC)


def build_server_app(
    config: RunConfig,
    *,
    run_id: str,
    enrolled: Mapping[str, str] | None = None,
    examples: int | None = None,
    progress: Callable[[str], None] = print,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(
            grid,
            config,
            run_id=run_id,
            flower_run_id=str(context.run_id),
            enrolled=enrolled,
            examples=examples,
            progress=progress,
        )

    return app
