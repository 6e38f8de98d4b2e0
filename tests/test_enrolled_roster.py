"""Only enrolled nodes take part in a deployed run, under their enrolled names.

The roster that `fedtune coordinator enroll` writes maps SuperNode keys to names; the ServerApp
sees the SuperLink through an EnrolledGrid built from it. Fast tests use Flower's own in-memory
LinkState and Grid; the deployment tests run a real coordinator and real nodes on 127.0.0.1,
with a rogue SuperNode registered behind fedtune's back under an enrolled node's name.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid
from sqlalchemy import select

from conftest import tiny_node_sections
from fedtune.common.database import transaction
from fedtune.coordinator.abtest import parse_reply
from fedtune.coordinator.enrollment import superlink_nodes
from fedtune.coordinator.roster import (
    EnrolledGrid,
    NotEnrolledError,
    Roster,
    enrolled_node,
    flower_public_key,
    record_enrollment,
)
from fedtune.coordinator.run_registry import flower_run_id
from fedtune.coordinator.strategy import sort_evaluate_replies, sort_train_replies
from fedtune.coordinator.superlink import CONNECTION, CoordinatorError, flwr
from fedtune.demo.data import write_demo_data
from fedtune.demo.local_deployment import LocalDeployment, fedtune_command
from fedtune.platform.db.privacy_records import privacy_records
from fedtune.platform.db.storage import (
    NodeMetric,
    RejectedUpdate,
    Round,
    Run,
    open_database,
)
from fedtune.platform.security.node_auth import generate_node_auth_key
from fedtune.platform.wire.messages import METRICS, NODE, SCORES, decline_content
from fedtune.privacy.ledger_store import LedgerEntryRow, ledger_entries
from fedtune.privacy.node_ledger import LEDGER_FILE

pytestmark = pytest.mark.e2e

# -- fast: the roster and the grid, on Flower's in-memory LinkState ---------------------------


def new_pem_key() -> bytes:
    """A SuperNode public key as `flwr supernode register` sends it."""
    key = ec.generate_private_key(ec.SECP384R1()).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def link() -> Iterator[tuple[object, InMemoryGrid]]:
    """A real (in-memory) SuperLink state with a run, and the Grid a ServerApp gets."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, NOOP_FEDERATION_ID, None, None, "serverapp")
    grid = InMemoryGrid(factory)
    grid.set_run(state.get_run_info(run_ids=[run_id])[0])
    TaskIdentity.run_id, TaskIdentity.node_id = run_id, SUPERLINK_NODE_ID
    TaskIdentity.task_id = int(grid.run.primary_task_id or 0)
    yield state, grid
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def connect(state: object, public_key: bytes, *, name: str) -> int:
    """Register a SuperNode (``name`` is what `flwr supernode register --name` stores) and
    bring it online."""
    node_id = state.create_node("none", "none", public_key, 30, name=name)  # type: ignore[attr-defined]
    assert state.activate_node(node_id, 30)  # type: ignore[attr-defined]
    return int(node_id)


@pytest.fixture
def nodes(link, tmp_path):
    """hospital and bank enrolled (the run lists hospital only); a rogue SuperNode registered
    outside fedtune, named "hospital"."""
    state, grid = link
    keys = {name: new_pem_key() for name in ("hospital", "bank", "rogue")}
    ids = {
        "hospital": connect(state, keys["hospital"], name="hospital"),
        "bank": connect(state, keys["bank"], name="bank"),
        "rogue": connect(state, keys["rogue"], name="hospital"),
    }
    engine = open_database(f"sqlite:///{tmp_path / 'fedtune.db'}")
    with transaction(engine) as session:
        for name in ("hospital", "bank"):
            record_enrollment(
                session,
                name,
                public_key=flower_public_key(keys[name]),
                node_id=str(ids[name]),
                certificate=None,
            )
    return EnrolledGrid(grid, Roster.load(engine, ["hospital"])), ids, state


def test_the_roster_holds_keys_as_flower_registers_them(tmp_path):
    paths = generate_node_auth_key(tmp_path)

    stored = flower_public_key(paths.public_key.read_text())

    assert stored.encode() == try_load_public_key(paths.public_key)  # what the SuperLink keeps
    assert stored.startswith("-----BEGIN PUBLIC KEY-----")


