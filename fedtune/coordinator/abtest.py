"""Federated A/B tests between two model versions, on the nodes' held-out data.

The coordinator sends each node both versions (a version's adapter arrays, or none for the
base model) in one ``evaluate.abtest`` message; each node scores both on the same held-out
examples and sends back scores only (:mod:`fedtune.client_node.abtest_eval`). Per node and
overall, each metric's difference B - A gets a paired test and a confidence interval
(:mod:`fedtune.coordinator.ab_statistics`); Holm's method corrects for the several metrics
within each scope. The test and its results are stored, with a verdict at ``alpha``.

In deployment the grid is an :class:`~fedtune.coordinator.roster.EnrolledGrid`: only enrolled
nodes are asked, and each node's scores go under its enrolled name (a reply naming another
node is left out).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from sqlalchemy import select
from sqlalchemy.engine import Engine

from fedtune.common.database import transaction
from fedtune.common.errors import FedtuneError
from fedtune.coordinator.ab_statistics import (
    METRICS,
    Comparison,
    PairedSummary,
    apply_holm,
    combine_summaries,
    compare_paired,
    compare_summary,
    metric_bounds,
)
from fedtune.coordinator.checkpoints import read_checkpoint
from fedtune.coordinator.ledger_check import LedgerCheck
from fedtune.coordinator.roster import EnrolledGrid, name_problem, reported_name
from fedtune.coordinator.versions import ModelVersion
from fedtune.platform.config import MAX_DPO_BETA, LoraSettings
from fedtune.platform.db.storage import AbTest, AbTestResult
from fedtune.platform.wire.messages import (
    ABTEST,
    ABTEST_MESSAGE_TYPE,
    ARRAYS,
    DECLINE,
    LEDGER,
    NODE,
    SCORES,
    SUMMARY_FIELDS,
    AbTestInstructions,
)
from fedtune.platform.wire.packed_arrays import pack
from fedtune.privacy.ledger_store import checkpoint_row, entry_row, node_public_keys
from fedtune.privacy.signing import load_public_key

OVERALL = "overall"
DEFAULT_METRICS = ("loss", "rouge-l")


class UnknownAbTestError(FedtuneError, ValueError):
    """No stored A/B test has that id."""


@dataclass(frozen=True)
class AbTestPlan:
    version_a: ModelVersion
    version_b: ModelVersion
    base_model_fingerprint: str
    metrics: tuple[str, ...] = DEFAULT_METRICS
    alpha: float = 0.05
    max_examples: int = 32
    max_new_tokens: int = 48
    dpo_beta: float = 0.1  # the implicit reward's beta behind reward-margin
    nodes: tuple[str, ...] | None = None  # None: every connected (enrolled) node
    run_id: str | None = None  # the run that asked for it, if any
    checkpoint_key: bytes | None = None  # for checkpoints encrypted at rest

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown or not self.metrics:
            raise ValueError(f"unknown A/B metrics {unknown}; choose from {sorted(METRICS)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.dpo_beta <= MAX_DPO_BETA:
            raise ValueError(f"dpo_beta must be in (0, {MAX_DPO_BETA:g}], got {self.dpo_beta}")
        if self.max_examples < 2:
            raise ValueError("max_examples must be at least 2 for a paired test")
        if self.version_a.id == self.version_b.id:
            raise ValueError(f"versions A and B are the same ({self.version_a.id})")
        for version in (self.version_a, self.version_b):
            fingerprint = version.base_model_fingerprint
            if fingerprint is not None and fingerprint != self.base_model_fingerprint:
                raise ValueError(
                    f"version {version.id} adapts base model {fingerprint}, not "
                    f"{self.base_model_fingerprint}"
                )


@dataclass(frozen=True)
class NodeScores:
    node: str
    per_example: dict[str, tuple[np.ndarray, np.ndarray]]  # metric -> (a, b)
    summaries: dict[str, PairedSummary]  # metric -> statistics (always filled)


def _message_content(plan: AbTestPlan, test_id: str) -> RecordDict:
    content = RecordDict()
    loras: dict[str, LoraSettings | None] = {}
    for side, version in (("a", plan.version_a), ("b", plan.version_b)):
        if version.is_base:
            loras[side] = None
            continue
        assert version.path is not None and version.sha256 is not None
        arrays, lora = read_checkpoint(version.path, sha256=version.sha256, key=plan.checkpoint_key)
        content[f"{ARRAYS}-{side}"] = pack(arrays)
        loras[side] = lora
    content[ABTEST] = AbTestInstructions(
        test_id=test_id,
        base_model_fingerprint=plan.base_model_fingerprint,
        version_a=plan.version_a.id,
        version_b=plan.version_b.id,
        lora_a=loras["a"],
        lora_b=loras["b"],
        metrics=plan.metrics,
        max_examples=plan.max_examples,
        max_new_tokens=plan.max_new_tokens,
        dpo_beta=plan.dpo_beta,
    ).to_record()
    return content


def parse_reply(
    message: Message,
    metrics: Sequence[str],
    *,
    enrolled: Callable[[int], str | None] | None = None,
) -> NodeScores:
    """A node's scores; ``ValueError`` when the reply is an error or lacks a metric. With
    ``enrolled`` (deployment) they are its sender's, under its enrolled name."""
    if message.has_error():
        raise ValueError(f"node error {message.error.code}: {message.error.reason}")
    content = message.content
    source = message.metadata.src_node_id
    name = str(content.config_records[NODE].get("name", source))
    if enrolled is not None:
        problem = name_problem(enrolled(source), reported_name(content), source)
        if problem is not None:
            raise ValueError(problem)
        name = str(enrolled(source))
    if DECLINE in content.config_records:
        reason = content.config_records[DECLINE].get("reason", "no reason given")
        raise ValueError(f"{name} declined: {str(reason)[:300]}")
    scores = content.metric_records[SCORES]
    per_example, summaries = {}, {}
    stated = content.config_records.get(ABTEST)
    noisy = bool(stated.get("dp", False)) if stated is not None else False
    for metric in metrics:
        binary = METRICS[metric].kind == "binary"
        if noisy:
            summaries[metric] = PairedSummary.from_noisy(
                n=float(scores[f"{metric}/n"]),  # type: ignore[arg-type]
                sum_a=float(scores[f"{metric}/sum_a"]),  # type: ignore[arg-type]
                sum_b=float(scores[f"{metric}/sum_b"]),  # type: ignore[arg-type]
                sum_d2=float(scores[f"{metric}/sum_d2"]),  # type: ignore[arg-type]
                noise_sd_sum=float(scores[f"{metric}/noise-sd"]),  # type: ignore[arg-type]
            )
        elif f"{metric}/a" in scores:
            a = np.asarray(scores[f"{metric}/a"], dtype=np.float64)
            b = np.asarray(scores[f"{metric}/b"], dtype=np.float64)
            if a.shape != b.shape or a.ndim != 1:
                raise ValueError(f"{name}: {metric} scores of A and B are not paired")
            _check_scores(name, metric, a, b)
            per_example[metric] = (a, b)
            summaries[metric] = PairedSummary.of(a.tolist(), b.tolist(), binary=binary)
        elif f"{metric}/n" in scores:
            values = {field: scores[f"{metric}/{field}"] for field in SUMMARY_FIELDS}
            summaries[metric] = PairedSummary(
                n=int(values["n"]),  # type: ignore[arg-type]
                sum_a=float(values["sum_a"]),  # type: ignore[arg-type]
                sum_b=float(values["sum_b"]),  # type: ignore[arg-type]
                sum_d=float(values["sum_d"]),  # type: ignore[arg-type]
                sum_d2=float(values["sum_d2"]),  # type: ignore[arg-type]
                b_only=int(values["b_only"]) if binary else None,  # type: ignore[arg-type]
                a_only=int(values["a_only"]) if binary else None,  # type: ignore[arg-type]
            )
        else:
            raise ValueError(f"{name} sent no scores for {metric}")
    for metric, summary in summaries.items():
        noise = float(scores.get(f"{metric}/noise-sd", 0.0)) if noisy else 0.0  # type: ignore[arg-type]
        _check_sums(name, metric, summary, noise_sd=noise)
    return NodeScores(name, per_example, summaries)


