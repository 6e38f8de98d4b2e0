"""How `fedtune simulate` scales with the number of nodes: round time, peak memory and open
files for 10, 100, 300 and 1,000 simulated nodes with a tiny model.

Each point is a whole simulated run (``fedtune.simulation.simulate``: Flower's Simulation
Engine, one Ray actor with every CPU, nodes in turn) in a child process of this script, which
samples that process tree every ``--sample-s`` seconds with psutil:

- ``coordinator``: the child process itself (the ServerApp, fedtune's strategy and database,
  and Flower's engine threads); its peak RSS, peak open files (``num_fds``) and CPU seconds.
- ``tree``: the child and every process it started (Ray's GCS, raylet and workers; ``simulate``
  adopts orphans, so none escapes): peak of the summed RSS (shared pages count once per
  process: an upper bound), peak summed open files, and the most open files of any one
  process (what a per-process limit such as 1,024 meets).
- round time: each round's seconds as the coordinator records them (train and evaluate
  exchanges; ``Round.seconds``), round 1 apart (it loads the model in the worker); per node.

Every node has its own demo data (``--examples`` training conversations, 8 held out) and state
folder (key, ledger), as a real consortium's would. The model is the tests' tiny one
(``tests/conftest.py``: a 2-layer, 64-wide Llama with a 400-token BPE tokenizer), so that the
nodes' own work is small beside what is measured. Points run in order of
size; one that would not finish within ``--budget-minutes`` (estimated from the last point's
time, scaled linearly in nodes, times 1.5) is recorded as "not measured" with the reason.
``--as-limit BYTES`` runs each point under ``prlimit --as``. Results merge into
``benchmarks/results/scale.json``, keyed by node count (and ``/stock-engine`` for
``--stock-engine``, which keeps Flower's own message poller for comparison).
``--poller-only`` measures one tick of the engine's message poller, Flower's and fedtune's
(``fedtune.platform.runtime.simulation_engine``), for each node count, in this process, into
``poller_tick``::

    .venv/bin/python benchmarks/scale.py --nodes 10 100 --budget-minutes 10
    .venv/bin/python benchmarks/scale.py --nodes 300 1000 --as-limit 16000000000
    .venv/bin/python benchmarks/scale.py --poller-only --nodes 10 100 300 1000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

RESULTS = Path(__file__).parent / "results"
DEFAULT_NODES = (10, 100, 300, 1000)
SAFETY = 1.5  # a point is started only if 1.5x its linear estimate fits the budget

WHAT_IS_MEASURED = {
    "round_seconds": "Round.seconds of each round as the coordinator records it (train and "
    "evaluate exchanges), round 1 including the model's load in the Ray worker",
    "steady_round_seconds": "mean over rounds 2..R; per_node: that over the node count",
    "node_handler_seconds": "per round, the sum of every node's handler time as the nodes "
    "report it (node-seconds: loading its runtime if evicted, DP-SGD, accounting, ledger, "
    "evaluation); the rest of the round is Flower, Ray and the coordinator",
    "run_seconds": "wall time of simulate(), start-up of Ray and shut-down included",
    "coordinator": "the process running simulate() (ServerApp, strategy, database, Flower's "
    "engine threads): peak RSS (MiB), peak open file descriptors, CPU seconds (user+system)",
    "tree": "that process and all its descendants (Ray GCS, raylet, workers): peak summed RSS "
    "(MiB; shared pages counted per process, an upper bound), peak summed open file "
    "descriptors, and the most any one process held",
}


def write_run(folder: Path, *, model: str, nodes: int, rounds: int, examples: int) -> Path:
    from fedtune.demo.data import write_demo_data

    entries = []
    for index in range(nodes):
        domain = ("hospital", "bank")[index % 2]
        train, held_out = write_demo_data(
            folder / "data" / f"node-{index}", domain=domain, train=examples, held_out=8, seed=index
        )
        entries.append(
            f'[[nodes]]\nname = "node-{index}"\ntrain = "{train}"\neval = "{held_out}"\n'
        )
    run = folder / "run.toml"
    run.write_text(
        f'[run]\nname = "scale-{nodes}"\nrounds = {rounds}\n\n'
        f'[model]\nspec = "{model}"\n\n'
        "[data]\nmax_length = 160\nmax_eval_examples = 8\n\n"
        "[training]\nsteps = 1\nbatch_size = 8\nphysical_batch_size = 8\n"
        "torch_threads = 1\nseed = 0\n\n"
        '[privacy]\nmode = "dp"\ntarget_epsilon = 8.0\ndelta = 1e-5\n\n'
        + "\n".join(entries)
        + '\n[output]\ndir = "out"\n'
    )
    return run


def run_point(run_toml: Path, out: Path, *, stock_engine: bool) -> None:
    """In the child: one simulated run; its round times to ``out``."""
    from sqlalchemy import select

    from fedtune.common.database import transaction
    from fedtune.platform.config import load_run_config
    from fedtune.platform.db.storage import NodeMetric, Round, open_database
    from fedtune.platform.runtime import simulation_engine

    if stock_engine:  # keep Flower's poller: simulate() installs fedtune's, make that a no-op
        simulation_engine.install = lambda: None
    from fedtune.simulation import simulate

    config = load_run_config(run_toml)
    started = time.perf_counter()
    run_id = simulate(config, progress=lambda line: None)
    run_seconds = time.perf_counter() - started
    with transaction(open_database(config.database_url)) as session:
        rounds = session.scalars(select(Round).where(Round.run_id == run_id)).all()
        metrics = session.scalars(select(NodeMetric).where(NodeMetric.run_id == run_id)).all()
        on_nodes: dict[int, float] = {}
        for row in metrics:  # each handler's own seconds, train and evaluate
            handler = row.metrics.get("node-seconds") if isinstance(row.metrics, dict) else None
            if isinstance(handler, (int, float)):
                on_nodes[row.round] = on_nodes.get(row.round, 0.0) + float(handler)
        result = {
            "run_seconds": run_seconds,
            "rounds": [
                {
                    "round": r.number,
                    "seconds": r.seconds,
                    "node_handler_seconds": on_nodes.get(r.number),
                    "nodes_sampled": r.nodes_sampled,
                    "updates_accepted": r.updates_accepted,
                }
                for r in sorted(rounds, key=lambda r: r.number)
            ],
        }
    out.write_text(json.dumps(result, indent=2) + "\n")


class Sampler:
    """Peaks of a process tree's memory and open files."""

    def __init__(self, root: psutil.Process):
        self.root = root
        self.peak: dict[str, float] = {
            "coordinator_rss_mib": 0.0,
            "coordinator_open_files": 0,
            "tree_rss_mib": 0.0,
            "tree_open_files": 0,
            "max_open_files_one_process": 0,
            "tree_processes": 0,
        }
        self.coordinator_cpu_s = 0.0

    def sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss = fds = most = 0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                memory = process.memory_info().rss
                files = process.num_fds()
                rss += memory
                fds += files
                most = max(most, files)
                if process.pid == self.root.pid:
                    self._peak("coordinator_rss_mib", memory / 2**20)
                    self._peak("coordinator_open_files", files)
                    times = process.cpu_times()
                    self.coordinator_cpu_s = times.user + times.system
        self._peak("tree_rss_mib", rss / 2**20)
        self._peak("tree_open_files", fds)
        self._peak("max_open_files_one_process", most)
        self._peak("tree_processes", len(processes))

    def _peak(self, key: str, value: float) -> None:
        self.peak[key] = max(self.peak[key], value)


