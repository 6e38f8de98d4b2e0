"""A real deployment on 127.0.0.1: `fedtune coordinator start` (Flower SuperLink with TLS and
node authentication) and three `fedtune node start` processes, each stopped by the tests.

The nodes train a tiny model with a fixed noise multiplier and seed, so the same round trains
the same update twice: that lets a secure run and a plain run be compared.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from safetensors.numpy import load
from sqlalchemy import select

from conftest import tiny_node_sections
from fedtune.cli import main
from fedtune.common.database import transaction
from fedtune.coordinator.checkpoints import ENCRYPTED_WEIGHTS_FILE, WEIGHTS_FILE, checkpoint_weights
from fedtune.coordinator.gateway import gateway_folder, key_id
from fedtune.coordinator.superlink import CONNECTION, flwr
from fedtune.demo.data import write_demo_data
from fedtune.demo.local_deployment import LocalDeployment, fedtune_command, protections_of
from fedtune.demo.preferences import write_demo_preferences
from fedtune.demo.verifiable import write_demo_prompts
from fedtune.platform.db.storage import (
    AdapterCheckpoint,
    BudgetGroup,
    HealthSignal,
    NodeLevelEntry,
    RejectedUpdate,
    Round,
    Run,
    open_database,
)
from fedtune.platform.model.fingerprint import file_fingerprint
from fedtune.platform.security.encryption import load_key
from fedtune.platform.wire.messages import GRPO_METRICS
from fedtune.privacy.audit.independent_accounting import recompute_ledger
from fedtune.privacy.ledger import LedgerEntry
from fedtune.privacy.ledger_store import entry_from_json, ledger_entries, ledger_receipts
from fedtune.privacy.node_ledger import LEDGER_FILE, NodeLedger
from fedtune.privacy.signing import NodeKey

pytestmark = pytest.mark.e2e

NODES = {"hospital-a": "hospital", "bank-b": "bank", "hospital-c": "hospital"}

RUN_TOML = """\
[run]
rounds = {rounds}
min_nodes = {min_nodes}

[model]
spec = "{model}"

[training]
steps = 2
batch_size = 16

[aggregation]
secure = {secure}
node_wait_s = 240
reply_timeout_s = 300

{nodes}
[output]
dir = "{out}"
"""


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[LocalDeployment]:
    workdir = tmp_path_factory.mktemp("deployment")
    for domain in ("hospital", "bank"):
        write_demo_data(workdir / "data", domain=domain, train=48, held_out=6)
    with LocalDeployment(workdir) as local:
        local.init_coordinator()
        local.start_coordinator()
        for name, domain in NODES.items():
            local.add_node(
                name,
                sections=tiny_node_sections(tiny_model_dir, workdir / "data" / domain),
                # This test compares a secure run with a plain one on the same nodes.
                coordinator={"require_secure_aggregation": False},
                # Rounds go on with two nodes when one is killed: accepted knowingly here.
                min_secure_peers=2,
            )
            local.enroll(name)
            local.start_node(name)
        yield local


def write_run(
    local: LocalDeployment,
    tiny_model_dir: Path,
    *,
    name: str,
    rounds: int,
    secure: bool,
    min_nodes: int = 3,
) -> Path:
    nodes = "\n".join(f'[[nodes]]\nname = "{n}"\n' for n in NODES)
    path = local.workdir / f"{name}.toml"
    path.write_text(
        RUN_TOML.format(
            rounds=rounds,
            min_nodes=min_nodes,
            model=tiny_model_dir,
            secure="true" if secure else "false",
            nodes=nodes,
            out=f"runs/{name}",
        )
    )
    return path


def pem_of_ssh_public_key(path: Path) -> bytes:
    """A node's OpenSSH public key as the PEM bytes Flower sends."""
    key = serialization.load_ssh_public_key(path.read_bytes())
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def rounds_of(local: LocalDeployment, run_id: str) -> list[tuple[int, int, int]]:
    """(number, nodes sampled, updates accepted) of each recorded round."""
    with transaction(open_database(local.coordinator.database_url)) as session:
        rows = session.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.number))
        return [(r.number, r.nodes_sampled, r.updates_accepted) for r in rows]


