"""The node's long-lived trainer service: the ClientApp process forwards a message's content
to it over an authenticated loopback connection and gets the reply (or the reason it failed)."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedtune.client_node.data_files import DataError
from fedtune.client_node.trainer_service import (
    SERVICE_FILE,
    TrainerError,
    TrainerService,
    TrainerUnavailableError,
    call_trainer,
)
from fedtune.platform.config import DataConfig, NodeConfig, NodeSettings


def _count_words(config: NodeConfig, content: RecordDict) -> RecordDict:
    words = str(content.config_records["config"]["text"]).split()
    return RecordDict(
        {
            "metrics": MetricRecord({"words": len(words)}),
            "node": ConfigRecord({"name": config.node.name}),
        }
    )


def _refuse(config: NodeConfig, content: RecordDict) -> RecordDict:
    raise DataError("train.jsonl:2: this row has no messages")


def _library_failure(config: NodeConfig, content: RecordDict) -> RecordDict:
    row = str(content.config_records["config"]["text"])
    raise ValueError(f"cannot tokenize {row!r}")  # as a library may quote its input


@pytest.fixture
def service(tmp_path):
    config = NodeConfig(
        node=NodeSettings(name="hospital", state_dir=tmp_path / "state"),
        data=DataConfig(train=tmp_path / "train.jsonl", eval=tmp_path / "eval.jsonl"),
    )
    running = TrainerService(
        config, {"train": _count_words, "evaluate": _refuse, "query": _library_failure}
    )
    running.start()
    yield running
    running.stop()


def message(text: str) -> RecordDict:
    return RecordDict({"config": ConfigRecord({"text": text})})


def test_a_message_is_answered_by_the_node_handler(service):
    reply = call_trainer(service.config.node.state_dir, "train", message("three small words"))

    assert reply.metric_records["metrics"]["words"] == 3
    assert reply.config_records["node"]["name"] == "hospital"


def test_fedtunes_own_refusal_comes_back_with_its_reason(service):
    with pytest.raises(TrainerError, match=r"DataError: train\.jsonl:2: this row has no messages"):
        call_trainer(service.config.node.state_dir, "evaluate", message("x"))


def test_a_library_errors_text_stays_in_the_nodes_log_and_only_its_type_leaves(service, capfd):
    secret = "Patient Jane Roe, MRN 0042"

    with pytest.raises(TrainerError) as raised:
        call_trainer(service.config.node.state_dir, "query", message(secret))

    assert str(raised.value).startswith("ValueError (its text stays on the node")
    assert "Jane Roe" not in str(raised.value)
    assert f"ValueError: cannot tokenize '{secret}'" in capfd.readouterr().err


def test_a_message_type_the_node_does_not_handle_is_refused(service):
    with pytest.raises(TrainerError, match=r"does not handle 'query\.other'"):
        call_trainer(service.config.node.state_dir, "query.other", message("x"))


def test_the_service_file_is_readable_only_by_the_node_s_user(service):
    path = service.config.node.state_dir / SERVICE_FILE

    assert path.stat().st_mode & 0o077 == 0


def test_a_caller_without_the_key_is_refused_and_the_service_goes_on(service):
    path = service.config.node.state_dir / SERVICE_FILE
    described = path.read_text()
    path.write_text(json.dumps({**json.loads(described), "key": "00" * 32}))

    with pytest.raises(TrainerUnavailableError, match="does not answer"):
        call_trainer(service.config.node.state_dir, "train", message("x"))
    path.write_text(described)
    reply = call_trainer(service.config.node.state_dir, "train", message("still here"))
    assert reply.metric_records["metrics"]["words"] == 2


def test_without_a_running_trainer_the_error_says_how_to_start_it(tmp_path):
    with pytest.raises(TrainerUnavailableError, match="fedtune node start"):
        call_trainer(tmp_path, "train", message("x"))


def test_a_stopped_service_removes_its_file(service):
    service.stop()

    assert not (service.config.node.state_dir / SERVICE_FILE).exists()
