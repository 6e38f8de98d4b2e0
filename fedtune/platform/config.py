"""Typed, validated configuration loaded from TOML.

Every section is a pydantic model; :func:`load_node_config` turns any validation problem into a
:class:`ConfigError` that names the file and the dotted key, e.g.
``node.toml: privacy.target_epsilon: Input should be greater than 0``.
Relative paths in a config file are resolved against the file's directory.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from fedtune.common.errors import FedtuneError, unreadable
from fedtune.privacy.training_defaults import (
    DP_LEARNING_RATE,
    DP_MAX_GRAD_NORM,
    GRPO_LEARNING_RATE,
)

PositiveFloat = Annotated[float, Field(gt=0)]
# Configuration is strict (a string "8" is no number; see _Section), but TOML has no path
# type: a path is written as a string.
ConfigPath = Annotated[Path, Field(strict=False)]


def _database_url(value: str) -> str:
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(value)
    except ArgumentError:
        raise ValueError(
            f"{value!r} is not an SQLAlchemy URL (a SQLite file is sqlite:////absolute/path.db)"
        ) from None
    return value


DatabaseUrl = Annotated[str, AfterValidator(_database_url)]
PositiveInt = Annotated[int, Field(gt=0)]


_ConfigT = TypeVar("_ConfigT", bound=BaseModel)


WITNESS_KEY_FILE = "witness_key.pem"


class ConfigError(FedtuneError, ValueError):
    """A configuration file is missing, unreadable or invalid."""


class _Section(BaseModel):
    """Strict: a value of the wrong TOML type (``target_epsilon = "8"``) is refused rather
    than converted, and no float may be inf or nan."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    def updated(self, *, section: str, **changes: Any) -> Self:
        """A copy with ``changes``, validated as the TOML is (``model_copy`` validates
        nothing): values a coordinator sends meet the node's own rules. ``section`` names
        this part of the configuration in the one-line error."""
        try:
            return self.model_validate({**self.model_dump(), **changes})
        except ValidationError as exc:
            problems = [
                f"{'.'.join([section, *map(str, item['loc'])])}: "
                + item["msg"].removeprefix("Value error, ")
                for item in exc.errors()
            ]
            raise ConfigError("; ".join(problems)) from None

    @classmethod
    def checked(cls, key: str, value: Any, *, section: str) -> Any:
        """``value`` validated as this section's ``key`` is in the TOML, alone (without the
        section's rules between keys): a coordinator's value for one of the node's settings,
        e.g. an A/B test's DPO beta. :class:`ConfigError` names ``section.key``."""
        field = cls.model_fields[key]
        adapter: TypeAdapter[Any] = TypeAdapter(
            Annotated[field.annotation, *field.metadata],  # type: ignore[arg-type]
            config=ConfigDict(strict=True, allow_inf_nan=False),
        )
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{section}.{key}: {problem}") from None


class ModelConfig(_Section):
    """Which base model to load and how."""

    spec: str = Field(
        default="smollm2-135m",
        description="A local Hugging Face directory, a .gguf file, or the alias 'smollm2-135m'.",
    )
    cache_dir: ConfigPath | None = Field(
        default=None,
        description="Where converted models are kept; default $FEDTUNE_CACHE_DIR or "
        "~/.cache/fedtune.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantization: Literal["none", "4bit", "8bit"] = Field(
        default="none", description="QLoRA loading through bitsandbytes; CUDA only."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="The precision of the base model's (unquantized) weights. bfloat16 halves "
        "their memory on a GPU; the LoRA adapter, its gradients, the clipping and the noise "
        "stay float32 either way. On a CPU with native bfloat16 (AVX-512 BF16 or AMX) it is "
        "faster too (a DP step of SmolLM2-135M: 7.9 s against 10.9 s measured on a 2-core AMD "
        "EPYC); without, bfloat16 is emulated and slower than float32. With "
        "model.quantization the quantizer decides the precision: leave this at float32.",
    )

    @model_validator(mode="after")
    def _one_precision_setting(self) -> Self:
        if self.dtype != "float32" and self.quantization != "none":
            raise ValueError(
                f'dtype = "{self.dtype}" applies to unquantized weights, but quantization = '
                f'"{self.quantization}": the quantizer sets the precision, leave dtype at float32'
            )
        return self


