"""Time SecAgg+ mask generation: Flower's stock generator against fedtune's (chacha20-v1).

Both are called as Flower calls them, ``pseudo_rand_gen(seed, num_range, shapes)``, with a
fresh 44-byte seed each call (the base64url text of a 32-byte key, as Flower's pairwise
seeds are). A node builds one self mask and one pairwise mask per peer of its update's size;
the coordinator rebuilds one self mask per surviving node and, per dropped node, one pairwise
mask per neighbour: mask time per round is about (masks built) x (values) x (time per value).

Cases: Flower's default modulus 2**32 on one array of 1M and 8M values and on the shapes of
fedtune's default LoRA adapter (SmolLM2-135M, r=8 on q_proj and v_proj: 460,800 values in
121 arrays, Flower's weight factor included); and a modulus of 3 * 2**30, where a quarter of
chacha20-v1's 32-bit words are rejected (its worst case below 2**32). Calls alternate between
the generators so that machine noise hits both alike; the result is the median over
``--repeats`` calls, in milliseconds per million values. Writes
``benchmarks/results/secagg_masks.json``::

    .venv/bin/python benchmarks/secagg_masks.py --repeats 9
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cryptography
import flwr
import numpy as np

from fedtune.platform.wire import secagg_masks

RESULTS = Path(__file__).parent / "results"
Generator = Callable[[bytes, int, list[tuple[int, ...]]], list[np.ndarray]]
GENERATORS: dict[str, Generator] = {
    "flower-stock": secagg_masks.STOCK_GENERATOR,
    secagg_masks.GENERATOR_NAME: secagg_masks.pseudo_rand_gen,
}


def adapter_shapes(*, layers: int = 30, hidden: int = 576, kv: int = 192, rank: int = 8):
    """The arrays a node masks for SmolLM2-135M's LoRA on q_proj and v_proj (plus the factor)."""
    shapes: list[tuple[int, ...]] = [(1,)]
    for _ in range(layers):
        shapes += [(rank, hidden), (hidden, rank), (rank, hidden), (kv, rank)]
    return shapes


CASES: list[tuple[str, int, list[tuple[int, ...]]]] = [
    ("1M values, modulus 2**32", 2**32, [(1_000_000,)]),
    ("8M values, modulus 2**32", 2**32, [(8_000_000,)]),
    ("LoRA adapter (460,801 values, 121 arrays), modulus 2**32", 2**32, adapter_shapes()),
    ("1M values, modulus 3 * 2**30 (chacha20-v1 rejects 1 word in 4)", 3 * 2**30, [(1_000_000,)]),
]


def time_case(num_range: int, shapes: list[tuple[int, ...]], repeats: int) -> dict[str, Any]:
    values = sum(int(np.prod(shape)) for shape in shapes)
    seconds: dict[str, list[float]] = {name: [] for name in GENERATORS}
    for _ in range(repeats):
        for name, generate in GENERATORS.items():
            seed = base64.urlsafe_b64encode(os.urandom(32))
            started = time.perf_counter()
            masks = generate(seed, num_range, shapes)
            seconds[name].append(time.perf_counter() - started)
            assert sum(mask.size for mask in masks) == values
    per_million = {
        name: 1e3 * statistics.median(times) * 1e6 / values for name, times in seconds.items()
    }
    return {
        "values": values,
        "num_range": num_range,
        "arrays": len(shapes),
        "ms_per_million_values": per_million,
        "new_over_stock": per_million[secagg_masks.GENERATOR_NAME] / per_million["flower-stock"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS / "secagg_masks.json")
    args = parser.parse_args()

    started = time.perf_counter()
    cases = {}
    for label, num_range, shapes in CASES:
        cases[label] = time_case(num_range, shapes, args.repeats)
        ms = cases[label]["ms_per_million_values"]
        print(f"{label}: " + ", ".join(f"{k} {v:.1f} ms/M" for k, v in ms.items()), flush=True)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report = {
        "benchmark": "secagg_masks",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cryptography": cryptography.__version__,
            "flwr": flwr.__version__,
            "cpus": cpus,
            "load_average_1_5_15_min": os.getloadavg(),
            "note": "2-core CPU machine shared with other engineers' work",
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "what_is_measured": "wall time of one pseudo_rand_gen(seed, num_range, shapes) call "
        "(fresh 44-byte seed each call, calls alternating between generators), median over "
        "the repeats, per million mask values; 'seconds' lists every call",
        "generators": {
            "flower-stock": "flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen: "
            "XOR-folded 32-bit seed, numpy RandomState (MT19937), randint(0, num_range - 1)",
            secagg_masks.GENERATOR_NAME: "fedtune.platform.wire.secagg_masks.pseudo_rand_gen: "
            "SHA-256(label, range, shapes, whole seed) -> ChaCha20 keystream, exact rejection "
            "sampling",
        },
        "cases": cases,
        "total_seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "cases"}, indent=2))


if __name__ == "__main__":
    main()
