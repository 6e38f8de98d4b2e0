"""Audit: a node's ledger entries as the coordinator holds them, filtered by run, data set
and date and shown a page at a time (the database filters and pages: a copy of 100,000
entries opens as fast as one of ten); a button that verifies the copy; the files an
auditor takes away (the ledger JSONL for `fedtune audit verify` and the HTML report); and
what leaves a node (the egress manifest, for the settings chosen here: the coordinator's
database does not hold a node's settings)."""

from __future__ import annotations

import datetime as dt
import math

import streamlit as st

from fedtune.dashboard import common, queries
from fedtune.dashboard.database import DashboardError
from fedtune.dashboard.ledger_checks import AuditFiles, audit_files
from fedtune.dashboard.summaries import short_fingerprint
from fedtune.platform.wire.egress import RELEASE_METRICS, egress_manifest, field_rows

FILES_KEY = "audit-files"
PAGE_KEY = "audit-page"
SHOWN_KEY = "audit-shown-filter"  # the filter the page number belongs to
FILTER_KEYS = ("audit-runs", "audit-data-sets", "audit-dates", PAGE_KEY, SHOWN_KEY)
PAGE_SIZE = 500  # entries a page: the table stays quick however long the ledger grows
ENTRY_COLUMNS = [
    "seq",
    "run_id",
    "round",
    "data_fingerprint",
    "mode",
    "steps",
    "sample_rate",
    "noise_multiplier",
    "max_grad_norm",
    "epsilon_round",
    "epsilon_after",
    "epsilon_cap",
    "delta",
    "accountant",
    "recorded_at",
    "hash",
]


def chosen_filter(node: str, facets: queries.LedgerFacets) -> queries.LedgerFilter:
    """The run, data set and date filters shown here, as a query of ``node``'s entries."""
    left, middle, right = st.columns(3)
    runs = left.multiselect("Runs", list(facets.runs), key="audit-runs")
    data_sets = middle.multiselect(
        "Data sets",
        list(facets.data_sets),
        format_func=short_fingerprint,
        key="audit-data-sets",
    )
    days = None
    first, last = facets.first_day, facets.last_day
    if first is not None and last is not None:
        dates = right.date_input(
            "Recorded between (UTC)",
            value=(first, last),
            min_value=first,
            max_value=last,
            key="audit-dates",
        )
        if isinstance(dates, tuple) and len(dates) == 2 and dates != (first, last):
            start, end = dates
            if isinstance(start, dt.date) and isinstance(end, dt.date):
                days = (start, end)
    return queries.LedgerFilter(node, runs=tuple(runs), data_sets=tuple(data_sets), days=days)


def forget_filters() -> None:
    """Another node's ledger: its runs, data sets and days are not this one's."""
    for key in FILTER_KEYS:
        st.session_state.pop(key, None)


def page_number(wanted: queries.LedgerFilter, pages: int) -> int:
    """The page of entries to show (a selector when there is more than one): the first
    whenever the filters change."""
    if st.session_state.get(SHOWN_KEY) != wanted:
        st.session_state[SHOWN_KEY] = wanted
        st.session_state.pop(PAGE_KEY, None)
    if pages <= 1:
        return 1
    if not 1 <= st.session_state.get(PAGE_KEY, 1) <= pages:
        st.session_state[PAGE_KEY] = 1
    return int(
        st.number_input(f"Page (of {pages:,})", min_value=1, max_value=pages, step=1, key=PAGE_KEY)
    )


def entries_section(node: str) -> None:
    facets = common.fetch(queries.ledger_facets, node)
    if facets.entries == 0:
        common.note_absent(f"No ledger entries of {node} have reached the coordinator yet.")
        return
    wanted = chosen_filter(node, facets)
    matching = common.fetch(queries.ledger_count, wanted) if wanted.filters else facets.entries
    if matching == 0:
        common.note_absent("No entries match these filters.")
        return
    pages = math.ceil(matching / PAGE_SIZE)
    page = page_number(wanted, pages)
    offset = (page - 1) * PAGE_SIZE
    shown = common.fetch(queries.ledger_page, wanted, offset=offset, limit=PAGE_SIZE)
    st.dataframe(
        shown[[c for c in ENTRY_COLUMNS if c in shown.columns]],
        hide_index=True,
        column_config={"delta": st.column_config.NumberColumn(format="%.0e")},
    )
    if pages == 1:
        st.caption(f"{matching:,} of {facets.entries:,} entries shown.")
        return
    which = f"the {matching:,} that match the filters" if wanted.filters else f"{matching:,}"
    st.caption(
        f"Entries {offset + 1:,}–{offset + len(shown):,} of {which} shown (page {page:,} of "
        f"{pages:,}, {PAGE_SIZE} a page)"
        + (f"; {facets.entries:,} entries in this copy." if wanted.filters else ".")
    )