class DataConfig(_Section):
    """The node's local data set: JSONL, CSV or Parquet (chosen by the file's suffix) in chat
    or prompt/response form (see fedtune/client_node/data.py), or JSONL preference pairs
    (``{"prompt", "chosen", "rejected"}``) for ``training.method = "dpo"``."""

    train: ConfigPath
    eval: ConfigPath
    max_length: Annotated[int, Field(ge=8)] = 128
    loss_on_thinking: bool = Field(
        default=True,
        description="Whether an answer's <think>...</think> reasoning (DeepSeek-R1 style) "
        "counts in the loss; false trains on the answer after it, the reasoning as context.",
    )
    max_eval_examples: PositiveInt | None = Field(
        default=None, description="Evaluate on at most this many held-out examples."
    )
    shares_budget_with: list[ConfigPath] = Field(
        default_factory=list,
        description="Other training files that hold the same people as this one (say, the "
        "SFT file a preference file was made from). The budget guard then counts the group "
        "as one budget: a round runs only if the epsilon of every private round on these "
        "files and on this one, composed together, stays within privacy.epsilon_cap, and the "
        "noise is planned so that the group ends at privacy.target_epsilon. Files are known "
        "by their content's fingerprint, as in the ledger.",
    )


class LoraSettings(_Section):
    """LoRA adapter shape. DP noise is added to every trainable value, so the defaults keep
    them few: the attention query and value projections only (per model family, see
    fedtune/platform/model/families.py), and only the B matrices (FFA-LoRA). Measured on the
    demo data at epsilon 8 (benchmarks/dp_utility.py): B-only at lr 1e-2 gained 0.65 in
    held-out loss where A+B at lr 3e-3 gained 0.45."""

    r: PositiveInt = 8
    alpha: PositiveInt = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: (
        Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None
    ) = Field(
        default=None,
        description="Layer names LoRA adapts, matched as PEFT does (a full module name or its "
        "last dotted parts), or ['all-linear']. Unset: the model family's default (Llama, "
        "Qwen2: q_proj, v_proj; DeepSeek-V2/V3: q_proj or q_b_proj, kv_b_proj). Each name "
        "must match a linear layer; the router and routed experts of an MoE stay frozen.",
    )
    train_a: bool = Field(
        default=False,
        description="False freezes the random A matrices and trains only B (FFA-LoRA), "
        "halving the noised parameters.",
    )


DEFAULT_DPO_BETA = 0.1
# DPO's beta in practice lies in 0.01-1; far above, the implicit reward (beta times a log
# ratio) only overflows. A coordinator's beta for an A/B test meets the same bound.
MAX_DPO_BETA = 100.0
# The most rewards training.grpo_rewards may sum: the number of built-in reward kinds. An A/B
# test counts each reward in [0, 1], so a prompt's "reward" lies in [0, MAX_GRPO_REWARDS]:
# the coordinator's bound on any node's per-prompt score (fedtune/coordinator/ab_statistics.py).
MAX_GRPO_REWARDS = 3
# GRPO's defaults, sized to run on a laptop CPU (fedtune/client_node/grpo.py). 96 completion
# tokens: a worked answer in the <think>…</think><answer>…</answer> format takes 40-60 tokens
# on the demo's prompts; at 32-48 every completion was cut before <answer> and all rewards
# were 0 (SmolLM2-135M after the demo's cold start, 8 held-out prompts per domain: reward
# 1.125 hospital / 0.5 bank of 2 at 96 tokens, 0 at 32).
GRPO_DEFAULTS: dict[str, Any] = {
    "grpo_group_size": 4,
    "grpo_max_completion_tokens": 96,
    "grpo_temperature": 1.0,
    "grpo_beta": 0.04,
    "grpo_clip_ratio": 0.2,
    "grpo_rewards": ["answer_exact", "format"],
    "grpo_numeric_tolerance": 0.0,
}


