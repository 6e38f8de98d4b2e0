"""The node's Flower ClientApp (Message API): train and evaluate the global LoRA adapter on
this node's data. Only the adapter update, metrics and the privacy report leave the node.

The base model is loaded once per process and reused across messages (:func:`node_runtime`);
a message for a different base model is refused before anything runs. A simulation's Ray
actor plays many nodes in turn: it keeps the runtimes (data sets, fingerprints) of the nodes it
served last, at most :data:`DEFAULT_CACHED_NODES` (``simulation.cached_nodes``), and rebuilds an
evicted one from its files; a node's ledger lives in its file (opened per use), so nothing of
it is lost.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel

from fedtune.client_node.abtest_eval import (
    MissingHeldOutDataError,
    score_versions,
    scores_content,
)
from fedtune.client_node.data import ChatDataset
from fedtune.client_node.evaluation import HeldOutMetrics, evaluate
from fedtune.client_node.local_round import train_local_round
from fedtune.client_node.metric_policy import (
    dp_scores_content,
    evaluate_metrics,
    train_metrics,
)
from fedtune.client_node.preference_data import PAIR_FORM, PreferenceDataset
from fedtune.client_node.preference_eval import PreferenceMetrics, evaluate_preferences
from fedtune.client_node.prompt_data import PROMPT_FORM, PromptDataset
from fedtune.client_node.rewards import RewardError
from fedtune.client_node.training_data import (
    TrainingData,
    budget_group_fingerprints,
    load_held_out,
    load_held_out_pairs,
    load_held_out_prompts,
    load_training_data,
    method_of,
)
from fedtune.common.errors import FedtuneError
from fedtune.platform.config import ConfigError, LoraSettings, NodeConfig, TrainingSettings
from fedtune.platform.model.base_model import BaseModel, load_base_model
from fedtune.platform.model.fingerprint import file_fingerprint
from fedtune.platform.model.lora import adapter_arrays, attach_lora, load_adapter_arrays
from fedtune.platform.wire.messages import (
    ABTEST,
    ABTEST_MESSAGE_TYPE,
    ARRAYS,
    CONFIG,
    DESCRIBE_MESSAGE_TYPE,
    EVALUATE_DEVICE_SECONDS,
    EVALUATE_TOKENS,
    GRPO_METRICS,
    NODE,
    NODE_SECONDS,
    NUM_EXAMPLES,
    SECURE_AGGREGATION,
    SERVER_ROUND,
    TRAIN_DEVICE_SECONDS,
    TRAIN_TOKENS,
    AbTestInstructions,
    ProtocolMismatchError,
    TrainInstructions,
    decline_content,
    evaluate_reply_content,
    node_identity,
    receipt_from_content,
    record_to_arrays,
    train_reply_content,
)
from fedtune.platform.wire.plain_upload import narrowed
from fedtune.privacy.accounting import BudgetExhaustedError
from fedtune.privacy.ledger import LedgerFormatError
from fedtune.privacy.node_ledger import NodeLedger

logger = logging.getLogger(__name__)


class BaseModelMismatchError(FedtuneError, RuntimeError):
    """The run trains a different base model than the one this node holds."""


@dataclass
class _LoadedModel:
    base: BaseModel
    peft: PeftModel | None = None
    lora: LoraSettings | None = None


@dataclass
class NodeRuntime:
    """What a node keeps in memory between messages."""

    config: NodeConfig
    loaded: _LoadedModel
    train_data: TrainingData  # as the file holds: the run asks a method
    held_out: ChatDataset
    data_fingerprint: str
    held_out_fingerprint: str
    ledger: NodeLedger
    budget_group: list[str]  # fingerprints of data.shares_budget_with
    # The held-out preference pairs, when the held-out file holds pairs (else None).
    held_out_pairs: PreferenceDataset | None = None
    # The held-out GRPO prompts, when the held-out file holds prompts with answers.
    held_out_prompts: PromptDataset | None = None

    @property
    def pad_token_id(self) -> int:
        return int(self.loaded.base.tokenizer.pad_token_id)  # type: ignore[attr-defined]

    def model_with(self, lora: LoraSettings) -> PeftModel:
        """The base model with an adapter of shape ``lora`` (re-wrapped if the shape changed)."""
        loaded = self.loaded
        if loaded.peft is None or loaded.lora != lora:
            if loaded.peft is not None:
                loaded.base.model = loaded.peft.unload()
            loaded.peft = attach_lora(loaded.base.model, lora)
            loaded.lora = lora
        return loaded.peft

    def identity(self) -> ConfigRecord:
        return node_identity(
            name=self.config.node.name,
            base_model_fingerprint=self.loaded.base.fingerprint,
            data_fingerprint=self.data_fingerprint,
        )


DEFAULT_CACHED_NODES = 32


class RuntimeCache(OrderedDict[str, NodeRuntime]):
    """The runtimes of the ``limit`` nodes served last, by node name (least recent first)."""

    def __init__(self, limit: int = DEFAULT_CACHED_NODES) -> None:
        super().__init__()
        self.limit = limit

    def set_limit(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the runtime cache holds at least one node, not {limit}")
        self.limit = limit
        self._evict()

    def fresh(self, config: NodeConfig) -> NodeRuntime | None:
        """The cached runtime of ``config``'s node, if it was built from ``config``."""
        runtime = self.get(config.node.name)
        if runtime is None or runtime.config != config:
            return None
        self.move_to_end(config.node.name)
        return runtime

    def keep(self, runtime: NodeRuntime) -> None:
        self[runtime.config.node.name] = runtime
        self.move_to_end(runtime.config.node.name)
        self._evict()

    def _evict(self) -> None:
        while len(self) > self.limit:
            _, evicted = self.popitem(last=False)
            evicted.ledger.close()


