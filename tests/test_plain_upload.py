"""float16 plain uploads: half the bytes, and the coordinator's mean within the stated bound
of the exact mean; a float16 update in a float32 run is still refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedtune.coordinator.strategy import open_update, update_problem
from fedtune.platform.wire.messages import ARRAYS, TrainInstructions, arrays_to_record
from fedtune.platform.wire.plain_upload import (
    FLOAT16_ABSOLUTE_ERROR,
    FLOAT16_RELATIVE_ERROR,
    narrowed,
    widened,
)


def updates(nodes: int, *, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """LoRA-sized float32 updates of different scales per node."""
    rng = np.random.default_rng(seed)
    return [
        {
            "lora_A": rng.normal(0, 0.02 * (i + 1), (8, 576)).astype(np.float32),
            "lora_B": rng.normal(0, 0.5, (576, 8)).astype(np.float32),
        }
        for i in range(nodes)
    ]


def test_a_float16_upload_is_half_the_bytes_and_comes_back_as_float32():
    update = updates(1)[0]
    sent = arrays_to_record(narrowed(update, "float16"))
    plain = arrays_to_record(update)

    size16 = len(recorddict_to_proto(RecordDict({ARRAYS: sent})).SerializeToString())
    size32 = len(recorddict_to_proto(RecordDict({ARRAYS: plain})).SerializeToString())
    back = {name: a.numpy() for name, a in widened(sent).items()}

    assert size16 < 0.55 * size32
    assert {a.dtype for a in back.values()} == {np.dtype(np.float32)}
    for name, value in update.items():
        np.testing.assert_allclose(
            back[name], value, rtol=FLOAT16_RELATIVE_ERROR, atol=FLOAT16_ABSOLUTE_ERROR
        )


def test_the_mean_of_float16_updates_is_within_the_bound_of_the_exact_mean():
    sent = updates(5, seed=3)
    weights = np.array([48, 30, 100, 7, 64], dtype=np.float64)
    exact = {
        name: sum(w * u[name].astype(np.float64) for w, u in zip(weights, sent, strict=True))
        / weights.sum()
        for name in sent[0]
    }
    received = [
        {n: a.numpy() for n, a in widened(arrays_to_record(narrowed(u, "float16"))).items()}
        for u in sent
    ]
    mean = {
        name: sum(np.float32(w) * r[name] for w, r in zip(weights, received, strict=True))
        / np.float32(weights.sum())
        for name in sent[0]
    }
    largest = max(float(np.abs(u[name]).max()) for u in sent for name in u)

    for name in exact:
        error = float(np.abs(mean[name] - exact[name]).max())
        assert error <= largest * FLOAT16_RELATIVE_ERROR + FLOAT16_ABSOLUTE_ERROR + 1e-7
        assert error > 0  # float16 did round: the bound is not met by accident


def test_a_float16_update_in_a_float32_run_is_refused_and_widened_in_a_float16_run():
    update = updates(1)[0]
    reference = arrays_to_record(update)
    content = RecordDict(
        {
            ARRAYS: arrays_to_record(narrowed(update, "float16")),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )

    assert "dtype float16" in (update_problem(content, reference) or "")
    open_update(content, widen=True)
    assert update_problem(content, reference) is None


def test_the_instructions_carry_the_upload_type_and_require_it():
    from fedtune.platform.config import LoraSettings

    instructions = TrainInstructions(
        run_id="r",
        base_model_fingerprint="f",
        steps=1,
        batch_size=2,
        learning_rate=1e-3,
        optimizer="adamw",
        planned_rounds=1,
        lora=LoraSettings(),
        evaluate_local_model=False,
        upload_dtype="float16",
    )
    record = instructions.to_record()
    assert TrainInstructions.from_record(record).upload_dtype == "float16"
    del record["upload-dtype"]  # fedtune-wire/4 always states it: a message without is refused
    with pytest.raises(ValueError, match="upload-dtype"):
        TrainInstructions.from_record(ConfigRecord(dict(record)))
    with pytest.raises(ValueError, match="float8"):
        narrowed({"x": np.zeros(2, np.float32)}, "float8")