class TrainingSettings(_Section):
    """One round of local training. A round is ``steps`` optimizer steps over logical batches
    of ``batch_size`` examples (expected size under Poisson sampling), computed in physical
    micro-batches of at most ``physical_batch_size``. ``"auto"`` takes the privacy planner's
    choice for the data size (`fedtune privacy plan`; :meth:`planned`). Under
    ``method = "dpo"`` a row is a preference pair: batches count pairs, and a pair costs
    about twice an example's memory (its chosen and its rejected answer)."""

    steps: PositiveInt | Literal["auto"] = 20
    batch_size: PositiveInt | Literal["auto"] = 32
    physical_batch_size: PositiveInt = 8
    # Measured (privacy/training_defaults.py); GRPO_LEARNING_RATE with method = "grpo".
    learning_rate: PositiveFloat = DP_LEARNING_RATE
    optimizer: Literal["adamw", "sgd"] = "adamw"
    method: Literal["sft", "dpo", "grpo"] = Field(
        default="sft",
        description='"sft": supervised, on conversations; "dpo": direct preference '
        'optimisation on preference pairs (the privacy unit is then one pair); "grpo": group '
        "relative policy optimisation on prompts with checkable answers (the privacy unit is "
        "then one prompt). In a federated run the run's configuration chooses it for every node.",
    )
    dpo_beta: Annotated[float, Field(gt=0, le=MAX_DPO_BETA)] = Field(
        default=DEFAULT_DPO_BETA,
        description='With method = "dpo": how far the model may move from the base model '
        "(DPO's beta, at most 100; larger: closer to the base).",
    )
    grpo_group_size: Annotated[int, Field(ge=2)] = Field(
        default=GRPO_DEFAULTS["grpo_group_size"],
        description='With method = "grpo": completions sampled per prompt (G).',
    )
    grpo_max_completion_tokens: PositiveInt = Field(
        default=GRPO_DEFAULTS["grpo_max_completion_tokens"],
        description='With method = "grpo": the most tokens a sampled completion may have.',
    )
    grpo_temperature: PositiveFloat = Field(
        default=GRPO_DEFAULTS["grpo_temperature"],
        description='With method = "grpo": the sampling temperature of the completions.',
    )
    grpo_beta: Annotated[float, Field(ge=0)] = Field(
        default=GRPO_DEFAULTS["grpo_beta"],
        description='With method = "grpo": weight of the KL divergence to the base model.',
    )
    grpo_clip_ratio: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=GRPO_DEFAULTS["grpo_clip_ratio"],
        description='With method = "grpo": the policy ratio is clipped to [1 - c, 1 + c].',
    )
    grpo_rewards: Annotated[
        list[Annotated[str, Field(min_length=1)]],
        Field(min_length=1, max_length=MAX_GRPO_REWARDS),
    ] = Field(
        default_factory=lambda: list(GRPO_DEFAULTS["grpo_rewards"]),
        description='With method = "grpo": the rewards summed per completion (at most 3): '
        'built in "answer_exact", "answer_numeric", "format", or a name installed in the '
        'Python entry point group "fedtune.rewards" (fedtune/client_node/rewards.py).',
    )
    grpo_numeric_tolerance: Annotated[float, Field(ge=0)] = Field(
        default=GRPO_DEFAULTS["grpo_numeric_tolerance"],
        description='With method = "grpo": how far a numeric answer may be from the reference '
        'and still earn "answer_numeric".',
    )
    seed: int | None = Field(
        default=None,
        description="Seed for batch sampling and DP noise. Leave unset in production: "
        "noise that can be re-derived from a known seed protects nothing.",
    )
    torch_threads: PositiveInt | None = None

    @property
    def is_planned(self) -> bool:
        """Whether the planner chooses the steps or the logical batch."""
        return self.steps == "auto" or self.batch_size == "auto"

    def planned(self, examples: int, *, privacy: PrivacySettings, rounds: int) -> TrainingSettings:
        """These settings with ``"auto"`` replaced by the planner's choice for ``examples``
        training examples, ``privacy``'s target and ``rounds`` rounds (unchanged without
        ``"auto"``); the physical batch is cut to the logical one."""
        if not self.is_planned:
            return self
        from fedtune.privacy.planner import make_plan

        plan = make_plan(
            examples,
            epsilon=privacy.target_epsilon,
            delta=privacy.delta,
            rounds=rounds,
            batch_size=None if self.batch_size == "auto" else self.batch_size,
            accountant=privacy.accountant,
        )
        return self.model_copy(
            update={
                "batch_size": plan.batch_size,
                "steps": plan.steps_per_round if self.steps == "auto" else self.steps,
                "physical_batch_size": min(self.physical_batch_size, plan.batch_size),
            }
        )

    @model_validator(mode="before")
    @classmethod
    def _grpo_learning_rate(cls, data: Any) -> Any:
        """GRPO's own default learning rate: the supervised one wrecks its policy."""
        if isinstance(data, dict) and data.get("method") == "grpo" and "learning_rate" not in data:
            return {**data, "learning_rate": GRPO_LEARNING_RATE}
        return data

    @model_validator(mode="after")
    def _physical_not_larger(self) -> Self:
        # By value, not by "was it set": a dumped configuration (a deployment job) carries the
        # default and must validate again.
        if self.dpo_beta != DEFAULT_DPO_BETA and self.method != "dpo":
            raise ValueError(f'dpo_beta is set but method is "{self.method}", not "dpo"')
        if self.method != "grpo":
            for key, default in GRPO_DEFAULTS.items():
                if getattr(self, key) != default:
                    raise ValueError(f'{key} is set but method is "{self.method}", not "grpo"')
        if isinstance(self.batch_size, int) and self.physical_batch_size > self.batch_size:
            raise ValueError(
                f"physical_batch_size ({self.physical_batch_size}) must not exceed "
                f"batch_size ({self.batch_size})"
            )
        return self