def _check_scores(node: str, metric: str, a: np.ndarray, b: np.ndarray) -> None:
    """A node's per-example scores lie in the metric's range (a reward above the fixed bound,
    say, would outweigh every honest node's): else that node is left out, not the test."""
    low, high = metric_bounds(metric)
    for side, values in (("A", a), ("B", b)):
        if values.size and not (np.all(values >= low) and np.all(values <= high)):
            raise ValueError(f"{node}: {metric} scores of {side} lie outside [{low:g}, {high:g}]")


def _check_sums(node: str, metric: str, summary: PairedSummary, *, noise_sd: float) -> None:
    """A summary's sums fit n scores in the metric's range; under DP, give or take ten times
    the noise the node states (an honest release is off by more once in about 10^23)."""
    low, high = metric_bounds(metric)
    if not (math.isfinite(low) and math.isfinite(high)):
        return
    slack = 10.0 * noise_sd * (1.0 + max(abs(low), abs(high)))
    for side, total in (("A", summary.sum_a), ("B", summary.sum_b)):
        if not summary.n * low - slack <= total <= summary.n * high + slack:
            raise ValueError(
                f"{node}: {metric} sum of {side} ({total:g}) cannot come from {summary.n} "
                f"scores in [{low:g}, {high:g}]"
            )


