"""A small but realistic coordinator database for the dashboard's tests, written with the
real models and the real ledger API: one finished run of 3 rounds with two nodes (the bank
declines round 3 for lack of budget), metrics, signed ledger
copies, an A/B test with results, health signals (update norms hidden by secure aggregation)
and alerts. Also how the tests open a page (Streamlit's AppTest) and read what it shows."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from sqlalchemy.orm import Session
from streamlit.testing.v1 import AppTest

from fedtune.common.database import transaction
from fedtune.coordinator.node_costs import CostFigures, cost_row
from fedtune.coordinator.run_protections import run_protections
from fedtune.dashboard import common
from fedtune.dashboard.launch import APP
from fedtune.platform.config import RunConfig
from fedtune.platform.db.storage import (
    AbTest,
    AbTestResult,
    AdapterCheckpoint,
    BudgetGroup,
    HealthAlert,
    HealthSignal,
    NodeLevelEntry,
    NodeMetric,
    RejectedUpdate,
    Round,
    Run,
    open_database,
)
from fedtune.privacy.accounting import accountant_version, epsilon_of
from fedtune.privacy.ledger import LedgerEntry, seal_entry, sign_checkpoint
from fedtune.privacy.ledger_store import (
    add_public_key,
    append_entries,
    checkpoint_row,
    entry_row,
    ledger_entries,
    receipt_row,
)
from fedtune.privacy.node_ledger import NodeLedger
from fedtune.privacy.node_level_dp import NodeLevelPrivacy
from fedtune.privacy.receipts import witness_of
from fedtune.privacy.signing import NodeKey

RUN_ID = "20261123T190338Z-55dc7d1f"
RUN_NAME = "clinical-notes"
AB_TEST_ID = "ab-20261124-01"
BASE_FINGERPRINT = "sha256:" + "1e" * 32
DATA = {"hospital": "sha256:" + "2a" * 32, "bank": "sha256:" + "d2" * 32}
CAPS = {"hospital": 8.0, "bank": 4.0}
DELTA = 1e-5
ROUND_PLAN = (1.0, 0.05, 40)  # noise multiplier, sample rate, steps
SECURE_AGGREGATION = "secure aggregation: the coordinator sees only the sum of the updates"
BUDGET_REASON = (
    "declined by the budget guard: this round would bring the data set's epsilon from "
    "3.719 to 4.334, past its cap 4 (delta 1e-05, RDP)"
)
STARTED = datetime(2026, 11, 23, 19, 3, 38, tzinfo=UTC)


# The run's deployment as `fedtune run start` records it (deployment_facts of a coordinator).
DEPLOYMENT_FACTS = {
    "tls": True,
    "ca_certificate_sha256": "c4" * 32,
    "node_authentication": True,
    "superlink_host": "127.0.0.1",
    "gateway": "127.0.0.1:9092",
    "pinned_apps": True,
}
RUN_CONFIG = {
    "run": {"name": RUN_NAME, "rounds": 3},
    "aggregation": {
        "secure": True,
        "node_dp": {"clipping_norm": 0.5, "noise_multiplier": 1.2, "delta": 1e-5},
    },
    "nodes": [{"name": "hospital"}, {"name": "bank"}],
    "output": {"dir": "out"},
}
WITNESSED = ("hospital",)  # the nodes whose ledger entries the coordinator countersigned


def cost_figures(node: str, number: int, phase: str) -> CostFigures:
    """What a node reported its work on a message cost (the bank's device is slower)."""
    slow = 2.0 if node == "bank" else 1.0
    if phase == "train":
        return CostFigures(
            train_tokens=40_000 + 1_000 * number,
            evaluate_tokens=6_000 if number == 1 else 3_000,
            train_device_seconds=30.0 * slow + number,
            evaluate_device_seconds=4.0 * slow,
            wall_seconds=42.0 * slow + number,
        )
    return CostFigures(
        evaluate_tokens=3_000,
        evaluate_device_seconds=2.0 * slow,
        wall_seconds=3.5 * slow,
    )


@dataclass(frozen=True)
class CoordinatorData:
    path: Path
    url: str
    keys: dict[str, NodeKey]
    epsilons: dict[str, list[float]]  # per node, after each round it trained
    node_level: list[float]  # the coordinator's node-level epsilon after each round


@cache
def epsilons_after(rounds: int) -> list[float]:
    history = [ROUND_PLAN] * rounds
    return [epsilon_of(history[: n + 1], delta=DELTA, accountant="rdp") for n in range(rounds)]


def build_coordinator_database(
    folder: Path, *, ab_tests: bool = True, url: str | None = None
) -> CoordinatorData:
    """Write the coordinator database into ``folder`` (SQLite) or at ``url`` (an empty
    database); ``ab_tests=False`` leaves the A/B tables empty."""
    path = folder / "fedtune.db"  # the SQLite file, when no url is given
    url = url or f"sqlite:///{path}"
    engine = open_database(url, create=True)
    keys = {node: NodeKey.generate() for node in DATA}
    witness = NodeKey.generate()
    trained = {"hospital": [1, 2, 3], "bank": [1, 2]}
    epsilons = {node: list(epsilons_after(len(rounds))) for node, rounds in trained.items()}
    config = RunConfig.model_validate(RUN_CONFIG)
    assert config.aggregation.node_dp is not None
    node_dp = NodeLevelPrivacy(
        config.aggregation.node_dp,
        run_id=RUN_ID,
        population=len(DATA),
        ledger=NodeLedger(folder / "node-level-ledger", node="coordinator"),
    )
    with transaction(engine) as session:
        session.add(
            Run(
                id=RUN_ID,
                name=RUN_NAME,
                flower_run_id="17160110135431313420",
                status="finished",
                rounds_planned=3,
                base_model_spec="smollm2-135m",
                base_model_fingerprint=BASE_FINGERPRINT,
                config={"run": {"name": RUN_NAME, "rounds": 3}},
                started_at=STARTED,
                finished_at=STARTED + timedelta(minutes=8),
                protections=run_protections(config, deployment=DEPLOYMENT_FACTS),
            )
        )
        session.flush()
        for node, key in keys.items():
            add_public_key(session, node, key.public_key_text())
        global_losses = [(2.96, 2.85), (2.76, 2.75), (2.76, 2.70)]
        for number, (train_loss, held_out) in enumerate(global_losses, start=1):
            nodes = [node for node in DATA if number in trained[node]]
            session.add(
                Round(
                    run_id=RUN_ID,
                    number=number,
                    nodes_sampled=2,
                    updates_accepted=len(nodes),
                    updates_rejected=2 - len(nodes),
                    train_loss=train_loss,
                    held_out_loss=held_out,
                    seconds=150.0,
                    finished_at=STARTED + timedelta(minutes=2 * number),
                )
            )
            session.add(
                AdapterCheckpoint(
                    run_id=RUN_ID, round=number, path=f"/adapters/{number}", sha256="0" * 64
                )
            )
            for offset, node in enumerate(nodes):
                loss = train_loss + 0.2 * offset - 0.05 * number
                session.add_all(_node_rows(node, number, loss))
                entry = _append_ledger(session, node, keys[node], number, epsilons[node])
                if node in WITNESSED:
                    session.add(receipt_row(witness_of(entry, witness)))
                for phase in ("train", "evaluate"):
                    session.add(
                        cost_row(
                            cost_figures(node, number, phase),
                            run_id=RUN_ID,
                            server_round=number,
                            phase=phase,
                            node_name=node,
                            flower_node_id=f"{node}-id",
                        )
                    )
            node_dp.record(number, contributors=len(nodes))
            assert node_dp.latest is not None
            level_entry, level_head = node_dp.latest
            session.add(
                NodeLevelEntry(
                    run_id=RUN_ID,
                    round=number,
                    seq=level_entry.seq,
                    epsilon_after=level_entry.epsilon_after,
                    entry=entry_row(level_entry).entry,
                    checkpoint=checkpoint_row(level_head).checkpoint,
                    public_key=node_dp.ledger.key.public_key_text(),
                )
            )
        session.add(
            RejectedUpdate(
                run_id=RUN_ID,
                round=3,
                phase="train",
                node_name="bank",
                flower_node_id="8882002188391956645",
                kind="declined",
                reason=BUDGET_REASON,
            )
        )
        session.add_all(_health_rows())
        if ab_tests:
            session.add_all(_ab_rows())
    engine.dispose()
    node_dp.ledger.engine.dispose()
    node_level = [e.epsilon_after or 0.0 for e in node_dp.ledger.entries()]
    return CoordinatorData(path=path, url=url, keys=keys, epsilons=epsilons, node_level=node_level)


@cache
def round_epsilon() -> float:
    """The epsilon of one round alone (what ``epsilon_round`` records)."""
    return epsilon_of([ROUND_PLAN], delta=DELTA, accountant="rdp")


def _node_rows(node: str, number: int, loss: float) -> list[object]:
    return [
        NodeMetric(
            run_id=RUN_ID,
            round=number,
            phase="train",
            node_name=node,
            flower_node_id=f"{node}-id",
            num_examples=800,
            metrics={
                "train-loss": loss + 0.1,
                "held-out-loss-start": loss + 0.3,
                "held-out-loss-local": loss - 0.1,
                "num-examples": 800.0,
                "train-seconds": 42.0,
            },
        ),
        NodeMetric(
            run_id=RUN_ID,
            round=number,
            phase="evaluate",
            node_name=node,
            flower_node_id=f"{node}-id",
            num_examples=48,
            metrics={"held-out-loss": loss, "held-out-perplexity": 2.718**loss},
        ),
    ]


def ledger_fields(node: str, number: int, epsilon: float) -> dict[str, object]:
    return {
        "node": node,
        "run_id": RUN_ID,
        "round": number,
        "base_model_fingerprint": BASE_FINGERPRINT,
        "data_fingerprint": DATA[node],
        "mode": "dp",
        "steps": ROUND_PLAN[2],
        "sample_rate": ROUND_PLAN[1],
        "noise_multiplier": ROUND_PLAN[0],
        "max_grad_norm": 1.0,
        "delta": DELTA,
        "epsilon_round": round_epsilon(),
        "epsilon_after": epsilon,
        "epsilon_cap": CAPS[node],
        "accountant": "rdp",
        "accountant_version": accountant_version(),
        "kind": "training_round",
        "method": "dp-sgd",
        "privacy_unit": "example",
        "recorded_at": (STARTED + timedelta(minutes=2 * number)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }


def _append_ledger(
    session: Session, node: str, key: NodeKey, number: int, epsilons: list[float]
) -> LedgerEntry:
    held = ledger_entries(session, node)
    previous = held[-1] if held else None
    entry = seal_entry(
        ledger_fields(node, number, epsilons[number - 1]), previous=previous, key=key
    )
    append_entries(
        session, [entry], sign_checkpoint(node=node, head=entry, key=key), contiguous=False
    )
    return entry


def _health_rows() -> list[object]:
    rows: list[object] = []
    for number, share in ((1, 1.0), (2, 1.0), (3, 0.5)):
        rows.append(HealthSignal(run_id=RUN_ID, round=number, signal="participation", value=share))
        for signal in ("update-norm", "update-norm-ratio", "cosine-to-aggregate"):
            for node in DATA:
                rows.append(
                    HealthSignal(
                        run_id=RUN_ID,
                        round=number,
                        node_name=node,
                        signal=signal,
                        value=None,
                        unavailable=SECURE_AGGREGATION,
                    )
                )
    rows += [
        HealthAlert(
            run_id=RUN_ID,
            round=3,
            node_name="bank",
            kind="declined",
            message=f"bank declined: {BUDGET_REASON}",
        ),
        HealthAlert(
            run_id=RUN_ID,
            round=2,
            node_name="bank",
            kind="near-cap",
            message="bank has spent epsilon 3.72 of its cap 4 (93%)",
        ),
    ]
    return rows


def _ab_rows() -> list[object]:
    test = AbTest(
        id=AB_TEST_ID,
        version_a="base",
        version_b=f"{RUN_ID}/3",
        metrics={"names": ["loss", "exact-match"], "max_examples": 48},
        alpha=0.05,
        nodes={"requested": None, "answered": ["hospital", "bank"]},
        status="finished",
        started_at=STARTED + timedelta(hours=1),
        finished_at=STARTED + timedelta(hours=1, minutes=5),
    )
    results = [
        ("overall", "loss", False, 96, 2.91, 2.62, -0.29, -0.41, -0.17, 4e-5, 8e-5, "b better"),
        (
            "overall",
            "exact-match",
            True,
            96,
            0.30,
            0.32,
            0.02,
            -0.04,
            0.08,
            0.41,
            0.41,
            "no significant difference",
        ),
        ("hospital", "loss", False, 48, 3.05, 2.71, -0.34, -0.52, -0.16, 3e-4, None, "b better"),
        ("bank", "loss", False, 48, 2.77, 2.53, -0.24, -0.40, -0.08, 4e-3, None, "b better"),
    ]
    return [
        test,
        *(
            AbTestResult(
                test_id=AB_TEST_ID,
                scope=scope,
                metric=metric,
                higher_is_better=higher,
                examples=examples,
                mean_a=mean_a,
                mean_b=mean_b,
                difference=difference,
                ci_low=low,
                ci_high=high,
                confidence=0.95,
                test="paired t-test",
                p_value=p,
                p_adjusted=p_adjusted,
                verdict=verdict,
                detail={"shared": "statistics"},
            )
            for (
                scope,
                metric,
                higher,
                examples,
                mean_a,
                mean_b,
                difference,
                low,
                high,
                p,
                p_adjusted,
                verdict,
            ) in results
        ),
    ]


def insert_forged_entry(data: CoordinatorData, node: str) -> LedgerEntry:
    """Insert, through a separate writable connection, an entry that extends ``node``'s
    copy but is signed with another key (UPDATE and DELETE are blocked by triggers)."""
    engine = open_database(data.url, create=False)
    with transaction(engine) as session:
        held = ledger_entries(session, node)
        head = held[-1]
        fields = ledger_fields(node, head.round + 1, head.epsilon_after or 0.0)
        forged = seal_entry(fields, previous=head, key=NodeKey.generate())
        session.add(entry_row(forged))
    engine.dispose()
    return forged


PLAIN_RUN_ID = "20261124T080000Z-0badc0de"


def add_plain_aggregation_run(data: CoordinatorData) -> None:
    """A second, later run without secure aggregation: the update norms are known, and the
    hospital's update in round 2 is an outlier."""
    engine = open_database(data.url, create=False)
    norms = {1: {"hospital": 0.8, "bank": 0.7}, 2: {"hospital": 6.0, "bank": 0.9}}
    with transaction(engine) as session:
        session.add(
            Run(
                id=PLAIN_RUN_ID,
                name="plain-aggregation",
                status="running",
                rounds_planned=4,
                base_model_spec="smollm2-135m",
                base_model_fingerprint=BASE_FINGERPRINT,
                config={},
                started_at=STARTED + timedelta(days=1),
            )
        )
        session.flush()
        for number, by_node in norms.items():
            session.add(
                Round(
                    run_id=PLAIN_RUN_ID,
                    number=number,
                    nodes_sampled=2,
                    updates_accepted=2,
                    updates_rejected=0,
                    train_loss=2.5,
                    held_out_loss=2.4,
                )
            )
            for node, norm in by_node.items():
                session.add(
                    HealthSignal(
                        run_id=PLAIN_RUN_ID,
                        round=number,
                        node_name=node,
                        signal="update-norm",
                        value=norm,
                    )
                )
        session.add(
            HealthAlert(
                run_id=PLAIN_RUN_ID,
                round=2,
                node_name="hospital",
                kind="outlier-update",
                message="hospital's update norm 6 is 6.7x the median of the other nodes' (0.9)",
            )
        )
    engine.dispose()


PREFERENCES = "sha256:" + "3b" * 32  # the hospital's preference pairs: the same people


def add_budget_group(data: CoordinatorData) -> float:
    """The hospital's preference file, in one budget group with its SFT file: a DP-DPO round
    on it in round 4 (signed and copied like the others) and the group as the node stated
    it with that round. Returns the group's epsilon as the guard composes it: four rounds."""
    engine = open_database(data.url, create=False)
    key = data.keys["hospital"]
    group = epsilon_of([ROUND_PLAN] * 4, delta=DELTA, accountant="rdp")
    with transaction(engine) as session:
        previous = ledger_entries(session, "hospital")[-1]
        fields = {
            **ledger_fields("hospital", 4, round_epsilon()),
            "data_fingerprint": PREFERENCES,
            "method": "dp-dpo",
            "privacy_unit": "preference_pair",
        }
        entry = seal_entry(fields, previous=previous, key=key)
        append_entries(
            session,
            [entry],
            sign_checkpoint(node="hospital", head=entry, key=key),
            contiguous=False,
        )
        session.add(
            BudgetGroup(
                run_id=RUN_ID,
                round=4,
                node_name="hospital",
                data_fingerprint=PREFERENCES,
                members={"fingerprints": sorted([DATA["hospital"], PREFERENCES])},
                epsilon_after=group,
            )
        )
    engine.dispose()
    return group


def add_copy_with_a_gap(data: CoordinatorData, node: str = "clinic") -> NodeKey:
    """A ledger copy of ``node`` that holds entries 1 and 3 of its ledger, not entry 2 (a
    round the node trained without this coordinator)."""
    key = NodeKey.generate()
    entries: list[LedgerEntry] = []
    for number in (1, 2, 3):
        fields = {**ledger_fields("hospital", number, epsilons_after(3)[number - 1]), "node": node}
        entries.append(seal_entry(fields, previous=entries[-1] if entries else None, key=key))
    engine = open_database(data.url, create=False)
    with transaction(engine) as session:
        add_public_key(session, node, key.public_key_text())
        for entry in (entries[0], entries[2]):
            checkpoint = sign_checkpoint(node=node, head=entry, key=key)
            append_entries(session, [entry], checkpoint, contiguous=False)
    engine.dispose()
    return key


def add_long_copy(data: CoordinatorData, node: str, count: int) -> NodeKey:
    """A ledger copy of ``node`` with ``count`` entries, one recorded every hour from
    ``STARTED`` (so a day holds 24), signed and checkpointed at its head."""
    key = NodeKey.generate()
    entries: list[LedgerEntry] = []
    for number in range(1, count + 1):
        fields = {
            **ledger_fields("hospital", 1, epsilons_after(1)[0]),
            "node": node,
            "round": number,
            "recorded_at": (STARTED + timedelta(hours=number - 1)).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ"
            ),
        }
        entries.append(seal_entry(fields, previous=entries[-1] if entries else None, key=key))
    engine = open_database(data.url, create=False)
    with transaction(engine) as session:
        add_public_key(session, node, key.public_key_text())
        session.add_all(entry_row(entry) for entry in entries)
        session.add(checkpoint_row(sign_checkpoint(node=node, head=entries[-1], key=key)))
    engine.dispose()
    return key


def append_to_copy(data: CoordinatorData, node: str, key: NodeKey) -> LedgerEntry:
    """One more entry (and its checkpoint) at the head of ``node``'s copy."""
    engine = open_database(data.url, create=False)
    with transaction(engine) as session:
        head = ledger_entries(session, node)[-1]
        fields = {**ledger_fields("hospital", 1, epsilons_after(1)[0]), "node": node}
        entry = seal_entry({**fields, "round": head.round + 1}, previous=head, key=key)
        append_entries(
            session, [entry], sign_checkpoint(node=node, head=entry, key=key), contiguous=False
        )
    engine.dispose()
    return entry


# --- reading what a page shows -----------------------------------------------------------

TIMEOUT = 60


def open_page(url: str, page: str | None, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    """The dashboard on ``url``, showing ``page`` (e.g. ``views/privacy.py``; None: Overview)."""
    monkeypatch.setenv(common.ENV_VAR, url)
    app = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    if page is not None:
        app.switch_page(page).run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def texts(app: AppTest) -> str:
    """Everything the page says in words (markdown, captions, notes, alerts)."""
    parts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success"):
        parts += [str(element.value) for element in getattr(app, kind)]
    return "\n".join(parts)


def frames(app: AppTest) -> list[pd.DataFrame]:
    return [element.value for element in app.dataframe]


def chart_specs(app: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in app.get("vega_lite_chart")]


def chart_data(app: AppTest, index: int = 0) -> pd.DataFrame:
    dataset = app.get("vega_lite_chart")[index].proto.datasets[0]
    return pa.ipc.open_stream(io.BytesIO(dataset.data.data)).read_all().to_pandas()