class PrivacySettings(_Section):
    """Differential privacy of the node's training (DP-SGD).

    ``target_epsilon`` is what the node's whole planned work on this data set ends at:
    ``planned_rounds`` rounds of ``training.steps`` steps. The noise multiplier is calibrated
    for what is left of that plan given what this data set has already spent.
    """

    mode: Literal["dp", "non-private"] = "dp"
    target_epsilon: PositiveFloat = 8.0
    epsilon_cap: PositiveFloat | None = Field(
        default=None,
        description="The most this node may ever spend on a data set, over all runs; the "
        "budget guard declines a round that would pass it. Default: target_epsilon.",
    )
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    max_grad_norm: PositiveFloat = DP_MAX_GRAD_NORM  # measured: privacy/training_defaults.py
    planned_rounds: PositiveInt = 1
    accountant: Literal["rdp", "prv"] = "rdp"
    noise_multiplier: PositiveFloat | None = Field(
        default=None,
        description="Use this noise multiplier instead of calibrating one to the target.",
    )
    allow_non_private_updates: bool = Field(
        default=False,
        description='With mode = "non-private", a federated node declines to train unless '
        "this is true: an update trained without DP carries no privacy guarantee.",
    )
    release_metrics: Literal["none", "dp", "plain"] = Field(
        default="plain",
        description='What the node says about its data besides its update: "plain" (losses, '
        'timings, A/B test scores as computed), "dp" (the held-out loss and count through a '
        'Gaussian mechanism, accounted in the ledger; nothing else) or "none" (no metric; '
        "the update's weight only). `fedtune audit egress` lists what each choice sends.",
    )
    metric_loss_bound: PositiveFloat = Field(
        default=5.0,
        description='With release_metrics = "dp": each held-out example\'s loss (nats per '
        "token) is clipped to [0, bound] before release.",
    )
    metric_margin_bound: PositiveFloat = Field(
        default=2.0,
        description='With release_metrics = "dp": each held-out preference pair\'s reward '
        "margin (an A/B test's reward-margin) is clipped to [-bound, bound] before release.",
    )
    metric_noise_multiplier: PositiveFloat = Field(
        default=5.0,
        description='With release_metrics = "dp": the Gaussian noise of a release, in units of '
        "its sensitivity (larger: less epsilon per release, noisier figures).",
    )

    @property
    def cap(self) -> float:
        """The data set's epsilon cap in force (``epsilon_cap``, else ``target_epsilon``)."""
        return self.epsilon_cap if self.epsilon_cap is not None else self.target_epsilon


class NodeSettings(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    state_dir: ConfigPath = Field(
        default=Path("node-state"),
        description="Where the node keeps what must survive restarts: its epsilon ledger "
        "(ledger.db) and its signing key (node_key.pem).",
    )


class EvaluationPolicy(_Section):
    """What the node lets leave it in an A/B test (never text: only scores)."""

    share_per_example_scores: bool = Field(
        default=True,
        description="Send one score per held-out example and version; false: only paired "
        "statistics (the coordinator then runs a paired t-test or McNemar, no Wilcoxon).",
    )


class OutputSettings(_Section):
    dir: ConfigPath


class CoordinatorConnection(_Section):
    """How a deployed node reaches the coordinator's SuperLink (`fedtune node start`)."""

    address: str = Field(
        pattern=r"^[^\s:]+:[0-9]+$", description="HOST:PORT of the coordinator's SuperLink."
    )
    root_certificates: ConfigPath = Field(description="The consortium's CA certificate (ca.pem).")
    auth_key: ConfigPath = Field(
        description="The node's ECDSA P-384 private key from `fedtune node keygen` "
        "(auth_key); the coordinator enrolls its public half."
    )
    require_secure_aggregation: bool = Field(
        default=True,
        description="Decline train rounds that would send the update in the clear instead of "
        "through secure aggregation.",
    )
    min_secure_peers: Annotated[int, Field(ge=2)] = Field(
        default=3,
        description="Take part in a secure-aggregation round only with at least this many "
        "nodes, this one included: in a round of two, each learns the other's update from the "
        "mean. 2 accepts that knowingly.",
    )
    refused_retry_s: PositiveFloat = Field(
        default=150.0,
        description="How long to keep retrying when the coordinator refuses the node's key: a "
        "node restarted before its old connection expires (about 60 s) is refused too.",
    )


class NodeConfig(_Section):
    """Everything `fedtune node train` and `fedtune node start` need."""

    node: NodeSettings
    model: ModelConfig = ModelConfig()
    data: DataConfig
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    privacy: PrivacySettings = PrivacySettings()
    evaluation: EvaluationPolicy = EvaluationPolicy()
    output: OutputSettings | None = Field(
        default=None, description="Required by `fedtune node train`; a federated node has none."
    )
    coordinator: CoordinatorConnection | None = Field(
        default=None, description="Required by `fedtune node start`."
    )


NodeName = Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]