def verify_section(node: str) -> None:
    if not st.button("Verify this ledger copy", key="audit-verify", icon=":material/verified:"):
        return
    url = common.require_database()
    heads = queries.ledger_heads(common.engine(url)) or []  # as it is now, not as cached
    head = next((h for h in heads if h.node == node), None)
    if head is None:
        st.warning(f"{node} has no ledger copy in this database any more.")
        return
    with st.spinner(f"Verifying {head.entries:,} ledger entries…"):
        check = common.verify_copy(head).check
    if check.verdict == "verifies":
        st.success(f"{node}'s ledger copy verifies: {check.message}.")
    elif check.verdict == "fails":
        st.error(f"{node}'s ledger copy does not verify: {check.message}")
    else:
        st.warning(f"{node}'s ledger copy: {check.message}.")


def downloads_section(node: str) -> None:
    st.subheader("For the auditor")
    st.caption(
        "The whole ledger copy (the filters above do not apply: an auditor verifies the complete "
        "chain), exported and verified against the node's key stored here, with every epsilon "
        "recomputed independently. Verify the file offline with `fedtune audit verify`."
    )
    if st.button("Prepare audit files", key="audit-prepare", icon=":material/download:"):
        try:
            st.session_state[FILES_KEY] = audit_files(
                common.engine(common.require_database()), node
            )
        except DashboardError as error:
            st.session_state.pop(FILES_KEY, None)
            st.error(str(error))
    files = st.session_state.get(FILES_KEY)
    if not isinstance(files, AuditFiles) or files.node != node:
        return
    (st.success if files.ok else st.error)(
        f"{files.entries} entries: "
        + ("verified, every epsilon recomputed." if files.ok else "the audit found problems.")
    )
    st.code(files.summary, language=None)
    left, right = st.columns(2)
    left.download_button(
        "Ledger (JSONL)",
        data=files.jsonl,
        file_name=files.jsonl_name,
        mime="application/jsonl",
        on_click="ignore",
        key="audit-jsonl",
    )
    right.download_button(
        "Audit report (HTML)",
        data=files.html,
        file_name=files.html_name,
        mime="text/html",
        on_click="ignore",
        key="audit-html",
    )


def egress_section() -> None:
    """The egress manifest for the node settings chosen here."""
    st.subheader("What leaves a node")
    st.caption(
        "Every field of every reply a node sends, generated from the reply builders "
        "(`fedtune audit egress --config node.toml` prints a node's own): masked by secure "
        "aggregation, dp with its accounting in the node's ledger, signed-public (the ledger "
        "record), plain, or not-sent under these settings; then what Flower sends beside them."
    )
    left, middle, right = st.columns(3)
    release = left.selectbox(
        "privacy.release_metrics",
        RELEASE_METRICS,
        index=RELEASE_METRICS.index("plain"),
        key="egress-release-metrics",
    )
    secure = middle.checkbox(
        "Updates through secure aggregation", value=True, key="egress-secure-aggregation"
    )
    per_example = right.checkbox("Per-example A/B scores", value=True, key="egress-per-example")
    manifest = egress_manifest(
        release_metrics=str(release),
        secure_aggregation=secure,
        share_per_example_scores=per_example,
    ).to_dict()
    for reply in manifest["replies"]:
        with st.expander(f"{reply['message_type']} — {reply['variant']}"):
            st.caption(reply["meaning"])
            st.dataframe(field_rows(reply["records"]), hide_index=True)
    with st.expander("Sent by Flower beside the replies"):
        for item in manifest["flower"]:
            st.markdown(f"**{item['name']}** ({item['when']}): {item['meaning']}")
            rows = field_rows([{"fields": item["fields"]}])
            st.dataframe(
                [{k: v for k, v in row.items() if k not in ("record", "kind")} for row in rows],
                hide_index=True,
            )
    for note in manifest["notes"]:
        st.caption(note)


st.title("Audit")
nodes = common.fetch(queries.ledger_copy_nodes)
if not nodes:
    common.note_absent("No ledger copies yet: nodes send a signed entry with every round.")
else:
    chosen = st.selectbox("Node", nodes, key="audit-node", on_change=forget_filters)
    assert chosen is not None
    entries_section(chosen)
    verify_section(chosen)
    downloads_section(chosen)
egress_section()
