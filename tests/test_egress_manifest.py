"""The egress manifest against what a node really sends: each reply is built through the
node's own code on a tiny model (train, decline, evaluate, A/B test, describe, the SecAgg+
stages through Flower's mod), and any record or field the manifest lacks, or declares not sent,
fails. A node's error reply never quotes a row of its data."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from flwr.app import Array, Message, Metadata, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Stage
from flwr.common.serde import message_to_proto, recorddict_from_proto
from flwr.proto.fleet_pb2 import PushMessagesRequest
from flwr.proto.message_pb2 import Metadata as ProtoMetadata
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from test_secagg_guard import (  # the in-process SecAgg+ harness, and its autouse fixtures
    NODES,
    server_app_identity,  # noqa: F401
    strong_masks,  # noqa: F401
)
from test_signed_secagg_keys import Consortium, SignedGrid, signed_round

from fedtune.client_node import client_app
from fedtune.client_node.client_app import REPLIES
from fedtune.client_node.clientapp_worker import error_reply
from fedtune.client_node.metric_policy import DP_EVALUATE_METRICS
from fedtune.client_node.trainer_service import TrainerError, TrainerService, call_trainer
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import LoraSettings, load_node_config
from fedtune.platform.model.fingerprint import model_dir_fingerprint
from fedtune.platform.model.lora import adapter_arrays, attach_lora
from fedtune.platform.runtime.supernode_entry import HEARTBEAT_EVERY_S, HEARTBEAT_INTERVAL_S
from fedtune.platform.wire.egress import (
    FLOWER_TRAFFIC,
    SUMMARY_MEANINGS,
    EgressManifest,
    Record,
    egress_manifest,
    format_manifest,
    node_manifest,
)
from fedtune.platform.wire.messages import (
    ABTEST,
    ABTEST_MESSAGE_TYPE,
    ARRAYS,
    DESCRIBE_MESSAGE_TYPE,
    SUMMARY_FIELDS,
    AbTestInstructions,
    TrainInstructions,
    arrays_to_record,
)
from fedtune.platform.wire.packed_arrays import ArrayLayout
from fedtune.platform.wire.secagg_masks import GENERATOR_NAME
from fedtune.platform.wire.secure_messages import SecureTrain, secure_reply_from_train_reply

LORA = LoraSettings()
SECRET = "SECRET-ROW-7f3a9c"
RECORDS = {"arrays": "array_records", "metrics": "metric_records", "config": "config_records"}
TYPES: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "float": (float, int),
    "bool": bool,
    "str": str,
    "str (JSON)": str,
    "bytes": bytes,
    "bytes (RecordDict)": bytes,
    "list[float]": list,
    "list[int]": list,
    "list[bytes]": list,
    "float32 array": Array,
    "uint8 array": Array,
}


def undeclared(content: RecordDict, declared: Sequence[Record]) -> list[str]:
    """Every record and field of ``content`` that ``declared`` lacks, declares of another
    kind or type, or declares not sent; a field that carries records is opened and checked."""
    problems = []
    for kind, attribute in RECORDS.items():
        for name, record in getattr(content, attribute).items():
            spec = next((r for r in declared if r.name == name), None)
            if spec is None or spec.kind != kind:
                problems.append(f"record {name!r} ({kind}) is not in the manifest")
                continue
            for key, value in record.items():
                item = spec.field_for(key)
                if item is None:
                    problems.append(f"{name}.{key} is not in the manifest")
                    continue
                if not item.sent:
                    problems.append(f"{name}.{key} is sent but declared {item.protection}")
                if not isinstance(value, TYPES[item.type]):
                    problems.append(f"{name}.{key} is {type(value).__name__}, not {item.type}")
                elif kind == "arrays" and value.dtype != item.type.split()[0]:
                    problems.append(f"{name}.{key} is {value.dtype}, not {item.type}")
                if item.contains:
                    proto = ProtoRecordDict()
                    proto.ParseFromString(value)
                    inner = undeclared(recorddict_from_proto(proto), item.contains)
                    problems += [f"{name}.{key}: {problem}" for problem in inner]
    return problems


def assert_declared(content: RecordDict, manifest: EgressManifest, message_type: str, variant: str):
    reply = manifest.reply(message_type, variant)
    assert undeclared(content, reply.records) == []


# --- a node on a tiny model -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_process_cache():
    client_app._RUNTIMES.clear()
    client_app._MODELS.clear()
    yield
    client_app._RUNTIMES.clear()
    client_app._MODELS.clear()


def write_node(tmp_path: Path, model: Path, *, train: Path | None = None, **privacy) -> Path:
    """A node.toml for the tiny model on demo data (``train``: another training file)."""
    write_demo_data(tmp_path / "data", domain="hospital", train=48, held_out=6)
    data = tmp_path / "data" / "hospital"
    document = {
        "node": {"name": "hospital", "state_dir": str(tmp_path / "state")},
        "model": {"spec": str(model)},
        "data": {
            "train": str(train or data / "train.jsonl"),
            "eval": str(data / "held_out.jsonl"),
            "max_length": 160,
        },
        "training": {"physical_batch_size": 8, "seed": 0, "torch_threads": 1},
        "privacy": {"target_epsilon": 8.0, **privacy},
    }
    path = tmp_path / "node.toml"
    path.write_text(tomli_w.dumps(document))
    return path


def node(tmp_path: Path, model: Path, **privacy):
    return load_node_config(write_node(tmp_path, model, **privacy))


def initial_arrays(model_dir: Path) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return adapter_arrays(attach_lora(AutoModelForCausalLM.from_pretrained(model_dir), LORA))


def train_content(model_dir: Path, *, server_round: int = 1) -> RecordDict:
    instructions = TrainInstructions(
        run_id="run-1",
        base_model_fingerprint=model_dir_fingerprint(model_dir),
        steps=2,
        batch_size=16,
        learning_rate=0.01,
        optimizer="adamw",
        planned_rounds=1,
        lora=LORA,
        evaluate_local_model=True,
    )
    config = instructions.to_record()
    config["server-round"] = server_round
    return RecordDict({ARRAYS: arrays_to_record(initial_arrays(model_dir)), "config": config})


def abtest_content(model_dir: Path) -> RecordDict:
    instructions = AbTestInstructions(
        test_id="ab-1",
        base_model_fingerprint=model_dir_fingerprint(model_dir),
        version_a="base",
        version_b="v1",
        lora_a=None,
        lora_b=LORA,
        metrics=("loss", "exact-match"),
        max_examples=4,
        max_new_tokens=3,
    )
    return RecordDict(
        {
            ABTEST: instructions.to_record(),
            f"{ARRAYS}-b": arrays_to_record(initial_arrays(model_dir)),
        }
    )


def as_message(content: RecordDict, kind: str) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=42,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=metadata)


# --- every reply through the node's code ------------------------------------------------------


@pytest.mark.parametrize("policy", ["plain", "dp", "none"])
def test_a_train_reply_sends_only_what_the_manifest_declares(tmp_path, tiny_model_dir, policy):
    config = node(tmp_path, tiny_model_dir, release_metrics=policy)

    reply = client_app.train_reply(config, train_content(tiny_model_dir))

    assert "decline" not in reply.config_records
    assert_declared(reply, egress_manifest(release_metrics=policy), "train", "update")
    if policy == "plain":  # the round-1 baseline and the local evaluation both ran
        assert {"held-out-loss-start", "held-out-loss-local"} <= set(
            reply.metric_records["metrics"]
        )


def test_a_decline_sends_only_what_the_manifest_declares(tmp_path, tiny_model_dir):
    config = node(tmp_path, tiny_model_dir, mode="non-private")

    reply = client_app.train_reply(config, train_content(tiny_model_dir))

    assert "decline" in reply.config_records
    assert_declared(reply, egress_manifest(), "train", "decline")


@pytest.mark.parametrize("policy", ["plain", "dp", "none"])
def test_an_evaluate_reply_sends_only_what_the_manifest_declares(tmp_path, tiny_model_dir, policy):
    config = node(tmp_path, tiny_model_dir, release_metrics=policy)

    reply = client_app.evaluate_reply(config, train_content(tiny_model_dir, server_round=2))

    assert_declared(reply, egress_manifest(release_metrics=policy), "evaluate", "metrics")
    assert ("ledger" in reply.config_records) == (policy == "dp")


@pytest.mark.parametrize(
    ("policy", "per_example", "variant"),
    [
        ("plain", True, "per-example scores"),
        ("plain", False, "paired statistics"),
        ("dp", True, "paired statistics (DP)"),
        ("none", True, "decline"),
    ],
)
def test_an_abtest_reply_sends_only_what_the_manifest_declares(
    tmp_path, tiny_model_dir, policy, per_example, variant
):
    config = node(tmp_path, tiny_model_dir, release_metrics=policy)
    config = config.model_copy(
        update={
            "evaluation": config.evaluation.model_copy(
                update={"share_per_example_scores": per_example}
            )
        }
    )

    reply = client_app.abtest_reply(config, abtest_content(tiny_model_dir))

    manifest = egress_manifest(release_metrics=policy, share_per_example_scores=per_example)
    assert_declared(reply, manifest, ABTEST_MESSAGE_TYPE, variant)
    if variant != "decline":
        assert {"loss", "exact-match"} == {k.split("/")[0] for k in reply.metric_records["scores"]}


def test_a_describe_reply_sends_only_what_the_manifest_declares(tmp_path, tiny_model_dir):
    config = node(tmp_path, tiny_model_dir)

    reply = client_app.describe_reply(config, RecordDict())

    assert_declared(reply, egress_manifest(), DESCRIBE_MESSAGE_TYPE, "identity")


# --- under SecAgg+ ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> Consortium:
    return Consortium(tmp_path_factory.mktemp("ca"))


class FedtuneGrid(SignedGrid):
    """The signed in-process SecAgg+ round whose nodes answer the training stage with
    fedtune's secure reply (:func:`secure_reply_from_train_reply`) of a real train reply."""

    def __init__(self, consortium: Consortium, nodes, train_reply: RecordDict):
        super().__init__(consortium, nodes)
        self.train_reply = train_reply

    def _trainer(self, node: int):
        def train(message: Message, context) -> Message:
            sent = {"w": np.zeros(12, np.float32)}
            request = SecureTrain(
                RecordDict({ARRAYS: arrays_to_record(sent)}),
                ArrayLayout.of(sent),
                None,
                GENERATOR_NAME,
            )
            reply = RecordDict(
                {
                    **{k: v for k, v in self.train_reply.items() if k != ARRAYS},
                    ARRAYS: arrays_to_record({"w": np.full(12, 0.01 * node, np.float32)}),
                }
            )
            return Message(secure_reply_from_train_reply(reply, request), reply_to=message)

        return train