def measure(nodes: int, args: argparse.Namespace, model: str, scratch: Path) -> dict[str, Any]:
    folder = scratch / f"nodes-{nodes}"
    folder.mkdir(parents=True)
    clock = time.perf_counter()
    run_toml = write_run(
        folder, model=model, nodes=nodes, rounds=args.rounds, examples=args.examples
    )
    setup_s = time.perf_counter() - clock
    out = folder / "point.json"
    command = [sys.executable, __file__, "--point", str(run_toml), "--point-out", str(out)]
    if args.stock_engine:
        command.append("--stock-engine")
    if args.as_limit:
        command = ["prlimit", f"--as={args.as_limit}", "--", *command]
    log = (folder / "point.log").open("wb")
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(child.pid)  # prlimit execs the command: the same process
    sampler = Sampler(root)
    deadline = time.monotonic() + args.point_timeout
    while child.poll() is None:
        sampler.sample()
        if time.monotonic() > deadline:
            child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(30)
            child.kill()
            break
        time.sleep(args.sample_s)
    log.close()
    if child.returncode != 0 or not out.exists():
        tail = (folder / "point.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{nodes} nodes: the run failed (exit {child.returncode}): {tail}")
    result = json.loads(out.read_text())
    steady = [r["seconds"] for r in result["rounds"] if r["round"] > 1 and r["seconds"]]
    mean = sum(steady) / len(steady) if steady else None
    return {
        "nodes": nodes,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine_poller": "flower" if args.stock_engine else "fedtune",
        "data_setup_seconds": setup_s,
        **result,
        "steady_round_seconds": mean,
        "steady_round_seconds_per_node": mean / nodes if mean else None,
        "coordinator": {
            "peak_rss_mib": sampler.peak["coordinator_rss_mib"],
            "peak_open_files": sampler.peak["coordinator_open_files"],
            "cpu_seconds": sampler.coordinator_cpu_s,
        },
        "tree": {
            "peak_rss_mib": sampler.peak["tree_rss_mib"],
            "peak_open_files": sampler.peak["tree_open_files"],
            "max_open_files_one_process": sampler.peak["max_open_files_one_process"],
            "peak_processes": sampler.peak["tree_processes"],
        },
    }


