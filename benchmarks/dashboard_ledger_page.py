"""Time the dashboard's Audit and Privacy pages on a coordinator database whose copy of one
node's epsilon ledger holds 100,000 entries.

Builds the database with fedtune's own models and ledger API: ``--entries`` DP rounds of one
node (default 100,000) over ``--runs`` runs and 3 data sets, each entry sealed (hash chain and
Ed25519 signature) and followed by its signed checkpoint, as the coordinator stores them
round after round; with the runs, their rounds and the node's epsilon reports unless
``--ledger-only``; and a second node with a short ledger. Then runs the pages with
Streamlit's AppTest, in this process, as a browser session would run them:

- ``open``: the page's first run on a cold dashboard (every cache empty);
- ``rerun``: the same page again at once (the figures are cached for a few seconds);
- ``rerun_expired``: again after the figures' cache expired (a visitor a minute later);
- the Audit page's interactions: the next page of entries, a run filter, a date filter;
- the buttons that verify a whole copy (not part of opening a page; reported, no target).

Writes ``benchmarks/results/dashboard_ledger_page.json``. Target: under 3 s to open.

    .venv/bin/python benchmarks/dashboard_ledger_page.py --entries 100000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import streamlit as st
from streamlit.testing.v1 import AppTest

from fedtune.common.database import transaction
from fedtune.dashboard import common
from fedtune.dashboard.launch import APP
from fedtune.platform.db.storage import Round, Run, open_database
from fedtune.privacy.ledger import LedgerEntry, seal_entry, sign_checkpoint
from fedtune.privacy.ledger_store import add_public_key, checkpoint_row, entry_row
from fedtune.privacy.signing import NodeKey

RESULTS = Path(__file__).parent / "results"
TARGET_SECONDS = 3.0
NODE = "hospital-a"
OTHER_NODE = "insurer-b"  # sorts after NODE: the Audit page opens on the large copy
STARTED = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
EVERY = dt.timedelta(minutes=10)  # 100,000 rounds span about two years
CAP = 200.0


def ledger_fields(node: str, index: int, count: int, runs: int, spent: float) -> dict[str, object]:
    return {
        "node": node,
        "run_id": run_id(index * runs // count),
        "round": index % (count // runs) + 1,
        "base_model_fingerprint": "sha256:" + "b" * 64,
        "data_fingerprint": data_set(index),
        "mode": "dp",
        "steps": 50,
        "sample_rate": 0.0123,
        "noise_multiplier": 1.0734,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "epsilon_round": 0.001,
        "epsilon_after": spent,
        "epsilon_cap": CAP,
        "accountant": "rdp",
        "accountant_version": "opacus-1.6.0",
        "kind": "training_round",
        "method": "dp-sgd",
        "privacy_unit": "example",
        "recorded_at": (STARTED + index * EVERY).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }


def run_id(number: int) -> str:
    return f"2024{number:04d}T000000Z-{number:08x}"


def data_set(index: int) -> str:
    return f"sha256:{index % 3}" + "d" * 63


def seal_ledger(key: NodeKey, node: str, count: int, runs: int) -> list[LedgerEntry]:
    """``count`` DP rounds over ``runs`` runs on 3 data sets, epsilon growing per data set."""
    entries: list[LedgerEntry] = []
    spent = [0.0, 0.0, 0.0]
    previous = None
    for index in range(count):
        spent[index % 3] += 0.001
        fields = ledger_fields(node, index, count, runs, spent[index % 3])
        previous = seal_entry(fields, previous=previous, key=key)
        entries.append(previous)
        if (index + 1) % 20_000 == 0:
            print(f"sealed {index + 1} entries", flush=True)
    return entries


def build_database(path: Path, *, entries: int, runs: int, ledger_only: bool) -> dict[str, float]:
    """Write the coordinator database; returns how long sealing and storing took."""
    key, other_key = NodeKey.generate(), NodeKey.generate()
    started = time.perf_counter()
    sealed = seal_ledger(key, NODE, entries, runs)
    other = seal_ledger(other_key, OTHER_NODE, 3, 1)
    checkpoints = [sign_checkpoint(node=NODE, head=entry, key=key) for entry in sealed]
    checkpoints.append(sign_checkpoint(node=OTHER_NODE, head=other[-1], key=other_key))
    seal_seconds = time.perf_counter() - started
    started = time.perf_counter()
    engine = open_database(f"sqlite:///{path}", create=True)
    with transaction(engine) as session:
        for number in range(runs):
            session.add(
                Run(
                    id=run_id(number),
                    name=f"notes-{number}",
                    status="finished",
                    rounds_planned=entries // runs,
                    base_model_spec="smollm2-135m",
                    base_model_fingerprint="sha256:" + "b" * 64,
                    config={},
                    started_at=STARTED + number * (entries // runs) * EVERY,
                    finished_at=STARTED + (number + 1) * (entries // runs) * EVERY,
                )
            )
        session.flush()
        add_public_key(session, NODE, key.public_key_text())
        add_public_key(session, OTHER_NODE, other_key.public_key_text())
        session.add_all(entry_row(entry) for entry in sealed + other)
        session.add_all(checkpoint_row(checkpoint) for checkpoint in checkpoints)
        if not ledger_only:
            session.add_all(rounds_and_reports(sealed))
    engine.dispose()
    return {"seal_seconds": seal_seconds, "store_seconds": time.perf_counter() - started}


def rounds_and_reports(entries: list[LedgerEntry]) -> list[object]:
    """One round per entry (the node trained every round) and the node's epsilon report."""
    rows: list[object] = []
    for entry in entries:
        rows.append(
            Round(
                run_id=entry.run_id,
                number=entry.round,
                nodes_sampled=1,
                updates_accepted=1,
                updates_rejected=0,
                train_loss=2.5,
                held_out_loss=2.4,
                seconds=60.0,
            )
        )
    return rows