def test_every_secagg_stage_reply_sends_only_what_the_manifest_declares(
    tmp_path, tiny_model_dir, consortium
):
    config = node(tmp_path, tiny_model_dir)
    trained = client_app.train_reply(config, train_content(tiny_model_dir))
    grid = FedtuneGrid(consortium, NODES, trained)

    mean = signed_round(grid)

    assert mean is not None
    manifest = egress_manifest(secure_aggregation=True)
    for stage in Stage.all():
        replies = grid.stage_replies(stage)
        assert replies, stage
        for reply in replies:
            assert not reply.has_error(), reply.error
            assert_declared(reply.content, manifest, "train", f"SecAgg+ stage {stage}")


# --- error replies ----------------------------------------------------------------------------

BAD_ROWS = [
    json.dumps({"messages": [{"role": SECRET, "content": "x"}]}),
    json.dumps({"messages": [{"role": "user", "content": SECRET}]}),
    json.dumps({"messages": SECRET}),
    json.dumps({"prompt": SECRET, "response": 42}),
    json.dumps({SECRET: "x"}),
    json.dumps(SECRET),
    '{"prompt": "' + SECRET + '", "response": ',
    '{"prompt": "' + SECRET + '"} trailing',
]


@pytest.mark.parametrize("row", BAD_ROWS)
def test_an_error_reply_never_quotes_a_data_row(tmp_path, tiny_model_dir, row):
    good = json.dumps({"prompt": "Where is cardiology?", "response": "Building B."})
    train = tmp_path / "train.jsonl"
    train.write_text(f"{good}\n{row}\n{good}\n", encoding="utf-8")
    config = load_node_config(write_node(tmp_path, tiny_model_dir, train=train))
    message = as_message(train_content(tiny_model_dir), "train")
    service = TrainerService(config, REPLIES)  # the deployed node's path: trainer, then worker
    service.start()
    try:
        with pytest.raises(TrainerError) as raised:
            call_trainer(config.node.state_dir, "train", message.content)
    finally:
        service.stop()

    reply, details = error_reply(message, raised.value)

    assert f"{train}:2:" in reply.error.reason  # the problem is named by file and line
    sent = message_to_proto(reply).SerializeToString()
    assert SECRET not in reply.error.reason and SECRET not in details
    assert SECRET.encode() not in sent


