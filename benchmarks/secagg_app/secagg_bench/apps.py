"""ServerApp and ClientApp of the SecAgg+ overhead benchmark (``benchmarks/secagg_overhead.py``).

The ClientApp trains nothing: each train message gets a synthetic float32 update of ``values``
numbers, deterministic per (seed, round, node index) -- ``synthetic_update`` -- with
``num_examples = 100 + node index``. The node index comes from the SuperNode's
``--node-config index=I``. Under SecAgg+ the update goes through Flower's ``secaggplus_mod``
(with ``masked-upload = "packed"`` the ServerApp picks the modulus as fedtune's coordinator
does, the fewest whole bytes the sum of all nodes cannot wrap, its masked vectors are then
re-encoded as fedtune's node does, in the smallest type the modulus needs, and the ServerApp
checks them as fedtune's coordinator does: the only imports of fedtune here);
plain rounds skip the mod (it would reject a train message without its configs). An outer
mod writes one JSON line per message to ``node-log-dir/node-I.jsonl``: the stage, when the
ClientApp process started (Flower starts one per message), when the handler started and how
long it took, and how long generating the update took.

The ServerApp runs Flower's legacy ``DefaultWorkflow`` with a legacy ``FedAvg`` (no
evaluation): the fit workflow is ``SecAggPlusWorkflow(num_shares=1.0,
reconstruction_threshold=0.6, max_weight=<largest num_examples>, ...)`` when the run config says
``mode = "secagg+"``, else Flower's default fit workflow. The new global vector is cast back to
float32 (SecAgg+ returns a float64 mean, which would double what the nodes receive; fedtune's
``SecureFedAvg`` casts likewise). Per round it records, server side:
the fit round's wall time (from sampling the nodes to the new global vector), each SecAgg+
stage's time and how much of it was the message exchange, the application-layer bytes of every
message to and from each node (each RecordDict serialised with
``recorddict_to_proto(...).SerializeToString()``; the time spent sizing is subtracted from
the round time), and the largest absolute difference between the aggregate and the weighted
mean of the nodes' updates recomputed in float64. It writes all of it to the run config's
``results`` path after every round.
"""

from __future__ import annotations

import json
import os
import platform
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import flwr
import numpy as np
import psutil
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import recorddict_to_proto
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp

PLAIN, SECAGG = "plain", "secagg+"
PACKED = "packed"  # masked-upload: fedtune's packed type; "int64": Flower's own
SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


def synthetic_update(values: int, *, seed: int, server_round: int, node_index: int) -> np.ndarray:
    """The update node ``node_index`` sends in ``server_round``: N(0, 0.01^2), float32."""
    rng = np.random.default_rng([seed, server_round, node_index])
    return rng.standard_normal(values, dtype=np.float32) * np.float32(0.01)


def num_examples(node_index: int) -> int:
    return 100 + node_index


def message_bytes(message: Message) -> int:
    """Application-layer size of a message's content (its RecordDict as protobuf)."""
    if not message.has_content():
        return 0
    return len(recorddict_to_proto(message.content).SerializeToString())


# ---------------------------------------------------------------------------------- ClientApp

_LAST_FIT: dict[str, float] = {}  # the fit's own seconds, for the outer mod (same process)


class SyntheticClient(NumPyClient):
    def __init__(self, *, node_index: int, values: int, seed: int, upload: str = "float32"):
        self.node_index, self.values, self.seed = node_index, values, seed
        self.upload = upload  # plain rounds: "float16" as fedtune's plain_upload sends it

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple:
        started = time.perf_counter()
        if sum(p.size for p in parameters) != self.values:
            raise ValueError(
                f"got {sum(p.size for p in parameters)} values, expected {self.values}"
            )
        update = synthetic_update(
            self.values,
            seed=self.seed,
            server_round=int(config["server-round"]),
            node_index=self.node_index,
        )
        seconds = time.perf_counter() - started
        _LAST_FIT["seconds"] = seconds
        metrics = {"node-index": self.node_index, "fit-seconds": seconds}
        if self.upload == "float16":
            update = update.astype(np.float16)
        return [update], num_examples(self.node_index), metrics


