"""The masked update travels in the smallest type its modulus needs: Flower's own SecAgg+
workflow, driven over the in-process grid of test_secagg_guard.py, gives the same mean from
uint32 uploads as from Flower's int64 ones at half the bytes, and the coordinator refuses a
node whose masked arrays the secure sum cannot take, finishing the round without it."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import recorddict_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from test_secagg_guard import (  # the in-process harness, and its autouse fixtures
    InProcessGrid,
    server_app_identity,
    strong_masks,
)

from fedtune.client_node.secagg_guard import guarded_secaggplus_mod
from fedtune.coordinator.masked_vectors import MaskedVectorCheck
from fedtune.platform.wire.masked_upload import (
    QUANTIZATION_RANGE,
    masked_vector_problem,
    modulus_for,
    pack_masked_reply,
    upload_dtype,
    upload_width,
    widened,
)

__all__ = ["server_app_identity", "strong_masks"]

NODES = [2001, 2002, 2003, 2004]
VALUES = 50_000
CLIPPING_RANGE, MAX_WEIGHT = 8.0, 20.0


def update(node: int, values: int = VALUES) -> np.ndarray:
    rng = np.random.default_rng(node)
    return (rng.standard_normal(values) * 0.01).astype(np.float32)


def weight(node: int) -> int:
    return 10 + node % 5


class Grid(InProcessGrid):
    """The harness with updates of ``values`` float32 numbers."""

    values = VALUES

    def _trainer(self, node: int):
        def train(message: Message, context: Context) -> Message:
            fitres = FitRes(
                Status(Code.OK, ""),
                ndarrays_to_parameters([update(node, self.values)]),
                weight(node),
                {},
            )
            return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)

        return train


class Recording(FedAvg):
    def __init__(self, nodes: int):
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=nodes,
            min_available_clients=nodes,
        )
        self.mean: np.ndarray | None = None
        self.failures: list[BaseException] = []

    def aggregate_fit(self, server_round, results, failures):
        self.failures = list(failures)
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            self.mean = parameters_to_ndarrays(parameters)[0]
        return parameters, metrics


def secure_round(grid: InProcessGrid, *, via=None, threshold=0.6, modulus=2**32) -> Recording:
    """One fit round of Flower's SecAggPlusWorkflow over ``grid`` (through ``via``)."""
    nodes = list(grid.contexts)
    strategy = Recording(len(nodes))
    server = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    legacy = LegacyContext(
        context=server,
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
        client_manager=SimpleClientManager(),
    )
    for node in nodes:
        legacy.client_manager.register(GridClientProxy(node, via or grid, 1))
    initial = ndarrays_to_parameters([np.zeros(grid.values, np.float32)])
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        initial, keep_input=True
    )
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: 1, WorkflowKey.START_TIME: 0.0}
    )
    SecAggPlusWorkflow(
        num_shares=1.0,
        reconstruction_threshold=threshold,
        max_weight=MAX_WEIGHT,
        clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=modulus,
    )(via or grid, legacy)
    return strategy


def weighted_mean(nodes: list[int]) -> np.ndarray:
    total = sum(weight(node) * update(node).astype(np.float64) for node in nodes)
    return total / sum(weight(node) for node in nodes)


def error_bound(nodes: list[int]) -> float:
    """Flower's quantisation: each node's stochastic rounding is off by less than one step
    (2 * clipping_range / quantization_range, in units of weight / max_weight), so the mean is
    off by less than n steps over the total weight ratio."""
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    return len(nodes) * step / (sum(weight(node) for node in nodes) / MAX_WEIGHT)


def masked_arrays(reply: Message) -> list[np.ndarray]:
    blobs = reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    return [np.load(io.BytesIO(blob)) for blob in blobs]


