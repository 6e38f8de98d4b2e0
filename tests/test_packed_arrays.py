"""An adapter on the wire as one vector and its layout: what it saves in Flower objects (one
request each when deployed), that it comes back exactly, and that a sender who lies about
the layout gets a plain refusal, on the node and on the coordinator."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.compat.common.recorddict_compat import fitins_to_recorddict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedtune.coordinator.strategy import open_update, update_problem
from fedtune.platform.config import LoraSettings
from fedtune.platform.wire.messages import (
    ARRAYS,
    METRICS,
    TrainInstructions,
    arrays_to_record,
    record_to_arrays,
)
from fedtune.platform.wire.packed_arrays import (
    LAYOUT_KEY,
    VECTOR_KEY,
    ArrayLayout,
    PackedArraysError,
    pack,
    unpack,
)
from fedtune.platform.wire.secure_messages import (
    ADAPTER_LAYOUT_KEY,
    SecureMessageError,
    secure_train_config,
    train_content_from_secure,
)


def smollm2_like_adapter(seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of a LoRA adapter of r 8 on q and v of a 30-layer, 576-wide model."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer in range(30):
        for module, out in (("q_proj", 576), ("v_proj", 192)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            arrays[f"{prefix}.lora_A.weight"] = rng.normal(size=(8, 576)).astype(np.float32)
            arrays[f"{prefix}.lora_B.weight"] = rng.normal(size=(out, 8)).astype(np.float32)
    return arrays


def test_a_packed_adapter_comes_back_exactly_in_a_few_flower_objects():
    arrays = smollm2_like_adapter()

    record = pack(arrays)
    back = record_to_arrays(record)

    assert list(back) == list(arrays)
    assert all(back[k].dtype == np.float32 and np.array_equal(back[k], arrays[k]) for k in arrays)
    packed = get_all_nested_objects(RecordDict({ARRAYS: record}))
    one_each = get_all_nested_objects(RecordDict({ARRAYS: arrays_to_record(arrays)}))
    assert len(one_each) > 240  # 120 arrays: an array and a chunk each (one request each)
    assert len(packed) <= 8


def test_a_float16_upload_stays_float16_when_packed():
    arrays = {k: v.astype(np.float16) for k, v in smollm2_like_adapter().items()}

    back = unpack(pack(arrays))

    assert all(v.dtype == np.float16 for v in back.values())
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)


def test_arrays_of_mixed_number_types_are_refused_when_packed():
    with pytest.raises(PackedArraysError, match="several number types"):
        pack({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float64)})


def forged(layout: object, vector: np.ndarray | None = None) -> ArrayRecord:
    """A packed record whose layout says what a lying sender wants."""
    text = layout if isinstance(layout, str) else json.dumps(layout)
    return ArrayRecord(
        {
            VECTOR_KEY: Array(np.zeros(6, np.float32) if vector is None else vector),
            LAYOUT_KEY: Array(np.frombuffer(text.encode(), np.uint8).copy()),
        }
    )


@pytest.mark.parametrize(
    "layout, problem",
    [
        ({"dtype": "float32", "arrays": [["a", [2, 2]]]}, "for a layout of 4 values"),
        ({"dtype": "float32", "arrays": [["a", [2, 4]]]}, "for a layout of 8 values"),
        ({"dtype": "float32", "arrays": [["a", [-2, -3]]]}, "not a list of sizes"),
        ({"dtype": "float32", "arrays": [["a", [6]], ["a", [0]]]}, "names an array twice"),
        ({"dtype": "object", "arrays": [["a", [6]]]}, "number type 'object'"),
        ({"dtype": "float64", "arrays": [["a", [6]]]}, "float32 vector for a float64 layout"),
        ({"dtype": "float32", "arrays": [[7, [6]]]}, "names must be text"),
        ({"dtype": "float32", "arrays": [["a", [6], "x"]]}, "not \\[name, shape\\]"),
        ({"dtype": "float32", "arrays": [["a", [1.5]]]}, "not a list of sizes"),
        ({"dtype": "float32"}, "cannot be read"),
        ("{not json", "cannot be read"),
    ],
)
def test_a_packed_record_whose_layout_lies_is_refused(layout, problem):
    with pytest.raises(PackedArraysError, match=problem):
        record_to_arrays(forged(layout))


def test_a_packed_record_with_another_array_beside_it_is_refused():
    record = pack({"a": np.zeros(3, np.float32)})
    record["smuggled"] = Array(np.zeros(3, np.float32))

    with pytest.raises(PackedArraysError, match="only"):
        record_to_arrays(record)


def test_a_2d_vector_is_refused_even_when_its_size_fits():
    layout = {"dtype": "float32", "arrays": [["a", [6]]]}

    with pytest.raises(PackedArraysError, match="shape \\(2, 3\\)"):
        record_to_arrays(forged(layout, np.zeros((2, 3), np.float32)))


def test_the_coordinator_refuses_a_train_reply_whose_packed_update_lies():
    expected = arrays_to_record({"a": np.zeros(6, np.float32)})
    content = RecordDict(
        {
            ARRAYS: forged({"dtype": "float32", "arrays": [["a", [7]]]}),
            METRICS: MetricRecord({"num-examples": 4}),
        }
    )

    open_update(content)

    assert "packed update cannot be read" in (update_problem(content, expected) or "")


def test_the_coordinator_opens_a_packed_train_reply_and_checks_it_as_before():
    expected = arrays_to_record({"a": np.zeros(6, np.float32)})
    content = RecordDict(
        {ARRAYS: pack({"a": np.ones(6, np.float32)}), METRICS: MetricRecord({"num-examples": 4})}
    )

    open_update(content)

    assert update_problem(content, expected) is None
    assert content.array_records[ARRAYS]["a"].numpy().tolist() == [1.0] * 6


INSTRUCTIONS = TrainInstructions(
    run_id="run-1",
    base_model_fingerprint="sha256:base",
    steps=1,
    batch_size=2,
    learning_rate=0.01,
    optimizer="adamw",
    planned_rounds=1,
    lora=LoraSettings(),
    evaluate_local_model=False,
)


def secure_message(layout_json: str, vectors: list[np.ndarray]) -> RecordDict:
    layout = ArrayLayout.of({"a": np.zeros(6, np.float32)})
    config = secure_train_config(INSTRUCTIONS, server_round=1, layout=layout)
    config[ADAPTER_LAYOUT_KEY] = layout_json
    return fitins_to_recorddict(
        FitIns(ndarrays_to_parameters(vectors), dict(config)), keep_input=True
    )


@pytest.mark.parametrize(
    "layout, vectors, problem",
    [
        ('{"dtype": "float32", "arrays": [["a", [9]]]}', [np.zeros(6, np.float32)], "9 values"),
        ('{"dtype": "float32", "arrays": [["a", [6]]]}', [np.zeros(6, np.float64)], "one float32"),
        (
            '{"dtype": "float32", "arrays": [["a", [6]]]}',
            [np.zeros(6, np.float32)] * 2,
            "2 arrays sent",
        ),
        ('{"dtype": "float32", "arrays": [["a", [-6]]]}', [np.zeros(6, np.float32)], "sizes"),
    ],
)
def test_a_node_refuses_a_secure_train_message_whose_layout_does_not_fit(layout, vectors, problem):
    with pytest.raises(SecureMessageError, match=problem):
        train_content_from_secure(secure_message(layout, vectors))


def test_a_node_reads_the_adapter_of_a_secure_train_message_by_its_layout():
    layout = '{"dtype": "float32", "arrays": [["a", [2, 3]]]}'
    vector = np.arange(6, dtype=np.float32)

    received = train_content_from_secure(secure_message(layout, [vector]))

    assert received.sent["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert isinstance(received.content.config_records["config"], ConfigRecord)