AbMetric = Literal[
    "loss", "rouge-l", "exact-match", "preference-accuracy", "reward-margin", "reward"
]
AB_LOSS: AbMetric = "loss"


class RunSettings(_Section):
    """The federated run: how many rounds, how many nodes train in each."""

    name: NodeName = "fedtune-run"
    rounds: PositiveInt = 3
    fraction_train: Annotated[float, Field(gt=0, le=1)] = Field(
        default=1.0, description="Share of the connected nodes sampled for each round."
    )
    min_nodes: PositiveInt | None = Field(
        default=None, description="Wait for at least this many nodes; default: all of [[nodes]]."
    )
    adapter_seed: int = Field(
        default=0, description="Seed of the initial global adapter (its frozen A matrices)."
    )
    initial_adapter: ConfigPath | None = Field(
        default=None,
        description="Start from this PEFT adapter folder (adapter_model.safetensors; a cold "
        "start before GRPO, or another run's unencrypted checkpoint) instead of a fresh "
        "adapter; its shape must be the run's [lora].",
    )
    evaluate_local_model: bool = Field(
        default=True,
        description="Nodes also report the held-out loss of their own model after training.",
    )
    ab_test_against_production: bool = Field(
        default=False,
        description="At the end of the run, A/B-test the final global adapter against the "
        "version in production (`fedtune model promote`), if there is one.",
    )
    ab_test_metrics: list[AbMetric] = Field(default_factory=lambda: [AB_LOSS], min_length=1)


class RunDataSettings(_Section):
    max_length: Annotated[int, Field(ge=8)] = 128
    max_eval_examples: PositiveInt | None = None
    loss_on_thinking: bool = True  # as DataConfig.loss_on_thinking


class RunNode(_Section):
    """One node of the run. A simulated node also names its data set and, optionally, its own
    privacy target; a deployed node holds those in its own node.toml."""

    name: NodeName
    train: ConfigPath | None = Field(default=None, description="Required in simulation.")
    eval: ConfigPath | None = Field(default=None, description="Required in simulation.")
    shares_budget_with: list[ConfigPath] = Field(
        default_factory=list, description="This node's data.shares_budget_with (simulation)."
    )
    state_dir: ConfigPath | None = Field(
        default=None, description="Default: OUTPUT_DIR/nodes/NAME."
    )
    model: str | None = Field(
        default=None,
        description="Where this node loads the base model from, if not model.spec; the run "
        "refuses a node whose base model differs (by fingerprint).",
    )
    target_epsilon: PositiveFloat | None = None
    epsilon_cap: PositiveFloat | None = None
    delta: Annotated[float, Field(gt=0, lt=1)] | None = None
    release_metrics: Literal["none", "dp", "plain"] | None = Field(
        default=None, description="This node's privacy.release_metrics (default: the run's)."
    )
    share_per_example_scores: bool = True
    public_key: str | None = Field(
        default=None,
        description="The node's enrolled Ed25519 public key (base64, or a key file); a "
        "simulated node without one is enrolled with the key in its state_dir.",
    )


class RunOutput(_Section):
    dir: ConfigPath
    database: DatabaseUrl | None = Field(
        default=None, description="SQLAlchemy URL; default: sqlite:///OUTPUT_DIR/fedtune.db."
    )
    witness_key_file: ConfigPath | None = Field(
        default=None,
        description="The coordinator's Ed25519 witness key, which countersigns every ledger "
        "head it receives (receipts); created on first use. Default: OUTPUT_DIR/witness_key.pem "
        "(in deployment, the coordinator's STATE_DIR/witness_key.pem).",
    )
    encryption_key_file: ConfigPath | None = Field(
        default=None,
        description="Encrypt global adapter checkpoints at rest (AES-256-GCM) with this key "
        "(`fedtune coordinator encryption-key --out FILE`).",
    )

    def checkpoint_key(self) -> bytes | None:
        from fedtune.platform.security.encryption import load_key

        return load_key(self.encryption_key_file) if self.encryption_key_file else None


class NodeLevelDP(_Section):
    """Node-level differential privacy on top of each node's example-level DP-SGD (DP-FedAvg
    with fixed clipping, McMahan et al. 2018): each node clips its update to
    ``clipping_norm`` before secure aggregation, nodes weigh equally, and the coordinator adds
    Gaussian noise to the mean. The privacy unit is a whole node's data."""

    clipping_norm: PositiveFloat
    noise_multiplier: PositiveFloat
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    max_epsilon: PositiveFloat | None = Field(
        default=None, description="Stop the run before a round that would pass it."
    )


