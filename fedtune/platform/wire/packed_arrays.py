"""An adapter's arrays as one flat vector on the wire, with the layout to split it again.

Flower 1.41 sends every ``Array`` of a message as its own object, and a deployed node pulls
(and a node pushes) each object by its own request: SmolLM2's LoRA adapter (r 8 on q and v) is
120 arrays, about 249 objects a message, one HTTPS request each through the gateway at about
33 ms, two at a time: 11-14 s for every message that carries the adapter, while its 1.8 MB
take well under a second. Packed, the same message is a handful of objects (one vector below
Flower's 5 MiB chunk size, and the layout).

A packed :class:`~flwr.app.ArrayRecord` holds exactly two arrays: :data:`VECTOR_KEY`, every
array's values in layout order, and :data:`LAYOUT_KEY`, the JSON of :class:`ArrayLayout` (the
names, shapes and number type) as bytes. Whoever reads one does not trust the sender: the
layout is checked (names, shapes, a number type of the adapter's, sizes that add up to the
vector exactly) before anything is split; a bad one raises :class:`PackedArraysError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from fedtune.common.errors import FedtuneError

VECTOR_KEY = "fedtune-packed-vector"
LAYOUT_KEY = "fedtune-packed-layout"
DTYPES = ("float16", "float32", "float64")  # what an adapter, or its float16 upload, is made of
MAX_ARRAYS = 100_000
MAX_NAME_CHARS = 400
MAX_LAYOUT_BYTES = 16 << 20


class PackedArraysError(FedtuneError, ValueError):
    """A packed vector or layout that does not describe the arrays it claims to."""


@dataclass(frozen=True)
class ArrayLayout:
    """Names and shapes of the arrays, in the order their values lie in the vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: str

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> ArrayLayout:
        """The layout of ``arrays`` (their order kept); they must share one number type."""
        dtypes = sorted({np.asarray(value).dtype.name for value in arrays.values()})
        if len(dtypes) > 1:
            raise PackedArraysError(f"arrays of several number types cannot be packed: {dtypes}")
        return cls._checked(
            tuple(arrays),
            tuple(tuple(int(d) for d in np.shape(value)) for value in arrays.values()),
            dtypes[0] if dtypes else "float32",
        )

    @property
    def size(self) -> int:
        """How many values the vector holds."""
        return sum(math.prod(shape) for shape in self.shapes)

    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """``arrays``' values as one vector in this layout's order."""
        missing = sorted(set(self.names) - set(arrays))
        if missing or len(arrays) != len(self.names):
            extra = sorted(set(arrays) - set(self.names))
            raise PackedArraysError(
                f"arrays differ from the layout: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            value = np.asarray(arrays[name])
            if value.shape != shape:
                raise PackedArraysError(f"{name} has shape {value.shape}, the layout {shape}")
            parts.append(value.reshape(-1))
        if not parts:
            return np.zeros(0, dtype=self.dtype)
        return np.concatenate(parts).astype(self.dtype, copy=False)

    def split(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """The named arrays in ``vector`` (a 1-D vector of exactly :attr:`size` values)."""
        if vector.ndim != 1 or vector.size != self.size:
            raise PackedArraysError(
                f"a vector of shape {vector.shape} for a layout of {self.size} values"
            )
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            end = start + math.prod(shape)
            out[name] = vector[start:end].reshape(shape)
            start = end
        return out

    def to_json(self) -> str:
        entries = [[n, list(s)] for n, s in zip(self.names, self.shapes, strict=True)]
        return json.dumps({"dtype": self.dtype, "arrays": entries})

    @classmethod
    def from_json(cls, text: str | bytes) -> ArrayLayout:
        """A layout another party sent, checked."""
        if len(text) > MAX_LAYOUT_BYTES:
            raise PackedArraysError(f"the layout is {len(text)} bytes, over {MAX_LAYOUT_BYTES}")
        try:
            data = json.loads(text)
            dtype, entries = data["dtype"], data["arrays"]
            names = tuple(entry[0] for entry in entries)
            shapes = tuple(tuple(entry[1]) for entry in entries)
            if any(len(entry) != 2 for entry in entries):
                raise ValueError("an entry is not [name, shape]")
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise PackedArraysError(f"the layout cannot be read ({exc})") from None
        return cls._checked(names, shapes, dtype)

    @classmethod
    def _checked(
        cls, names: Sequence[object], shapes: Sequence[Sequence[object]], dtype: object
    ) -> ArrayLayout:
        if dtype not in DTYPES:
            raise PackedArraysError(f"number type {dtype!r} is not one of {DTYPES}")
        if len(names) > MAX_ARRAYS:
            raise PackedArraysError(f"{len(names)} arrays, over {MAX_ARRAYS}")
        if not all(isinstance(n, str) and 0 < len(n) <= MAX_NAME_CHARS for n in names):
            raise PackedArraysError(f"array names must be text of 1-{MAX_NAME_CHARS} characters")
        if len(set(names)) != len(names):
            raise PackedArraysError("the layout names an array twice")
        for shape in shapes:
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise PackedArraysError(f"shape {list(shape)[:8]} is not a list of sizes")
        return cls(
            tuple(str(n) for n in names),
            tuple(tuple(int(d) for d in s) for s in shapes),  # type: ignore[call-overload]
            str(dtype),
        )


def pack(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``arrays`` as a packed record: two Flower objects below 5 MiB, whatever their number."""
    layout = ArrayLayout.of(arrays)
    encoded = np.frombuffer(layout.to_json().encode(), dtype=np.uint8)
    return ArrayRecord(
        {VECTOR_KEY: Array(layout.flatten(arrays)), LAYOUT_KEY: Array(encoded.copy())}
    )


def is_packed(record: ArrayRecord) -> bool:
    return LAYOUT_KEY in record or VECTOR_KEY in record


def unpack(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The named arrays of a packed record another party sent."""
    if set(record) != {VECTOR_KEY, LAYOUT_KEY}:
        raise PackedArraysError(f"a packed record holds {VECTOR_KEY} and {LAYOUT_KEY} only")
    encoded = record[LAYOUT_KEY].numpy()
    if encoded.dtype != np.uint8 or encoded.ndim != 1:
        raise PackedArraysError("the layout is not a vector of bytes")
    layout = ArrayLayout.from_json(encoded.tobytes())
    vector = record[VECTOR_KEY].numpy()
    if vector.dtype.name != layout.dtype:
        raise PackedArraysError(f"a {vector.dtype} vector for a {layout.dtype} layout")
    return layout.split(vector)