def upload_bytes(grid: InProcessGrid, node: int) -> int:
    """What ``node`` sent in the round: each reply's RecordDict as Flower serialises it."""
    return sum(
        len(recorddict_to_proto(reply.content).SerializeToString())
        for _, sender, reply in grid.replies
        if sender == node and reply.has_content()
    )


@pytest.mark.parametrize(
    ("modulus", "dtype", "width"),
    [
        (2**8, "uint8", 1),
        (2**16, "uint16", 2),
        (2**17, "uint8", 3),  # three bytes a value: numpy has no 24-bit type
        (2**24, "uint8", 3),
        (2**25, "uint32", 4),
        (2**32, "uint32", 4),
        (2**33, "int64", 8),
    ],
)
def test_masked_values_travel_in_the_smallest_type_a_power_of_two_modulus_needs(
    modulus, dtype, width
):
    assert (upload_dtype(modulus), upload_width(modulus)) == (np.dtype(dtype), width)


@pytest.mark.parametrize(
    ("nodes", "modulus"), [(1, 2**24), (2, 2**24), (3, 2**24), (4, 2**32), (1023, 2**32)]
)
def test_the_modulus_is_the_fewest_whole_bytes_the_sum_of_all_nodes_cannot_wrap(nodes, modulus):
    assert modulus_for(nodes, quantization_range=QUANTIZATION_RANGE) == modulus
    # Every node at the top of the quantisation range: the sum still fits.
    assert nodes * QUANTIZATION_RANGE < modulus


def test_a_run_too_large_for_any_modulus_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match="1024 nodes at a quantisation range of 4194304"):
        modulus_for(1024, quantization_range=QUANTIZATION_RANGE)


def test_a_modulus_that_is_not_a_power_of_two_keeps_flowers_int64():
    assert upload_dtype(3 * 2**20) == np.dtype("int64")  # a wrap-around sum would not be exact


def test_flowers_arithmetic_on_uint32_uploads_gives_its_int64_result():
    """What the coordinator does with the uploads (Flower's helpers): sum modulo 2**32, then
    take int64 masks off; the packed type must give the same numbers."""
    rng = np.random.default_rng(0)
    modulus = 2**32
    uploads = [rng.integers(0, modulus, 1000, dtype=np.int64) for _ in range(5)]
    masks = [rng.integers(0, modulus, 1000, dtype=np.int64) for _ in range(3)]

    def unmasked(arrays: list[np.ndarray]) -> np.ndarray:
        total = [arrays[0]]
        for array in arrays[1:]:
            total = parameters_addition(total, [array])
        total = parameters_mod(total, modulus)
        for mask in masks:
            total = parameters_subtraction(total, [mask])
        return parameters_mod(total, modulus)[0]

    packed = unmasked([a.astype(np.uint32) for a in uploads])
    assert packed.dtype == np.int64  # the int64 masks promote the uint32 sum back
    assert np.array_equal(packed, unmasked(uploads))


def test_a_secure_round_uploads_uint32_and_gives_the_weighted_mean():
    grid = Grid(NODES[:3])

    strategy = secure_round(grid, via=MaskedVectorCheck(grid))

    assert strategy.failures == []
    assert all(
        array.dtype == np.uint32
        for reply in grid.stage_replies(Stage.COLLECT_MASKED_VECTORS)
        for array in masked_arrays(reply)
    )
    error = np.abs(strategy.mean - weighted_mean(NODES[:3])).max()
    assert error < error_bound(NODES[:3]), (error, error_bound(NODES[:3]))