_MODELS: dict[tuple[str, str, str], _LoadedModel] = {}
_RUNTIMES = RuntimeCache()


def node_runtime(config: NodeConfig) -> NodeRuntime:
    """This process's runtime for the node ``config`` describes; loaded on first use."""
    runtime = _RUNTIMES.fresh(config)
    if runtime is not None:
        return runtime
    if config.training.torch_threads:
        torch.set_num_threads(config.training.torch_threads)
    key = (config.model.spec, config.model.quantization, config.model.dtype)
    loaded = _MODELS.get(key)
    if loaded is None:
        loaded = _MODELS[key] = _LoadedModel(base=load_base_model(config.model))
    tokenizer = loaded.base.tokenizer
    train_data = load_training_data(
        config.data.train,
        tokenizer,
        method=None,
        max_length=config.data.max_length,
        loss_on_thinking=config.data.loss_on_thinking,
    )
    held_out = load_held_out(
        config.data.eval,
        tokenizer,
        max_length=config.data.max_length,
        limit=config.data.max_eval_examples,
        loss_on_thinking=config.data.loss_on_thinking,
    )
    data_fingerprint = file_fingerprint(config.data.train)
    runtime = NodeRuntime(
        config=config,
        loaded=loaded,
        train_data=train_data,
        held_out=held_out,
        data_fingerprint=data_fingerprint,
        held_out_fingerprint=file_fingerprint(config.data.eval),
        ledger=NodeLedger(config.node.state_dir, node=config.node.name),
        budget_group=budget_group_fingerprints(config.data.shares_budget_with),
        held_out_pairs=load_held_out_pairs(
            config.data.eval,
            tokenizer,
            max_length=config.data.max_length,
            limit=config.data.max_eval_examples,
        ),
        held_out_prompts=load_held_out_prompts(
            config.data.eval,
            tokenizer,
            max_length=config.data.max_length,
            limit=config.data.max_eval_examples,
        ),
    )
    _RUNTIMES.keep(runtime)
    return runtime


def _check_base_model(runtime: NodeRuntime, expected: str) -> None:
    own = runtime.loaded.base.fingerprint
    if own != expected:
        raise BaseModelMismatchError(
            f"node {runtime.config.node.name} refuses the round: the run trains base model "
            f"{expected}, this node holds {own} ({runtime.config.model.spec})"
        )


def _evaluate(runtime: NodeRuntime, model: torch.nn.Module) -> HeldOutMetrics:
    return evaluate(
        model,
        runtime.held_out,
        pad_token_id=runtime.pad_token_id,
        device=runtime.loaded.base.device,
    )


def _evaluate_preferences(
    runtime: NodeRuntime, model: torch.nn.Module, *, beta: float
) -> PreferenceMetrics | None:
    """Preference accuracy and margins on the held-out pairs (None without pairs); only
    for a node that releases plain metrics (figures under "dp" have no release for them)."""
    if runtime.held_out_pairs is None or runtime.config.privacy.release_metrics != "plain":
        return None
    return evaluate_preferences(
        model,
        runtime.held_out_pairs,
        beta=beta,
        pad_token_id=runtime.pad_token_id,
        device=runtime.loaded.base.device,
    )