class AggregationSettings(_Section):
    """How a deployed run aggregates (`fedtune run start`); simulation always averages in the
    clear. Secure aggregation is Flower's SecAgg+: the coordinator learns only the weighted
    mean of the sampled nodes' adapters."""

    secure: bool = Field(default=True, description="SecAgg+; needs at least 2 nodes per round.")
    reconstruction_threshold: Annotated[float, Field(gt=0.5, le=1)] = Field(
        default=0.6,
        description="Share of a node's neighbours that must stay to the end of a round so that "
        "a node that drops out can be unmasked; higher: more privacy, less tolerance. Above "
        "one half (nodes refuse lower thresholds): the shares sent are always more than half "
        "of the round's nodes.",
    )
    max_weight: PositiveFloat | None = Field(
        default=None,
        description="SecAgg+'s largest node weight (training examples); default: the largest "
        "training set the nodes report. Far larger values cost precision.",
    )
    clipping_range: PositiveFloat = Field(
        default=8.0, description="Adapter values are clipped to +-this before masking."
    )
    node_wait_s: PositiveFloat = Field(
        default=300.0,
        description="How long a round waits for run.min_nodes nodes; then the "
        "run stops with an error instead of hanging.",
    )
    node_dp: NodeLevelDP | None = Field(
        default=None, description="Node-level DP (needs secure = true); off by default."
    )
    reply_timeout_s: PositiveFloat = Field(
        default=3600.0,
        description="How long one exchange with the nodes may take (a train step includes "
        "local training); a node that has not answered by then is dropped from the round.",
    )
    plain_upload: Literal["float32", "float16"] = Field(
        default="float32",
        description="Number type of a plain (not secure) round's updates on the wire: "
        "float16 halves the upload; the mean's error is at most 2**-11 of the largest value.",
    )
    key_stage_timeout_s: PositiveFloat = Field(
        default=10.0,
        description="How long SecAgg+'s key exchanges (setup, key shares, unmasking: no "
        "training) wait for a node; a node silent that long is dropped from the round, so a "
        "dead one costs the round this rather than the SuperLink's 20 s heartbeat expiry.",
    )

    @model_validator(mode="after")
    def _node_dp_needs_secure(self) -> Self:
        if self.node_dp is not None and not self.secure:
            raise ValueError("node_dp clips on the nodes and noises the secure mean: set secure")
        return self


class SimulationSettings(_Section):
    client_cpus: PositiveInt | None = Field(
        default=None,
        description="CPUs given to each simulated node; default: all of them, so nodes train "
        "one after the other with every core (the fastest on a small CPU machine).",
    )
    cached_nodes: PositiveInt = Field(
        default=32,
        description="Nodes whose runtime (tokenised data, fingerprints) each simulation worker "
        "keeps between messages, least recently used evicted; a node's ledger is on disk and "
        "survives eviction. Bounds a worker's memory when it plays hundreds of nodes.",
    )
    ray_address: str | None = Field(
        default=None,
        min_length=1,
        description="Run on this existing Ray cluster (its head's host:port, from `ray start "
        "--head`) instead of a Ray instance of its own on this machine. Ray has no "
        "authentication: whoever reaches the cluster's ports runs code on it, so use only a "
        "cluster on 127.0.0.1 or a private network that nobody else reaches. Every machine "
        "of the cluster needs fedtune, the model and the nodes' data and state folders at the "
        "same paths.",
    )


