"""A run on deployed nodes: the rounds loop the coordinator's ServerApp drives.

Unlike Flower's strategy loop (used in simulation), this loop never waits without a limit: a
round waits ``aggregation.node_wait_s`` for ``run.min_nodes`` nodes and each exchange
``aggregation.reply_timeout_s`` for replies, and a node that disappears (its heartbeat expires)
gets an error reply from the SuperLink. It trains through SecAgg+ by default, and it resumes:
a run restarted with ``resume`` continues after its last round whose checkpoint was committed.

Only enrolled nodes take part, under their enrolled names: the loop sees the SuperLink through
an :class:`~fedtune.coordinator.roster.EnrolledGrid`, so a SuperNode registered behind
fedtune's back is never counted, sampled or sent anything, and a round starts only when
``run.min_nodes`` enrolled nodes are connected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.compat.common.recorddict_compat import parameters_to_arrayrecord
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from sqlalchemy import func, select

from fedtune.common.database import transaction
from fedtune.coordinator.checkpoints import read_checkpoint
from fedtune.coordinator.job import DeploymentJob
from fedtune.coordinator.masked_vectors import MaskedVectorCheck
from fedtune.coordinator.prompt_grid import PromptGrid
from fedtune.coordinator.roster import EnrolledGrid, Roster, name_problem, reported_name
from fedtune.coordinator.secagg_peers import SignedKeyRelay
from fedtune.coordinator.secure_aggregation import NotEnoughNodesError, SecureFedAvg
from fedtune.coordinator.server_app import (
    RunSetup,
    ab_test_final_against_production,
    finish_run,
    prepare_run,
)
from fedtune.coordinator.strategy import ReplyOutcome, ValidatingFedAvg
from fedtune.platform.config import RunConfig
from fedtune.platform.db.storage import AdapterCheckpoint, Round, open_database
from fedtune.platform.wire import secagg_masks
from fedtune.platform.wire.masked_upload import QUANTIZATION_RANGE, modulus_for
from fedtune.platform.wire.messages import (
    DESCRIBE_MESSAGE_TYPE,
    NODE,
    NUM_EXAMPLES,
    arrays_to_record,
    record_to_arrays,
)
from fedtune.privacy.ledger_store import node_public_keys
from fedtune.privacy.node_ledger import NodeLedger
from fedtune.privacy.node_level_dp import LEDGER_NODE, NodeLevelPrivacy


def enrolled_ledger_keys(config: RunConfig) -> dict[str, str]:
    """The newest enrolled ledger key of each of the run's nodes (`fedtune coordinator
    enroll`); a node without one cannot contribute."""
    with transaction(open_database(config.database_url)) as session:
        keys = {node.name: node_public_keys(session, node.name) for node in config.nodes}
    return {name: found[-1] for name, found in keys.items() if found}


def run_deployed(
    grid: Grid,
    context: Context,
    job: DeploymentJob,
    *,
    flower_run_id: str | None = None,
    progress: Callable[[str], None] = print,
) -> None:
    config = job.run
    setup = prepare_run(
        config,
        run_id=job.run_id,
        flower_run_id=flower_run_id,
        enrolled=enrolled_ledger_keys(config),
        resuming=job.resume,
        deployment=job.coordinator or {},
        progress=progress,
    )
    roster = Roster.load(setup.engine, (node.name for node in config.nodes))
    missing = sorted({n.name for n in config.nodes} - (set(setup.keys) & roster.names))
    if missing:
        progress(f"not enrolled (never sampled, updates refused): {missing}")
    prompt = PromptGrid(grid, key_stage_timeout_s=config.aggregation.key_stage_timeout_s)
    enrolled = EnrolledGrid(prompt, roster, progress=progress)
    try:
        first, arrays = _starting_point(setup, config) if job.resume else (1, setup.initial)
        if first > 1:
            progress(f"resuming run {job.run_id} at round {first} of {config.run.rounds}")
        _rounds(enrolled, context, setup, config, first=first, arrays=arrays, progress=progress)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        finish_run(setup.engine, job.run_id, status="failed", error=error)
        raise
    finish_run(setup.engine, job.run_id, status="finished")
    if config.run.ab_test_against_production:
        ab_test_final_against_production(
            enrolled, setup.engine, config, job.run_id, setup.fingerprint, progress
        )


def _starting_point(setup: RunSetup, config: RunConfig) -> tuple[int, dict[str, np.ndarray]]:
    """The round after the last recorded one, and the newest committed global adapter.
    Checkpoint folders of later rounds (written before an interruption, never committed) are
    kept aside, renamed."""
    with transaction(setup.engine) as session:
        done = session.scalar(select(func.max(Round.number)).where(Round.run_id == setup.run_id))
        done = int(done or 0)
        last = session.scalars(
            select(AdapterCheckpoint)
            .where(AdapterCheckpoint.run_id == setup.run_id, AdapterCheckpoint.round <= done)
            .order_by(AdapterCheckpoint.round.desc())
            .limit(1)
        ).first()
        path, sha = (Path(last.path), last.sha256) if last is not None else (None, None)
    adapters = config.output.dir / "adapters"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for folder in sorted(adapters.glob("round-*")):
        suffix = folder.name.removeprefix("round-")
        if suffix.isdigit() and int(suffix) > done:
            folder.rename(folder.with_name(f"{folder.name}.interrupted-{stamp}"))
    if path is None or sha is None:
        return done + 1, setup.initial
    arrays, _ = read_checkpoint(path, sha256=sha, key=config.output.checkpoint_key())
    return done + 1, arrays


def _wait_for_nodes(grid: EnrolledGrid, minimum: int, timeout_s: float) -> list[int]:
    """The connected enrolled nodes, once there are ``minimum`` of them: no node is sent
    anything before (so none spends epsilon on a round that cannot be kept)."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := grid.get_node_ids()) < minimum:
        if time.monotonic() > deadline:
            problem = (
                f"{len(nodes)} enrolled nodes connected, {minimum} needed (run.min_nodes), "
                f"after waiting {timeout_s:g} s (aggregation.node_wait_s)"
            )
            if grid.ignored:
                problem += (
                    f"; {len(grid.ignored)} other connected nodes are not enrolled for this run"
                )
            if not grid.roster.names:
                problem += "; no node of this run is enrolled (`fedtune coordinator enroll`)"
            raise NotEnoughNodesError(problem)
        time.sleep(1.0)
    return nodes


def _describe_nodes(
    grid: EnrolledGrid, nodes: list[int], timeout_s: float, progress: Callable[[str], None]
) -> dict[str, int]:
    """Each answering node's enrolled name -> training-set size (warms the nodes' trainers
    too)."""
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type=DESCRIBE_MESSAGE_TYPE)
        for node in nodes
    ]
    sizes: dict[str, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            progress(f"node {node_id} did not describe itself: {reply.error}")
            continue
        name = grid.enrolled_name(node_id)
        wrong = name_problem(name, reported_name(reply.content), node_id)
        if name is None or wrong is not None:
            grid.exclude(node_id)  # before it spends epsilon on rounds that cannot be kept
            progress(f"node {node_id} left out of this run: {wrong}")
            continue
        identity = reply.content.config_records[NODE]
        sizes[name] = int(identity.get(NUM_EXAMPLES, 0))  # type: ignore[arg-type]
    progress("nodes: " + ", ".join(f"{name} ({n} examples)" for name, n in sorted(sizes.items())))
    return sizes


def _rounds(
    grid: EnrolledGrid,
    context: Context,
    setup: RunSetup,
    config: RunConfig,
    *,
    first: int,
    arrays: dict[str, np.ndarray],
    progress: Callable[[str], None],
) -> None:
    aggregation = config.aggregation
    minimum = config.run.min_nodes or len(config.nodes)
    nodes = _wait_for_nodes(grid, minimum, aggregation.node_wait_s)
    sizes = _describe_nodes(grid, nodes, aggregation.reply_timeout_s, progress)
    if setup.training.is_planned:  # "auto": planned for the smallest node that answered
        if not sizes:
            raise NotEnoughNodesError('training "auto" needs the nodes\' sizes; none answered')
        setup.plan_training(min(sizes.values()), progress=progress)
    # Evaluation (and plain training) go through fedtune's validating FedAvg; its own node
    # sampling would wait without a limit, so its minimums are 1 and this loop waits instead.
    plain = ValidatingFedAvg(
        observer=setup.recorder,
        upload_dtype=aggregation.plain_upload,
        ledger_check=setup.ledger_check(),
        receipts=setup.recorder.receipt_for,
        enrolled=grid.enrolled_name,
        fraction_train=config.run.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=1,
    )
    secure = None
    if aggregation.secure:
        max_weight = aggregation.max_weight or float(max(sizes.values(), default=1))
        progress(f"secure aggregation (SecAgg+), max weight {max_weight:g}")
        secure = _SecureRounds(grid, context, setup, config, arrays, max_weight=max_weight)
    try:
        for server_round in range(first, config.run.rounds + 1):
            _wait_for_nodes(grid, minimum, aggregation.node_wait_s)
            if secure is not None:
                arrays = secure.train(server_round)
            else:
                messages = plain.configure_train(
                    server_round, arrays_to_record(arrays), setup.instructions.to_record(), grid
                )
                replies = grid.send_and_receive(messages, timeout=aggregation.reply_timeout_s)
                mean, _ = plain.aggregate_train(server_round, replies)
                arrays = record_to_arrays(mean) if mean is not None else arrays
            messages = plain.configure_evaluate(
                server_round, arrays_to_record(arrays), setup.instructions.to_record(), grid
            )
            replies = grid.send_and_receive(messages, timeout=aggregation.reply_timeout_s)
            plain.aggregate_evaluate(server_round, replies)
    finally:
        if secure is not None:
            secure.close()


class StrictMajority(float):
    """A reconstruction threshold whose share of n nodes is always a strict majority.

    Flower rounds ``fraction * n`` to the nearest even integer: 0.6 of 4 nodes gives 2, no
    majority, which lets a coordinator that splits the nodes collect a dropped node's secrets
    from half of them; nodes refuse it (client_node/secagg_guard.py)."""

    def __mul__(self, nodes: object) -> float:
        if not isinstance(nodes, int):
            return NotImplemented
        return max(float(self) * nodes, float(nodes // 2 + 1))

    __rmul__ = __mul__


class _SecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+, also surviving a node that leaves before it has shared its keys.

    Flower's unmask stage wants to rebuild the keys of every node that was sampled and is gone;
    a node that left before sharing its keys left no shares to rebuild from, so the round
    halted. Such a node masked nothing and nobody masked with it: it is dropped from the round
    (and from every neighbourhood) once key sharing is over.
    """

    def share_keys_stage(self, grid: Grid, context: Context, state: WorkflowState) -> bool:
        proceed = bool(super().share_keys_stage(grid, context, state))  # type: ignore[arg-type]
        stayed = set(state.active_node_ids)
        state.sampled_node_ids = stayed
        state.nid_to_neighbours = {
            node: neighbours & stayed
            for node, neighbours in state.nid_to_neighbours.items()
            if node in stayed
        }
        return proceed


def _node_level_privacy(config: RunConfig, run_id: str) -> NodeLevelPrivacy | None:
    settings = config.aggregation.node_dp
    if settings is None:
        return None
    ledger = NodeLedger(config.output.dir / "node-level-ledger", node=LEDGER_NODE)
    return NodeLevelPrivacy(settings, run_id=run_id, population=len(config.nodes), ledger=ledger)


class _SecureRounds:
    """Train rounds through Flower's SecAgg+ workflow, which needs a LegacyContext."""

    def __init__(
        self,
        grid: EnrolledGrid,
        context: Context,
        setup: RunSetup,
        config: RunConfig,
        arrays: dict[str, np.ndarray],
        *,
        max_weight: float,
    ):
        aggregation = config.aggregation
        secagg_masks.install()  # unmask with the masks the nodes made (not Flower's 32-bit ones)
        secagg_masks.check_installed()
        self.grid = grid
        # Signed keys to peers; masked updates the secure sum cannot take refused.
        self.relay = MaskedVectorCheck(SignedKeyRelay(grid, grid.roster.certificates))
        self.setup = setup
        self.strategy = SecureFedAvg(
            instructions=setup.instructions,
            global_arrays=arrays_to_record(arrays),
            observer=setup.recorder,
            ledger_check=setup.ledger_check(),
            min_nodes=config.run.min_nodes or len(config.nodes),
            fraction_train=config.run.fraction_train,
            node_wait_s=aggregation.node_wait_s,
            node_dp=_node_level_privacy(config, setup.run_id),
            enrolled=grid.enrolled_name,
        )
        setup.recorder.node_level = self.strategy.node_dp  # its ledger copied with each round
        self.legacy = LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=config.run.rounds),
            strategy=self.strategy,
        )
        self.workflow = _SecAggPlus(
            num_shares=1.0,  # every sampled node holds a share of every other's keys
            reconstruction_threshold=StrictMajority(aggregation.reconstruction_threshold),
            max_weight=max_weight,
            clipping_range=aggregation.clipping_range,
            quantization_range=QUANTIZATION_RANGE,
            # A round sums at most the run's nodes: 3 bytes a masked value for up to 3 nodes.
            modulus_range=modulus_for(len(config.nodes), quantization_range=QUANTIZATION_RANGE),
            timeout=aggregation.reply_timeout_s,
        )
        # The client manager learns its nodes from the grid it is given: enrolled ones only.
        self.thread, self.stop, registered = start_update_client_manager_thread(
            grid, self.legacy.client_manager
        )
        registered.wait()

    def train(self, server_round: int) -> dict[str, np.ndarray]:
        strategy = self.strategy
        self.legacy.state.array_records[MAIN_PARAMS_RECORD] = parameters_to_arrayrecord(
            strategy.parameters(), keep_input=True
        )
        self.legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round, WorkflowKey.START_TIME: time.time()}
        )
        self.workflow(self.relay, self.legacy)
        if strategy.recorded_round != server_round:  # the protocol halted before the mean
            outcomes = [
                ReplyOutcome(
                    "failed",
                    node,
                    strategy.name_of(node),
                    "secure aggregation halted: too few nodes stayed",
                )
                for node in strategy.sampled
            ]
            self.setup.recorder.on_train(server_round, outcomes, None, None, strategy.global_arrays)
        return record_to_arrays(strategy.global_arrays)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