def compare_scope(
    scores: Sequence[NodeScores], metrics: Sequence[str], *, alpha: float
) -> list[Comparison]:
    """One comparison per metric over ``scores`` pooled, Holm-adjusted across the metrics.
    Per-example scores when every node shared them, else the paired statistics."""
    comparisons = []
    for metric in metrics:
        if all(metric in s.per_example for s in scores):
            a = np.concatenate([s.per_example[metric][0] for s in scores])
            b = np.concatenate([s.per_example[metric][1] for s in scores])
            comparisons.append(compare_paired(metric, a.tolist(), b.tolist(), alpha=alpha))
        else:
            summary = combine_summaries([s.summaries[metric] for s in scores])
            comparisons.append(compare_summary(metric, summary, alpha=alpha))
    return apply_holm(comparisons, alpha=alpha)


def new_test_id() -> str:
    return datetime.now(UTC).strftime("ab-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def run_abtest(
    grid: Grid,
    engine: Engine,
    plan: AbTestPlan,
    *,
    test_id: str | None = None,
    timeout: float = 3600.0,
    progress: Callable[[str], None] = print,
    on_reply: Callable[[Message], None] | None = None,
) -> str:
    """Run ``plan`` over the nodes reachable through ``grid``; returns the stored test's id.
    ``on_reply`` sees every reply as received (tests use it to inspect what nodes send)."""
    test_id = test_id or new_test_id()
    with transaction(engine) as session:
        session.add(
            AbTest(
                id=test_id,
                version_a=plan.version_a.id,
                version_b=plan.version_b.id,
                metrics={
                    "names": list(plan.metrics),
                    "max_examples": plan.max_examples,
                    "max_new_tokens": plan.max_new_tokens,
                    "dpo_beta": plan.dpo_beta,
                },
                alpha=plan.alpha,
                nodes={"requested": list(plan.nodes) if plan.nodes else None, "answered": []},
                status="running",
                run_id=plan.run_id,
            )
        )
    try:
        results, answered = _run(grid, engine, plan, test_id, timeout, progress, on_reply)
    except BaseException as exc:
        _finish(engine, test_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    with transaction(engine) as session:
        session.add_all(results)
        test = session.get(AbTest, test_id)
        assert test is not None
        test.status, test.finished_at = "finished", datetime.now(UTC)
        test.nodes = {**test.nodes, "answered": sorted(answered)}
    return test_id


def _run(
    grid: Grid,
    engine: Engine,
    plan: AbTestPlan,
    test_id: str,
    timeout: float,
    progress: Callable[[str], None],
    on_reply: Callable[[Message], None] | None,
) -> tuple[list[Any], list[str]]:
    enrolled = grid.enrolled_name if isinstance(grid, EnrolledGrid) else None
    released: list[Any] = []  # ledger rows of scores released under DP
    node_ids = list(grid.get_node_ids())
    if not node_ids:
        raise RuntimeError("no enrolled node is connected" if enrolled else "no node is connected")
    content = _message_content(plan, test_id)
    messages = [
        Message(content=content, dst_node_id=node_id, message_type=ABTEST_MESSAGE_TYPE)
        for node_id in node_ids
    ]
    progress(
        f"A/B test {test_id}: {plan.version_a.id} vs {plan.version_b.id} on {len(node_ids)} "
        f"nodes, metrics {', '.join(plan.metrics)}, up to {plan.max_examples} examples each"
    )
    scores, problems = [], []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if on_reply is not None:
            on_reply(reply)
        try:
            node = parse_reply(reply, plan.metrics, enrolled=enrolled)
            released += _release_rows(engine, test_id, node.node, reply.content)
        except (ValueError, KeyError) as exc:
            problems.append(str(exc))
            continue
        if plan.nodes is None or node.node in plan.nodes:
            scores.append(node)
    for problem in problems:
        progress(f"  left out: {problem}")
    if not scores:
        raise RuntimeError("no node returned usable scores: " + "; ".join(problems))
    scopes = [(s.node, [s]) for s in sorted(scores, key=lambda s: s.node)] + [(OVERALL, scores)]
    results: list[Any] = [
        _result_row(test_id, scope, comparison, members)
        for scope, members in scopes
        for comparison in compare_scope(members, plan.metrics, alpha=plan.alpha)
    ]
    return results + released, [s.node for s in scores]


def _release_rows(engine: Engine, test_id: str, node: str, content: RecordDict) -> list[Any]:
    """The coordinator's copy of the ledger entry with which a node released its scores under
    DP (none for plain scores); ``ValueError`` when it does not verify under the node's key."""
    if LEDGER not in content.config_records:
        stated = content.config_records.get(ABTEST)
        if stated is not None and stated.get("dp"):
            raise ValueError(f"{node}: DP scores without the ledger entry of their release")
        return []
    with transaction(engine) as session:
        keys = node_public_keys(session, node)
    if not keys:
        raise ValueError(f"{node}: no public key stored to verify its release")
    check = LedgerCheck(engine=engine, run_id=test_id, enrolled={node: load_public_key(keys[-1])})
    signed, problem = check(0, node, content, kind="metric_release")
    if problem is not None or signed is None:
        raise ValueError(f"{node}: {problem}")
    return [entry_row(signed.entry), checkpoint_row(signed.checkpoint)]


def _result_row(
    test_id: str, scope: str, c: Comparison, members: Sequence[NodeScores]
) -> AbTestResult:
    return AbTestResult(
        test_id=test_id,
        scope=scope,
        metric=c.metric,
        higher_is_better=c.higher_is_better,
        examples=c.examples,
        mean_a=c.mean_a,
        mean_b=c.mean_b,
        difference=c.difference,
        ci_low=c.ci_low,
        ci_high=c.ci_high,
        confidence=c.confidence,
        test=c.test,
        p_value=c.p_value,
        p_adjusted=c.p_adjusted,
        verdict=c.verdict,
        detail={**_jsonable(c.detail), "nodes": [m.node for m in members]},
    )


def _jsonable(detail: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.item() if isinstance(v, np.generic) else v)
        for k, v in detail.items()
        if isinstance(v, (str, int, float, bool, type(None), list, np.generic))
    }


