"""What Flower's SecAgg+ costs against plain FedAvg in a real deployment: round time and bytes
sent per node.

Each node count gets a fresh deployment on 127.0.0.1, built the way fedtune's coordinator is
(``fedtune.coordinator.superlink``): a private CA and server certificate
(``fedtune.platform.security.tls.init_certificates``), a SuperLink with TLS and SuperNode
authentication on 127.0.0.1 (``superlink_command``, with Flower's own SuperExec given the
options of fedtune's ``superexec_command``: fedtune's runs only fedtune's pinned ServerApp; the
nodes connect to it directly, not through the gateway; by default
without its ``--database``, see
``--superlink-state``: on this loaded machine the SQLite state answered a node's object push
and the SuperLink's executor with "database is locked", stalling a round for minutes and
ending the executor, after which no run started), one ECDSA key per node
(``fedtune.platform.security.node_auth.generate_node_auth_key``) registered with
``flwr supernode register``, and one ``flower-supernode`` process per node (TLS,
``--auth-supernode-private-key``, ``--node-config index=I``). The nodes run the small Flower
app in ``benchmarks/secagg_app`` instead of fedtune's trainer, so that nothing but aggregation
is measured: each node's update is a synthetic float32 vector of the given size
(deterministic per node and round, ``num_examples = 100 + node index``).

For every (node count, update size) the app runs once with Flower's default fit workflow
(plain FedAvg) and once with ``SecAggPlusWorkflow(num_shares=1.0,
reconstruction_threshold=0.6, max_weight=<largest num_examples>)``, ``--rounds`` rounds each.
Measured, per round:

- round time: the ServerApp's wall time of the fit round, from sampling the nodes to the new
  global vector (no evaluation). Round 1 includes installing the app on the nodes and is
  reported apart; the result is the median of rounds 2..R.
- bytes: every message's content between the ServerApp and each node, serialised as Flower's
  RecordDict protobuf (``recorddict_to_proto(...).SerializeToString()``), summed per node
  over the round's exchanges (one for plain FedAvg, four SecAgg+ stages). This is the
  application layer: Flower's message envelope, its object chunking, HTTP/2 and TLS framing
  are not counted. The time spent sizing messages is subtracted from the round time.
- correctness: the largest absolute difference between the aggregate and the weighted mean of
  the nodes' updates recomputed in float64.
- where SecAgg+'s time goes: per stage, the ServerApp's time in the message exchange and its
  own computation (summing masked vectors, unmasking, FedAvg over the result); on the nodes
  (from a JSON line each ClientApp writes per message) the time from the ClientApp process's
  start to its handler (Flower starts one process per message), the handler's time (key
  generation, key shares, masking plus producing the update, share reveal) and the update's
  generation alone. What is left of an exchange is waiting: the SuperNode asks the SuperLink
  for work every 3 s when idle and the ServerApp asks for replies every 3 s (Flower 1.41).

Masked upload (``--masked-upload``): ``packed`` (default) re-encodes each node's masked vectors
as fedtune's node does (``fedtune.platform.wire.masked_upload``: uint32 for Flower's modulus
2**32) and checks them on the ServerApp as fedtune's coordinator does
(``fedtune.coordinator.masked_vectors``); ``int64`` is Flower's own upload, with which the cells
without the ``/packed-upload`` suffix were measured. ``masked_upload_before_after`` lists the
cells measured both ways.

Everything runs on this machine at once (SuperLink, ServerApp, N SuperNodes and their
ClientApp processes); ``machine`` in the result gives the CPU count and load averages, which
include whatever else ran meanwhile. Cells run in order of cost; when ``--budget-minutes``
would be exceeded, the remaining cells are skipped and listed with the reason. Results merge
into ``benchmarks/results/secagg_overhead.json``, keyed by node count and update size::

    .venv/bin/python benchmarks/secagg_overhead.py                      # the full grid
    .venv/bin/python benchmarks/secagg_overhead.py --nodes 4 --values 2M --rounds 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flwr as flower
import numpy as np
import psutil

from fedtune.coordinator.superlink import (
    CONNECTION,
    flower_environment,
    flwr,
    prepare,
    superexec_command,
    superlink_command,
)
from fedtune.platform.config import CoordinatorConfig, CoordinatorSettings, TlsSettings
from fedtune.platform.runtime.flower_tools import tool_path_environment
from fedtune.platform.security.node_auth import generate_node_auth_key
from fedtune.platform.security.tls import init_certificates
from fedtune.platform.wire.pinned_apps import ensure_secret
from fedtune.platform.wire.plain_upload import FLOAT16_ABSOLUTE_ERROR, FLOAT16_RELATIVE_ERROR

RESULTS = Path(__file__).parent / "results"
RUNTIMES = ("subprocess", "worker", "worker-prompt")
APP = Path(__file__).parent / "secagg_app"
TARGET_RATIO = 1.5  # SecAgg+ round time / plain round time (issue "Secure aggregation")
MODES = ("plain", "secagg+")
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
DEFAULT_NODES = (2, 4, 8)
DEFAULT_VALUES = ("0.5M", "2M", "8M")

WHAT_IS_MEASURED = {
    "round_seconds": "ServerApp wall time of one fit round (sampling to new global vector), "
    "message sizing subtracted; median of rounds 2..R (round 1 installs the app on the nodes)",
    "sent_bytes_per_node": "application-layer bytes a node sends in one round: each reply's "
    "RecordDict serialised with flwr.common.serde.recorddict_to_proto(...).SerializeToString(), "
    "summed over the round's exchanges (SecAgg+: all four stages); mean over nodes, median over "
    "rounds 2..R. Flower's message envelope, object chunking, HTTP/2 and TLS are not counted",
    "received_bytes_per_node": "the same for the messages the ServerApp sends to a node",
    "max_abs_error": "max |aggregate - weighted mean of the updates (float64)| over all rounds",
    "breakdown": "medians over rounds 2..R, seconds. server_exchange: ServerApp waiting in "
    "grid.send_and_receive; server_compute: the ServerApp's own work in the stage; "
    "node_process_start: from the ClientApp process's start to its handler (max over nodes); "
    "node_handler: the handler (max over nodes); waiting: exchange minus the slowest node's "
    "process start and handler (polling intervals, transport, SuperNode bookkeeping)",
}


def parse_values(text: str) -> int:
    """'0.5M' -> 500000, '2k' -> 2000, '1000' -> 1000."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    number = text[:-1] if scale != 1 else text
    value = float(number) * scale
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of values")
    return int(value)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def stop_processes(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process and everything it started (also what left its tree but kept its
    session), SIGKILL what is left after 15 s."""
    for process in processes:
        targets = {p.pid: p for p in process_tree(process.pid)}
        for candidate in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if os.getsid(candidate.pid) == process.pid:  # started with start_new_session
                    targets.setdefault(candidate.pid, candidate)
        for target in targets.values():
            with contextlib.suppress(psutil.Error):
                target.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(list(targets.values()), timeout=15)
        for target in alive:
            with contextlib.suppress(psutil.Error):
                target.kill()
        psutil.wait_procs(alive, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


class Federation:
    """A SuperLink and ``nodes`` SuperNodes on 127.0.0.1 under ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        nodes: int,
        *,
        progress: Callable[[str], None],
        superlink_state: str = "memory",
        runtime: str = "subprocess",
    ):
        self.runtime = runtime
        self.workdir = workdir
        self.nodes = nodes
        self.superlink_state = superlink_state
        self.progress = progress
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.superlink: subprocess.Popen[bytes] | None = None
        self.superexec: subprocess.Popen[bytes] | None = None
        self.supernodes: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.config: CoordinatorConfig | None = None

    def __enter__(self) -> Federation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 120) -> None:
        certs = init_certificates(self.workdir / "certs")
        self.config = config = CoordinatorConfig(
            coordinator=CoordinatorSettings(
                state_dir=self.workdir / "coordinator",
                host="127.0.0.1",
                port=free_port(),
                superlink_port=free_port(),
            ),
            tls=TlsSettings(
                ca_certificate=certs.ca_cert,
                certificate=certs.server_cert,
                private_key=certs.server_key,
            ),
        )
        prepare(config)
        command = superlink_command(config)
        if self.superlink_state == "memory":  # drop `--database PATH`: Flower keeps it in memory
            at = command.index("--database")
            del command[at : at + 2]
        with (self.logs / "superlink.log").open("ab") as log:
            self.superlink = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**flower_environment(config), "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(
                    ("127.0.0.1", config.coordinator.superlink_port), 1
                ).close()
                break
            except OSError:
                if self.superlink.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the SuperLink did not start; see {self.logs}") from None
                time.sleep(0.3)
        # Flower's own SuperExec, with the options of fedtune's: fedtune's runs only fedtune's
        # pinned ServerApp and refuses this benchmark's (fedtune.platform.wire.pinned_apps).
        command = superexec_command(config, superlink_pid=self.superlink.pid)
        command[:3] = [str(Path(sys.executable).parent / "flower-superexec")]
        with (self.logs / "superexec.log").open("ab") as log:  # starts the ServerApps
            self.superexec = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**flower_environment(config), "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        for index in range(self.nodes):
            folder = self.workdir / "nodes" / f"node-{index}"
            keys = generate_node_auth_key(folder)
            flwr(config, "supernode", "register", str(keys.public_key), CONNECTION,
                 "--name", f"node-{index}")  # fmt: skip
            port = free_port()
            supernode = (
                # fedtune's node: Flower's SuperNode with short waits and heartbeat
                [sys.executable, "-m", "fedtune.platform.runtime.supernode_entry"]
                if self.runtime == "worker-prompt"
                else [str(Path(sys.executable).parent / "flower-supernode")]
            )
            command = [
                *supernode,
                "--root-certificates", str(config.tls.ca_certificate),
                "--superlink", config.superlink_address,  # straight to it: no gateway here
                "--auth-supernode-private-key", str(keys.private_key),
                "--node-config", f"index={index}",
                "--host", "127.0.0.1",
                "--port", str(port),
            ]  # fmt: skip
            secret = folder / "superexec.secret"
            if self.runtime != "subprocess":  # tasks go to a long-lived worker, as on fedtune's
                ensure_secret(secret)
                command += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
            environment = {
                **tool_path_environment(),  # the SuperNode starts flower-superexec by name
                "FLWR_HOME": str(folder / "flwr"),
                "PYTHONUNBUFFERED": "1",
            }
            with (self.logs / f"node-{index}.log").open("ab") as log:
                self.supernodes.append(
                    subprocess.Popen(
                        command,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=environment,
                        start_new_session=True,
                    )
                )
            if self.runtime != "subprocess":
                poll_s = "0.1" if self.runtime == "worker-prompt" else "0.5"
                with (self.logs / f"worker-{index}.log").open("ab") as log:
                    self.workers.append(
                        subprocess.Popen(
                            [
                                sys.executable,
                                str(APP / "worker.py"),
                                f"127.0.0.1:{port}",
                                str(secret),
                                poll_s,
                            ],
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True,
                        )
                    )
        self.wait_for_nodes(deadline)
        self.progress(f"{self.nodes} nodes online at {config.superlink_address}")

    def wait_for_nodes(self, deadline: float) -> None:
        assert self.config is not None
        while True:
            listed = json.loads(
                flwr(self.config, "supernode", "list", CONNECTION, "--format", "json")
            )
            online = [n for n in listed.get("nodes", []) if n.get("status") == "online"]
            if len(online) >= self.nodes:
                return
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(online)} of {self.nodes} nodes online; see {self.logs}")
            time.sleep(1.0)

    def check_alive(self) -> None:
        if self.superlink is not None and self.superlink.poll() is not None:
            raise RuntimeError(f"the SuperLink exited; see {self.logs / 'superlink.log'}")
        if self.superexec is not None and self.superexec.poll() is not None:
            # Seen with --database under load: "database is locked" answers the executor's
            # acquire-task with HTTP 500, it exits, and no later run's ServerApp ever starts.
            raise RuntimeError(f"the SuperExec exited; see {self.logs / 'superexec.log'}")
        for index, node in enumerate(self.supernodes):
            if node.poll() is not None:
                raise RuntimeError(f"SuperNode {index} exited; see {self.logs}")
        for index, worker in enumerate(self.workers):
            if worker.poll() is not None:
                raise RuntimeError(f"ClientApp worker {index} exited; see {self.logs}")

    def listening(self) -> list[str]:
        """Every address a process of this federation listens on."""
        found = set()
        for root in [self.superlink, self.superexec, *self.supernodes, *self.workers]:
            if root is None:
                continue
            for process in process_tree(root.pid):
                with contextlib.suppress(psutil.Error):
                    for conn in process.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            found.add(f"{conn.laddr.ip}:{conn.laddr.port}")
        return sorted(found)

    def run_app(
        self,
        name: str,
        *,
        mode: str,
        values: int,
        rounds: int,
        seed: int,
        timeout_s: float,
        server_poll_s: float = 0.0,
        masked_upload: str = "packed",
        plain_upload: str = "float32",
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Submit one run of the benchmark app; its server report and the nodes' log lines."""
        assert self.config is not None
        results = self.workdir / "results" / f"{name}.json"
        node_logs = self.workdir / "node-logs" / name
        run_config = (
            f"mode={json.dumps(mode)} values={values} num-nodes={self.nodes} rounds={rounds} "
            f"seed={seed} timeout={timeout_s:.1f} server-poll={server_poll_s:.3f} "
            f"results={json.dumps(str(results))} "
            f"node-log-dir={json.dumps(str(node_logs))} "
            f"masked-upload={json.dumps(masked_upload)} "
            f"plain-upload={json.dumps(plain_upload)} "
            f"grid={json.dumps('prompt' if self.runtime == 'worker-prompt' else 'flower')}"
        )
        output = flwr(self.config, "run", str(APP), CONNECTION, "--run-config", run_config,
                      "--format", "json", timeout=300)  # fmt: skip
        flower_run_id = str(json.loads(output)["run-id"])
        deadline = time.monotonic() + timeout_s
        last_progress, seen = time.monotonic(), None
        while True:
            report = _read_json(results)
            if report is not None and report.get("status") in ("finished", "failed"):
                break
            self.check_alive()
            now = len(report["rounds"]) if report else -1
            if now != seen:
                last_progress, seen = time.monotonic(), now
            elif time.monotonic() - last_progress > 180:  # a ServerApp that died unreported?
                last_progress = time.monotonic()
                status = _flower_run_status(self.config, flower_run_id)
                if status.startswith("finished") and not status.endswith("completed"):
                    report = _read_json(results) or {}
                    if report.get("status") not in ("finished", "failed"):
                        raise RuntimeError(
                            f"Flower run {flower_run_id} {status} without a report; "
                            f"see `flwr log {flower_run_id}` with FLWR_HOME="
                            f"{self.config.coordinator.state_dir / 'flwr'}"
                        )
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {name} did not finish within {timeout_s:g} s")
            time.sleep(1.0)
        if report["status"] != "finished":
            raise RuntimeError(f"run {name} failed: {report.get('error')}")
        lines = []
        for path in sorted(node_logs.glob("node-*.jsonl")):
            lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        report["flower_run_id"] = flower_run_id
        return report, lines

    def stop(self) -> None:
        stop_processes(self.workers)
        self.workers = []
        stop_processes(self.supernodes)  # nodes first: SIGTERM marks them offline at once
        self.supernodes = []
        for process in (self.superexec, self.superlink):
            if process is not None:
                stop_processes([process])
        self.superexec = self.superlink = None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _flower_run_status(config: CoordinatorConfig, flower_run_id: str) -> str:
    try:
        listed = json.loads(
            flwr(config, "ls", CONNECTION, "--run-id", flower_run_id, "--format", "json")
        )
        return str(listed["runs"][0]["status"])
    except Exception:
        return "unknown"


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(report: dict[str, Any], node_lines: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode of one cell: round times, bytes per node, error and where the time went."""
    rounds = report["rounds"]
    measured = [r for r in rounds if r["round"] > 1]
    first = next((r for r in rounds if r["round"] == 1), None)

    def per_node(record: dict[str, Any], key: str) -> list[int]:
        return [entry[key] for entry in record["bytes_per_node"].values()]

    by_node_stage: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for line in node_lines:
        by_node_stage.setdefault((line["round"], line["stage"]), []).append(line)

    breakdowns = []
    for record in measured:
        stages = []
        for stage in record["stages"]:
            lines = by_node_stage.get((record["round"], stage["stage"]), [])
            starts = [line["handler_started"] - line["process_started"] for line in lines]
            handlers = [line["handler_seconds"] for line in lines]
            busiest = max((s + h for s, h in zip(starts, handlers, strict=True)), default=0.0)
            fits = [line["fit_seconds"] for line in lines if line["fit_seconds"] is not None]
            stages.append(
                {
                    "stage": stage["stage"],
                    "server_exchange": stage["exchange_seconds"],
                    "server_compute": stage["server_compute_seconds"],
                    "node_process_start": max(starts, default=None),
                    "node_handler": max(handlers, default=None),
                    "node_update_generation": max(fits, default=None),
                    "waiting": stage["exchange_seconds"] - busiest if lines else None,
                    "node_lines": len(lines),
                }
            )
        breakdowns.append(stages)
    breakdown = []
    for position, stage in enumerate(breakdowns[0] if breakdowns else []):
        same = [b[position] for b in breakdowns if len(b) > position]
        breakdown.append(
            {
                "stage": stage["stage"],
                **{
                    key: _median([s[key] for s in same])
                    for key in stage
                    if key not in ("stage", "node_lines")
                },
            }
        )
    totals = {
        key: sum(s[key] for s in breakdown if s[key] is not None)
        for key in ("server_exchange", "server_compute", "node_process_start", "node_handler",
                    "waiting")
    }  # fmt: skip
    totals["aggregate_fit"] = _median([r["aggregate_fit_seconds"] for r in measured])
    sent_by_stage: dict[str, list[float]] = {}
    for record in measured:
        for stage in {s for e in record["bytes_per_node"].values() for s in e["by_stage"]}:
            values = [e["by_stage"].get(stage, {}).get("sent_bytes", 0)
                      for e in record["bytes_per_node"].values()]  # fmt: skip
            sent_by_stage.setdefault(stage, []).append(statistics.mean(values))
    return {
        "flower_run_id": report.get("flower_run_id"),
        "median_round_seconds": _median([r["seconds"] for r in measured]),
        "round_seconds": [r["seconds"] for r in measured],
        "first_round_seconds": first["seconds"] if first else None,
        "sent_bytes_per_node": _median(
            [statistics.mean(per_node(r, "sent_bytes")) for r in measured]
        ),
        "max_sent_bytes_per_node": max(max(per_node(r, "sent_bytes")) for r in measured),
        "received_bytes_per_node": _median(
            [statistics.mean(per_node(r, "received_bytes")) for r in measured]
        ),
        "sent_bytes_per_node_by_stage": {k: _median(v) for k, v in sent_by_stage.items()},
        "max_abs_error": max(r.get("max_abs_error", float("nan")) for r in rounds),
        "max_abs_update_value": max(r.get("max_abs_update_value", float("nan")) for r in rounds),
        "sizing_seconds_subtracted": _median([r["sizing_seconds"] for r in measured]),
        "breakdown": breakdown,
        "breakdown_totals": totals,
        "rounds": rounds,
    }


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": list(os.getloadavg()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=list(DEFAULT_NODES))
    parser.add_argument(
        "--values", type=parse_values, nargs="+", default=[parse_values(v) for v in DEFAULT_VALUES],
        help="float32 values per update, e.g. 0.5M 2M 8M",
    )  # fmt: skip
    parser.add_argument(
        "--cells", nargs="+", metavar="NODESxVALUES",
        help="measure only these cells, e.g. 2x8M 8x0.5M (instead of --nodes x --values)",
    )  # fmt: skip
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--superlink-state", choices=("memory", "sqlite"), default="memory",
        help="memory (default): the SuperLink without --database; sqlite: fedtune's coordinator "
        "command unchanged (--database superlink.db)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="per run; round 1 is reported apart")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-minutes", type=float, default=40.0,
                        help="start no cell that would end after this much wall time")  # fmt: skip
    parser.add_argument("--run-timeout", type=float, default=1200.0, help="seconds per run")
    parser.add_argument(
        "--server-poll", type=float, default=0.0,
        help="seconds between the ServerApp's requests for replies; 0 (default): Flower's "
        "Grid.send_and_receive, which waits 3 s between them. Cells measured with another "
        "value are keyed apart",
    )  # fmt: skip
    parser.add_argument(
        "--masked-upload", choices=("packed", "int64"), default="packed",
        help="packed (default): masked values in the smallest type the modulus needs, as "
        "fedtune's nodes send them (uint32), checked as fedtune's coordinator does; int64: "
        "Flower's own upload (the cells measured before Dec 2026; keyed apart)",
    )  # fmt: skip
    parser.add_argument(
        "--runtime", choices=RUNTIMES, default="subprocess",
        help="subprocess (default): Flower's subprocess isolation, one ClientApp process per "
        "message; worker: each node in --isolation process with a long-lived ClientApp worker "
        "(fedtune's, serving this app), Flower's waits (the SuperNode's 3 s idle and 0.5 s "
        "reply waits, the worker's 0.5 s, the ServerApp's 3 s); worker-prompt: the same with "
        "fedtune's shorter waits (supernode_entry, worker 0.1 s, PromptGrid 0.1 s, object pulls "
        "retried after 0.1 s on both sides: since 2026-12-04 20:26Z). Keyed apart",
    )  # fmt: skip
    parser.add_argument(
        "--plain-upload", choices=("float32", "float16"), default="float32",
        help="plain rounds' update type; float16 as fedtune's aggregation.plain_upload sends "
        "it (averaged in float32); the cell then records the error bound. Keyed apart",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="keep certificates, logs and raw reports here")
    parser.add_argument("--out", type=Path, default=RESULTS / "secagg_overhead.json")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (round 1 installs the app; median of the rest)")
    grid = [(n, v) for n in sorted(args.nodes) for v in sorted(args.values)]
    if args.cells:
        try:
            grid = sorted(
                {
                    (int(c.lower().split("x")[0]), parse_values(c.lower().split("x")[1]))
                    for c in args.cells
                }
            )
        except (IndexError, ValueError, argparse.ArgumentTypeError):
            parser.error(f"--cells takes NODESxVALUES, e.g. 2x8M, got {args.cells}")
    if min(n for n, _ in grid) < 2:
        parser.error("SecAgg+ needs at least 2 nodes")

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # so that the federation is stopped

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def progress(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    report = _read_json(args.out) or {}
    report.update(
        benchmark="secagg_overhead",
        target_ratio=TARGET_RATIO,
        what_is_measured=WHAT_IS_MEASURED,
    )
    cells: dict[str, Any] = report.setdefault("cells", {})
    invocation = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "machine_at_start": machine_info(),
        "versions": {
            "flwr": flower.__version__, "numpy": np.__version__, "psutil": psutil.__version__,
        },
        "settings": {
            "nodes": args.nodes, "values": args.values, "modes": args.modes,
            "rounds": args.rounds, "seed": args.seed, "budget_minutes": args.budget_minutes,
            "server_poll_s": args.server_poll, "cells": [f"{n}x{v}" for n, v in grid],
            "superlink_state": args.superlink_state, "masked_upload": args.masked_upload,
            "runtime": args.runtime, "plain_upload": args.plain_upload,
        },
        "note": "all processes on one machine, sharing its CPUs with other engineers' test runs "
        "(see load_average); SuperLink with TLS and SuperNode authentication; "
        + {
            "subprocess": "Flower's subprocess isolation (one ClientApp process per message)",
            "worker": "process isolation, a long-lived ClientApp worker per node, Flower's waits",
            "worker-prompt": "process isolation, a long-lived ClientApp worker per node, "
            "fedtune's shorter waits",
        }[args.runtime],
        "skipped": [],
    }  # fmt: skip
    started = time.monotonic()
    budget = args.budget_minutes * 60
    last_cell_seconds = 0.0  # an estimate of the next cell's time: the last one's, scaled
    scratch = (
        tempfile.TemporaryDirectory(prefix="secagg-overhead-") if args.workdir is None else None
    )
    root = Path(scratch.name) if scratch else args.workdir.resolve()
    try:
        last_nodes = None
        for nodes in sorted({n for n, _ in grid}):
            plan = [v for n, v in grid if n == nodes]
            if last_nodes is not None:
                last_cell_seconds *= nodes / last_nodes  # ClientApp start-ups grow with nodes
            last_nodes = nodes
            if time.monotonic() - started + last_cell_seconds > budget:
                for values in plan:
                    invocation["skipped"].append(_skip(nodes, values, started, budget))
                continue
            with Federation(
                root / f"nodes-{nodes}",
                nodes,
                progress=progress,
                superlink_state=args.superlink_state,
                runtime=args.runtime,
            ) as federation:
                invocation.setdefault("listening", {})[f"{nodes}-nodes"] = federation.listening()
                broken = None
                for values in plan:
                    elapsed = time.monotonic() - started
                    if broken is not None:
                        invocation["skipped"].append(
                            {"nodes": nodes, "values": values, "reason": broken}
                        )
                        continue
                    if elapsed + last_cell_seconds > budget:
                        invocation["skipped"].append(_skip(nodes, values, started, budget))
                        continue
                    cell_started = time.monotonic()
                    key = (
                        f"{nodes}-nodes/{values}-values"
                        + (f"/server-poll-{args.server_poll:g}s" if args.server_poll > 0 else "")
                        + ("/packed-upload" if args.masked_upload == "packed" else "")
                        + (f"/{args.runtime}" if args.runtime != "subprocess" else "")
                        + ("/plain-float16" if args.plain_upload == "float16" else "")
                    )
                    cell: dict[str, Any] = {
                        "nodes": nodes,
                        "values": values,
                        "server_poll_s": args.server_poll,
                        "superlink_state": args.superlink_state,
                        "masked_upload": args.masked_upload,
                        "runtime": args.runtime,
                        "plain_upload": args.plain_upload,
                        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "load_average_before": list(os.getloadavg()),
                    }
                    for mode in args.modes:
                        name = f"{nodes}n-{values}v-{mode.replace('+', 'plus')}"
                        progress(f"{key} {mode}: {args.rounds} rounds")
                        try:
                            server, lines = federation.run_app(
                                name, mode=mode, values=values, rounds=args.rounds,
                                seed=args.seed, timeout_s=args.run_timeout,
                                server_poll_s=args.server_poll,
                                masked_upload=args.masked_upload,
                                plain_upload=args.plain_upload,
                            )  # fmt: skip
                        except (RuntimeError, TimeoutError) as exc:
                            progress(f"{key} {mode} failed: {exc}")
                            invocation.setdefault("failed", []).append(
                                {"nodes": nodes, "values": values, "mode": mode, "error": str(exc)}
                            )
                            broken = f"the {nodes}-node deployment failed earlier: {exc}"
                            break
                        cell[mode] = summarise(server, lines)
                        progress(
                            f"{key} {mode}: median round "
                            f"{cell[mode]['median_round_seconds']:.2f} s, sent "
                            f"{cell[mode]['sent_bytes_per_node'] / 1e6:.1f} MB/node, max error "
                            f"{cell[mode]['max_abs_error']:.2e}"
                        )
                    if broken is not None:
                        continue
                    cell["load_average_after"] = list(os.getloadavg())
                    if args.plain_upload == "float16" and "plain" in cell:
                        # fedtune.platform.wire.plain_upload: the mean's error bound
                        cell["plain"]["float16_error_bound"] = (
                            cell["plain"]["max_abs_update_value"] * FLOAT16_RELATIVE_ERROR
                            + FLOAT16_ABSOLUTE_ERROR
                        )
                    if "plain" in cell and "secagg+" in cell:
                        ratio = (
                            cell["secagg+"]["median_round_seconds"]
                            / cell["plain"]["median_round_seconds"]
                        )
                        cell["time_ratio"] = ratio
                        cell["bytes_ratio"] = (
                            cell["secagg+"]["sent_bytes_per_node"]
                            / cell["plain"]["sent_bytes_per_node"]
                        )
                        cell["target_met"] = ratio <= TARGET_RATIO
                        progress(f"{key}: SecAgg+/plain {ratio:.2f}x (target {TARGET_RATIO}x)")
                    cell["invocation"] = invocation["when"]
                    cells[key] = cell
                    last_cell_seconds = time.monotonic() - cell_started
                    _write(args.out, report, invocation)
    finally:
        invocation["machine_at_end"] = machine_info()
        invocation["wall_minutes"] = (time.monotonic() - started) / 60
        _write(args.out, report, invocation)
        if scratch is not None:
            scratch.cleanup()
    progress(f"written {args.out}")


def _skip(nodes: int, values: int, started: float, budget: float) -> dict[str, Any]:
    return {
        "nodes": nodes,
        "values": values,
        "reason": f"wall-time budget: {(time.monotonic() - started) / 60:.1f} of "
        f"{budget / 60:g} minutes spent, and the previous cell took longer than what is left",
    }


def _write(path: Path, report: dict[str, Any], invocation: dict[str, Any]) -> None:
    invocations = [i for i in report.get("invocations", []) if i["when"] != invocation["when"]]
    report["invocations"] = [*invocations, invocation]
    measured = {
        (c["nodes"], c["values"])
        for c in report["cells"].values()
        if not c.get("server_poll_s")  # the grid is measured with Flower's own polling
        and c.get("runtime", "subprocess") == "subprocess"
    }
    reasons: dict[tuple[int, int], str] = {}
    for earlier in report["invocations"]:
        for skipped in earlier.get("skipped", []):
            reasons[(skipped["nodes"], skipped["values"])] = skipped["reason"]
        for failed in earlier.get("failed", []):
            reasons[(failed["nodes"], failed["values"])] = (
                f"failed ({failed['mode']}): {failed['error']}"
            )
    report["skipped"] = [
        {
            "nodes": nodes,
            "values": values,
            "reason": reasons.get(
                (nodes, values),
                "not run: the invocations so far chose other cells (--cells) to fit the "
                "wall-time budget; see invocations",
            ),
        }
        for nodes in DEFAULT_NODES
        for values in (parse_values(v) for v in DEFAULT_VALUES)
        if (nodes, values) not in measured
    ]
    timed = [c for c in report["cells"].values() if "target_met" in c]
    report["target_met_cells"] = (
        f"{sum(c['target_met'] for c in timed)} of {len(timed)} cells have SecAgg+ round time "
        f"<= {TARGET_RATIO}x plain"
    )
    report["table"] = [
        {
            "nodes": cell["nodes"],
            "values": cell["values"],
            "server_poll_s": cell.get("server_poll_s", 0.0),
            "superlink_state": cell.get("superlink_state"),
            "masked_upload": cell.get("masked_upload", "int64"),
            "runtime": cell.get("runtime", "subprocess"),
            "plain_upload": cell.get("plain_upload", "float32"),
            "plain_median_round_s": cell.get("plain", {}).get("median_round_seconds"),
            "secagg_median_round_s": cell.get("secagg+", {}).get("median_round_seconds"),
            "time_ratio": cell.get("time_ratio"),
            "target_met": cell.get("target_met"),
            "plain_sent_MB_per_node": _mb(cell.get("plain", {}).get("sent_bytes_per_node")),
            "secagg_sent_MB_per_node": _mb(cell.get("secagg+", {}).get("sent_bytes_per_node")),
            "bytes_ratio": cell.get("bytes_ratio"),
            "secagg_max_abs_error": cell.get("secagg+", {}).get("max_abs_error"),
            "plain_max_abs_error": cell.get("plain", {}).get("max_abs_error"),
        }
        for cell in sorted(
            report["cells"].values(),
            key=lambda c: (
                c.get("runtime", "subprocess"),
                c.get("server_poll_s", 0.0),
                c["nodes"],
                c["values"],
            ),
        )
    ]
    report["masked_upload_before_after"] = _before_after(report["cells"])
    report["waits_before_after"] = _waits_before_after(report["cells"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _before_after(cells: dict[str, Any]) -> list[dict[str, Any]]:
    """Bytes a node sends in a SecAgg+ round with Flower's int64 upload (before) and with the
    packed one (after), per cell measured both ways (Flower's own polling)."""
    by_upload: dict[tuple[int, int], dict[str, Any]] = {}
    for cell in cells.values():
        if cell.get("server_poll_s") or "secagg+" not in cell:
            continue
        if cell.get("runtime", "subprocess") != "subprocess":
            continue
        upload = cell.get("masked_upload", "int64")
        by_upload.setdefault((cell["nodes"], cell["values"]), {})[upload] = cell
    rows = []
    for (nodes, values), found in sorted(by_upload.items()):
        if set(found) != {"int64", "packed"}:
            continue
        before, after = found["int64"], found["packed"]
        rows.append(
            {
                "nodes": nodes,
                "values": values,
                "plain_sent_bytes_per_node": after.get("plain", {}).get("sent_bytes_per_node"),
                "secagg_sent_bytes_per_node_int64": before["secagg+"]["sent_bytes_per_node"],
                "secagg_sent_bytes_per_node_packed": after["secagg+"]["sent_bytes_per_node"],
                "bytes_ratio_int64": before.get("bytes_ratio"),
                "bytes_ratio_packed": after.get("bytes_ratio"),
                "max_abs_error_int64": before["secagg+"].get("max_abs_error"),
                "max_abs_error_packed": after["secagg+"].get("max_abs_error"),
            }
        )
    return rows


def _waits_before_after(cells: dict[str, Any]) -> list[dict[str, Any]]:
    """Round times with the long-lived worker and Flower's waits (before) and fedtune's shorter
    ones (after), per cell measured both ways."""
    by_runtime: dict[tuple[int, int], dict[str, Any]] = {}
    for cell in cells.values():
        if cell.get("runtime") in ("worker", "worker-prompt") and "time_ratio" in cell:
            by_runtime.setdefault((cell["nodes"], cell["values"]), {})[cell["runtime"]] = cell
    rows = []
    for (nodes, values), found in sorted(by_runtime.items()):
        row: dict[str, Any] = {"nodes": nodes, "values": values}
        for runtime, label in (("worker", "before"), ("worker-prompt", "after")):
            cell = found.get(runtime)
            if cell is None:
                continue
            row[f"plain_round_s_{label}"] = cell["plain"]["median_round_seconds"]
            row[f"secagg_round_s_{label}"] = cell["secagg+"]["median_round_seconds"]
            row[f"time_ratio_{label}"] = cell["time_ratio"]
        rows.append(row)
    return rows


def _mb(size: float | None) -> float | None:
    return None if size is None else round(size / 1e6, 3)


if __name__ == "__main__":
    main()