def train_reply(config: NodeConfig, content: RecordDict) -> RecordDict:
    """Set the global adapter, train one private round; the reply's content (the update, or
    a decline with its reason)."""
    started = time.perf_counter()
    config_record = content.config_records[CONFIG]
    runtime = node_runtime(config)
    try:
        instructions = TrainInstructions.from_record(config_record)
    except ProtocolMismatchError as exc:  # before any training: no epsilon is spent
        return decline_content(identity=runtime.identity(), reason=str(exc))
    server_round = config_record.get(SERVER_ROUND)
    _check_base_model(runtime, instructions.base_model_fingerprint)
    mismatch = _method_mismatch(runtime, instructions.method)
    if mismatch is not None:  # before any training: no epsilon is spent
        return decline_content(identity=runtime.identity(), reason=mismatch)
    model = runtime.model_with(instructions.lora)
    load_adapter_arrays(model, record_to_arrays(content[ARRAYS]))  # type: ignore[arg-type]
    try:  # before any training: no epsilon is spent
        training = config.training.updated(
            section="training",
            steps=instructions.steps,
            batch_size=instructions.batch_size,
            physical_batch_size=min(config.training.physical_batch_size, instructions.batch_size),
            learning_rate=instructions.learning_rate,
            optimizer=instructions.optimizer,
            method=instructions.method,
            dpo_beta=instructions.dpo_beta,
            **instructions.grpo,
        )
        privacy = config.privacy.updated(
            section="privacy", planned_rounds=instructions.planned_rounds
        )
    except ConfigError as exc:
        reason = f"the run's settings are refused: {exc}"
        return decline_content(identity=runtime.identity(), reason=reason)
    connection = config.coordinator
    if (
        connection is not None
        and connection.require_secure_aggregation
        and not config_record.get(SECURE_AGGREGATION, False)
    ):
        reason = (
            f"node {config.node.name} sends updates only through secure aggregation "
            "(coordinator.require_secure_aggregation = true); this round asked for it in the clear"
        )
        return decline_content(identity=runtime.identity(), reason=reason)
    if privacy.mode == "non-private" and not privacy.allow_non_private_updates:
        reason = (
            f"node {config.node.name} trains without differential privacy (privacy.mode = "
            '"non-private") and does not send such updates; set '
            "privacy.allow_non_private_updates = true to allow it (comparisons only)"
        )
        return decline_content(identity=runtime.identity(), reason=reason)
    metrics: dict[str, int | float] = {}
    evaluations: list[HeldOutMetrics] = []
    # Local evaluations feed only figures the node's policy releases ("plain").
    evaluate_local = instructions.evaluate_local_model and config.privacy.release_metrics == "plain"
    if evaluate_local and server_round == 1:
        # The first global adapter is the base model's (B = 0): its loss is the baseline.
        baseline = _evaluate(runtime, model)
        metrics["held-out-loss-start"] = baseline.loss
        evaluations.append(baseline)
    try:
        local = train_local_round(
            model,
            runtime.train_data,
            ledger=runtime.ledger,
            data_fingerprint=runtime.data_fingerprint,
            base_model_fingerprint=runtime.loaded.base.fingerprint,
            training=training,
            privacy=privacy,
            pad_token_id=runtime.pad_token_id,
            device=runtime.loaded.base.device,
            run_id=instructions.run_id,
            server_round=int(server_round) if isinstance(server_round, int) else None,
            # The run's rounds left, this one included: a later run (or a resumed round)
            # spreads what is left of the node's target over them.
            remaining_rounds=(
                instructions.planned_rounds - server_round + 1
                if isinstance(server_round, int)
                else None
            ),
            progress=False,
            budget_group=runtime.budget_group,
            tokenizer=runtime.loaded.base.tokenizer,
        )
    except (BudgetExhaustedError, RewardError) as exc:  # before any training
        return decline_content(identity=runtime.identity(), reason=str(exc))
    losses = [loss for loss in local.result.train_losses if loss is not None]
    metrics[NUM_EXAMPLES] = len(runtime.train_data)
    metrics["train-loss"] = sum(losses) / len(losses) if losses else math.nan
    metrics["train-seconds"] = local.result.seconds
    metrics[TRAIN_TOKENS] = local.result.tokens
    metrics[TRAIN_DEVICE_SECONDS] = local.result.device_seconds
    if local.grpo is not None:  # the round's health: what its sampled completions earned
        metrics.update(
            {
                name: float(local.grpo[key])
                for name, key in GRPO_METRICS.items()
                if local.grpo[key] is not None
            }
        )
    if evaluate_local:
        local_model = _evaluate(runtime, model)
        metrics["held-out-loss-local"] = local_model.loss
        evaluations.append(local_model)
    metrics["evaluate-seconds"] = sum(e.seconds for e in evaluations)
    metrics[EVALUATE_TOKENS] = sum(e.tokens_read for e in evaluations)
    metrics[EVALUATE_DEVICE_SECONDS] = sum(e.device_seconds for e in evaluations)
    # All the node's own work on this message (loading, accounting, ledger, evaluation too).
    metrics[NODE_SECONDS] = time.perf_counter() - started
    arrays = adapter_arrays(model)
    if not config_record.get(SECURE_AGGREGATION, False):  # SecAgg+ quantises float32 itself
        arrays = narrowed(arrays, instructions.upload_dtype)
    return train_reply_content(
        arrays=arrays,
        metrics=train_metrics(config, metrics),
        identity=runtime.identity(),
        budget=local.budget,
        ledger=(local.entry, local.checkpoint),
    )


