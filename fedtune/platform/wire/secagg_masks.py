"""SecAgg+ masks from a cryptographic stream keyed by the whole secret.

Flower 1.41's ``secaggplus_utils.pseudo_rand_gen`` XORs the seed's 4-byte words into one
32-bit integer and seeds numpy's Mersenne Twister with it: a self-mask seed (32 random bytes)
keeps 32 bits, a pairwise seed (the base64url *text* of an HKDF key, whose bytes all lack the
top bit) at most 28, and a 2**28 search recovered one node's update of a two-node round in
178 CPU-seconds. Its ``randint(0, num_range - 1)`` also never yields ``num_range - 1``.
Upstream: flower issue #7522, pull request #7570 (open in Dec 2026).

:func:`pseudo_rand_gen` has Flower's signature and replaces it (:func:`install`). Each call:

1. key = SHA-256(``DOMAIN`` | u64 num_range | u64 len(shapes) | per shape: u64 ndim, u64 per
   dimension | seed), all integers unsigned 64-bit little-endian. Every byte of the seed
   counts (nothing is decoded or folded); the label and the shapes separate this use.
2. ChaCha20 (``cryptography``) with that key and an all-zero 16-byte nonce/counter; its
   keystream is read as little-endian words, 32-bit when ``num_range <= 2**32``, else 64-bit,
   shape after shape in order.
3. Rejection sampling, exact: a word ``w`` is kept when ``w < 2**bits - (2**bits % num_range)``
   and gives ``w % num_range``; a rejected word is replaced by the next words of the same
   stream. Uniform on ``[0, num_range)``; nothing is ever rejected for a power of two.

Node and coordinator must run the same generator: they compare :data:`GENERATOR_NAME`
(:func:`require_generator`) before a round.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import struct
import sys
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms
from flwr.common.secure_aggregation import secaggplus_utils

GENERATOR_NAME = "chacha20-v1"
DOMAIN = b"fedtune-secagg-mask-v1"
ATTRIBUTE = "pseudo_rand_gen"
# Where Flower 1.41 looks the generator up by name: each module's global, read at call time.
FLOWER_MODULES = (
    "flwr.common.secure_aggregation.secaggplus_utils",
    "flwr.client.mod.secure_aggregation.secaggplus_mod",
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
)
MAX_RANGE = 2**63  # masks are int64, as Flower's

STOCK_GENERATOR = secaggplus_utils.pseudo_rand_gen
_NONCE = bytes(16)
_ZEROS = memoryview(bytes(1 << 20))  # ChaCha20 of zeros is its keystream


def mask_key(seed: bytes, num_range: int, shapes: Sequence[tuple[int, ...]]) -> bytes:
    """The ChaCha20 key of one call: SHA-256 over the label, the range, the shapes, the seed."""
    parts = [DOMAIN, struct.pack("<QQ", num_range, len(shapes))]
    for shape in shapes:
        parts.append(struct.pack(f"<Q{len(shape)}Q", len(shape), *shape))
    parts.append(bytes(seed))
    return hashlib.sha256(b"".join(parts)).digest()


def pseudo_rand_gen(
    seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """One int64 array per shape, uniform on ``[0, num_range)``, determined by all of
    ``seed`` (Flower's signature; a drop-in for ``secaggplus_utils.pseudo_rand_gen``)."""
    if not isinstance(num_range, int) or isinstance(num_range, bool):
        raise TypeError(f"num_range must be an int, not {type(num_range).__name__}")
    if not 1 <= num_range <= MAX_RANGE:
        raise ValueError(f"num_range must be in [1, 2**63], not {num_range}")
    if len(seed) == 0:
        raise ValueError("the mask seed is empty")
    shapes = [tuple(int(d) for d in shape) for shape in dimensions_list]
    key = mask_key(seed, num_range, shapes)
    stream = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    word = np.dtype("<u4") if num_range <= 2**32 else np.dtype("<u8")
    span = 2 ** (8 * word.itemsize)
    limit = span - span % num_range  # words at or above it would favour small values
    return [_draw(stream, word, limit, num_range, shape) for shape in shapes]


def _draw(
    stream: CipherContext, word: np.dtype, limit: int, num_range: int, shape: tuple[int, ...]
) -> np.ndarray:
    count = math.prod(shape)
    words = _keystream(stream, word, count)
    if limit < 2 ** (8 * word.itemsize):
        kept = words[words < limit]
        while kept.size < count:  # probability of a rejection: below num_range / 2**bits
            more = _keystream(stream, word, count - kept.size)
            kept = np.concatenate([kept, more[more < limit]])
        words = kept
    if num_range < 2 ** (8 * word.itemsize):
        if num_range & (num_range - 1) == 0:
            np.bitwise_and(words, word.type(num_range - 1), out=words)
        else:
            np.remainder(words, word.type(num_range), out=words)
    return words.astype(np.int64).reshape(shape)


def _keystream(stream: CipherContext, word: np.dtype, count: int) -> np.ndarray:
    """The next ``count`` words of ``stream``, written straight into a new array."""
    words = np.empty(count, dtype=word)
    out = words.data.cast("B")
    for start in range(0, len(out), len(_ZEROS)):
        chunk = out[start : start + len(_ZEROS)]
        stream.update_into(_ZEROS[: len(chunk)], chunk)
    return words


def install() -> tuple[str, ...]:
    """Make Flower's SecAgg+ (node mod and coordinator workflow) use :func:`pseudo_rand_gen`.

    Sets the global in each of :data:`FLOWER_MODULES` (importing them) and in any other loaded
    module that still holds Flower's generator under that name. Idempotent. Returns the
    names of the modules that now hold this generator.
    """
    for name in FLOWER_MODULES:
        setattr(importlib.import_module(name), ATTRIBUTE, pseudo_rand_gen)
    for module in list(sys.modules.values()):
        if _holds(module, STOCK_GENERATOR):
            setattr(module, ATTRIBUTE, pseudo_rand_gen)
    return tuple(
        name
        for name, module in list(sys.modules.items())
        if _holds(module, pseudo_rand_gen) and name != __name__
    )


def _holds(module: object, generator: object) -> bool:
    """Whether ``module``'s own namespace binds the generator name to ``generator`` (no
    ``__getattr__``: lazy modules are not woken)."""
    return getattr(module, "__dict__", {}).get(ATTRIBUTE) is generator


def check_installed() -> None:
    """Raise ``RuntimeError`` naming every module whose SecAgg+ masks would not come from
    :func:`pseudo_rand_gen`."""
    stale = [
        name
        for name in FLOWER_MODULES
        if not _holds(importlib.import_module(name), pseudo_rand_gen)
    ]
    stale += [
        name
        for name, module in list(sys.modules.items())
        if _holds(module, STOCK_GENERATOR) and name not in stale
    ]
    if stale:
        raise RuntimeError(
            f"Flower's stock SecAgg+ mask generator is still in use in {', '.join(stale)}; "
            "call fedtune.platform.wire.secagg_masks.install() first"
        )


def require_generator(name: str) -> None:
    """Raise ``ValueError`` unless the peer's generator ``name`` is this process's
    (:data:`GENERATOR_NAME`, installed): masks from different generators never cancel."""
    if name != GENERATOR_NAME:
        raise ValueError(
            f"secure aggregation refused: the peer masks with generator {name!r}, "
            f"this side with {GENERATOR_NAME!r}"
        )
    check_installed()