def _finish(engine: Engine, test_id: str, *, status: str, error: str | None = None) -> None:
    with transaction(engine) as session:
        test = session.get(AbTest, test_id)
        if test is not None:
            test.status, test.error, test.finished_at = status, error, datetime.now(UTC)


_RESULT_FIELDS = tuple(
    column.name for column in AbTestResult.__table__.columns if column.name not in ("id", "test_id")
)


def abtest_report(engine: Engine, test_id: str) -> dict[str, Any]:
    """The stored test and its results, as plain data."""
    with transaction(engine) as session:
        test = session.get(AbTest, test_id)
        if test is None:
            known = session.scalars(select(AbTest.id).order_by(AbTest.started_at.desc())).all()
            raise UnknownAbTestError(
                f"no A/B test {test_id!r}; recent: {', '.join(known[:5]) or 'none'}"
            )
        rows = session.scalars(
            select(AbTestResult).where(AbTestResult.test_id == test_id).order_by(AbTestResult.id)
        ).all()
        return {
            "id": test.id,
            "a": test.version_a,
            "b": test.version_b,
            "alpha": test.alpha,
            "status": test.status,
            "error": test.error,
            "metrics": test.metrics,
            "nodes": test.nodes,
            "results": [{name: getattr(row, name) for name in _RESULT_FIELDS} for row in rows],
        }


def format_abtest(report: dict[str, Any]) -> str:
    lines = [
        f"A/B test {report['id']} ({report['status']}): A = {report['a']}, B = {report['b']}, "
        f"alpha {report['alpha']:g} (Holm across metrics)"
    ]
    if report["error"]:
        lines.append(f"  error: {report['error']}")
    lines.append(
        f"{'scope':<12} {'metric':<12} {'n':>5} {'A':>9} {'B':>9} {'B - A':>9} "
        f"{'CI':>21} {'p':>9} {'p (Holm)':>9}  verdict (test)"
    )
    for r in report["results"]:
        ci = (
            f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
            if r["ci_low"] is not None and r["ci_high"] is not None
            else "-"
        )
        lines.append(
            f"{r['scope']:<12} {r['metric']:<12} {r['examples']:>5} {_num(r['mean_a']):>9} "
            f"{_num(r['mean_b']):>9} {_num(r['difference'], signed=True):>9} {ci:>21} "
            f"{_p(r['p_value']):>9} {_p(r['p_adjusted']):>9}  {r['verdict']} ({r['test']})"
        )
    return "\n".join(lines)


def _num(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"