class RunConfig(_Section):
    """Everything `fedtune simulate` needs: the run, the shared training plan, and the nodes."""

    run: RunSettings = RunSettings()
    model: ModelConfig = ModelConfig()
    data: RunDataSettings = RunDataSettings()
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    privacy: PrivacySettings = PrivacySettings()
    nodes: list[RunNode] = Field(min_length=1)
    output: RunOutput
    simulation: SimulationSettings = SimulationSettings()
    aggregation: AggregationSettings = AggregationSettings()

    @model_validator(mode="after")
    def _unique_nodes(self) -> Self:
        names = [node.name for node in self.nodes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"node names must be unique; repeated: {duplicates}")
        if self.run.min_nodes is not None and self.run.min_nodes > len(self.nodes):
            raise ValueError(
                f"run.min_nodes ({self.run.min_nodes}) exceeds the {len(self.nodes)} nodes"
            )
        return self

    @property
    def database_url(self) -> str:
        return self.output.database or f"sqlite:///{self.output.dir / 'fedtune.db'}"

    @property
    def witness_key_path(self) -> Path:
        return self.output.witness_key_file or self.output.dir / WITNESS_KEY_FILE

    def node_config(self, name: str) -> NodeConfig:
        """The configuration the simulated node ``name`` runs with; its privacy plan spans the
        run's rounds."""
        node = next((n for n in self.nodes if n.name == name), None)
        if node is None:
            raise KeyError(f"no node named {name!r} in this run")
        if node.train is None or node.eval is None:
            raise ConfigError(f"nodes.{name}: a simulated node needs its train and eval files")
        privacy_updates: dict[str, object] = {"planned_rounds": self.run.rounds}
        if node.target_epsilon is not None:
            privacy_updates["target_epsilon"] = node.target_epsilon
        if node.epsilon_cap is not None:
            privacy_updates["epsilon_cap"] = node.epsilon_cap
        if node.delta is not None:
            privacy_updates["delta"] = node.delta
        if node.release_metrics is not None:
            privacy_updates["release_metrics"] = node.release_metrics
        return NodeConfig(
            node=NodeSettings(
                name=node.name,
                state_dir=node.state_dir or self.output.dir / "nodes" / node.name,
            ),
            model=self.model.model_copy(update={"spec": node.model or self.model.spec}),
            data=DataConfig(
                train=node.train,
                eval=node.eval,
                max_length=self.data.max_length,
                max_eval_examples=self.data.max_eval_examples,
                loss_on_thinking=self.data.loss_on_thinking,
                shares_budget_with=node.shares_budget_with,
            ),
            lora=self.lora,
            training=self.training,
            privacy=self.privacy.model_copy(update=privacy_updates),
            evaluation=EvaluationPolicy(share_per_example_scores=node.share_per_example_scores),
        )


class CoordinatorSettings(_Section):
    """Where the coordinator keeps its state, where its gateway listens for nodes, and the
    SuperLink's own port, which never leaves 127.0.0.1."""

    state_dir: ConfigPath = Field(
        default=Path("coordinator-state"),
        description="Flower's state (superlink.db), its CLI configuration, the gateway's "
        "configuration and logs, submitted run apps; default database too.",
    )
    host: str = Field(
        default="127.0.0.1",
        description="The gateway's listen address (the coordinator's public address); "
        "0.0.0.0 to accept remote nodes.",
    )
    port: Annotated[int, Field(gt=0, lt=65536)] = Field(
        default=9092, description="The gateway's port: nodes connect here."
    )
    superlink_port: Annotated[int, Field(gt=0, lt=65536)] = Field(
        default=9093,
        description="The SuperLink's port on 127.0.0.1 (Fleet, Control and Runtime APIs): "
        "admin tools use it on this host; nodes reach only its Fleet API, through the gateway.",
    )
    database: DatabaseUrl | None = Field(
        default=None, description="SQLAlchemy URL; default: sqlite:///STATE_DIR/fedtune.db."
    )
    encryption_key_file: ConfigPath | None = Field(
        default=None,
        description="Encrypt global adapter checkpoints at rest with this AES-256 key "
        "(`fedtune coordinator encryption-key --out FILE`).",
    )

    @model_validator(mode="after")
    def _superlink_apart(self) -> Self:
        if self.superlink_port == self.port:
            raise ValueError(
                f"superlink_port ({self.superlink_port}) must differ from port: the gateway "
                "listens on port, the SuperLink (127.0.0.1 only) on superlink_port"
            )
        return self


class GatewaySettings(_Section):
    """The reverse proxy (nginx) at the coordinator's public address: it forwards the Fleet
    API's paths only and refuses a node-authentication header set it has already seen."""

    nginx: str = Field(default="nginx", description="The nginx command (Debian's package).")
    modules_dir: ConfigPath = Field(
        default=Path("/usr/lib/nginx/modules"),
        description="Where nginx's dynamic modules are: ndk_http_module.so and "
        "ngx_http_lua_module.so (Debian's libnginx-mod-http-lua).",
    )
    max_body_mb: Annotated[int, Field(ge=8, le=1024)] = Field(
        default=64,
        description="Largest request body in MiB; above Flower's 5 MiB array chunks.",
    )
    requests_per_second: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=50,
        description="Requests a second from one client address, in bursts of up to 10 "
        "seconds' worth; more are answered 503 (a node backs off and retries) before the node "
        "check and the SuperLink see them. A node sends about 3 a second: raise it when many "
        "nodes share one address (NAT).",
    )


class TlsSettings(_Section):
    """The coordinator's TLS files (`fedtune certs init --out DIR`)."""

    ca_certificate: ConfigPath
    certificate: ConfigPath
    private_key: ConfigPath


