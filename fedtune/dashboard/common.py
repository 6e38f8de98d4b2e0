"""What every page shares: the database it reads, cached queries, the run picker and
plain-language notes for data that is absent."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import pandas as pd
import streamlit as st
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from fedtune.common.database import database_url
from fedtune.dashboard.database import (
    DashboardError,
    check_database,
    describe_database,
    open_read_only,
)
from fedtune.dashboard.queries import CopyHead
from fedtune.privacy.ledger_copies import CopyCheck, check_copy

ENV_VAR = "FEDTUNE_DASHBOARD_DB"  # where the database URL is read when no --db is given
CACHE_SECONDS = 5
# A copy of up to this many entries is verified whenever a page shows its verdict (well
# under a second); a larger one on request, its verdict kept until the copy changes.
VERIFY_ON_SIGHT_ENTRIES = 5_000

P = ParamSpec("P")
T = TypeVar("T")


def url_from_arguments(argv: Sequence[str]) -> str | None:
    """The ``--db`` value among the script's arguments (``streamlit run app.py -- --db URL``)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--db")
    known, _ = parser.parse_known_args(list(argv))
    return cast(str | None, known.db)


def current_url() -> str:
    """The database this dashboard reads; stops the page with a message when none is given."""
    given = url_from_arguments(sys.argv[1:]) or os.environ.get(ENV_VAR)
    if not given:
        st.error(
            "No database given. Start the dashboard with `fedtune dashboard --db URL` "
            f"(or set {ENV_VAR})."
        )
        st.stop()
    return database_url(cast(str, given))


@st.cache_resource(show_spinner=False)
def engine(url: str) -> Engine:
    """One read-only engine per database, shared by all sessions."""
    return open_read_only(url)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def checked(url: str) -> str | None:
    """Why ``url`` cannot be shown (see :func:`check_database`), or None when it can."""
    try:
        check_database(url)
    except DashboardError as error:
        return str(error)
    return None


def require_database() -> str:
    """The database URL, after checking that it is a readable fedtune database."""
    url = current_url()
    problem = checked(url)
    if problem is not None:
        st.error(problem)
        st.stop()
    return url


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def _cached(module: str, name: str, url: str, *args: Any, **kwargs: Any) -> Any:
    function = getattr(importlib.import_module(module), name)
    return function(engine(url), *args, **kwargs)


def fetch(query: Callable[Concatenate[Engine, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``query(engine, *args, **kwargs)`` on the current database, cached for a few seconds;
    a database error stops the page with its message."""
    url = require_database()
    try:
        return cast(T, _cached(query.__module__, query.__name__, url, *args, **kwargs))
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        st.error(f"Cannot read the database {describe_database(url)}: {reason}")
        st.stop()
        raise  # not reached: st.stop() raises


def run_label(row: pd.Series) -> str:
    return f"{row['name']} · {row['run_id']} ({row['status']})"


def pick_run(runs: pd.DataFrame, *, key: str, allow_all: bool = False) -> str | None:
    """A select box of the runs, newest first; None means all runs (when ``allow_all``)."""
    labels = {str(row["run_id"]): run_label(row) for _, row in runs.iterrows()}
    options: list[str | None] = [*labels]
    if allow_all:
        options.insert(0, None)
    return st.selectbox(
        "Run",
        options,
        format_func=lambda run: "all runs" if run is None else labels[run],
        key=key,
    )


def note_absent(what: str, *, why: str | None = None) -> None:
    """Say plainly that something is absent (never show zeros in its place)."""
    st.info(what + (f" {why}" if why else ""), icon=":material/info:")


def number(value: Any, spec: str = ".3f") -> str:
    """``value`` formatted, or an em dash when absent."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "—"
    return format(value, spec)


# --- ledger copy verdicts -----------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """A verdict on a ledger copy, the state of the copy it was reached on, and when."""

    check: CopyCheck
    head: CopyHead
    at: datetime
    seconds: float  # how long the verification took

    def fresh(self) -> bool:
        return (datetime.now(UTC) - self.at).total_seconds() < CACHE_SECONDS


class _Verdicts:
    """The latest verdict on each (database, node) copy, shared by every session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], Verdict] = {}

    def get(self, url: str, head: CopyHead) -> Verdict | None:
        """The verdict reached on exactly this state of the copy, if any."""
        with self._lock:
            verdict = self._held.get((url, head.node))
        return verdict if verdict is not None and verdict.head == head else None

    def put(self, url: str, verdict: Verdict) -> None:
        with self._lock:
            self._held[(url, verdict.head.node)] = verdict


@st.cache_resource(show_spinner=False)
def _verdicts() -> _Verdicts:
    return _Verdicts()


def known_verdict(head: CopyHead) -> Verdict | None:
    """The verdict on ``head``'s copy, when one was reached on this very state of it; a
    small copy is verified again when its verdict is more than a few seconds old."""
    verdict = _verdicts().get(require_database(), head)
    if verdict is None or (head.entries <= VERIFY_ON_SIGHT_ENTRIES and not verdict.fresh()):
        return None
    return verdict


def verify_copy(head: CopyHead) -> Verdict:
    """Verify ``head``'s copy now (chain, signatures, signed head) and keep the verdict for
    every session, keyed by the state of the copy read before verifying: entries appended
    meanwhile make the next page verify again."""
    url = require_database()
    started = time.perf_counter()
    check = check_copy(engine(url), head.node)
    verdict = Verdict(check, head, datetime.now(UTC), time.perf_counter() - started)
    _verdicts().put(url, verdict)
    return verdict