def checkpoint_arrays(local: LocalDeployment, run_id: str, number: int) -> dict[str, np.ndarray]:
    config = local.coordinator
    with transaction(open_database(config.database_url)) as session:
        row = session.scalars(
            select(AdapterCheckpoint).where(
                AdapterCheckpoint.run_id == run_id, AdapterCheckpoint.round == number
            )
        ).one()
        path, sha = Path(row.path), row.sha256
    assert config.coordinator.encryption_key_file is not None
    key = load_key(config.coordinator.encryption_key_file)
    return dict(load(checkpoint_weights(path, sha256=sha, key=key)))


def test_secure_run_over_tls_with_enrolled_nodes_completes(deployment, tiny_model_dir):
    run_toml = write_run(deployment, tiny_model_dir, name="secure", rounds=2, secure=True)

    run_id = deployment.submit(run_toml)
    status = deployment.wait_for_run(run_id, timeout_s=600)

    assert status == "finished"
    rounds = rounds_of(deployment, run_id)
    assert rounds == [(1, 3, 3), (2, 3, 3)]
    protections = protections_of(deployment.coordinator, run_id)
    assert sorted(protections) == [
        "checkpoint_encryption",
        "differential_privacy",
        "gateway",
        "node_authentication",
        "pinned_apps",
        "secure_aggregation",
        "signed_ledger",
        "tls",
    ]
    # Every node reached the coordinator through the gateway, which logged its key id.
    access = (gateway_folder(deployment.coordinator) / "access.log").read_text()
    for name in NODES:
        public_key = deployment.workdir / "nodes" / name / "state" / "auth_key.pub"
        assert f"key={key_id(pem_of_ssh_public_key(public_key))}" in access
    folder = deployment.workdir / "runs/secure/adapters/round-2"
    assert (folder / ENCRYPTED_WEIGHTS_FILE).is_file()
    assert not (folder / WEIGHTS_FILE).exists()  # never in the clear at rest
    with transaction(open_database(deployment.coordinator.database_url)) as session:
        for name in NODES:
            copies = [e for e in ledger_entries(session, name) if e.run_id == run_id]
            assert [e.round for e in copies] == [1, 2]
    witness = NodeKey.load(deployment.coordinator.witness_key_path).public_key
    for name in NODES:
        node_ledger = open_database(
            f"sqlite:///{deployment.workdir / 'nodes' / name / 'state' / LEDGER_FILE}"
        )
        with transaction(node_ledger) as session:
            own = [e for e in ledger_entries(session, name) if e.run_id == run_id]
            receipts = {(r.seq, r.head_hash): r for r in ledger_receipts(session, name)}
        assert [e.round for e in own] == [1, 2]
        # The coordinator countersigned each head it stored; the node kept the receipts.
        assert all(receipts[(e.seq, e.hash)].signed_by(witness) for e in own), name


def test_secure_mean_equals_the_plain_weighted_mean(deployment, tiny_model_dir):
    secure_run = deployment.submit(
        write_run(deployment, tiny_model_dir, name="mean-secure", rounds=1, secure=True)
    )
    assert deployment.wait_for_run(secure_run, timeout_s=600) == "finished"
    plain_run = deployment.submit(
        write_run(deployment, tiny_model_dir, name="mean-plain", rounds=1, secure=False)
    )
    assert deployment.wait_for_run(plain_run, timeout_s=600) == "finished"

    secure = checkpoint_arrays(deployment, secure_run, 1)
    plain = checkpoint_arrays(deployment, plain_run, 1)

    assert secure.keys() == plain.keys()
    error = max(float(np.abs(secure[k] - plain[k]).max()) for k in secure)
    assert error < 1e-4
    changed = max(float(np.abs(plain[k]).max()) for k in plain if "lora_B" in k)
    assert changed > 1e-3  # the round did train: B started at zero