def _method_mismatch(runtime: NodeRuntime, method: str) -> str | None:
    """Why this node cannot train the run's ``method`` on its data (one line), or None."""
    node, path = runtime.config.node.name, runtime.config.data.train
    if method not in ("sft", "dpo", "grpo"):
        return f"node {node} does not know training method {method[:20]!r} (sft, dpo or grpo)"
    if method_of(runtime.train_data) == method:
        return None
    if method == "grpo":
        return (
            f'node {node}: the run trains with GRPO (training.method = "grpo"), and its data '
            f"{path} holds no prompts with answers {PROMPT_FORM}"
        )
    if method == "dpo":
        return (
            f'node {node}: the run trains with DPO (training.method = "dpo"), and its data '
            f"{path} holds no preference pairs {PAIR_FORM}"
        )
    held = "prompts with answers" if method_of(runtime.train_data) == "grpo" else "preference pairs"
    return (
        f'node {node}: the run trains with SFT (training.method = "sft"), and its data {path} '
        f"holds {held}, not conversations"
    )


def evaluate_reply(config: NodeConfig, content: RecordDict) -> RecordDict:
    """Held-out loss and perplexity of the global adapter on this node's data (and, on
    held-out preference pairs, preference accuracy and reward margin at the run's beta); the
    coordinator's receipt for this node's ledger head, when the message carries one, is kept
    beside the entry it covers."""
    started = time.perf_counter()
    runtime = node_runtime(config)
    instructions = TrainInstructions.from_record(content.config_records[CONFIG])
    _keep_receipt(runtime, content)
    _check_base_model(runtime, instructions.base_model_fingerprint)
    model = runtime.model_with(instructions.lora)
    load_adapter_arrays(model, record_to_arrays(content[ARRAYS]))  # type: ignore[arg-type]
    result = _evaluate(runtime, model)
    preferences = _evaluate_preferences(runtime, model, beta=instructions.dpo_beta)
    server_round = content.config_records[CONFIG].get(SERVER_ROUND)
    metrics, release = evaluate_metrics(
        config,
        result,
        preferences=preferences,
        seconds=time.perf_counter() - started,
        ledger=runtime.ledger,
        held_out_fingerprint=runtime.held_out_fingerprint,
        base_model_fingerprint=runtime.loaded.base.fingerprint,
        run_id=instructions.run_id,
        round_number=server_round if isinstance(server_round, int) else 0,
    )
    return evaluate_reply_content(metrics=metrics, identity=runtime.identity(), ledger=release)


def _keep_receipt(runtime: NodeRuntime, content: RecordDict) -> None:
    """Store the message's receipt; a bad one is logged and left out (it proves nothing, and
    evaluating does not depend on it)."""
    try:
        receipt = receipt_from_content(content)
        problem = runtime.ledger.keep_receipt(receipt) if receipt is not None else None
    except (LedgerFormatError, ValueError) as exc:
        problem = str(exc)
    if problem is not None:
        logger.warning("coordinator's ledger receipt not kept: %s", problem)