@pytest.mark.parametrize(
    "raised",
    [KeyError(SECRET), ValueError(f"invalid literal: {SECRET!r}"), RuntimeError(SECRET)],
    ids=["KeyError", "ValueError", "RuntimeError"],
)
def test_a_library_errors_text_never_leaves_in_an_error_reply(tiny_model_dir, raised):
    message = as_message(train_content(tiny_model_dir), "train")

    reply, details = error_reply(message, raised)

    assert reply.error.reason.startswith(type(raised).__name__)
    assert SECRET.encode() not in message_to_proto(reply).SerializeToString()
    assert SECRET not in details


def test_an_error_reply_is_in_the_manifest():
    error = egress_manifest().reply("any", "error").records[0]

    assert {f.name for f in error.fields} == {"code", "reason"}


# --- the manifest against its sources ---------------------------------------------------------


def test_every_paired_statistic_has_a_meaning():
    assert set(SUMMARY_MEANINGS) == set(SUMMARY_FIELDS)


def test_the_dp_evaluate_metrics_are_the_node_policys():
    metrics = egress_manifest(release_metrics="dp").reply("evaluate", "metrics").record("metrics")

    assert {f.name for f in metrics.fields if f.sent} == set(DP_EVALUATE_METRICS)
    assert all(
        f.protection == ("dp",) and "metric_release" in f.accounting
        for f in metrics.fields
        if f.sent
    )