def test_a_node_level_dp_run_keeps_the_coordinator_s_signed_epsilon(
    deployment, tiny_model_dir, tmp_path
):
    run_toml = write_run(deployment, tiny_model_dir, name="node-dp", rounds=1, secure=True)
    run_toml.write_text(
        run_toml.read_text()
        + "\n[aggregation.node_dp]\nclipping_norm = 0.5\nnoise_multiplier = 1.0\n"
    )

    run_id = deployment.submit(run_toml)

    assert deployment.wait_for_run(run_id, timeout_s=600) == "finished"
    ledger = deployment.workdir / "runs/node-dp/node-level-ledger"
    (entry,) = NodeLedger(ledger, node="coordinator").entries()
    assert (entry.run_id, entry.round, entry.max_grad_norm) == (run_id, 1, 0.5)
    assert entry.epsilon_after is not None and entry.epsilon_after > 0
    exported = tmp_path / "coordinator.jsonl"
    assert (
        main(
            [
                "audit",
                "export",
                "--db",
                str(ledger / LEDGER_FILE),
                "--node",
                "coordinator",
                "--out",
                str(exported),
            ]
        )
        == 0
    )
    key = NodeLedger(ledger, node="coordinator").key.public_key_text()
    assert main(["audit", "verify", str(exported), "--public-key", key]) == 0
    # The coordinator's database holds a copy of that entry, and the run's protections as
    # recorded when it started (the dashboard reads both).
    with transaction(open_database(deployment.coordinator.database_url)) as session:
        (copy,) = session.scalars(select(NodeLevelEntry).where(NodeLevelEntry.run_id == run_id))
        run = session.get(Run, run_id)
        assert run is not None and run.protections is not None
        protections = run.protections
    assert entry_from_json(copy.entry) == entry and copy.public_key == key
    assert protections["mode"] == "deployment"
    assert {
        name: protections[name]["state"]
        for name in ("tls", "node_authentication", "secure_aggregation", "node_level_dp")
    } == dict.fromkeys(("tls", "node_authentication", "secure_aggregation", "node_level_dp"), "on")


def run_to_the_end(deployment: LocalDeployment, run_toml: Path, nodes: dict[str, str]) -> str:
    """Submit ``run_toml``, wait for its end, stop ``nodes``; the finished run's id."""
    try:
        run_id = deployment.submit(run_toml)
        status = deployment.wait_for_run(run_id, timeout_s=600)
    finally:
        for name in nodes:  # SIGTERM: the SuperLink marks them offline at once
            deployment.kill(f"node-{name}", sig=signal.SIGTERM)
    assert status == "finished"
    return run_id


def verified_ledger_copies(
    deployment: LocalDeployment, run_id: str, nodes: dict[str, str], *, tmp_path: Path, capsys
) -> dict[str, LedgerEntry]:
    """Each node's one entry of ``run_id`` as the coordinator holds it, after checking that it
    is the node's own entry, that the node's export verifies (`fedtune audit verify`) and that
    the independent accountant agrees."""
    with transaction(open_database(deployment.coordinator.database_url)) as session:
        copies = {
            name: [e for e in ledger_entries(session, name) if e.run_id == run_id] for name in nodes
        }
    for name in nodes:
        [copy] = copies[name]
        state = deployment.workdir / "nodes" / name / "state"
        exported = tmp_path / f"{name}.jsonl"
        args = ["audit", "export", "--db", str(state / LEDGER_FILE), "--node", name]
        assert main([*args, "--out", str(exported)]) == 0
        key = NodeLedger(state, node=name).key.public_key_text()
        assert main(["audit", "verify", str(exported), "--public-key", key]) == 0
        assert "VERIFIED" in capsys.readouterr().out
        own = [e for e in NodeLedger(state, node=name).entries() if e.run_id == run_id]
        assert own == [copy]  # the coordinator's copy is the node's entry
        assert [c.agrees for c in recompute_ledger([e.to_dict() for e in own])] == [True]
    return {name: entries[0] for name, entries in copies.items()}


DPO_NODES = {"dpo-hospital": "hospital", "dpo-bank": "bank"}


