"""A self-contained HTML report of an epsilon ledger, for compliance auditors.

One page, no external assets and no JavaScript: the verification verdict, per data set a chart
of epsilon over the ledger against its cap (inline SVG) with the totals, and a table of every
entry beside its independent recomputation (:mod:`fedtune.privacy.audit.independent_accounting`);
and, when the caller passes it, the egress manifest: what leaves a node.
The page is a jinja2 template (``templates/report.html.j2``) with autoescaping on: every value
from the ledger is escaped there, since a ledger is input and may be hostile. This module only
works out what the page shows (texts and the chart's geometry).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeGuard

from jinja2 import Environment, PackageLoader, StrictUndefined

from fedtune.common.errors import AlreadyExistsError
from fedtune.privacy.audit.independent_accounting import Recomputation

DEFAULT_TITLE = "Epsilon ledger audit report"
# Above this many points per chart, markers are left out and only the line is drawn.
MAX_MARKERS = 400


@dataclass
class _DataSet:
    node: str
    fingerprint: str
    rows: list[Mapping[str, Any]] = field(default_factory=list)


# The audit pages' templates (this report's and the canary audit's); each includes the
# style sheet templates/audit_page.css as literal text, so autoescaping leaves it intact.
TEMPLATES = Environment(
    loader=PackageLoader("fedtune.privacy.audit", "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=StrictUndefined,
)
_HEADERS = (
    "seq",
    "recorded at",
    "node",
    "run",
    "round",
    "data set",
    "mode",
    "steps",
    "q",
    "σ",
    "clip",
    "δ",
    "ε round",
    "ε after",
    "cap",
    "accountant",
    "recomputed ε",
    "agrees",
    "note",
)


def render_report(
    entries: Sequence[Mapping[str, Any]],
    *,
    verification: Mapping[str, Any],
    recomputations: Sequence[Recomputation],
    title: str = DEFAULT_TITLE,
    generated_at: str | None = None,
    egress: Mapping[str, Any] | None = None,
) -> str:
    """The report as one HTML page.

    ``egress`` is the egress manifest as plain data (``EgressManifest.to_dict()`` of
    :mod:`fedtune.platform.wire.egress`, which the auditor's code does not import: the caller
    builds it): shown as "What leaves a node" when given.

    ``verification`` is ``{"ok": bool, "problem": str | None, "summary": {...}}``, optionally
    with ``"public_key"`` (also looked up in ``summary``). ``recomputations`` are matched to
    entries by (node, seq). ``generated_at`` defaults to now (UTC).
    """
    if generated_at is None:
        generated_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ordered = sorted(entries, key=_ledger_order)
    checks = {(str(r.node), str(r.seq)): r for r in recomputations}
    data_sets: dict[tuple[str, str], _DataSet] = {}
    for entry in ordered:
        key = (_text(entry.get("node")), _text(entry.get("data_fingerprint")))
        data_sets.setdefault(key, _DataSet(*key)).rows.append(entry)
    summary = verification.get("summary")
    summary = summary if isinstance(summary, Mapping) else {}
    times = [str(e["recorded_at"]) for e in ordered if e.get("recorded_at") is not None]
    return TEMPLATES.get_template("report.html.j2").render(
        title=title,
        nodes=sorted({_text(e.get("node")) for e in ordered}),
        public_key=verification.get("public_key") or summary.get("public_key"),
        entry_count=len(ordered),
        first_recorded=min(times) if times else None,
        last_recorded=max(times) if times else None,
        generated_at=generated_at,
        verification_ok=verification.get("ok") is True,
        problem=verification.get("problem") or "the verification result is missing or not ok",
        summary=[(key, _plain(value)) for key, value in summary.items()],
        recomputed=_recomputation(ordered, checks),
        data_sets=[_data_set(data_set, checks) for data_set in data_sets.values()],
        headers=_HEADERS,
        rows=[_row(entry, checks.get(_key(entry))) for entry in ordered],
        egress=_egress(egress) if egress is not None else None,
    )


def _egress(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The egress manifest's tables: one row per field (a field that carries records is
    followed by theirs, named ``FIELD > RECORD``)."""

    def rows(records: Any, prefix: str = "") -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for record in records:
            for item in record.get("fields", ()):
                notes = [f"when: {item['when']}"] if item.get("when") else []
                notes += [f"accounting: {item['accounting']}"] if item.get("accounting") else []
                protection = [str(p) for p in item.get("protection", ())]
                out.append(
                    {
                        "record": f"{prefix}{record.get('name', '')}",
                        "kind": _text(record.get("kind")),
                        "field": _text(item.get("name")),
                        "type": _text(item.get("type")),
                        "protection": " + ".join(protection),
                        "warn": "plain" in protection,
                        "meaning": _text(item.get("meaning")),
                        "notes": "; ".join(notes),
                    }
                )
                out += rows(
                    item.get("contains", ()), f"{prefix}{record.get('name')}.{item['name']} > "
                )
        return out

    settings = manifest.get("settings") or {}
    return {
        "node": manifest.get("node"),
        "settings": [(key, _plain(value)) for key, value in settings.items()],
        "replies": [
            {
                "title": f"{reply.get('message_type')} — {reply.get('variant')}",
                "meaning": _text(reply.get("meaning")),
                "rows": rows(reply.get("records", ())),
            }
            for reply in manifest.get("replies", ())
        ],
        "flower": [
            {
                "title": _text(item.get("name")),
                "when": _text(item.get("when")),
                "meaning": _text(item.get("meaning")),
                "rows": rows([{"name": "", "kind": "", "fields": item.get("fields", ())}]),
            }
            for item in manifest.get("flower", ())
        ],
        "notes": [_text(note) for note in manifest.get("notes", ())],
    }