def test_a_rotation_replaces_the_name_s_key_and_node_id(tmp_path):
    engine = open_database(f"sqlite:///{tmp_path / 'fedtune.db'}")
    old, new = flower_public_key(new_pem_key()), flower_public_key(new_pem_key())
    with transaction(engine) as session:
        record_enrollment(session, "hospital", public_key=old, node_id="1", certificate="old")
    with transaction(engine) as session:
        record_enrollment(session, "hospital", public_key=new, node_id="2", certificate="new")

    with transaction(engine) as session:
        row = enrolled_node(session, "hospital")
        assert row is not None and (row.auth_public_key, row.flower_node_id) == (new, "2")
    assert Roster.load(engine, ["hospital"]).names_by_key == {new: "hospital"}
    assert Roster.load(engine, ["hospital"]).certificates == {"hospital": "new"}


def test_only_enrolled_nodes_the_run_lists_are_seen(nodes):
    grid, ids, _ = nodes

    assert grid.get_node_ids() == [ids["hospital"]]
    assert grid.ignored == {ids["bank"], ids["rogue"]}  # bank: enrolled, not in this run
    assert grid.enrolled_name(ids["hospital"]) == "hospital"
    assert grid.enrolled_name(ids["rogue"]) is None


def test_a_message_to_a_node_not_enrolled_is_refused_and_never_stored(nodes):
    grid, ids, state = nodes
    grid.get_node_ids()

    with pytest.raises(NotEnrolledError, match=f"SuperNode {ids['rogue']}: it is not enrolled"):
        grid.push_messages(
            [
                Message(RecordDict(), dst_node_id=ids["hospital"], message_type="query"),
                Message(RecordDict(), dst_node_id=ids["rogue"], message_type="query"),
            ]
        )
    assert state.get_message_ins(node_id=ids["rogue"], limit=None) == []
    assert state.get_message_ins(node_id=ids["hospital"], limit=None) == []  # none of them
    grid.push_messages([Message(RecordDict(), dst_node_id=ids["hospital"], message_type="query")])
    assert len(state.get_message_ins(node_id=ids["hospital"], limit=None)) == 1


def test_an_excluded_node_is_no_longer_listed_or_addressed(nodes):
    grid, ids, _ = nodes

    grid.exclude(ids["hospital"])  # e.g. it described itself under another name

    assert grid.get_node_ids() == []
    with pytest.raises(NotEnrolledError):
        grid.push_messages(
            [Message(RecordDict(), dst_node_id=ids["hospital"], message_type="query")]
        )


def test_secagg_s_client_manager_registers_enrolled_nodes_only(nodes):
    grid, ids, _ = nodes
    manager = SimpleClientManager()

    thread, stop, registered = start_update_client_manager_thread(grid, manager)
    registered.wait()
    sampled = manager.all()
    stop.set()
    thread.join(timeout=30)

    assert sorted(int(proxy.node_id) for proxy in sampled.values()) == [ids["hospital"]]


def reply_from(node_id: int, content: RecordDict) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=node_id,
        dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id="sent",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type="evaluate",
    )
    return Message(content=content, metadata=metadata)


def evaluation(name: str) -> RecordDict:
    return RecordDict(
        {
            METRICS: MetricRecord({"num-examples": 4, "held-out-loss": 2.0}),
            NODE: ConfigRecord({"name": name}),
        }
    )


ENROLLED = {7: "hospital", 8: "bank"}.get


def test_replies_go_under_the_sender_s_enrolled_name():
    outcomes = sort_evaluate_replies([reply_from(7, evaluation("hospital"))], enrolled=ENROLLED)

    assert [(o.kind, o.node_name) for o in outcomes] == [("accepted", "hospital")]


def test_a_reply_naming_another_node_is_rejected_under_the_enrolled_name():
    replies = [reply_from(8, evaluation("hospital"))]

    (evaluated,) = sort_evaluate_replies(replies, enrolled=ENROLLED)
    (trained,) = sort_train_replies(
        [reply_from(8, decline_content(identity=ConfigRecord({"name": "hospital"}), reason="x"))],
        ArrayRecord(),
        server_round=1,
        enrolled=ENROLLED,
    )

    for outcome in (evaluated, trained):
        assert (outcome.kind, outcome.node_name) == ("rejected", "bank")
        assert outcome.reason == (
            "the reply says it comes from 'hospital', but SuperNode 8 is enrolled as 'bank'"
        )