def dpo_node_sections(tiny_model_dir: Path, data: Path, *, grouped: bool) -> dict:
    """A node training its preference pairs; ``grouped``: its SFT file holds the same
    people (data.shares_budget_with)."""
    sections = tiny_node_sections(tiny_model_dir, data)
    sections["data"] = {
        **sections["data"],
        "train": str(data / "preferences_train.jsonl"),
        "eval": str(data / "preferences_held_out.jsonl"),
        **({"shares_budget_with": [str(data / "train.jsonl")]} if grouped else {}),
    }
    return sections


def test_a_federated_dp_dpo_run_of_two_nodes_keeps_verifiable_pair_level_ledgers(
    deployment, tiny_model_dir, tmp_path, capsys
):
    for domain in ("hospital", "bank"):
        write_demo_preferences(deployment.workdir / "data", domain=domain, train=24, held_out=4)
    for name, domain in DPO_NODES.items():
        deployment.add_node(
            name,
            sections=dpo_node_sections(
                tiny_model_dir, deployment.workdir / "data" / domain, grouped=name == "dpo-bank"
            ),
            min_secure_peers=2,
        )
        deployment.enroll(name)
        deployment.start_node(name)
    run_toml = deployment.workdir / "dpo.toml"
    run_toml.write_text(
        RUN_TOML.format(
            rounds=1,
            min_nodes=2,
            model=tiny_model_dir,
            secure="true",
            nodes="\n".join(f'[[nodes]]\nname = "{n}"\n' for n in DPO_NODES),
            out="runs/dpo",
        ).replace("batch_size = 16\n", 'batch_size = 16\nmethod = "dpo"\ndpo_beta = 0.2\n')
    )
    run_id = run_to_the_end(deployment, run_toml, DPO_NODES)

    assert rounds_of(deployment, run_id) == [(1, 2, 2)]
    copies = verified_ledger_copies(deployment, run_id, DPO_NODES, tmp_path=tmp_path, capsys=capsys)
    with transaction(open_database(deployment.coordinator.database_url)) as session:
        groups = session.scalars(select(BudgetGroup).where(BudgetGroup.run_id == run_id)).all()
        accuracy = session.scalars(
            select(HealthSignal).where(
                HealthSignal.run_id == run_id, HealthSignal.signal == "preference-accuracy"
            )
        ).all()
    for copy in copies.values():
        assert (copy.method, copy.privacy_unit) == ("dp-dpo-seeded-noise", "preference_pair")
    # The bank's SFT file holds the same people: its group, as the node's guard counted it.
    [group] = groups
    sft = file_fingerprint(deployment.workdir / "data/bank/train.jsonl")
    assert group.node_name == "dpo-bank"
    assert group.members["fingerprints"] == sorted([sft, copies["dpo-bank"].data_fingerprint])
    assert group.epsilon_after == pytest.approx(copies["dpo-bank"].epsilon_after)
    assert {s.node_name for s in accuracy} == {None, *DPO_NODES}


GRPO_NODES = {"grpo-hospital": "hospital", "grpo-bank": "bank"}

GRPO_TRAINING = """batch_size = 4
method = "grpo"
grpo_group_size = 2
grpo_max_completion_tokens = 6
grpo_rewards = ["answer_exact", "format"]
physical_batch_size = 2
"""