def poller_ticks(nodes: int, repeat: int = 3) -> dict[str, float]:
    """Seconds of one tick of the Simulation Engine's message poller, Flower's and fedtune's,
    in the middle of a round: ``nodes`` nodes, one delivered message each still stored (as while
    the nodes work), on Flower's in-memory link state set up as ``run_simulation`` does. The
    engine waits 0.1 s after each tick: busy_share is the poller thread's share of its time
    (it runs in the coordinator's process, sharing the GIL with the ServerApp)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    from fedtune.platform.runtime import simulation_engine

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    run = Run.create_empty(run_id=1)
    run.primary_task_id, run.federation_id = 1, NOOP_FEDERATION_ID
    state.run_ids[1] = RunRecord(run=run)  # type: ignore[attr-defined]
    state.task_store[1] = Task(task_id=1, run_id=1)  # type: ignore[attr-defined]
    mapping = vce_api._register_nodes(nodes, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    grid.push_messages(
        [Message(RecordDict({"c": ConfigRecord({"i": 0})}), node, "train") for node in mapping]
    )
    # every message delivered, still stored (as while the nodes work)
    simulation_engine.take_undelivered(state, frozenset(mapping))  # type: ignore[arg-type]

    def flower_tick() -> None:  # the body of vce_api.add_messages_to_queue's loop
        for node_id in mapping:
            state.get_message_ins(node_id=node_id, limit=1)

    def fedtune_tick() -> None:
        simulation_engine.take_undelivered(state, frozenset(mapping))  # type: ignore[arg-type]

    timings = {}
    for name, tick in (("flower", flower_tick), ("fedtune", fedtune_tick)):
        best = float("inf")
        for _ in range(repeat):
            clock = time.perf_counter()
            tick()
            best = min(best, time.perf_counter() - clock)
        timings[f"{name}_tick_seconds"] = best
        timings[f"{name}_busy_share"] = best / (best + 0.1)  # a tick, then a 0.1 s wait
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=list(DEFAULT_NODES))
    parser.add_argument("--rounds", type=int, default=2, help="round 1 is reported apart")
    parser.add_argument("--examples", type=int, default=64, help="training examples per node")
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    parser.add_argument("--point-timeout", type=float, default=3600.0, help="seconds per point")
    parser.add_argument("--sample-s", type=float, default=0.5)
    parser.add_argument("--as-limit", type=int, help="run each point under prlimit --as=BYTES")
    parser.add_argument("--stock-engine", action="store_true",
                        help="keep Flower's own message poller (for comparison)")  # fmt: skip
    parser.add_argument(
        "--poller-only", action="store_true",
        help="measure only one tick of the engine's message poller (Flower's and fedtune's) "
        "for each --nodes, in this process",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--point", type=Path, help=argparse.SUPPRESS)  # the child's run.toml
    parser.add_argument("--point-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point is not None:
        run_point(args.point, args.point_out, stock_engine=args.stock_engine)
        return
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 loads the model)")
    if args.poller_only:
        report = json.loads(args.out.read_text()) if args.out.exists() else {}
        ticks = report.setdefault("poller_tick", {})
        ticks["what"] = poller_ticks.__doc__.split("\n\n")[0].replace("\n", " ")  # type: ignore[union-attr]
        for nodes in sorted(args.nodes):
            ticks[f"{nodes}-nodes"] = poller_ticks(nodes)
            print(f"{nodes} nodes: {ticks[f'{nodes}-nodes']}", flush=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        return

    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    from conftest import build_tiny_model, build_tiny_tokenizer  # the tests' tiny model

    def tiny_model(folder: Path) -> str:
        tokenizer = build_tiny_tokenizer()
        build_tiny_model(len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return str(folder)

    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report.update(benchmark="scale", what_is_measured=WHAT_IS_MEASURED)
    points: dict[str, Any] = report.setdefault("points", {})
    invocation: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_average_at_start": list(os.getloadavg()),
        },
        "settings": {
            "rounds": args.rounds,
            "examples": args.examples,
            "as_limit": args.as_limit,
            "budget_minutes": args.budget_minutes,
        },
        "not_measured": [],
    }
    started = time.monotonic()
    last: tuple[int, float] | None = None  # (nodes, seconds) of the last point
    suffix = "/stock-engine" if args.stock_engine else ""
    scratch = Path(tempfile.mkdtemp(prefix="fedtune-scale-"))
    try:
        model = tiny_model(scratch / "tiny")
        for nodes in sorted(args.nodes):
            left = args.budget_minutes * 60 - (time.monotonic() - started)
            estimate = last[1] * nodes / last[0] * SAFETY if last else 0.0
            key = f"{nodes}-nodes{suffix}"
            if estimate > left:
                reason = (
                    f"not measured: estimated {estimate / 60:.1f} min (last point scaled "
                    f"linearly, x{SAFETY}), {left / 60:.1f} min of the budget left"
                )
                invocation["not_measured"].append({"nodes": nodes, "reason": reason})
                print(f"{key}: {reason}", flush=True)
                continue
            clock = time.monotonic()
            try:
                point = measure(nodes, args, model, scratch)
            except RuntimeError as exc:
                invocation["not_measured"].append({"nodes": nodes, "reason": f"failed: {exc}"})
                print(f"{key}: failed: {exc}", flush=True)
                break
            last = (nodes, time.monotonic() - clock)
            point["invocation"] = invocation["when"]
            points[key] = point
            print(
                f"{key}: steady round {point['steady_round_seconds']:.2f} s "
                f"({1000 * point['steady_round_seconds_per_node']:.1f} ms/node), run "
                f"{point['run_seconds']:.0f} s, coordinator "
                f"{point['coordinator']['peak_rss_mib']:.0f} MiB / "
                f"{point['coordinator']['peak_open_files']} files, tree "
                f"{point['tree']['peak_rss_mib']:.0f} MiB / most files in one process "
                f"{point['tree']['max_open_files_one_process']}",
                flush=True,
            )
            _write(args.out, report, invocation)
    finally:
        invocation["machine"]["load_average_at_end"] = list(os.getloadavg())
        invocation["wall_minutes"] = (time.monotonic() - started) / 60
        _write(args.out, report, invocation)
        shutil.rmtree(scratch, ignore_errors=True)


def _write(path: Path, report: dict[str, Any], invocation: dict[str, Any]) -> None:
    invocations = [i for i in report.get("invocations", []) if i["when"] != invocation["when"]]
    report["invocations"] = [*invocations, invocation]
    measured = {p["nodes"] for k, p in report["points"].items() if "/" not in k}
    report["not_measured"] = [
        {"nodes": nodes, "status": "not measured"}
        for nodes in DEFAULT_NODES
        if nodes not in measured
    ]
    report["table"] = [
        {
            "nodes": p["nodes"],
            "engine_poller": p["engine_poller"],
            "steady_round_s": p["steady_round_seconds"],
            "ms_per_node": None
            if p["steady_round_seconds_per_node"] is None
            else 1000 * p["steady_round_seconds_per_node"],
            "first_round_s": p["rounds"][0]["seconds"] if p["rounds"] else None,
            "run_s": p["run_seconds"],
            "coordinator_peak_rss_mib": p["coordinator"]["peak_rss_mib"],
            "coordinator_peak_open_files": p["coordinator"]["peak_open_files"],
            "coordinator_cpu_s": p["coordinator"]["cpu_seconds"],
            "tree_peak_rss_mib": p["tree"]["peak_rss_mib"],
            "tree_max_open_files_one_process": p["tree"]["max_open_files_one_process"],
        }
        for _, p in sorted(report["points"].items(), key=lambda kv: (kv[1]["nodes"], kv[0]))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