class CoordinatorConfig(_Section):
    """Everything `fedtune coordinator start|enroll` and `fedtune run ...` need."""

    coordinator: CoordinatorSettings = CoordinatorSettings()
    gateway: GatewaySettings = GatewaySettings()
    tls: TlsSettings

    @property
    def database_url(self) -> str:
        return self.coordinator.database or (
            f"sqlite:///{self.coordinator.state_dir / 'fedtune.db'}"
        )

    @property
    def witness_key_path(self) -> Path:
        """The key that countersigns the ledger heads nodes send (receipts)."""
        return self.coordinator.state_dir / WITNESS_KEY_FILE

    @property
    def public_address(self) -> str:
        """The gateway: where nodes connect (from this host when it listens on all
        addresses)."""
        host = self.coordinator.host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{self.coordinator.port}"

    @property
    def superlink_address(self) -> str:
        """Where tools on the coordinator host (the Flower CLI, SuperExec) reach the
        SuperLink."""
        return f"127.0.0.1:{self.coordinator.superlink_port}"


def _resolve(base: Path, value: Path | None) -> Path | None:
    if value is None or value.is_absolute():
        return value
    return (base / value).resolve()


def _format_error(path: Path, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")  # pydantic's, for a ValueError
        lines.append(f"{path}: {key}: {message}")
    return "\n".join(lines)


def _read(path: Path, model: type[_ConfigT]) -> _ConfigT:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {unreadable(path, exc)}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(path, exc)) from None


def _resolve_spec(base: Path, spec: str) -> str:
    """A model spec that looks like a path is taken from the config file's folder."""
    if spec.startswith((".", "/", "~")) or "/" in spec:
        return str(_resolve(base, Path(spec).expanduser()))
    return spec


def _resolve_model(base: Path, model: ModelConfig) -> ModelConfig:
    return model.model_copy(
        update={
            "spec": _resolve_spec(base, model.spec),
            "cache_dir": _resolve(base, model.cache_dir),
        }
    )


def load_node_config(path: str | Path) -> NodeConfig:
    """Read and validate a node TOML file; relative paths are taken from the file's folder."""
    path = Path(path)
    config = _read(path, NodeConfig)
    base = path.resolve().parent
    output = config.output
    if output is not None:
        output = output.model_copy(update={"dir": _resolve(base, output.dir)})
    return config.model_copy(
        update={
            "node": config.node.model_copy(
                update={"state_dir": _resolve(base, config.node.state_dir)}
            ),
            "model": _resolve_model(base, config.model),
            "data": config.data.model_copy(
                update={
                    "train": _resolve(base, config.data.train),
                    "eval": _resolve(base, config.data.eval),
                    "shares_budget_with": [
                        _resolve(base, path) for path in config.data.shares_budget_with
                    ],
                }
            ),
            "output": output,
            "coordinator": _resolve_connection(base, config.coordinator),
        }
    )


def _resolve_connection(
    base: Path, connection: CoordinatorConnection | None
) -> CoordinatorConnection | None:
    if connection is None:
        return None
    return connection.model_copy(
        update={
            "root_certificates": _resolve(base, connection.root_certificates),
            "auth_key": _resolve(base, connection.auth_key),
        }
    )


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run TOML file; relative paths are taken from the file's folder."""
    path = Path(path)
    config = _read(path, RunConfig)
    base = path.resolve().parent
    nodes = [
        node.model_copy(
            update={
                "train": _resolve(base, node.train),
                "eval": _resolve(base, node.eval),
                "shares_budget_with": [_resolve(base, p) for p in node.shares_budget_with],
                "state_dir": _resolve(base, node.state_dir),
                "model": _resolve_spec(base, node.model) if node.model else None,
            }
        )
        for node in config.nodes
    ]
    return config.model_copy(
        update={
            "run": config.run.model_copy(
                update={"initial_adapter": _resolve(base, config.run.initial_adapter)}
            ),
            "model": _resolve_model(base, config.model),
            "nodes": nodes,
            "output": config.output.model_copy(
                update={
                    "dir": _resolve(base, config.output.dir),
                    "encryption_key_file": _resolve(base, config.output.encryption_key_file),
                    "witness_key_file": _resolve(base, config.output.witness_key_file),
                }
            ),
        }
    )


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    """Read and validate a coordinator TOML file; relative paths are taken from its folder."""
    path = Path(path)
    config = _read(path, CoordinatorConfig)
    base = path.resolve().parent
    settings = config.coordinator
    return config.model_copy(
        update={
            "coordinator": settings.model_copy(
                update={
                    "state_dir": _resolve(base, settings.state_dir),
                    "encryption_key_file": _resolve(base, settings.encryption_key_file),
                }
            ),
            "tls": TlsSettings(
                ca_certificate=_resolve(base, config.tls.ca_certificate),  # type: ignore[arg-type]
                certificate=_resolve(base, config.tls.certificate),  # type: ignore[arg-type]
                private_key=_resolve(base, config.tls.private_key),  # type: ignore[arg-type]
            ),
        }
    )