def test_a_federated_dp_grpo_run_of_two_nodes_keeps_verifiable_prompt_level_ledgers(
    deployment, tiny_model_dir, tmp_path, capsys
):
    for domain in ("hospital", "bank"):
        write_demo_prompts(deployment.workdir / "data", domain=domain, train=12, held_out=4)
    for name, domain in GRPO_NODES.items():
        sections = tiny_node_sections(tiny_model_dir, deployment.workdir / "data" / domain)
        data = deployment.workdir / "data" / domain
        sections["data"] = {
            **sections["data"],
            "train": str(data / "grpo_train.jsonl"),
            "eval": str(data / "grpo_held_out.jsonl"),
        }
        deployment.add_node(name, sections=sections, min_secure_peers=2)
        deployment.enroll(name)
        deployment.start_node(name)
    run_toml = deployment.workdir / "grpo.toml"
    run_toml.write_text(
        RUN_TOML.format(
            rounds=1,
            min_nodes=2,
            model=tiny_model_dir,
            secure="true",
            nodes="\n".join(f'[[nodes]]\nname = "{n}"\n' for n in GRPO_NODES),
            out="runs/grpo",
        )
        .replace("steps = 2\n", "steps = 1\n")
        .replace("batch_size = 16\n", GRPO_TRAINING)
    )
    run_id = run_to_the_end(deployment, run_toml, GRPO_NODES)

    assert rounds_of(deployment, run_id) == [(1, 2, 2)]
    copies = verified_ledger_copies(
        deployment, run_id, GRPO_NODES, tmp_path=tmp_path, capsys=capsys
    )
    with transaction(open_database(deployment.coordinator.database_url)) as session:
        health = session.scalars(select(HealthSignal).where(HealthSignal.run_id == run_id)).all()
    for copy in copies.values():
        assert (copy.method, copy.privacy_unit) == ("dp-grpo-seeded-noise", "prompt")
    figures = {(h.signal, h.node_name): h.value for h in health if h.signal in GRPO_METRICS}
    for name in GRPO_NODES:  # the round's sampled completions, per node, as health
        assert 0 < figures["grpo-completion-tokens", name] <= 6
        assert 0 <= figures["grpo-format-share", name] <= 1
        assert figures["grpo-kl", name] >= 0
        assert ("grpo-mean-reward", name) in figures


def test_a_node_that_is_not_enrolled_is_refused(deployment, tiny_model_dir):
    toml = deployment.add_node(
        "stranger",
        sections=tiny_node_sections(tiny_model_dir, deployment.workdir / "data" / "bank"),
        coordinator={"refused_retry_s": 1.0},
    )

    result = subprocess.run(
        fedtune_command("node", "start", "--config", str(toml)),
        capture_output=True,
        text=True,
        timeout=240,
    )

    assert result.returncode == 2
    assert "the coordinator refused node stranger" in result.stderr
    assert "fedtune coordinator enroll" in result.stderr
    coordinator_log = deployment.log("coordinator").read_text()
    assert "No SuperNode found with the given public key" in coordinator_log


def test_every_node_announces_the_shortest_heartbeat(deployment):
    """The SuperLink's own record: each node's interval is 10 s, so it takes a node for dead
    after 2 x 10 s of silence (supernode_entry.py); Flower's default was 30 s (60 s)."""
    from flwr.supercore.constant import NodeStatus
    from flwr.supercore.state.schema.linkstate_models import Node
    from sqlalchemy import create_engine

    superlink = create_engine(
        f"sqlite:///{deployment.coordinator.coordinator.state_dir / 'superlink.db'}"
    )
    deadline = time.monotonic() + 180  # nodes load their model before they connect
    try:
        while True:
            with superlink.connect() as connection:  # Flower's database, read with its model
                online = connection.execute(
                    select(Node.heartbeat_interval).where(Node.status == NodeStatus.ONLINE)
                ).all()
            if len(online) >= len(NODES) or time.monotonic() > deadline:
                break
            time.sleep(1)
    finally:
        superlink.dispose()
    # Other tests of the module start nodes of their own (DPO's two, GRPO's two): each online
    # node counts, and the module's three are always among them.
    assert len(online) >= len(NODES)
    assert {interval for (interval,) in online} == {10.0}