def write_report(path: str | os.PathLike[str], html: str, *, overwrite: bool = False) -> Path:
    """Write ``html`` to ``path``; an existing file is replaced only with ``overwrite=True``."""
    target = Path(path)
    try:
        with target.open("w" if overwrite else "x", encoding="utf-8") as handle:
            handle.write(html)
    except FileExistsError:
        raise AlreadyExistsError(f"{target} already exists; it is not overwritten") from None
    return target


# ------------------------------------------------------------------------------ sections


def _recomputation(
    entries: Sequence[Mapping[str, Any]], checks: Mapping[tuple[str, str], Recomputation]
) -> dict[str, Any]:
    """What the sentence on the independent recomputation says."""
    found = [checks.get(_key(entry)) for entry in entries]
    done = [r for r in found if r is not None and not r.skipped]
    agree = sum(1 for r in done if r.agrees)
    skipped = sum(1 for r in found if r is not None and r.skipped)
    missing = sum(1 for r in found if r is None)
    methods = sorted(
        {f"{r.method} (tolerance {r.tolerance.describe()})" for r in done if r.tolerance}
    )
    return {
        "agree": agree,
        "done": len(done),
        "methods": "; ".join(methods),
        "wrong": _count(len(done) - agree, "entry disagrees", "entries disagree")
        if len(done) > agree
        else "",
        "skipped": _count(skipped, "non-private entry was", "non-private entries were")
        if skipped
        else "",
        "missing": _count(missing, "entry was", "entries were") if missing else "",
        "rdp": any(r.method.endswith(" rdp") for r in done),
    }


def _data_set(
    data_set: _DataSet, checks: Mapping[tuple[str, str], Recomputation]
) -> dict[str, Any]:
    rows = data_set.rows
    dp = [e for e in rows if e.get("mode") == "dp"]
    non_private = [e for e in rows if e.get("mode") != "dp"]
    last = dp[-1] if dp else {}
    over_cap = [e for e in dp if _exceeds(e.get("epsilon_after"), e.get("epsilon_cap"))]
    disagreeing = [e for e in rows if _disagrees(checks.get(_key(e)))]
    last_check = checks.get(_key(last)) if last else None
    banners = []
    if non_private:
        banners.append(
            f"No DP guarantee for this data set: {len(non_private)} non-private round(s) "
            f"(seq {_seq_list(non_private)}). The epsilon below covers only the private rounds."
        )
    if over_cap:
        banners.append(
            f"Epsilon exceeds the cap in {len(over_cap)} entries (seq {_seq_list(over_cap)})."
        )
    if disagreeing:
        banners.append(
            f"{len(disagreeing)} entries disagree with the independent recomputation "
            f"(seq {_seq_list(disagreeing)})."
        )
    cap = last.get("epsilon_cap")
    total = last.get("epsilon_after")
    label = f"Epsilon of data set {_short(data_set.fingerprint)} on node {data_set.node}"
    return {
        "node": data_set.node,
        "fingerprint": data_set.fingerprint,
        "short": _short(data_set.fingerprint),
        "label": label,
        "banners": banners,
        "total": _eps(total) if dp else "",
        "share": f" ({total / cap:.0%} of the cap)"
        if _finite(total) and _finite(cap) and cap > 0
        else "",
        "recomputed": _eps(last_check.recomputed_epsilon)
        if last_check is not None and not last_check.skipped
        else "—",
        "delta": _num(last.get("delta")) if dp else "—",
        "cap": _eps(cap),
        "accountants": sorted(
            {
                f"{_text(e.get('accountant'))} ({_text(e.get('accountant_version'))})"
                if e.get("accountant_version")
                else _text(e.get("accountant"))
                for e in dp
            }
        ),
        "rounds": len(rows),
        "private": len(dp),
        "non_private": len(non_private),
        "runs": len({_text(e.get("run_id")) for e in rows}),
        "chart": _chart(data_set, checks),
    }


