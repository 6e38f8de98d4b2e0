"""Time an auditor's offline verification of a large epsilon ledger file.

Seals a ledger of ``--entries`` DP rounds (default 100,000) with a fresh Ed25519 key,
exports it with its signed checkpoint, then times ``verify_ledger_file`` on it: reading and
checking every line, hashing the chain and verifying every signature (in parallel processes
above ``PARALLEL_THRESHOLD`` entries), and the signed head. Also times reading alone and,
unless ``--no-sequential``, verification in this process only. Writes
``benchmarks/results/ledger_verify.json``.

    .venv/bin/python benchmarks/ledger_verify.py --entries 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import cryptography

from fedtune.privacy.ledger import PARALLEL_THRESHOLD, LedgerEntry, seal_entry, sign_checkpoint
from fedtune.privacy.ledger_file import read_ledger_file, verify_ledger_file, write_ledger_file
from fedtune.privacy.signing import NodeKey

RESULTS = Path(__file__).parent / "results"
P = ParamSpec("P")
T = TypeVar("T")


def seal_ledger(key: NodeKey, count: int, *, node: str) -> list[LedgerEntry]:
    """``count`` DP rounds of 10 runs on 3 data sets, epsilon growing as a node's would."""
    entries: list[LedgerEntry] = []
    spent = [0.0, 0.0, 0.0]
    previous = None
    for index in range(count):
        data_set = index % 3
        spent[data_set] += 0.001
        fields = {
            "node": node,
            "run_id": f"run-{index * 10 // count}",
            "round": index // 30 + 1,
            "base_model_fingerprint": "sha256:" + "b" * 64,
            "data_fingerprint": f"sha256:{data_set}" + "d" * 63,
            "mode": "dp",
            "steps": 50,
            "sample_rate": 0.0123,
            "noise_multiplier": 1.0734,
            "max_grad_norm": 1.0,
            "delta": 1e-5,
            "epsilon_round": 0.001,
            "epsilon_after": spent[data_set],
            "epsilon_cap": 200.0,
            "accountant": "rdp",
            "accountant_version": "opacus-1.6.0",
            "kind": "training_round",
            "method": "dp-sgd",
            "privacy_unit": "example",
        }
        previous = seal_entry(fields, previous=previous, key=key)
        entries.append(previous)
        if (index + 1) % 20_000 == 0:
            print(f"sealed {index + 1} entries", flush=True)
    return entries


def timed(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> tuple[T, float]:
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=None, help="default: all usable CPUs")
    parser.add_argument("--no-sequential", action="store_true", help="skip the 1-process run")
    parser.add_argument("--out", type=Path, default=RESULTS / "ledger_verify.json")
    args = parser.parse_args()

    node = "hospital-a"
    key = NodeKey.generate()
    entries, seal_seconds = timed(seal_ledger, key, args.entries, node=node)
    checkpoint = sign_checkpoint(node=node, head=entries[-1], key=key)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ledger.jsonl"
        _, write_seconds = timed(
            write_ledger_file,
            path,
            node=node,
            public_key=key.public_key,
            entries=entries,
            checkpoint=checkpoint,
        )
        del entries
        file_mib = path.stat().st_size / 2**20
        _, read_seconds = timed(read_ledger_file, path)
        print(f"read {args.entries} entries in {read_seconds:.2f}s", flush=True)
        result, seconds = timed(
            verify_ledger_file, path, public_key=key.public_key, workers=args.workers
        )
        if not result.ok:
            raise SystemExit(f"the benchmark ledger did not verify: {result.problem}")
        print(f"verified {args.entries} entries in {seconds:.2f}s", flush=True)
        sequential_seconds = None
        if not args.no_sequential:
            sequential, sequential_seconds = timed(
                verify_ledger_file, path, public_key=key.public_key, workers=1
            )
            assert sequential.ok
            print(f"verified in one process in {sequential_seconds:.2f}s", flush=True)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report = {
        "benchmark": "ledger_verify",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cryptography": cryptography.__version__,
            "cpus": cpus,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parallel_threshold": PARALLEL_THRESHOLD,
        "entries": args.entries,
        "file_mib": file_mib,
        "seconds": seconds,
        "entries_per_second": args.entries / seconds,
        "read_seconds": read_seconds,
        "sequential_seconds": sequential_seconds,
        "seal_seconds": seal_seconds,
        "write_seconds": write_seconds,
        "target_seconds": 60.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