def test_a_node_killed_mid_round_leaves_the_round_to_the_others(deployment, tiny_model_dir):
    run_id = deployment.submit(
        write_run(deployment, tiny_model_dir, name="killed", rounds=2, secure=True, min_nodes=2)
    )
    log = deployment.log("node-hospital-c")
    received = log.read_text().count("Receiving: train message")
    deadline = time.monotonic() + 300
    while log.read_text().count("Receiving: train message") == received:  # SecAgg+ setup began
        assert time.monotonic() < deadline
        time.sleep(0.2)

    survivor = deployment.log("node-hospital-a")
    masked = survivor.read_text().count("starting stage 2")  # earlier runs' stage 2s
    deployment.kill("node-hospital-c")
    killed_at = time.monotonic()
    # What the dead node costs the round: the key stage it was in gives up on it after
    # aggregation.key_stage_timeout_s (10 s) and the others go on to train and mask (stage
    # 2); the SuperLink's heartbeat expiry (20 s) covers a node that dies while training.
    # The rest of the round is the others' own work, whatever the machine's load.
    while survivor.read_text().count("starting stage 2") == masked:
        assert time.monotonic() - killed_at < 30, "the dead node held the round up over 30 s"
        time.sleep(0.2)
    print(f"the round went on without the killed node after {time.monotonic() - killed_at:.1f} s")
    database = open_database(deployment.coordinator.database_url)
    deadline = time.monotonic() + 300
    while True:  # the round records the dead node
        with transaction(database) as session:
            noticed = session.scalars(
                select(RejectedUpdate).where(RejectedUpdate.run_id == run_id)
            ).first()
        if noticed is not None:
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    status = deployment.wait_for_run(run_id, timeout_s=900)

    assert status == "finished"
    rounds = rounds_of(deployment, run_id)
    assert [accepted for _, _, accepted in rounds] == [2, 2]
    node_ledger = open_database(
        f"sqlite:///{deployment.workdir / 'nodes/hospital-c/state' / LEDGER_FILE}"
    )
    with transaction(node_ledger) as session:
        assert [e for e in ledger_entries(session, "hospital-c") if e.run_id == run_id] == []
    with transaction(open_database(deployment.coordinator.database_url)) as session:
        failed = session.scalars(
            select(RejectedUpdate).where(RejectedUpdate.run_id == run_id, RejectedUpdate.round == 1)
        ).all()
        assert [f.kind for f in failed] == ["failed"]
    deployment.start_node("hospital-c")  # back for the next test


def test_coordinator_killed_mid_run_resumes_from_its_last_round(deployment, tiny_model_dir):
    run_id = deployment.submit(
        write_run(deployment, tiny_model_dir, name="resumed", rounds=2, secure=True, min_nodes=2)
    )
    deployment.wait_for_run(run_id, timeout_s=600, until_rounds=1)

    deployment.kill("coordinator")
    deployment.start_coordinator()
    deployment.submit(Path(), run_id=run_id, resume=True)
    status = deployment.wait_for_run(run_id, timeout_s=900)

    assert status == "finished"
    assert [number for number, _, _ in rounds_of(deployment, run_id)] == [1, 2]
    with transaction(open_database(deployment.coordinator.database_url)) as session:
        runs = session.scalars(select(Run).where(Run.id == run_id)).all()
        assert len(runs) == 1
    assert checkpoint_arrays(deployment, run_id, 2)


def test_a_rotated_connection_key_replaces_the_old_one_and_keeps_the_ledger_key(deployment):
    state = deployment.workdir / "nodes/hospital-a/state"
    ledger_key = (state / "node_key.pem").read_bytes()
    old_id = deployment.enroll("hospital-a")  # enrolled already: same key, same node id
    deployment.kill("node-hospital-a", sig=signal.SIGTERM)

    subprocess.run(
        fedtune_command("node", "keygen", "--out", str(state), "--new-auth-key"),
        check=True,
        capture_output=True,
    )
    new_id = deployment.enroll("hospital-a")
    deployment.start_node("hospital-a")

    assert new_id != old_id
    assert (state / "node_key.pem").read_bytes() == ledger_key
    log = deployment.log("coordinator")
    deadline = time.monotonic() + 240
    while f"Activated node_id={new_id}" not in log.read_text():
        assert time.monotonic() < deadline, "the node did not connect with its new key"
        time.sleep(1)
    listing = flwr(deployment.coordinator, "supernode", "ls", CONNECTION, "--format", "json")
    status = {n["node-id"]: n["status"] for n in json.loads(listing)["nodes"]}
    assert status[new_id] == "online"
    assert status.get(old_id, "gone") not in ("online", "registered")