def test_flowers_metadata_and_upload_fields_are_all_declared():
    metadata = next(item for item in FLOWER_TRAFFIC if item.name == "message metadata")
    push = next(item for item in FLOWER_TRAFFIC if item.name == "PushMessages")
    proto_metadata = {f.name for f in ProtoMetadata.DESCRIPTOR.fields} - {
        "src_task_id",  # loopback only: the SuperNode's task ids
        "dst_task_id",
    }

    assert {f.name for f in metadata.fields} == proto_metadata
    push_fields = {f.name for f in PushMessagesRequest.DESCRIPTOR.fields}
    assert {"clientapp_runtime_list", "messages_list", "node"} <= push_fields
    assert any(f.name == "clientapp_runtime" for f in push.fields)
    heartbeat = next(item for item in FLOWER_TRAFFIC if item.name == "SendNodeHeartbeat")
    assert f"about every {HEARTBEAT_EVERY_S:g} s" in heartbeat.when
    interval = next(f for f in heartbeat.fields if f.name == "heartbeat_interval")
    assert interval.meaning == f"{HEARTBEAT_INTERVAL_S:g} s"  # what supernode_entry announces


@pytest.mark.parametrize("policy", ["none", "dp"])
def test_under_a_restrictive_policy_the_only_plain_metric_is_the_weight(policy):
    manifest = egress_manifest(release_metrics=policy)

    plain = {
        f.name
        for reply, record, f in manifest.fields()
        if record.kind == "metrics" and f.protection == ("plain",)
    }

    assert plain == {"num-examples"}
    assert "num-examples" in " ".join(manifest.notes)