def test_three_nodes_upload_three_bytes_a_value_and_get_the_same_mean_as_with_uint32():
    """2**24 holds the sum of three nodes at 2**22: a quarter less upload, the same numbers
    (the same quantisation draws; masks cancel exactly)."""
    nodes = NODES[:3]
    np.random.seed(11)
    wide_grid = Grid(nodes)
    wide = secure_round(wide_grid, via=MaskedVectorCheck(wide_grid), modulus=2**32)
    np.random.seed(11)
    grid = Grid(nodes)
    narrow = secure_round(grid, via=MaskedVectorCheck(grid), modulus=2**24)

    assert narrow.failures == []
    assert all(
        array.dtype == np.uint8 and array.shape[-1] == 3
        for reply in grid.stage_replies(Stage.COLLECT_MASKED_VECTORS)
        for array in masked_arrays(reply)
    )
    assert np.array_equal(narrow.mean, wide.mean)
    assert np.abs(narrow.mean - weighted_mean(nodes)).max() < error_bound(nodes)
    ratio = upload_bytes(grid, nodes[0]) / upload_bytes(wide_grid, nodes[0])
    assert 0.74 < ratio < 0.77, ratio


def test_three_byte_values_widen_to_the_uint32_flower_sums():
    values = np.array([[0, 1, 2**24 - 1], [2**16, 255, 2**23]], np.int64)
    configs = ConfigRecord({Key.MASKED_PARAMETERS: saved([values])})
    pack_masked_reply(configs, 2**24)
    blobs = configs[Key.MASKED_PARAMETERS]
    assert masked_vector_problem(blobs, mod_range=2**24, shapes=[(2, 3)]) is None

    (wide,) = [np.load(io.BytesIO(blob)) for blob in widened(blobs, 2**24)]

    assert wide.dtype == np.uint32 and np.array_equal(wide, values)
    assert widened(blobs, 2**32) is blobs  # other widths travel as Flower sums them


def test_packing_leaves_the_mean_exactly_as_flowers_int64_upload_gives_it():
    """The same quantisation draws (numpy's global generator) through both: masks cancel
    exactly, so the means are identical."""
    np.random.seed(7)
    packed = secure_round(Grid(NODES[:3])).mean
    np.random.seed(7)
    stock = Grid(NODES[:3], mod=stock_flower_mod)
    flower = secure_round(stock).mean
    assert all(
        array.dtype == np.int64
        for reply in stock.stage_replies(Stage.COLLECT_MASKED_VECTORS)
        for array in masked_arrays(reply)
    )

    assert np.array_equal(packed, flower)


def stock_flower_mod(message: Message, context: Context, call_next) -> Message:
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(message, context, call_next)


def test_a_secure_round_uploads_at_most_five_percent_more_than_a_plain_float32_one():
    grid = Grid(NODES[:3])
    secure_round(grid)
    plain = FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters([update(NODES[0])]), weight(NODES[0]), {}
    )
    plain_bytes = len(
        recorddict_to_proto(compat.fitres_to_recorddict(plain, keep_input=True)).SerializeToString()
    )

    ratio = max(upload_bytes(grid, node) for node in NODES[:3]) / plain_bytes

    assert ratio <= 1.05, ratio


# --- a node that sends what the secure sum cannot take --------------------------------------


def tampering(node: int, change):
    """The guarded mod of an honest node, except that ``node`` replaces its masked arrays."""

    def mod(message: Message, context: Context, call_next) -> Message:
        stage = message.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
        reply = guarded_secaggplus_mod(message, context, call_next)
        if stage == Stage.COLLECT_MASKED_VECTORS and message.metadata.dst_node_id == node:
            configs = reply.content.config_records[RECORD_KEY_CONFIGS]
            arrays = masked_arrays(reply)
            configs[Key.MASKED_PARAMETERS] = change(arrays)
        return reply

    return mod


def saved(arrays: list[np.ndarray]) -> list[bytes]:
    return [ndarray_to_bytes(array) for array in arrays]


