"""The coordinator's node-level DP ledger reaches its database: each noised round's signed
entry is copied with the round, verifiable under the ledger's key stored beside it, and the
dashboard reads the run's node-level epsilon from these copies."""

from __future__ import annotations

import json

import torch
from sqlalchemy import select

from fedtune.common.database import transaction
from fedtune.coordinator.checkpoints import AdapterCheckpointer
from fedtune.coordinator.recorder import RunRecorder
from fedtune.dashboard.queries import node_level_entries
from fedtune.platform.config import LoraSettings, NodeLevelDP
from fedtune.platform.db.storage import NodeLevelEntry, Run, open_database
from fedtune.platform.model.lora import adapter_arrays, attach_lora
from fedtune.platform.wire.messages import arrays_to_record
from fedtune.privacy.ledger import Checkpoint, verify_chain
from fedtune.privacy.ledger_store import entry_from_json
from fedtune.privacy.node_ledger import NodeLedger
from fedtune.privacy.node_level_dp import NodeLevelPrivacy
from fedtune.privacy.signing import NodeKey, load_public_key


def test_each_noised_round_copies_the_coordinators_signed_entry(tmp_path, tiny_model):
    torch.manual_seed(0)
    model = attach_lora(tiny_model, LoraSettings())
    arrays = arrays_to_record(adapter_arrays(model))
    engine = open_database(f"sqlite:///{tmp_path / 'fedtune.db'}")
    with transaction(engine) as session:
        session.add(
            Run(
                id="run-1",
                name="node-level",
                status="running",
                rounds_planned=2,
                base_model_spec="tiny",
                base_model_fingerprint="sha256:x",
                config={},
            )
        )
    recorder = RunRecorder(
        engine,
        run_id="run-1",
        rounds=2,
        checkpointer=AdapterCheckpointer(model, tmp_path / "adapters"),
        witness=NodeKey.generate(),
        progress=lambda line: None,
    )
    node_dp = NodeLevelPrivacy(
        NodeLevelDP(clipping_norm=0.1, noise_multiplier=1.0),
        run_id="run-1",
        population=3,
        ledger=NodeLedger(tmp_path / "node-level-ledger", node="coordinator"),
    )
    recorder.node_level = node_dp

    for server_round in (1, 2):  # as SecureFedAvg does: noise, record, then tell the observer
        node_dp.record(server_round, contributors=3)
        recorder.on_train(server_round, [], arrays, None, arrays)
        recorder.on_evaluate(server_round, [], None)

    with transaction(engine) as session:
        rows = session.scalars(select(NodeLevelEntry).order_by(NodeLevelEntry.seq)).all()
        session.expunge_all()
    ledger = node_dp.ledger.entries()
    assert [(r.round, r.seq, r.epsilon_after) for r in rows] == [
        (e.round, e.seq, e.epsilon_after) for e in ledger
    ]
    copies = [entry_from_json(r.entry) for r in rows]
    assert copies == ledger
    head = Checkpoint.from_dict(json.loads(rows[-1].checkpoint))
    verdict = verify_chain(copies, public_key=load_public_key(rows[-1].public_key), checkpoint=head)
    assert verdict.ok
    frame = node_level_entries(engine, "run-1")
    assert frame["epsilon_after"].tolist() == [e.epsilon_after for e in ledger]
    assert set(frame["noise_multiplier"]) == {1.0} and set(frame["delta"]) == {1e-5}
    engine.dispose()