def _row(entry: Mapping[str, Any], check: Recomputation | None) -> dict[str, Any]:
    """One entry's table row: its cells, its recomputation and the verdict."""
    classes = []
    if entry.get("mode") != "dp":
        classes.append("nonprivate")
    if _disagrees(check):
        classes.append("disagree")
    fingerprint = _text(entry.get("data_fingerprint"))

    def cell(value: Any, *, text: bool = False, **extra: Any) -> dict[str, Any]:
        return {"value": value, "text": text, "code": False, "warn": False, **extra}

    cells = [
        cell(_text(entry.get("seq"))),
        cell(_text(entry.get("recorded_at")), text=True),
        cell(_text(entry.get("node")), text=True),
        cell(_text(entry.get("run_id")), text=True),
        cell(_text(entry.get("round"))),
        cell(_short(fingerprint), text=True, code=True, title=fingerprint),
        cell(_text(entry.get("mode")), text=True, warn=entry.get("mode") != "dp"),
        cell(_text(entry.get("steps"))),
        cell(_num(entry.get("sample_rate"))),
        cell(_num(entry.get("noise_multiplier"))),
        cell(_num(entry.get("max_grad_norm"))),
        cell(_num(entry.get("delta"))),
        cell(_eps(entry.get("epsilon_round"))),
        cell(_eps(entry.get("epsilon_after"))),
        cell(_eps(entry.get("epsilon_cap"))),
        cell(_text(entry.get("accountant")), text=True),
    ]
    if check is None:
        verdict, recomputed = "missing", "—"
    elif check.skipped:
        verdict, recomputed = "skipped", "—"
    else:
        verdict = "agrees" if check.agrees else "disagrees"
        recomputed = _eps(check.recomputed_epsilon)
    return {
        "classes": classes,
        "cells": cells,
        "recomputed": recomputed,
        "verdict": verdict,
        "note": check.note if check is not None else "",
        "disagreement": check.note if check is not None and _disagrees(check) else "",
    }


# ---------------------------------------------------------------------------------- chart

_W, _H = 760, 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 110, 34, 46