BAD_UPLOADS = {
    "float64": (lambda a: saved([x.astype(np.float64) for x in a]), "is float64"),
    "int64": (lambda a: saved([x.astype(np.int64) for x in a]), "is int64"),
    "big-endian": (lambda a: saved([x.astype(">u4") for x in a]), "is >u4"),
    "beyond the modulus": (
        lambda a: saved([a[0], np.full_like(a[1], 2**26 + 5)]),
        "outside [0, 67108864)",
    ),
    "one value to broadcast": (lambda a: saved([a[0], a[1][:1]]), "has shape (1,)"),
    "an array short": (lambda a: saved(a[:1]), "sent 1 masked arrays"),
    "a pickle": (lambda a: [pickle.dumps(a[0]), *saved(a[1:])], "cannot be read"),
    "not bytes": (lambda a: ["0"] * len(a), "not a list of arrays"),
}


THREE_BYTE_UPLOADS = {
    "uint32 where three bytes are due": (
        lambda a: saved([x.astype(np.uint32) for x in a]),
        "is uint32, the modulus 8388608 needs uint8",
    ),
    "four bytes a value": (
        lambda a: saved([np.concatenate([x, x[..., :1]], axis=-1) for x in a]),
        "has shape (1, 4), the round sent (1, 3)",
    ),
    "values flattened": (
        lambda a: saved([x.reshape(-1) for x in a]),
        "has shape (3,), the round sent (1, 3)",
    ),
    "beyond a 23-bit modulus": (
        lambda a: saved([a[0], np.full_like(a[1], 255)]),
        "outside [0, 8388608)",
    ),
}


# Each forged upload with the modulus it lies about: 2**26 travels as uint32, 2**23 as 3 bytes.
FORGED_UPLOADS = [(kind, 2**26, *BAD_UPLOADS[kind]) for kind in BAD_UPLOADS] + [
    (kind, 2**23, *THREE_BYTE_UPLOADS[kind]) for kind in THREE_BYTE_UPLOADS
]


@pytest.mark.parametrize(
    ("kind", "modulus", "change", "reason"), FORGED_UPLOADS, ids=[f[0] for f in FORGED_UPLOADS]
)
def test_a_node_whose_masked_upload_the_sum_cannot_take_is_dropped_with_the_reason(
    kind, modulus, change, reason
):
    grid = Grid(NODES, mod=tampering(NODES[3], change))
    grid.values = 1000

    strategy = secure_round(grid, via=MaskedVectorCheck(grid), threshold=0.75, modulus=modulus)

    assert strategy.mean is not None  # the others' mean, the bad node's masks taken off
    honest = NODES[:3]
    total = sum(weight(n) * update(n, 1000).astype(np.float64) for n in honest)
    expected = total / sum(weight(n) for n in honest)
    assert np.abs(strategy.mean - expected).max() < error_bound(honest)
    assert len(strategy.failures) >= 1
    assert all(f"node {NODES[3]} refused" in str(f) for f in strategy.failures)
    assert any(reason in str(f) for f in strategy.failures), strategy.failures


def test_without_the_check_one_float_upload_halts_the_round_for_everyone():
    grid = Grid(NODES, mod=tampering(NODES[3], BAD_UPLOADS["float64"][0]))
    grid.values = 1000

    with pytest.raises(TypeError):
        secure_round(grid, threshold=0.75)


def test_a_node_never_packs_a_value_outside_the_modulus():
    configs = ConfigRecord({Key.MASKED_PARAMETERS: saved([np.array([0, 2**20], np.int64)])})

    with pytest.raises(ValueError, match="outside"):
        pack_masked_reply(configs, 2**20)


def test_the_check_accepts_exactly_what_a_node_packs():
    configs = ConfigRecord(
        {Key.MASKED_PARAMETERS: saved([np.array([3], np.int64), np.arange(6).reshape(2, 3)])}
    )
    pack_masked_reply(configs, 2**32)

    blobs = configs[Key.MASKED_PARAMETERS]
    assert masked_vector_problem(blobs, mod_range=2**32, shapes=[(1,), (2, 3)]) is None
    assert "int64" in str(masked_vector_problem(blobs, mod_range=2**33, shapes=[(1,), (2, 3)]))