def _node_index(context: Context) -> int:
    index = context.node_config.get("index")
    if not isinstance(index, int):
        raise ValueError('start the SuperNode with --node-config "index=I"')
    return index


def client_fn(context: Context):
    return SyntheticClient(
        node_index=_node_index(context),
        values=int(context.run_config["values"]),
        seed=int(context.run_config["seed"]),
        upload=str(context.run_config.get("plain-upload", "float32"))
        if context.run_config.get("mode") == PLAIN
        else "float32",
    ).to_client()


def bench_mod(message: Message, context: Context, call_next: Callable) -> Message:
    """Route SecAgg+ messages through ``secaggplus_mod`` and log each message's timings."""
    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = str(configs.get(Key.STAGE)) if configs is not None else "fit"  # the mod pops it
    handler_started = time.time()
    clock = time.perf_counter()
    _LAST_FIT.clear()
    if configs is not None:
        reply = secaggplus_mod(message, context, call_next)
        if stage == "collect_masked_vectors" and _packed(context) and not reply.has_error():
            _pack(reply, context)
    else:
        reply = call_next(message, context)
    handler_seconds = time.perf_counter() - clock
    folder = context.run_config.get("node-log-dir")
    if isinstance(folder, str) and folder:
        index = _node_index(context)
        line = {
            "flower_run_id": str(message.metadata.run_id),
            "round": int(message.metadata.group_id or 0),
            "node_index": index,
            "stage": stage,
            # A long-lived worker (benchmarks/secagg_app/worker.py) starts no process per
            # message: its start costs the message nothing.
            "process_started": handler_started
            if os.environ.get("SECAGG_BENCH_LONG_LIVED")
            else psutil.Process().create_time(),
            "handler_started": handler_started,
            "handler_seconds": handler_seconds,
            "fit_seconds": _LAST_FIT.get("seconds"),
            "pid": os.getpid(),
        }
        path = Path(folder) / f"node-{index}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as log:
            log.write(json.dumps(line) + "\n")
    return reply


def _packed(context: Context) -> bool:
    return str(context.run_config.get("masked-upload", "int64")) == PACKED


def _pack(reply: Message, context: Context) -> None:
    """What fedtune's node does after Flower's mod: the masked vectors in the smallest type the
    modulus needs (``fedtune.platform.wire.masked_upload``; imported only in this mode)."""
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    from fedtune.platform.wire.masked_upload import pack_masked_reply

    state = SecAggPlusState(**dict(context.state.config_records[RECORD_KEY_STATE]))
    pack_masked_reply(reply.content.config_records[RECORD_KEY_CONFIGS], state.mod_range)


client_app = ClientApp(client_fn=client_fn, mods=[bench_mod])


# ---------------------------------------------------------------------------------- ServerApp


