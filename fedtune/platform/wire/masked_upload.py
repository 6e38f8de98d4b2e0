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


def upload_dtype(mod_range: int) -> np.dtype:
    """The type masked values travel in: the smallest unsigned one holding ``[0, mod_range)``
    when ``mod_range`` is a power of two up to ``2**32`` (the coordinator's wrap-around sum
    stays exact modulo it), else Flower's int64."""
    if mod_range >= 1 and mod_range & (mod_range - 1) == 0:
        for dtype in _UNSIGNED:
            if mod_range <= 2 ** (8 * dtype.itemsize):
                return dtype
    return FLOWER_DTYPE


def pack_masked_reply(configs: ConfigRecord, mod_range: int) -> None:
    """Re-encode, in place, the masked vectors of a ``collect_masked_vectors`` reply's
    SecAgg+ record in :func:`upload_dtype`; refuses values outside ``[0, mod_range)``."""
    dtype = upload_dtype(mod_range)
    packed = []
    for blob in configs[Key.MASKED_PARAMETERS]:  # type: ignore[union-attr]
        array = _load(blob)  # type: ignore[arg-type]
        if array.size and (array.min() < 0 or array.max() >= mod_range):
            raise ValueError(f"a masked value lies outside [0, {mod_range})")
        packed.append(ndarray_to_bytes(array.astype(dtype, copy=False)))
    configs[Key.MASKED_PARAMETERS] = packed


def masked_vector_problem(
    blobs: object, *, mod_range: int, shapes: Sequence[tuple[int, ...]]
) -> str | None:
    """Why one node's masked vectors (the ``masked_parameters`` of its reply) may not enter
    the secure sum, or None: each must be a plain numpy array of :func:`upload_dtype` with the
    shape the round sent (``shapes``: the weight factor's ``(1,)``, then the parameters'),
    every value in ``[0, mod_range)``."""
    dtype = upload_dtype(mod_range)
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
        if array.shape != tuple(shape):
            return f"masked array {index} has shape {array.shape}, the round sent {tuple(shape)}"
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