def test_an_ab_test_reply_naming_another_node_is_left_out():
    scores = RecordDict(
        {
            SCORES: MetricRecord({"loss/a": [1.0, 2.0], "loss/b": [1.5, 2.5]}),
            NODE: ConfigRecord({"name": "hospital"}),
        }
    )

    assert parse_reply(reply_from(7, scores), ["loss"], enrolled=ENROLLED).node == "hospital"
    with pytest.raises(ValueError, match="enrolled as 'bank'"):
        parse_reply(reply_from(8, scores), ["loss"], enrolled=ENROLLED)


# -- deployment: a real coordinator, two honest nodes and a rogue one -------------------------

RUN_TOML = """\
[run]
rounds = 1
min_nodes = 2

[model]
spec = "{model}"

[training]
steps = 1
batch_size = 16

[aggregation]
secure = true
node_wait_s = {wait}
reply_timeout_s = 300

{nodes}
[output]
dir = "{out}"
"""


class Consortium:
    """The deployment, the model its nodes hold and the rogue SuperNode's id."""

    def __init__(self, local: LocalDeployment, model: Path, rogue_id: str):
        self.local = local
        self.model = model
        self.rogue_id = rogue_id

    def node_id(self, name: str) -> str:
        with transaction(open_database(self.local.coordinator.database_url)) as session:
            row = enrolled_node(session, name)
            assert row is not None
            return row.flower_node_id

    def run(self, name: str, nodes: list[str], *, wait_s: int) -> str:
        listed = "\n".join(f'[[nodes]]\nname = "{n}"\n' for n in nodes)
        path = self.local.workdir / f"{name}.toml"
        path.write_text(
            RUN_TOML.format(model=self.model, wait=wait_s, nodes=listed, out=f"runs/{name}")
        )
        return self.local.submit(path)