def _chart(
    data_set: _DataSet, checks: Mapping[tuple[str, str], Recomputation]
) -> dict[str, Any] | None:
    """The geometry of epsilon after each entry (x: ledger seq) against the cap, for the
    template's inline SVG; None without an entry of numeric seq."""
    rows = [e for e in data_set.rows if _finite(e.get("seq"))]
    if not rows:
        return None
    points = [
        (float(e["seq"]), float(e["epsilon_after"]), e)
        for e in rows
        if e.get("mode") == "dp" and _finite(e.get("epsilon_after"))
    ]
    caps = [
        (float(e["seq"]), float(e["epsilon_cap"])) for e in rows if _finite(e.get("epsilon_cap"))
    ]
    seqs = [float(e["seq"]) for e in rows]
    x_low, x_high = min(seqs), max(seqs)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_high = max([value for _, value, _ in points] + [cap for _, cap in caps] + [0.0])
    y_ticks = _nice_ticks(0.0, y_high * 1.08 if y_high > 0 else 1.0)
    y_top = y_ticks[-1]
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(value: float) -> float:
        return round(_LEFT + (value - x_low) / (x_high - x_low) * plot_w, 1)

    def y(value: float) -> float:
        return round(_TOP + plot_h - value / y_top * plot_h, 1)

    markers = []
    for seq, value, entry in points:
        check = checks.get(_key(entry))
        tip = f"seq {_text(entry.get('seq'))}, {_text(entry.get('recorded_at'))}: ε {value:.4f}"
        tip += f" ({check.note})" if check is not None else ""
        if _disagrees(check) or len(points) <= MAX_MARKERS:
            markers.append({"x": x(seq), "y": y(value), "tip": tip, "disagrees": _disagrees(check)})
    cap_path = ""
    if caps:
        # A step line: each cap holds from its entry until the next entry's cap.
        steps = [f"M{x(caps[0][0]):.1f},{y(caps[0][1]):.1f}"]
        steps.extend(f"H{x(seq):.1f}V{y(cap):.1f}" for seq, cap in caps[1:])
        steps.append(f"H{_LEFT + plot_w}")
        cap_path = "".join(steps)
    legend = [("epsilon", "ε after")]
    if caps:
        legend.append(("cap", "cap"))
    if any(e.get("mode") != "dp" for e in rows):
        legend.append(("non-private", "non-private round (no DP guarantee)"))
    if any(_disagrees(checks.get(_key(e))) for e in rows):
        legend.append(("disagrees", "disagrees with the recomputation"))
    offsets, offset = [], 0
    for symbol, text in legend:
        offsets.append((offset, symbol, text))
        offset += 34 + 6 * len(text)
    return {
        "width": _W,
        "height": _H,
        "left": _LEFT,
        "right": _LEFT + plot_w,
        "top": _TOP,
        "bottom": _TOP + plot_h,
        "middle": round(_LEFT + plot_w / 2, 1),
        "centre": round(_TOP + plot_h / 2, 1),
        "labels_x": _W - _RIGHT + 6,
        "y_ticks": [(y(tick), f"{tick:g}") for tick in y_ticks],
        "x_ticks": [
            (x(tick), f"{tick:g}")
            for tick in _nice_ticks(x_low, x_high, integers=True)
            if x_low <= tick <= x_high
        ],
        "non_private": [
            (x(float(e["seq"])), _text(e.get("seq"))) for e in rows if e.get("mode") != "dp"
        ],
        "cap_path": cap_path,
        "line": " ".join(f"{x(seq):.1f},{y(value):.1f}" for seq, value, _ in points),
        "markers": markers,
        "end_labels": _end_labels(
            points[-1][1] if points else None, caps[-1][1] if caps else None, y
        ),
        "legend": offsets,
    }


def _end_labels(epsilon: float | None, cap: float | None, y: Any) -> list[tuple[float, str, str]]:
    """The last epsilon and cap, right of the plot; pushed apart when they would overlap."""
    labels = []
    if epsilon is not None:
        labels.append([y(epsilon) + 4, "#0969da", f"ε = {epsilon:.3f}"])
    if cap is not None:
        labels.append([y(cap) + 4, "#b42318", f"cap ε = {cap:g}"])
    if len(labels) == 2 and abs(labels[0][0] - labels[1][0]) < 14:
        upper, lower = sorted(labels, key=lambda label: label[0])
        middle = (upper[0] + lower[0]) / 2
        upper[0], lower[0] = middle - 7, middle + 7
    return [(round(top, 1), colour, text) for top, colour, text in labels]


def _nice_ticks(low: float, high: float, *, integers: bool = False, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten) covering the range;
    the last one is at or above ``high``."""
    span = max(high - low, 1e-12)
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    if integers:
        step = max(1.0, round(step))
    start = math.floor(low / step) * step
    ticks = [start]
    while ticks[-1] < high - 1e-9 * step:
        ticks.append(start + len(ticks) * step)
    return ticks


# ------------------------------------------------------------------------------- helpers


def _text(value: Any) -> str:
    return "—" if value is None else str(value)


def _plain(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if _finite(value) else str(value)


def _eps(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if _finite(value) else str(value)


def _exceeds(value: Any, cap: Any) -> bool:
    return _finite(value) and _finite(cap) and value > cap


def _disagrees(check: Recomputation | None) -> bool:
    return check is not None and check.agrees is False


def _key(entry: Mapping[str, Any]) -> tuple[str, str]:
    return (str(entry.get("node")), str(entry.get("seq")))


def _ledger_order(entry: Mapping[str, Any]) -> tuple[str, int, float, str]:
    seq = entry.get("seq")
    if _finite(seq):
        return (str(entry.get("node")), 0, float(seq), "")
    return (str(entry.get("node")), 1, 0.0, str(seq))


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def _short(fingerprint: str) -> str:
    digest = fingerprint.split(":", 1)[-1]
    return digest[:12] + ("…" if len(digest) > 12 else "")


def _seq_list(entries: Sequence[Mapping[str, Any]], limit: int = 10) -> str:
    seqs = [_text(e.get("seq")) for e in entries]
    shown = ", ".join(seqs[:limit])
    return shown + (f" and {len(seqs) - limit} more" if len(seqs) > limit else "")