class MeasuringGrid:
    """A Grid that times every exchange and sizes every message, per node and stage.

    ``poll_s = 0`` keeps Flower's ``Grid.send_and_receive`` (it asks the SuperLink for replies
    every 3 s); a positive ``poll_s`` asks that often instead.
    """

    def __init__(self, grid: Grid, *, timeout: float, poll_s: float = 0.0):
        self._grid = grid
        self.timeout = timeout
        self.poll_s = poll_s
        self.stage = "fit"
        self.exchanges: list[dict[str, Any]] = []
        self.sizing_seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        messages = list(messages)
        clock = time.perf_counter()
        received: dict[str, int] = defaultdict(int)  # bytes each node receives
        for message in messages:
            received[str(message.metadata.dst_node_id)] += message_bytes(message)
        sizing = time.perf_counter() - clock
        started = time.time()
        clock = time.perf_counter()
        replies = self._exchange(messages, self.timeout if timeout is None else timeout)
        seconds = time.perf_counter() - clock
        clock = time.perf_counter()
        sent: dict[str, int] = defaultdict(int)  # bytes each node sends
        errors = []
        for reply in replies:
            if reply.has_error():
                errors.append(f"node {reply.metadata.src_node_id}: {reply.error}")
            sent[str(reply.metadata.src_node_id)] += message_bytes(reply)
        sizing += time.perf_counter() - clock
        self.sizing_seconds += sizing
        self.exchanges.append(
            {
                "stage": self.stage,
                "started": started,
                "seconds": seconds,
                "sizing_seconds": sizing,
                "messages": len(messages),
                "replies": len(replies),
                "errors": errors,
                "received_bytes": dict(received),
                "sent_bytes": dict(sent),
            }
        )
        return replies

    def _exchange(self, messages: list[Message], timeout: float) -> list[Message]:
        if self.poll_s <= 0:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        waiting = set(self._grid.push_messages(messages))
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and time.monotonic() < deadline:
            pulled = list(self._grid.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if waiting:
                time.sleep(self.poll_s)
        return replies


class RecordingFedAvg(FedAvg):
    """Legacy FedAvg that remembers who contributed to the last aggregate, and how long
    ``aggregate_fit`` took."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.participants: list[dict[str, Any]] = []
        self.aggregated_round: int | None = None
        self.aggregate_seconds = 0.0
        self.flower_dtypes: list[str] = []

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
        self.participants = [
            {
                "flower_node_id": str(proxy.node_id),
                "node_index": int(res.metrics["node-index"]),
                "num_examples": int(res.num_examples),
                "fit_seconds": float(res.metrics["fit-seconds"]),
            }
            for proxy, res in results
        ]
        clock = time.perf_counter()
        for _, res in results:  # a float16 upload is averaged in float32, as fedtune's is
            arrays = parameters_to_ndarrays(res.parameters)
            if any(a.dtype == np.float16 for a in arrays):
                res.parameters = ndarrays_to_parameters([a.astype(np.float32) for a in arrays])
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            # SecAgg+ hands back a float64 mean; keep the global vector float32, as fedtune's
            # SecureFedAvg does, so that both modes send the nodes the same bytes.
            arrays = parameters_to_ndarrays(parameters)
            self.flower_dtypes = sorted({str(a.dtype) for a in arrays})
            parameters = ndarrays_to_parameters([a.astype(np.float32) for a in arrays])
        self.aggregate_seconds = time.perf_counter() - clock
        self.aggregated_round = server_round if parameters is not None else None
        return parameters, metrics


class TimedSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with each stage timed."""

    def __init__(self, grid: MeasuringGrid, **kwargs: Any):
        super().__init__(**kwargs)
        self.grid = grid
        self.stage_seconds: dict[str, float] = {}

    def _timed(self, name: str, stage: Callable[..., bool], *args: Any) -> bool:
        self.grid.stage = name
        clock = time.perf_counter()
        try:
            return stage(*args)
        finally:
            self.stage_seconds[name] = time.perf_counter() - clock

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        self.stage_seconds = {}
        return self._timed("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        return self._timed("share_keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        return self._timed(
            "collect_masked_vectors", super().collect_masked_vectors_stage, grid, context, state
        )

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        return self._timed("unmask", super().unmask_stage, grid, context, state)


class TimedFit:
    """The fit workflow of one round, timed and checked; appends to ``rounds``."""

    def __init__(
        self,
        inner: Callable[[Grid, LegacyContext], None],
        *,
        grid: MeasuringGrid,
        strategy: RecordingFedAvg,
        settings: dict[str, Any],
        on_round: Callable[[dict[str, Any]], None],
    ):
        self.inner, self.grid, self.strategy = inner, grid, strategy
        self.max_abs_value = 0.0
        self.settings, self.on_round = settings, on_round

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        config = context.state.config_records[MAIN_CONFIGS_RECORD]
        server_round = int(cast(int, config[WorkflowKey.CURRENT_ROUND]))
        self.grid.stage = "fit"
        first_exchange = len(self.grid.exchanges)
        sizing_before = self.grid.sizing_seconds
        started = time.time()
        clock = time.perf_counter()
        self.inner(grid, context)
        raw_seconds = time.perf_counter() - clock
        sizing = self.grid.sizing_seconds - sizing_before
        exchanges = self.grid.exchanges[first_exchange:]
        complete = self.strategy.aggregated_round == server_round
        record: dict[str, Any] = {
            "round": server_round,
            "started": started,
            "seconds": raw_seconds - sizing,
            "seconds_including_sizing": raw_seconds,
            "sizing_seconds": sizing,
            "aggregate_fit_seconds": self.strategy.aggregate_seconds if complete else None,
            "aggregate_dtype_from_flower": self.strategy.flower_dtypes if complete else None,
            "complete": complete,
            "participants": self.strategy.participants if complete else [],
        }
        record["stages"] = self._stages(exchanges)
        record["bytes_per_node"] = self._bytes(exchanges, record["participants"])
        record["errors"] = [e for exchange in exchanges for e in exchange["errors"]]
        if complete:
            record["max_abs_error"] = self._check(context, server_round)
            record["max_abs_update_value"] = self.max_abs_value
        self.on_round(record)

    def _stages(self, exchanges: list[dict[str, Any]]) -> list[dict[str, Any]]:
        timed = getattr(self.inner, "stage_seconds", None)
        stages = []
        for exchange in exchanges:
            total = timed.get(exchange["stage"]) if timed is not None else None
            if total is not None:
                total -= exchange["sizing_seconds"]
            stages.append(
                {
                    "stage": exchange["stage"],
                    "started": exchange["started"],
                    "exchange_seconds": exchange["seconds"],
                    "stage_seconds": total,
                    "server_compute_seconds": None
                    if total is None
                    else total - exchange["seconds"],
                    "replies": exchange["replies"],
                }
            )
        return stages

    @staticmethod
    def _bytes(
        exchanges: list[dict[str, Any]], participants: list[dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        names = {p["flower_node_id"]: f"node-{p['node_index']}" for p in participants}
        out: dict[str, dict[str, Any]] = {}
        for exchange in exchanges:
            for direction in ("sent_bytes", "received_bytes"):
                for node_id, size in exchange[direction].items():
                    entry = out.setdefault(
                        names.get(node_id, f"flower-node-{node_id}"),
                        {"sent_bytes": 0, "received_bytes": 0, "by_stage": {}},
                    )
                    entry[direction] += size
                    by_stage = entry["by_stage"].setdefault(
                        exchange["stage"], {"sent_bytes": 0, "received_bytes": 0}
                    )
                    by_stage[direction] += size
        return out

    def _check(self, context: LegacyContext, server_round: int) -> float:
        """Largest |aggregate - weighted mean of the updates| (float64 reference)."""
        record = context.state.array_records[MAIN_PARAMS_RECORD]
        aggregate = parameters_to_ndarrays(arrayrecord_to_parameters(record, keep_input=True))
        got = np.concatenate([a.ravel() for a in aggregate]).astype(np.float64)
        expected = np.zeros(self.settings["values"], dtype=np.float64)
        total, self.max_abs_value = 0, 0.0
        for participant in self.strategy.participants:
            weight = participant["num_examples"]
            update = synthetic_update(
                self.settings["values"],
                seed=self.settings["seed"],
                server_round=server_round,
                node_index=participant["node_index"],
            )
            self.max_abs_value = max(self.max_abs_value, float(np.max(np.abs(update))))
            expected += weight * update.astype(np.float64)
            total += weight
        expected /= total
        return float(np.max(np.abs(got - expected)))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    mode = str(config["mode"])
    if mode not in (PLAIN, SECAGG):
        raise ValueError(f"run config mode must be {PLAIN!r} or {SECAGG!r}, got {mode!r}")
    settings = {
        "mode": mode,
        "values": int(config["values"]),
        "nodes": int(config["num-nodes"]),
        "rounds": int(config["rounds"]),
        "seed": int(config["seed"]),
        "timeout": float(config["timeout"]),
        "server_poll_s": float(config["server-poll"]),
        "masked_upload": str(config.get("masked-upload", "int64")),
        "grid": str(config.get("grid", "flower")),
    }
    results = Path(str(config["results"]))
    report: dict[str, Any] = {
        "settings": settings,
        "flwr": flwr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "status": "running",
        "rounds": [],
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    _write_json(results, report)

    strategy = RecordingFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=settings["nodes"],
        min_available_clients=settings["nodes"],
        initial_parameters=ndarrays_to_parameters([np.zeros(settings["values"], np.float32)]),
        on_fit_config_fn=lambda server_round: {"server-round": server_round},
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=settings["rounds"]), strategy=strategy
    )
    if settings["grid"] == "prompt":  # fedtune's coordinator grid: replies pulled every 0.1 s
        import sys

        from fedtune.coordinator.prompt_grid import PromptGrid
        from fedtune.platform.runtime.object_pulls import retry_pulls_sooner

        # and a reply's missing objects asked for again after 0.1 s, as fedtune's ServerApp
        # process does (coordinator/serverapp_process.py), in the module of this grid
        retry_pulls_sooner(sys.modules[type(grid).__module__])
        grid = PromptGrid(grid)
    measuring = MeasuringGrid(grid, timeout=settings["timeout"], poll_s=settings["server_poll_s"])
    if mode == SECAGG:
        max_weight = float(num_examples(settings["nodes"] - 1))
        ranges = {"quantization_range": 2**22, "modulus_range": 2**32}  # Flower's defaults
        if settings["masked_upload"] == PACKED:
            # the modulus fedtune's coordinator picks: 3 bytes a value for up to 3 nodes
            from fedtune.platform.wire.masked_upload import QUANTIZATION_RANGE, modulus_for

            ranges = {
                "quantization_range": QUANTIZATION_RANGE,
                "modulus_range": modulus_for(
                    settings["nodes"], quantization_range=QUANTIZATION_RANGE
                ),
            }
        settings["secaggplus"] = {
            "num_shares": 1.0,
            "reconstruction_threshold": 0.6,
            "max_weight": max_weight,
            **ranges,
        }
        inner: Callable[[Grid, LegacyContext], None] = TimedSecAggPlus(
            measuring,
            num_shares=1.0,
            reconstruction_threshold=0.6,
            max_weight=max_weight,
            timeout=settings["timeout"],
            **ranges,
        )
    else:
        inner = default_fit_workflow

    def on_round(record: dict[str, Any]) -> None:
        report["rounds"].append(record)
        _write_json(results, report)

    fit = TimedFit(inner, grid=measuring, strategy=strategy, settings=settings, on_round=on_round)
    try:
        outer: Any = measuring
        if mode == SECAGG and settings["masked_upload"] == PACKED:
            # fedtune's coordinator check of each masked upload, timed with the stage
            from fedtune.coordinator.masked_vectors import MaskedVectorCheck

            outer = MaskedVectorCheck(measuring)  # type: ignore[arg-type]
        DefaultWorkflow(fit_workflow=fit)(outer, legacy)
    except BaseException as exc:
        report.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        report["traceback"] = traceback.format_exc()
        _write_json(results, report)
        raise
    incomplete = [r["round"] for r in report["rounds"] if not r["complete"]]
    if incomplete:
        report.update(status="failed", error=f"rounds without an aggregate: {incomplete}")
    else:
        report["status"] = "finished"
    _write_json(results, report)