def wait_online(local: LocalDeployment, node_ids: list[str], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while any(superlink_nodes(local.coordinator).get(n) != "online" for n in node_ids):
        assert time.monotonic() < deadline, f"nodes {node_ids} did not all come online"
        time.sleep(1)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator:
    """hospital and bank enrolled and started; "clinic" enrolled, never started; a rogue node
    whose key the admin registered with `flwr supernode register --name hospital`, and whose
    node.toml says it is "hospital" too, started."""
    workdir = tmp_path_factory.mktemp("roster")
    for domain in ("hospital", "bank"):
        write_demo_data(workdir / "data", domain=domain, train=48, held_out=6)
    with LocalDeployment(workdir) as local:
        local.init_coordinator()
        local.start_coordinator()
        for name, domain in (("hospital", "hospital"), ("bank", "bank"), ("clinic", "bank")):
            # Rounds of two honest nodes here: they accept a secure mean of two knowingly.
            local.add_node(
                name,
                sections=tiny_node_sections(tiny_model_dir, workdir / "data" / domain),
                min_secure_peers=2,
            )
            local.enroll(name)
        rogue_toml = local.add_node(
            "rogue", sections=tiny_node_sections(tiny_model_dir, workdir / "data" / "hospital")
        )
        rogue_toml.write_text(rogue_toml.read_text().replace('name = "rogue"', 'name = "hospital"'))
        answer = flwr(
            local.coordinator,
            "supernode",
            "register",
            str(workdir / "nodes/rogue/state/auth_key.pub"),
            CONNECTION,
            "--name",
            "hospital",
            "--format",
            "json",
        )
        consortium = Consortium(local, tiny_model_dir, str(json.loads(answer)["node-id"]))
        for name in ("hospital", "bank", "rogue"):
            local.start_node(name)
        wait_online(local, [consortium.node_id("hospital"), consortium.node_id("bank")])
        wait_online(local, [consortium.rogue_id])
        yield consortium


def stored_from(local: LocalDeployment, run_id: str) -> dict[str, set]:
    """Per table, the node names (and node ids) of what run ``run_id`` stored."""
    with transaction(open_database(local.coordinator.database_url)) as session:
        metrics = session.scalars(select(NodeMetric).where(NodeMetric.run_id == run_id)).all()
        rejected = session.scalars(
            select(RejectedUpdate).where(RejectedUpdate.run_id == run_id)
        ).all()
        records = privacy_records(session, run_id)
        copies = session.scalars(select(LedgerEntryRow).where(LedgerEntryRow.run_id == run_id))
        rounds = session.scalars(select(Round).where(Round.run_id == run_id)).all()
        return {
            "metric_ids": {m.flower_node_id for m in metrics},
            "metric_names": {m.node_name for m in metrics},
            "rejected_ids": {r.flower_node_id for r in rejected},
            "epsilon_names": {r.node for r in records},
            "ledger_names": {c.node for c in copies},
            "rounds": {(r.number, r.nodes_sampled, r.updates_accepted) for r in rounds},
        }


def node_ledger(local: LocalDeployment, name: str, run_id: str) -> list:
    engine = open_database(f"sqlite:///{local.workdir / 'nodes' / name / 'state' / LEDGER_FILE}")
    with transaction(engine) as session:
        return [e for e in ledger_entries(session, name) if e.run_id == run_id]


def test_a_rogue_node_under_an_enrolled_name_is_never_sampled(consortium):
    local = consortium.local
    hospital, bank = consortium.node_id("hospital"), consortium.node_id("bank")

    run_id = consortium.run("with-rogue", ["hospital", "bank"], wait_s=240)
    status = local.wait_for_run(run_id, timeout_s=600)

    assert status == "finished"
    stored = stored_from(local, run_id)
    assert stored["rounds"] == {(1, 2, 2)}  # the rogue is not counted among the sampled
    assert stored["metric_ids"] == {hospital, bank}
    assert stored["metric_names"] == stored["epsilon_names"] == {"hospital", "bank"}
    assert stored["ledger_names"] == {"hospital", "bank"}
    assert stored["rejected_ids"] == set()
    assert "Receiving:" not in local.log("node-rogue").read_text()  # it got no message at all
    flower_id = flower_run_id(local.coordinator, run_id)
    server_log = flwr(local.coordinator, "log", flower_id, CONNECTION, "--show")
    assert f"ignored: SuperNode(s) [{consortium.rogue_id}] connected, not enrolled" in server_log


def test_a_run_that_cannot_be_kept_fails_before_any_node_spends_epsilon(consortium):
    """The run lists hospital and clinic: hospital (and bank, and the rogue calling itself
    hospital) are connected, clinic is not; 2 nodes are needed."""
    local = consortium.local
    engine = open_database(local.coordinator.database_url)

    run_id = consortium.run("cannot-be-kept", ["hospital", "clinic"], wait_s=10)
    status = local.wait_for_run(run_id, timeout_s=300)

    assert status == "failed"
    with transaction(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None and run.error is not None
        assert "1 enrolled nodes connected, 2 needed (run.min_nodes)" in run.error
    assert node_ledger(local, "hospital", run_id) == []
    stored = stored_from(local, run_id)
    assert not any(stored.values())
    assert "Receiving:" not in local.log("node-rogue").read_text()


def test_enrolling_again_follows_the_superlink_not_a_file(consortium):
    local = consortium.local
    first = local.enroll("clinic")  # enrolled by the fixture: nothing new registered
    assert first == consortium.node_id("clinic")
    assert superlink_nodes(local.coordinator)[first] == "registered"

    flwr(local.coordinator, "supernode", "unregister", first, CONNECTION)
    # Flower 1.41 never registers a key twice (node.public_key is UNIQUE, unregistered rows
    # included): enrolling the same key again says so instead of claiming success.
    with pytest.raises(CoordinatorError, match="never registers a key twice"):
        local.enroll("clinic")

    state = local.workdir / "nodes/clinic/state"
    subprocess.run(
        fedtune_command("node", "keygen", "--out", str(state), "--new-auth-key"),
        check=True,
        capture_output=True,
    )
    second = local.enroll("clinic")

    assert second != first
    listed = superlink_nodes(local.coordinator)
    assert (listed[first], listed[second]) == ("unregistered", "registered")
    assert consortium.node_id("clinic") == second
    assert local.enroll("clinic") == second  # idempotent
    assert len(superlink_nodes(local.coordinator)) == len(listed)
