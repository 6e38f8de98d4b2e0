"""The number type of a plain (not secure) round's update on the wire: float32, or float16 for
half the upload.

A node rounds each float32 value of its update to the nearest float16 (relative error at most
2**-11; LoRA updates are far inside float16's range, and a value beyond it becomes infinite,
which the coordinator refuses as non-finite). The coordinator widens the arrays back to
float32 before it checks and averages them, so the mean is taken in float32 over the rounded
values: its error against the exact mean is at most ``2**-11`` times the largest absolute
value in any update plus ``2**-25`` (float16's subnormal spacing near 0), plus float32's own
rounding (``benchmarks/secagg_overhead.py
--plain-upload float16`` measures it). Secure rounds keep their own encoding (SecAgg+ quantises
and masks the float32 values).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

UPLOAD_DTYPES = ("float32", "float16")
FLOAT16_RELATIVE_ERROR = 2.0**-11  # half the spacing of float16 values near 1 (unit roundoff)
FLOAT16_ABSOLUTE_ERROR = 2.0**-25  # below 2**-14 float16 is subnormal: spacing 2**-24


def narrowed(arrays: Mapping[str, np.ndarray], upload_dtype: str) -> dict[str, np.ndarray]:
    """``arrays`` as a node sends them: float32 arrays cast to ``upload_dtype``."""
    if upload_dtype not in UPLOAD_DTYPES:
        raise ValueError(f"upload dtype {upload_dtype!r} is not one of {UPLOAD_DTYPES}")
    target = np.dtype(upload_dtype)
    return {
        name: value.astype(target) if value.dtype == np.float32 else value
        for name, value in arrays.items()
    }


def widened(record: ArrayRecord) -> ArrayRecord:
    """A float16 upload's arrays back in float32 (others unchanged), for the coordinator's
    checks and mean."""
    out = ArrayRecord()
    for name, array in record.items():
        value = array.numpy()
        out[name] = Array(value.astype(np.float32) if value.dtype == np.float16 else value)
    return out