def abtest_reply(config: NodeConfig, content: RecordDict) -> RecordDict:
    """Score A/B test versions on this node's held-out data; only scores leave, and only
    from a node that releases plain metrics (the others decline, saying why)."""
    runtime = node_runtime(config)
    if config.privacy.release_metrics == "none":
        reason = (
            f"node {config.node.name} releases no metrics (privacy.release_metrics = "
            '"none"): it does not score A/B tests'
        )
        return decline_content(identity=runtime.identity(), reason=reason)
    instructions = AbTestInstructions.from_record(content.config_records[ABTEST])
    try:  # the coordinator's beta meets the node's own rule for training.dpo_beta
        TrainingSettings.checked("dpo_beta", instructions.dpo_beta, section="abtest")
    except ConfigError as exc:
        reason = f"node {config.node.name} refuses the A/B test's settings: {exc}"
        return decline_content(identity=runtime.identity(), reason=reason)
    _check_base_model(runtime, instructions.base_model_fingerprint)
    arrays = {
        side: record_to_arrays(content.array_records[f"{ARRAYS}-{side}"])
        if f"{ARRAYS}-{side}" in content.array_records
        else None
        for side in ("a", "b")
    }
    try:
        scores = score_versions(runtime, instructions, arrays)
    except (MissingHeldOutDataError, RewardError) as exc:
        return decline_content(identity=runtime.identity(), reason=str(exc))
    if config.privacy.release_metrics == "dp":
        try:
            return dp_scores_content(
                config,
                scores,
                identity=runtime.identity(),
                ledger=runtime.ledger,
                held_out_fingerprint=runtime.held_out_fingerprint,
                base_model_fingerprint=runtime.loaded.base.fingerprint,
                test_id=instructions.test_id,
            )
        except BudgetExhaustedError as exc:
            return decline_content(identity=runtime.identity(), reason=str(exc))
    return scores_content(
        scores,
        per_example=config.evaluation.share_per_example_scores,
        identity=runtime.identity(),
    )


def describe_reply(config: NodeConfig, content: RecordDict) -> RecordDict:
    """Who this node is and how many training examples it holds (the coordinator sizes secure
    aggregation's weights with it); loads the model, so the node is warm afterwards."""
    runtime = node_runtime(config)
    identity = runtime.identity()
    identity[NUM_EXAMPLES] = len(runtime.train_data)
    return RecordDict({NODE: identity})


# What each kind of message asks of a node: Flower's message type -> the handler of its content.
REPLIES: dict[str, Callable[[NodeConfig, RecordDict], RecordDict]] = {
    "train": train_reply,
    "evaluate": evaluate_reply,
    ABTEST_MESSAGE_TYPE: abtest_reply,
    DESCRIBE_MESSAGE_TYPE: describe_reply,
}


def handle_train(config: NodeConfig, message: Message) -> Message:
    return Message(train_reply(config, message.content), reply_to=message)


def handle_evaluate(config: NodeConfig, message: Message) -> Message:
    return Message(evaluate_reply(config, message.content), reply_to=message)


def handle_abtest(config: NodeConfig, message: Message) -> Message:
    return Message(abtest_reply(config, message.content), reply_to=message)


def build_client_app(
    node_config_for: Callable[[Context], NodeConfig],
    *,
    cached_nodes: int = DEFAULT_CACHED_NODES,
) -> ClientApp:
    """A ClientApp whose node configuration comes from ``node_config_for(context)``.

    ``node_config_for`` must be picklable: Flower's simulation ships the app to its workers.
    ``cached_nodes``: how many nodes' runtimes a process keeps (a Ray actor plays many nodes).
    """
    if cached_nodes < 1:
        raise ValueError(f"cached_nodes must be at least 1, not {cached_nodes}")
    app = ClientApp()

    @app.lifespan()
    def _limit(context: Context) -> Iterator[None]:  # around every message
        _RUNTIMES.set_limit(cached_nodes)
        yield

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(node_config_for(context), message)

    @app.evaluate()
    def evaluate_(message: Message, context: Context) -> Message:
        return handle_evaluate(node_config_for(context), message)

    @app.evaluate("abtest")
    def abtest(message: Message, context: Context) -> Message:
        return handle_abtest(node_config_for(context), message)

    @app.query("describe")
    def describe(message: Message, context: Context) -> Message:
        return Message(describe_reply(node_config_for(context), message.content), reply_to=message)

    return app
