"""SecAgg+ masks from fedtune's generator: its known answers and uniformity, Flower's SecAgg+
using it once installed, and why: Flower's stock generator gives a two-node round's single
update away to a search over folded 32-bit seeds (flower #7522)."""

from __future__ import annotations

import base64
import hashlib
import importlib
import math
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from flwr.app import ConfigRecord
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from scipy.stats import chisquare

from fedtune.platform.wire import secagg_masks

# the modules themselves (their packages export a function of the same name as the first)
node_side = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
workflow_side = importlib.import_module(
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
)

MOD_RANGE = 2**32  # Flower's defaults
TARGET_RANGE = 2**22
CLIPPING_RANGE = 8.0
MAX_WEIGHT = 100.0


@pytest.fixture
def strong_masks(monkeypatch):
    """install() for one test; afterwards every module holds what it held before."""
    for module in list(sys.modules.values()):
        if "pseudo_rand_gen" in getattr(module, "__dict__", {}):
            monkeypatch.setattr(module, "pseudo_rand_gen", module.pseudo_rand_gen)
    secagg_masks.install()


@pytest.fixture
def stock_masks(monkeypatch):
    """Flower's own generator everywhere for one test."""
    for name in secagg_masks.FLOWER_MODULES:
        monkeypatch.setattr(sys.modules[name], "pseudo_rand_gen", secagg_masks.STOCK_GENERATOR)