def test_a_node_config_gives_its_manifest(tmp_path, tiny_model_dir):
    config = node(tmp_path, tiny_model_dir, release_metrics="dp")

    manifest = node_manifest(config)

    assert manifest.settings["release_metrics"] == "dp"
    assert manifest.settings["secure_aggregation"] is False
    text = format_manifest(manifest)
    assert "metric_release" in text and "SendNodeHeartbeat" in text
    assert json.loads(json.dumps(manifest.to_dict()))["settings"] == manifest.settings


def test_the_manifests_defaults_are_a_nodes_defaults():
    from fedtune.platform.config import EvaluationPolicy, PrivacySettings

    settings = egress_manifest().settings

    assert settings["release_metrics"] == PrivacySettings().release_metrics
    assert settings["metric_loss_bound"] == PrivacySettings().metric_loss_bound
    assert settings["share_per_example_scores"] == EvaluationPolicy().share_per_example_scores


# --- the command and the auditor's report -----------------------------------------------------


def test_audit_egress_prints_the_manifest_for_a_nodes_settings(tmp_path, tiny_model_dir, capsys):
    from fedtune.cli import main

    path = write_node(tmp_path, tiny_model_dir, release_metrics="none")

    code = main(["audit", "egress", "--config", str(path)])

    text = capsys.readouterr().out
    assert code == 0
    assert text.startswith("What leaves node hospital (release_metrics = none")
    assert "train-loss: float, not-sent" in text and "clientapp_runtime" in text


def test_audit_egress_json_is_the_manifests_data(capsys):
    from fedtune.cli import main

    code = main(["audit", "egress", "--json"])

    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert data == json.loads(json.dumps(egress_manifest().to_dict()))
    assert data["node"] is None


def test_the_audit_report_shows_what_leaves_the_node(tmp_path, tiny_model_dir, capsys):
    from test_ledger import round_fields

    from fedtune.cli import main
    from fedtune.privacy.node_ledger import NodeLedger

    path = write_node(tmp_path, tiny_model_dir, release_metrics="dp")
    ledger = NodeLedger(tmp_path / "state", node="hospital")
    from fedtune.privacy.accounting import epsilon_of

    epsilon = epsilon_of([(1.1, 0.01, 20)], delta=1e-5, accountant="rdp")
    fields = round_fields(epsilon_round=epsilon, epsilon_after=epsilon)
    for name in ("node", "recorded_at"):
        fields.pop(name)
    ledger.append(fields)
    exported, report = tmp_path / "ledger.jsonl", tmp_path / "report.html"
    db = str(tmp_path / "state" / "ledger.db")
    assert main(["audit", "export", "--db", db, "--node", "hospital", "--out", str(exported)]) == 0

    code = main(
        ["audit", "report", str(exported), "--out", str(report), "--node-config", str(path)]
    )

    html = report.read_text()
    assert code == 0
    assert "What leaves a node" in html and "node <strong>hospital</strong>" in html
    assert "metric_release" in html and "SendNodeHeartbeat" in html
    assert "fitres.metrics" not in html  # this node sends no update through SecAgg+


@pytest.mark.parametrize("required", [True, False])
def test_a_deployed_nodes_manifest_lists_the_secagg_stages_and_clear_updates_unless_required(
    tmp_path, tiny_model_dir, required
):
    from fedtune.platform.config import CoordinatorConnection

    connection = CoordinatorConnection(
        address="127.0.0.1:9092",
        root_certificates=Path("ca.pem"),
        auth_key=Path("auth_key"),
        require_secure_aggregation=required,
    )
    config = node(tmp_path, tiny_model_dir).model_copy(update={"coordinator": connection})

    variants = [reply.variant for reply in node_manifest(config).replies_to("train")]

    assert [v for v in variants if v.startswith("SecAgg+")] == [
        f"SecAgg+ stage {stage}" for stage in Stage.all()
    ]
    assert ("update" in variants) is not required
