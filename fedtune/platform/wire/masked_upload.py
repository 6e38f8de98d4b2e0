"""The masked update of a SecAgg+ round in the smallest integer type its modulus needs.

Flower 1.41's ``secaggplus_mod`` uploads the masked vectors as int64 (its masks are int64),
twice the bytes of the float32 update they hide. Every masked value lies in
``[0, mod_range)`` and the coordinator only ever sums them modulo ``mod_range`` (a power of
two, ``SecAggPlusWorkflow`` insists); so for ``mod_range <= 2**32`` a node may send them as
``uint32`` (``uint16``, ``uint8`` for smaller moduli) and nothing changes for the coordinator:

- ``collect_masked_vectors_stage`` sums the nodes' arrays as numpy does: ``uint32 + uint32``
  wraps modulo ``2**32``, which ``mod_range`` divides, and ``parameters_mod`` then masks with
  ``mod_range - 1``, still ``uint32``;
- ``unmask_stage`` subtracts and adds the int64 masks: ``uint32 - int64`` promotes to int64,
  and the final ``parameters_mod`` brings the sum back into ``[0, mod_range)``.

numpy has no 24-bit type, so for ``2**16 < mod_range <= 2**24`` a node sends each array's
values as three little-endian bytes (a ``uint8`` array with a last axis of 3), a quarter less
than uint32; the coordinator widens them back to uint32 (:func:`widened`) before Flower's
workflow sees them. The modulus must exceed the sum over all nodes (each quantised value is
at most ``quantization_range``), so :func:`modulus_for` gives the smallest modulus of whole
bytes that a run of so many nodes cannot overflow: 2**24 for up to 3 nodes at Flower's
quantisation range of 2**22 (the precision is the same), 2**32 for up to 1,023.

(``tests/test_masked_upload.py`` runs Flower's own workflow over the packed arrays and checks
the promotion rules this relies on.) Node side: :func:`pack_masked_reply`. Coordinator side:
:func:`masked_vector_problem` says why one node's masked arrays cannot go into the sum (not
an array of the packed type, a shape the round did not send, a value outside
``[0, mod_range)``): a node could otherwise halt the round (a float array breaks Flower's
``&``) or, through numpy's broadcasting, smear one value over every coordinate.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from flwr.app import ConfigRecord
from flwr.common import ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import Key

FLOWER_DTYPE = np.dtype("<i8")  # what Flower's mod sends, kept for moduli above 2**32
_UNSIGNED = (np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4"))
_BYTE = np.dtype("<u1")
_WIDENED = np.dtype("<u4")  # what three-byte values become for Flower's sum
LARGEST_MODULUS = 2**32  # Flower's default, and the largest its workflow is documented for
QUANTIZATION_RANGE = 2**22  # Flower's default: each value quantised to [0, 2**22]


def upload_width(mod_range: int) -> int:
    """Bytes per masked value on the wire: 1, 2, 3 or 4 for a power-of-two ``mod_range`` up to
    ``2**32`` (the coordinator's wrap-around sum stays exact modulo it), else Flower's 8."""
    if mod_range >= 1 and mod_range & (mod_range - 1) == 0 and mod_range <= LARGEST_MODULUS:
        return max(1, (mod_range.bit_length() - 1 + 7) // 8)
    return FLOWER_DTYPE.itemsize


def upload_dtype(mod_range: int) -> np.dtype:
    """The type of the arrays masked values travel in: the smallest unsigned one holding
    ``[0, mod_range)`` (uint8 bytes, three per value, for moduli of 17 to 24 bits), or
    Flower's int64 where the modulus is no power of two up to ``2**32``."""
    width = upload_width(mod_range)
    if width == 3:
        return _BYTE
    return next((dtype for dtype in _UNSIGNED if dtype.itemsize == width), FLOWER_DTYPE)


def modulus_for(nodes: int, *, quantization_range: int) -> int:
    """The smallest modulus of whole bytes that the secure sum of ``nodes`` quantised updates
    (each value at most ``quantization_range``) cannot wrap around."""
    if nodes < 1 or quantization_range < 1:
        raise ValueError("a secure sum needs at least one node and a quantisation range")
    largest_sum = nodes * quantization_range
    bits = 8 * ((largest_sum.bit_length() + 7) // 8)
    if 2**bits > LARGEST_MODULUS:
        raise ValueError(
            f"{nodes} nodes at a quantisation range of {quantization_range} can sum to "
            f"{largest_sum}, beyond the largest modulus {LARGEST_MODULUS}"
        )
    return int(2**bits)


def pack_masked_reply(configs: ConfigRecord, mod_range: int) -> None:
    """Re-encode, in place, the masked vectors of a ``collect_masked_vectors`` reply's
    SecAgg+ record as :func:`upload_width` says; refuses values outside ``[0, mod_range)``."""
    width = upload_width(mod_range)
    packed = []
    for blob in configs[Key.MASKED_PARAMETERS]:  # type: ignore[union-attr]
        array = _load(blob)  # type: ignore[arg-type]
        if array.size and (array.min() < 0 or array.max() >= mod_range):
            raise ValueError(f"a masked value lies outside [0, {mod_range})")
        if width == 3:
            words = array.astype(_WIDENED).reshape(*array.shape, 1).view(_BYTE)
            packed.append(ndarray_to_bytes(np.ascontiguousarray(words[..., :3])))
        else:
            packed.append(ndarray_to_bytes(array.astype(upload_dtype(mod_range), copy=False)))
    configs[Key.MASKED_PARAMETERS] = packed


def widened(blobs: list[bytes], mod_range: int) -> list[bytes]:
    """Three-byte masked vectors (checked by :func:`masked_vector_problem`) as the uint32
    arrays Flower's workflow sums; any other upload unchanged."""
    if upload_width(mod_range) != 3:
        return blobs
    return [ndarray_to_bytes(_three_bytes_to_words(_load(blob))) for blob in blobs]


def _three_bytes_to_words(array: np.ndarray) -> np.ndarray:
    words = np.zeros((*array.shape[:-1], 4), _BYTE)
    words[..., :3] = array
    return words.view(_WIDENED).reshape(array.shape[:-1])


def masked_vector_problem(
    blobs: object, *, mod_range: int, shapes: Sequence[tuple[int, ...]]
) -> str | None:
    """Why one node's masked vectors (the ``masked_parameters`` of its reply) may not enter
    the secure sum, or None: each must be a plain numpy array of :func:`upload_dtype` with the
    shape the round sent (``shapes``: the weight factor's ``(1,)``, then the parameters'),
    every value in ``[0, mod_range)``."""
    dtype, three_bytes = upload_dtype(mod_range), upload_width(mod_range) == 3
    if not isinstance(blobs, list) or not all(isinstance(blob, bytes) for blob in blobs):
        return "its masked vectors are not a list of arrays"
    if len(blobs) != len(shapes):
        return f"it sent {len(blobs)} masked arrays, the round has {len(shapes)}"
    for index, (blob, shape) in enumerate(zip(blobs, shapes, strict=True)):
        try:
            array = _load(blob)
        except ValueError as exc:
            return f"masked array {index} cannot be read ({exc})"
        if array.dtype != dtype:
            return f"masked array {index} is {array.dtype}, the modulus {mod_range} needs {dtype}"
        expected = (*shape, 3) if three_bytes else tuple(shape)
        if array.shape != expected:
            return f"masked array {index} has shape {array.shape}, the round sent {expected}"
        if three_bytes:
            array = _three_bytes_to_words(array)
        if array.size and (int(array.min()) < 0 or int(array.max()) >= mod_range):
            return f"masked array {index} holds a value outside [0, {mod_range})"
    return None


def _load(blob: bytes) -> np.ndarray:
    """One array saved by ``np.save`` (Flower's ``ndarray_to_bytes``); no pickles, no archives."""
    try:
        array = np.load(io.BytesIO(blob), allow_pickle=False)
    except Exception as exc:  # numpy raises several kinds on bytes it cannot read
        raise ValueError(str(exc) or type(exc).__name__) from None
    if not isinstance(array, np.ndarray):  # an .npz archive loads as NpzFile
        raise ValueError("not a single array")
    return array