def clear_caches(*, resources: bool) -> None:
    st.cache_data.clear()
    if resources:
        st.cache_resource.clear()


def timed(step: Callable[[], AppTest]) -> tuple[AppTest, float]:
    started = time.perf_counter()
    app = step()
    seconds = time.perf_counter() - started
    if app.exception:
        raise SystemExit(f"the page failed: {[e.value for e in app.exception]}")
    return app, seconds


def page_timings(url: str, page: str) -> tuple[AppTest, dict[str, float]]:
    """Open ``page`` cold, re-run it at once, and re-run it after the figures expired."""
    os.environ[common.ENV_VAR] = url
    app = AppTest.from_file(str(APP), default_timeout=120).run()  # the Overview, then:
    clear_caches(resources=True)
    app, cold = timed(lambda: app.switch_page(page).run())
    app, rerun = timed(app.run)
    clear_caches(resources=False)
    app, expired = timed(app.run)
    print(f"{page}: open {cold:.2f}s, rerun {rerun:.2f}s, after expiry {expired:.2f}s")
    return app, {"open": cold, "rerun": rerun, "rerun_expired": expired}


def audit_interactions(app: AppTest) -> dict[str, float]:
    """The Audit page's paging and filters on the large copy, then its verify button."""
    times = {}
    app.selectbox(key="audit-node").set_value(NODE)
    app, times["select_node"] = timed(app.run)
    app.number_input(key="audit-page").set_value(2)
    app, times["next_page"] = timed(app.run)
    runs = app.multiselect(key="audit-runs")
    runs.set_value([runs.options[3]])
    app, times["filter_by_run"] = timed(app.run)
    app.multiselect(key="audit-runs").set_value([])
    app.date_input(key="audit-dates").set_value((dt.date(2024, 3, 1), dt.date(2024, 3, 31)))
    app, times["filter_by_date"] = timed(app.run)
    app.button(key="audit-verify").click()
    app, times["verify_button"] = timed(app.run)
    assert "verifies" in app.success[0].value, [s.value for s in app.success]
    for name, seconds in times.items():
        print(f"audit {name}: {seconds:.2f}s")
    return times


def privacy_verify(url: str) -> dict[str, float]:
    """The Privacy page's button that verifies the copies too large to verify on opening."""
    os.environ[common.ENV_VAR] = url
    clear_caches(resources=True)
    app = AppTest.from_file(str(APP), default_timeout=120).run()
    app = app.switch_page("views/privacy.py").run()
    app.button(key="privacy-verify").click()
    app, seconds = timed(app.run)
    verdicts = app.dataframe[-1].value.set_index("node")["verdict"]
    assert verdicts.loc[NODE] == "✅ verifies", verdicts
    print(f"privacy verify button: {seconds:.2f}s")
    return {"verify_button": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--ledger-only", action="store_true", help="no rounds or epsilon reports, only the ledger"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "dashboard_ledger_page.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fedtune.db"
        build = build_database(
            path, entries=args.entries, runs=args.runs, ledger_only=args.ledger_only
        )
        print(f"built the database in {sum(build.values()):.1f}s", flush=True)
        url = f"sqlite:///{path}"
        file_mib = path.stat().st_size / 2**20
        audit_app, audit = page_timings(url, "views/audit.py")
        audit_clicks = audit_interactions(audit_app)
        _, privacy = page_timings(url, "views/privacy.py")
        privacy_clicks = privacy_verify(url)

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = {
        "benchmark": "dashboard_ledger_page",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "streamlit": st.__version__,
            "cpus": cpus,
            "load_average_1_5_15_min": load,  # other work on the machine slows every figure
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "entries": args.entries,
        "file_mib": file_mib,
        "build": build,
        "seconds": {
            "audit": {**audit, **audit_clicks},
            "privacy": {**privacy, **privacy_clicks},
        },
        "target_seconds": TARGET_SECONDS,
        "within_target": max(audit["open"], privacy["open"]) < TARGET_SECONDS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