def reference_masks(seed: bytes, num_range: int, shapes: list[tuple[int, ...]]) -> list[list]:
    """The generator as its docstring specifies it, one word at a time, in plain Python."""
    header = b"fedtune-secagg-mask-v1" + num_range.to_bytes(8, "little")
    header += len(shapes).to_bytes(8, "little")
    for shape in shapes:
        header += b"".join(n.to_bytes(8, "little") for n in (len(shape), *shape))
    key = hashlib.sha256(header + seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    width = 4 if num_range <= 2**32 else 8
    limit = 2 ** (8 * width) - 2 ** (8 * width) % num_range
    masks = []
    for shape in shapes:
        values: list[int] = []
        while len(values) < math.prod(shape):
            word = int.from_bytes(stream.update(bytes(width)), "little")
            if word < limit:
                values.append(word % num_range)
        masks.append(values)
    return masks


# Written down once from secagg_masks.pseudo_rand_gen; reference_masks recomputes each from
# hashlib and cryptography's ChaCha20 alone, one word at a time. The second case rejects
# words (a quarter of 32-bit words lie above the largest multiple of 3 * 2**30; its stream's
# words 2, 3 and 7 are rejected), the third reads 64-bit words.
KNOWN_ANSWERS = [
    (
        bytes(range(32)),
        2**32,
        [(3,), (), (2, 2)],
        [
            [1119070351, 2842918538, 1578963615],
            [1118434290],
            [1659808216, 1122417605, 1396509546, 325549249],
        ],
    ),
    (
        base64.urlsafe_b64encode(bytes(range(32))),  # a pairwise seed as Flower hands it over
        3 * 2**30,
        [(8,)],
        [
            [
                1476951963,
                2986090047,
                38992524,
                2152335518,
                1238947718,
                259369290,
                2906621355,
                1538462321,
            ]
        ],
    ),
    (b"\xff" * 16, 2**40 + 7, [(4,)], [[566281394225, 332510751822, 854733509808, 505728135871]]),
    (b"\x01", 10, [(12,)], [[4, 1, 0, 0, 6, 6, 4, 2, 0, 4, 7, 1]]),
]


@pytest.mark.parametrize(("seed", "num_range", "shapes", "expected"), KNOWN_ANSWERS)
def test_the_generator_gives_its_known_answers(seed, num_range, shapes, expected):
    masks = secagg_masks.pseudo_rand_gen(seed, num_range, shapes)

    assert [mask.ravel().tolist() for mask in masks] == expected
    assert reference_masks(seed, num_range, shapes) == expected
    assert [mask.shape for mask in masks] == shapes
    assert all(mask.dtype == np.int64 for mask in masks)


def test_masks_have_flowers_shapes_and_type():
    shapes = [(1,), (), (3, 0), (2, 3, 4)]

    ours = secagg_masks.pseudo_rand_gen(b"s" * 32, MOD_RANGE, shapes)
    flowers = secagg_masks.STOCK_GENERATOR(b"s" * 32, MOD_RANGE, shapes)

    assert [(a.shape, a.dtype) for a in ours] == [(b.shape, b.dtype) for b in flowers]


def test_node_and_coordinator_derive_the_same_mask_from_the_same_seed():
    seed = base64.urlsafe_b64encode(bytes(range(1, 33)))

    on_node = secagg_masks.pseudo_rand_gen(seed, MOD_RANGE, [(5, 7), (1,)])
    on_coordinator = secagg_masks.pseudo_rand_gen(bytes(seed), MOD_RANGE, [(5, 7), (1,)])

    assert all(np.array_equal(a, b) for a, b in zip(on_node, on_coordinator, strict=True))


def test_flipping_any_bit_of_the_seed_changes_the_mask():
    seed = base64.urlsafe_b64encode(bytes(range(32)))  # 44 bytes, as Flower's pairwise seeds
    mask = secagg_masks.pseudo_rand_gen(seed, MOD_RANGE, [(16,)])[0]

    for bit in range(8 * len(seed)):
        flipped = bytearray(seed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        other = secagg_masks.pseudo_rand_gen(bytes(flipped), MOD_RANGE, [(16,)])[0]
        assert not np.array_equal(mask, other), f"bit {bit}"


def test_seeds_that_flower_folds_together_give_different_masks():
    seed = bytes(range(32))
    twin = bytes(a ^ b for a, b in zip(seed, b"\x5a" * 8 + bytes(16) + b"\x5a" * 8, strict=True))

    assert fold(seed) == fold(twin)
    assert np.array_equal(
        secagg_masks.STOCK_GENERATOR(seed, MOD_RANGE, [(8,)])[0],
        secagg_masks.STOCK_GENERATOR(twin, MOD_RANGE, [(8,)])[0],
    )
    assert not np.array_equal(
        secagg_masks.pseudo_rand_gen(seed, MOD_RANGE, [(8,)])[0],
        secagg_masks.pseudo_rand_gen(twin, MOD_RANGE, [(8,)])[0],
    )


def test_the_label_range_and_shapes_separate_masks_of_one_seed():
    seed = b"k" * 32

    first = secagg_masks.pseudo_rand_gen(seed, MOD_RANGE, [(4,)])[0]
    other_range = secagg_masks.pseudo_rand_gen(seed, 2**31, [(4,)])[0]
    other_shapes = secagg_masks.pseudo_rand_gen(seed, MOD_RANGE, [(4,), (1,)])[0]

    assert not np.array_equal(first % 2**31, other_range)
    assert not np.array_equal(first, other_shapes)


@pytest.mark.parametrize("num_range", [10, 2**4, 3 * 2**30, 2**40 + 7])
def test_masks_are_uniform_and_reach_the_top_of_the_range(num_range):
    values = secagg_masks.pseudo_rand_gen(b"uniform" * 5, num_range, [(200_000,)])[0]
    bins = min(num_range, 16)

    counts = np.bincount(
        (values.astype(object) * bins // num_range).astype(np.int64), minlength=bins
    )

    assert values.min() >= 0 and values.max() < num_range
    assert chisquare(counts).pvalue > 1e-4
    if num_range <= 16:
        assert (values == num_range - 1).any()


def test_flowers_stock_generator_never_yields_the_top_value():
    values = secagg_masks.STOCK_GENERATOR(b"uniform!" * 4, 10, [(200_000,)])[0]

    assert values.max() == 8  # randint(0, num_range - 1) excludes num_range - 1


@pytest.mark.parametrize("num_range", [0, -1, 2**63 + 1])
def test_a_range_outside_the_int64_masks_is_refused(num_range):
    with pytest.raises(ValueError, match="num_range"):
        secagg_masks.pseudo_rand_gen(b"s" * 32, num_range, [(1,)])


def test_install_puts_the_generator_where_flower_looks_it_up(strong_masks):
    installed = secagg_masks.install()  # a second time: nothing changes

    assert set(secagg_masks.FLOWER_MODULES) <= set(installed)
    for name in secagg_masks.FLOWER_MODULES:
        assert sys.modules[name].pseudo_rand_gen is secagg_masks.pseudo_rand_gen
    assert node_side.pseudo_rand_gen is secagg_masks.pseudo_rand_gen
    assert workflow_side.pseudo_rand_gen is secagg_masks.pseudo_rand_gen
    secagg_masks.check_installed()


def test_check_installed_names_the_modules_still_using_flowers_generator(stock_masks):
    with pytest.raises(RuntimeError, match="stock SecAgg\\+ mask generator") as raised:
        secagg_masks.check_installed()

    for name in secagg_masks.FLOWER_MODULES:
        assert name in str(raised.value)


def test_check_installed_finds_a_module_that_imported_flowers_generator(strong_masks, monkeypatch):
    module = type(sys)("some_plugin")
    module.pseudo_rand_gen = secagg_masks.STOCK_GENERATOR
    monkeypatch.setitem(sys.modules, "some_plugin", module)

    with pytest.raises(RuntimeError, match="some_plugin"):
        secagg_masks.check_installed()
    assert "some_plugin" in secagg_masks.install()
    secagg_masks.check_installed()


def test_require_generator_refuses_another_generator(strong_masks):
    secagg_masks.require_generator(secagg_masks.GENERATOR_NAME)

    with pytest.raises(ValueError, match="peer masks with generator 'flower-mt19937'"):
        secagg_masks.require_generator("flower-mt19937")


def test_require_generator_refuses_while_flowers_generator_is_in_use(stock_masks):
    with pytest.raises(RuntimeError, match="install"):
        secagg_masks.require_generator(secagg_masks.GENERATOR_NAME)


# A SecAgg+ round built from Flower's own functions: the node's stages from secaggplus_mod,
# the coordinator's unmasking as SecAggPlusWorkflow.unmask_stage does it.


def fold(seed: bytes) -> int:
    """Flower's stock seed: the XOR of the seed's 4-byte little-endian words."""
    folded = 0
    for start in range(0, len(seed), 4):
        folded ^= int.from_bytes(seed[start : start + 4], "little")
    return folded


def exact_update(node: int, size: int) -> np.ndarray:
    """Multiples of 1/256: Flower's stochastic quantization leaves them exact."""
    return ((np.arange(size) * (node + 3)) % 1024 - 512).astype(np.float32) / 256


def weight(node: int) -> int:
    return 25 * 2 ** (node % 3)  # 25, 50 or 100 of MAX_WEIGHT: exact q_ratio


def quantized(update: np.ndarray, examples: int) -> list[np.ndarray]:
    """What a node masks: Flower's _collect_masked_vectors before its masks."""
    q_ratio = round(examples / MAX_WEIGHT * TARGET_RANGE)
    scaled = parameters_multiply([update], q_ratio / TARGET_RANGE)
    return factor_combine(q_ratio, quantize(scaled, CLIPPING_RANGE, TARGET_RANGE))


def masked_round(updates: dict[int, np.ndarray], *, threshold: int):
    """Setup, share keys and collect masked vectors on every node, with Flower's functions."""
    states = {node: SecAggPlusState() for node in updates}
    setup = ConfigRecord(
        {
            Key.SAMPLE_NUMBER: len(updates),
            Key.SHARE_NUMBER: len(updates),
            Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: CLIPPING_RANGE,
            Key.TARGET_RANGE: TARGET_RANGE,
            Key.MOD_RANGE: MOD_RANGE,
            Key.MAX_WEIGHT: MAX_WEIGHT,
        }
    )
    public_keys = {}
    for node, state in states.items():
        state.nid = node
        keys = node_side._setup(state, setup)
        public_keys[node] = [keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]]
    forwarded: dict[int, dict[str, list]] = {
        node: {Key.SOURCE_LIST: [], Key.CIPHERTEXT_LIST: []} for node in updates
    }
    for node, state in states.items():
        sent = node_side._share_keys(
            state, ConfigRecord({str(n): k for n, k in public_keys.items()})
        )
        for destination, ciphertext in zip(
            sent[Key.DESTINATION_LIST], sent[Key.CIPHERTEXT_LIST], strict=True
        ):
            forwarded[destination][Key.SOURCE_LIST].append(node)
            forwarded[destination][Key.CIPHERTEXT_LIST].append(ciphertext)
    masked = {}
    for node, state in states.items():
        reply = node_side._collect_masked_vectors(
            state,
            ConfigRecord(forwarded[node]),
            weight(node),
            ndarrays_to_parameters([updates[node]]),
        )
        masked[node] = [bytes_to_ndarray(b) for b in reply[Key.MASKED_PARAMETERS]]
    return states, public_keys, masked


def collect_shares(states, surviving: list[int], dropped: list[int]) -> dict[int, list[bytes]]:
    """The unmask stage on every surviving node: the shares each hands over, by owner."""
    shares: dict[int, list[bytes]] = {node: [] for node in states}
    for node in surviving:
        reply = node_side._unmask(
            states[node],
            ConfigRecord({Key.ACTIVE_NODE_ID_LIST: surviving, Key.DEAD_NODE_ID_LIST: dropped}),
        )
        for owner, share in zip(reply[Key.NODE_ID_LIST], reply[Key.SHARE_LIST], strict=True):
            shares[owner].append(share)
    return shares


def unmask_like_the_workflow(masked_sum, shares, surviving, public_keys):
    """SecAggPlusWorkflow.unmask_stage's loop, through the workflow module's globals."""
    vector = masked_sum
    shapes = workflow_side.get_parameters_shape(vector)
    for node, node_shares in shares.items():
        secret = workflow_side.combine_shares(node_shares)
        if node in surviving:
            mask = workflow_side.pseudo_rand_gen(secret, MOD_RANGE, shapes)
            vector = workflow_side.parameters_subtraction(vector, mask)
            continue
        for other in set(public_keys) - {node}:
            shared_key = workflow_side.generate_shared_key(
                workflow_side.bytes_to_private_key(secret),
                workflow_side.bytes_to_public_key(public_keys[other][0]),
            )
            mask = workflow_side.pseudo_rand_gen(shared_key, MOD_RANGE, shapes)
            if node > other:
                vector = workflow_side.parameters_addition(vector, mask)
            else:
                vector = workflow_side.parameters_subtraction(vector, mask)
    return workflow_side.parameters_mod(vector, MOD_RANGE)


@pytest.mark.parametrize("dropped", [[], [13]])
def test_a_secaggplus_round_with_the_new_generator_gives_the_exact_sum(strong_masks, dropped):
    updates = {node: exact_update(node, 40) for node in (11, 12, 13)}
    surviving = [node for node in updates if node not in dropped]

    states, public_keys, masked = masked_round(updates, threshold=2)
    masked_sum = parameters_mod(
        [sum(masked[node][i] for node in surviving) for i in range(2)], MOD_RANGE
    )
    shares = collect_shares(states, surviving, dropped)
    total = unmask_like_the_workflow(masked_sum, shares, surviving, public_keys)

    expected = [
        sum(quantized(updates[node], weight(node))[i].astype(np.int64) for node in surviving)
        % MOD_RANGE
        for i in range(2)
    ]
    assert all(np.array_equal(a, b) for a, b in zip(total, expected, strict=True))


def test_flowers_node_masks_with_the_new_generator(strong_masks):
    updates = {node: exact_update(node, 8) for node in (21, 22, 23)}

    states, public_keys, masked = masked_round(updates, threshold=2)

    state = states[22]
    shapes = [(1,), (8,)]
    expected = parameters_addition(
        quantized(updates[22], weight(22)),
        secagg_masks.pseudo_rand_gen(state.rd_seed, MOD_RANGE, shapes),
    )
    for other in (21, 23):
        shared_key = workflow_side.generate_shared_key(
            workflow_side.bytes_to_private_key(state.sk1),
            workflow_side.bytes_to_public_key(public_keys[other][0]),
        )
        mask = secagg_masks.pseudo_rand_gen(shared_key, MOD_RANGE, shapes)
        combine = parameters_addition if other < 22 else parameters_subtraction
        expected = combine(expected, mask)
    expected = parameters_mod(expected, MOD_RANGE)
    assert all(np.array_equal(a, b) for a, b in zip(masked[22], expected, strict=True))


def search_folded_seeds(
    residual: list[np.ndarray], candidates: np.ndarray
) -> list[tuple[int, list[np.ndarray]]]:
    """The attack: every folded seed whose stock pairwise mask, taken off the residual, leaves
    a vector inside the quantized range (a wrong seed leaves uniform noise on 32 bits)."""
    shapes = [a.shape for a in residual]
    found = []
    for candidate in candidates:
        generator = np.random.RandomState(int(candidate))
        mask = [generator.randint(0, MOD_RANGE - 1, shape, dtype=np.int64) for shape in shapes]
        for combine in (parameters_subtraction, parameters_addition):
            guess = parameters_mod(combine(residual, mask), MOD_RANGE)
            if all((a <= TARGET_RANGE).all() for a in guess):
                found.append((int(candidate), guess))
    return found


def attack_two_node_round():
    """A two-node round; the coordinator rebuilds node 31's self-mask seed from the unmask
    stage's shares (as it must, to unmask the sum), takes that mask off node 31's masked
    vector and searches the folded pairwise seeds: 4,096 candidates with the true one among
    them (a whole 2**28 search took 178 CPU-seconds in C)."""
    updates = {31: exact_update(31, 24), 32: exact_update(32, 24)}
    states, public_keys, masked = masked_round(updates, threshold=2)
    shares = collect_shares(states, [31, 32], [])
    seed = workflow_side.combine_shares(shares[31])
    shapes = [a.shape for a in masked[31]]
    residual = parameters_mod(
        parameters_subtraction(masked[31], workflow_side.pseudo_rand_gen(seed, MOD_RANGE, shapes)),
        MOD_RANGE,
    )
    pairwise_seed = workflow_side.generate_shared_key(
        workflow_side.bytes_to_private_key(states[31].sk1),
        workflow_side.bytes_to_public_key(public_keys[32][0]),
    )
    assert fold(pairwise_seed) & 0x80808080 == 0  # base64url text: 28 bits at most
    candidates = np.random.default_rng(7).integers(0, 2**32, 4096, dtype=np.uint32) & 0x7F7F7F7F
    candidates[1234] = fold(pairwise_seed)
    return quantized(updates[31], weight(31)), candidates, search_folded_seeds(residual, candidates)


def test_flowers_stock_generator_gives_a_two_node_rounds_update_away(stock_masks):
    update, candidates, found = attack_two_node_round()

    assert [candidate for candidate, _ in found] == [candidates[1234]]
    recovered = found[0][1]  # node 31's weight and quantized update, exactly
    assert all(np.array_equal(a, b) for a, b in zip(recovered, update, strict=True))


def test_the_same_attack_finds_nothing_against_the_new_generator(strong_masks):
    _, _, found = attack_two_node_round()

    assert found == []
