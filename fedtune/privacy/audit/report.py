"""A self-contained HTML report of an epsilon ledger, for compliance auditors.

One page, no external assets and no JavaScript: the verification verdict, per data set a chart
of epsilon over the ledger against its cap (inline SVG) with the totals, and a table of every
entry beside its independent recomputation (:mod:`fedtune.privacy.audit.independent_accounting`).
Every value from the ledger is escaped: a ledger is input, and may be hostile.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any, TypeGuard

from fedtune.common.errors import AlreadyExistsError
from fedtune.privacy.audit.independent_accounting import Recomputation

DEFAULT_TITLE = "Epsilon ledger audit report"
# Above this many points per chart, markers are left out and only the line is drawn.
MAX_MARKERS = 400

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
margin:24px auto;max-width:1200px;padding:0 16px}
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;margin:28px 0 8px}
h3{font-size:15px;margin:24px 0 6px}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;word-break:break-all}
.verdict{border-radius:6px;padding:12px 16px;margin:16px 0;font-size:18px;font-weight:600}
.ok{background:#dafbe1;color:#1a7f37;border:2px solid #1a7f37}
.fail{background:#fee4e2;color:#b42318;border:2px solid #b42318}
.warn{color:#b42318;font-weight:600}
.facts{border-collapse:collapse;margin:4px 0 8px}
.facts th{text-align:left;font-weight:600;padding:2px 16px 2px 0;vertical-align:top}
.facts td{padding:2px 0}
table.entries{border-collapse:collapse;font-size:12px;width:100%}
table.entries th,table.entries td{border-bottom:1px solid #d0d7de;padding:3px 6px;
text-align:right;white-space:nowrap}
table.entries th{position:sticky;top:0;background:#f6f8fa}
table.entries td.text{text-align:left}
tr.disagree td:last-child{white-space:normal;min-width:280px;font-weight:400}
tr.nonprivate td{background:#fff4ce}
tr.disagree td{background:#fde2e1;font-weight:600}
.yes{color:#1a7f37}.no{color:#b42318;font-weight:700}
.banner{background:#fee4e2;color:#b42318;border-left:4px solid #b42318;padding:6px 10px;
margin:6px 0;font-weight:600}
svg{max-width:100%;height:auto;background:#fff}
.muted{color:#57606a}
"""


class _Text(str):
    """Escaped HTML for a left-aligned (text) table cell."""


@dataclass
class _DataSet:
    node: str
    fingerprint: str
    rows: list[Mapping[str, Any]] = field(default_factory=list)


def render_report(
    entries: Sequence[Mapping[str, Any]],
    *,
    verification: Mapping[str, Any],
    recomputations: Sequence[Recomputation],
    title: str = DEFAULT_TITLE,
    generated_at: str | None = None,
) -> str:
    """The report as one HTML page.

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

    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    _header(out, ordered, verification, generated_at)
    _verdict(out, verification)
    out.append(f"<p>{_recomputation_sentence(ordered, checks)}</p>")
    out.append("<h2>Data sets</h2>")
    if not data_sets:
        out.append('<p class="muted">The ledger holds no entries.</p>')
    for data_set in data_sets.values():
        _data_set_section(out, data_set, checks)
    _entry_table(out, ordered, checks)
    out.append("</body></html>")
    return "\n".join(out)


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


def _header(
    out: list[str],
    entries: Sequence[Mapping[str, Any]],
    verification: Mapping[str, Any],
    generated_at: str,
) -> None:
    summary = verification.get("summary")
    summary = summary if isinstance(summary, Mapping) else {}
    nodes = sorted({_text(e.get("node")) for e in entries})
    public_key = verification.get("public_key") or summary.get("public_key")
    times = [str(e["recorded_at"]) for e in entries if e.get("recorded_at") is not None]
    facts: list[tuple[str, str]] = [
        ("Node" if len(nodes) == 1 else "Nodes", ", ".join(_e(n) for n in nodes) or "—"),
        ("Public key", f"<code>{_e(public_key)}</code>" if public_key else "not given"),
        ("Entries", _e(len(entries))),
        ("Recorded", f"{_e(min(times))} to {_e(max(times))}" if times else "—"),
        ("Report generated", _e(generated_at)),
    ]
    _facts(out, facts)


def _verdict(out: list[str], verification: Mapping[str, Any]) -> None:
    summary = verification.get("summary")
    if verification.get("ok") is True:
        out.append('<div class="verdict ok">✓ Ledger verified: OK</div>')
    else:
        problem = verification.get("problem") or "the verification result is missing or not ok"
        out.append(f'<div class="verdict fail">✗ Ledger verification FAILED: {_e(problem)}</div>')
    if isinstance(summary, Mapping) and summary:
        _facts(out, [(_e(key), _e(_plain(value))) for key, value in summary.items()])


def _recomputation_sentence(
    entries: Sequence[Mapping[str, Any]], checks: Mapping[tuple[str, str], Recomputation]
) -> str:
    found = [checks.get(_key(entry)) for entry in entries]
    done = [r for r in found if r is not None and not r.skipped]
    agree = sum(1 for r in done if r.agrees)
    skipped = sum(1 for r in found if r is not None and r.skipped)
    missing = sum(1 for r in found if r is None)
    methods = sorted(
        {f"{r.method} (tolerance {r.tolerance.describe()})" for r in done if r.tolerance}
    )
    sentence = (
        f"<strong>{agree} of {len(done)}</strong> differentially private entries agree with an "
        "independent recomputation of their epsilon from their recorded parameters"
    )
    sentence += f" by {_e('; '.join(methods))}." if methods else "."
    if len(done) > agree:
        wrong = _count(len(done) - agree, "entry disagrees", "entries disagree")
        sentence += f' <span class="warn">{wrong} (highlighted below).</span>'
    if skipped:
        sentence += (
            f" {_count(skipped, 'non-private entry was', 'non-private entries were')} skipped: "
            "no DP guarantee, no epsilon to recompute."
        )
    if missing:
        sentence += (
            f' <span class="warn">{_count(missing, "entry was", "entries were")} not '
            "recomputed.</span>"
        )
    if any(r.method.endswith(" rdp") for r in done):
        sentence += (
            " At fractional RDP orders dp-accounting bounds the RDP from above, so its epsilon"
            " may exceed the one recorded by up to the upper tolerance."
        )
    return sentence


def _data_set_section(
    out: list[str], data_set: _DataSet, checks: Mapping[tuple[str, str], Recomputation]
) -> None:
    rows = data_set.rows
    dp = [e for e in rows if e.get("mode") == "dp"]
    non_private = [e for e in rows if e.get("mode") != "dp"]
    last = dp[-1] if dp else {}
    over_cap = [e for e in dp if _exceeds(e.get("epsilon_after"), e.get("epsilon_cap"))]
    disagreeing = [e for e in rows if _disagrees(checks.get(_key(e)))]
    last_check = checks.get(_key(last)) if last else None

    out.append(
        f"<h3>Data set <code>{_e(_short(data_set.fingerprint))}</code> "
        f'<span class="muted">on node {_e(data_set.node)}</span></h3>'
    )
    if non_private:
        out.append(
            f'<div class="banner">No DP guarantee for this data set: {len(non_private)} '
            f"non-private round(s) (seq {_e(_seq_list(non_private))}). The epsilon below covers "
            "only the private rounds.</div>"
        )
    if over_cap:
        out.append(
            f'<div class="banner">Epsilon exceeds the cap in {len(over_cap)} entries '
            f"(seq {_e(_seq_list(over_cap))}).</div>"
        )
    if disagreeing:
        out.append(
            f'<div class="banner">{len(disagreeing)} entries disagree with the independent '
            f"recomputation (seq {_e(_seq_list(disagreeing))}).</div>"
        )
    accountants = sorted(
        {
            f"{_text(e.get('accountant'))} ({_text(e.get('accountant_version'))})"
            if e.get("accountant_version")
            else _text(e.get("accountant"))
            for e in dp
        }
    )
    cap = last.get("epsilon_cap")
    total = last.get("epsilon_after")
    share = (
        f" ({_e(f'{total / cap:.0%}')} of the cap)"
        if _finite(total) and _finite(cap) and cap > 0
        else ""
    )
    recomputed = (
        _eps(last_check.recomputed_epsilon)
        if last_check is not None and not last_check.skipped
        else "—"
    )
    _facts(
        out,
        [
            ("Fingerprint", f"<code>{_e(data_set.fingerprint)}</code>"),
            ("Total epsilon", f"<strong>{_eps(total)}</strong>{share}" if dp else "—"),
            ("Recomputed total", recomputed),
            ("Delta", _num(last.get("delta")) if dp else "—"),
            ("Cap", _eps(cap)),
            ("Accountant", ", ".join(_e(a) for a in accountants) or "—"),
            (
                "Rounds",
                f"{len(rows)} ({len(dp)} private, "
                + (
                    f'<span class="warn">{len(non_private)} non-private</span>'
                    if non_private
                    else "0 non-private"
                )
                + f") in {len({_text(e.get('run_id')) for e in rows})} run(s)",
            ),
        ],
    )
    out.append(_chart(data_set, checks))


def _entry_table(
    out: list[str],
    entries: Sequence[Mapping[str, Any]],
    checks: Mapping[tuple[str, str], Recomputation],
) -> None:
    headers = [
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
    ]
    out.append("<h2>Entries</h2>")
    out.append('<table class="entries"><thead><tr>')
    out.append("".join(f"<th>{_e(h)}</th>" for h in headers))
    out.append("</tr></thead><tbody>")
    for entry in entries:
        check = checks.get(_key(entry))
        classes = []
        if entry.get("mode") != "dp":
            classes.append("nonprivate")
        if _disagrees(check):
            classes.append("disagree")
        if check is None:
            recomputed, verdict = "—", '<span class="no" title="not recomputed">?</span>'
        elif check.skipped:
            recomputed, verdict = "—", f'<span title="{_e(check.note)}">skipped</span>'
        else:
            recomputed = _eps(check.recomputed_epsilon)
            mark = '<span class="yes">✓</span>' if check.agrees else '<span class="no">✗</span>'
            verdict = f'<span title="{_e(check.note)}">{mark}</span>'
        fingerprint = _text(entry.get("data_fingerprint"))
        mode = _e(_text(entry.get("mode")))
        cells = [
            _e(_text(entry.get("seq"))),
            _Text(_e(_text(entry.get("recorded_at")))),
            _Text(_e(_text(entry.get("node")))),
            _Text(_e(_text(entry.get("run_id")))),
            _e(_text(entry.get("round"))),
            _Text(f'<code title="{_e(fingerprint)}">{_e(_short(fingerprint))}</code>'),
            _Text(mode if entry.get("mode") == "dp" else f'<span class="warn">{mode}</span>'),
            _e(_text(entry.get("steps"))),
            _num(entry.get("sample_rate")),
            _num(entry.get("noise_multiplier")),
            _num(entry.get("max_grad_norm")),
            _num(entry.get("delta")),
            _eps(entry.get("epsilon_round")),
            _eps(entry.get("epsilon_after")),
            _eps(entry.get("epsilon_cap")),
            _Text(_e(_text(entry.get("accountant")))),
            recomputed,
            verdict,
            _Text(_e(check.note) if _disagrees(check) and check is not None else ""),
        ]
        row_class = f' class="{" ".join(classes)}"' if classes else ""
        out.append(
            f"<tr{row_class}>"
            + "".join(
                f'<td class="text">{c}</td>' if isinstance(c, _Text) else f"<td>{c}</td>"
                for c in cells
            )
            + "</tr>"
        )
    out.append("</tbody></table>")


# ---------------------------------------------------------------------------------- chart

_W, _H = 760, 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 110, 34, 46


def _chart(data_set: _DataSet, checks: Mapping[tuple[str, str], Recomputation]) -> str:
    """Epsilon after each entry (x: ledger seq) against the cap, as inline SVG."""
    rows = [e for e in data_set.rows if _finite(e.get("seq"))]
    points = [
        (float(e["seq"]), float(e["epsilon_after"]), e)
        for e in rows
        if e.get("mode") == "dp" and _finite(e.get("epsilon_after"))
    ]
    caps = [
        (float(e["seq"]), float(e["epsilon_cap"])) for e in rows if _finite(e.get("epsilon_cap"))
    ]
    label = f"Epsilon of data set {_short(data_set.fingerprint)} on node {data_set.node}"
    if not rows:
        return f'<p class="muted">No chart: {_e(label)} has no entries with a numeric seq.</p>'

    seqs = [float(e["seq"]) for e in rows]
    x_low, x_high = min(seqs), max(seqs)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_high = max([value for _, value, _ in points] + [cap for _, cap in caps] + [0.0])
    y_ticks = _nice_ticks(0.0, y_high * 1.08 if y_high > 0 else 1.0)
    y_top = y_ticks[-1]
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(value: float) -> float:
        return _LEFT + (value - x_low) / (x_high - x_low) * plot_w

    def y(value: float) -> float:
        return _TOP + plot_h - value / y_top * plot_h

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" width="{_W}" '
        f'height="{_H}" role="img" aria-label="{_e(label)}" class="chart">',
        f"<title>{_e(label)}</title>",
    ]
    for tick in y_ticks:
        svg.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
            'stroke="#eaeef2"/>'
            f'<text x="{_LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#57606a">{_e(f"{tick:g}")}</text>'
        )
    for tick in _nice_ticks(x_low, x_high, integers=True):
        if x_low <= tick <= x_high:
            svg.append(
                f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{_TOP + plot_h}" '
                f'y2="{_TOP + plot_h + 4}" stroke="#57606a"/>'
                f'<text x="{x(tick):.1f}" y="{_TOP + plot_h + 16}" text-anchor="middle" '
                f'font-size="11" fill="#57606a">{_e(f"{tick:g}")}</text>'
            )
    svg.append(
        f'<line x1="{_LEFT}" x2="{_LEFT}" y1="{_TOP}" y2="{_TOP + plot_h}" stroke="#57606a"/>'
        f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h}" '
        'stroke="#57606a"/>'
        f'<text x="{_LEFT + plot_w / 2:.1f}" y="{_H - 8}" text-anchor="middle" font-size="12">'
        "ledger entry (seq)</text>"
        f'<text transform="translate(16 {_TOP + plot_h / 2:.1f}) rotate(-90)" '
        'text-anchor="middle" font-size="12">ε after the round</text>'
    )
    for entry in rows:
        if entry.get("mode") != "dp":
            seq = float(entry["seq"])
            svg.append(
                f'<line x1="{x(seq):.1f}" x2="{x(seq):.1f}" y1="{_TOP}" y2="{_TOP + plot_h}" '
                'stroke="#d4a72c" stroke-width="3" opacity="0.8">'
                f"<title>seq {_e(_text(entry.get('seq')))}: non-private round, no DP guarantee"
                "</title></line>"
            )
    if caps:
        # A step line: each cap holds from its entry until the next entry's cap.
        path = [f"M{x(caps[0][0]):.1f},{y(caps[0][1]):.1f}"]
        path.extend(f"H{x(seq):.1f}V{y(cap):.1f}" for seq, cap in caps[1:])
        path.append(f"H{_LEFT + plot_w}")
        svg.append(
            f'<path d="{"".join(path)}" fill="none" stroke="#b42318" stroke-width="1.5" '
            'stroke-dasharray="6 4"/>'
        )
    if points:
        line = " ".join(f"{x(seq):.1f},{y(value):.1f}" for seq, value, _ in points)
        svg.append(f'<polyline points="{line}" fill="none" stroke="#0969da" stroke-width="2"/>')
        for seq, value, entry in points:
            check = checks.get(_key(entry))
            tip = _e(
                f"seq {_text(entry.get('seq'))}, {_text(entry.get('recorded_at'))}: "
                f"ε {value:.4f}" + (f" ({check.note})" if check is not None else "")
            )
            if _disagrees(check):
                svg.append(
                    f'<path d="M{x(seq) - 5:.1f},{y(value) - 5:.1f}l10,10m0,-10l-10,10" '
                    f'stroke="#b42318" stroke-width="2.5"><title>{tip}</title></path>'
                )
            elif len(points) <= MAX_MARKERS:
                svg.append(
                    f'<circle cx="{x(seq):.1f}" cy="{y(value):.1f}" r="2.5" fill="#0969da">'
                    f"<title>{tip}</title></circle>"
                )
    svg.append(_end_labels(points[-1][1] if points else None, caps[-1][1] if caps else None, y))
    svg.append(
        _legend(
            non_private=any(e.get("mode") != "dp" for e in rows),
            disagreeing=any(_disagrees(checks.get(_key(e))) for e in rows),
            capped=bool(caps),
        )
    )
    svg.append("</svg>")
    return "".join(svg)


def _end_labels(epsilon: float | None, cap: float | None, y: Any) -> str:
    """The last epsilon and cap, right of the plot; pushed apart when they would overlap."""
    x0 = _W - _RIGHT + 6
    labels = []
    if epsilon is not None:
        labels.append([y(epsilon) + 4, "#0969da", f"ε = {epsilon:.3f}"])
    if cap is not None:
        labels.append([y(cap) + 4, "#b42318", f"cap ε = {cap:g}"])
    if len(labels) == 2 and abs(labels[0][0] - labels[1][0]) < 14:
        upper, lower = sorted(labels, key=lambda label: label[0])
        middle = (upper[0] + lower[0]) / 2
        upper[0], lower[0] = middle - 7, middle + 7
    return "".join(
        f'<text x="{x0}" y="{top:.1f}" font-size="11" fill="{colour}">{_e(text)}</text>'
        for top, colour, text in labels
    )


def _legend(*, non_private: bool, disagreeing: bool, capped: bool) -> str:
    items = [('<line x1="0" x2="18" y1="0" y2="0" stroke="#0969da" stroke-width="2"/>', "ε after")]
    if capped:
        items.append(
            (
                '<line x1="0" x2="18" y1="0" y2="0" stroke="#b42318" stroke-width="1.5" '
                'stroke-dasharray="6 4"/>',
                "cap",
            )
        )
    if non_private:
        items.append(
            (
                '<line x1="9" x2="9" y1="-6" y2="6" stroke="#d4a72c" stroke-width="3"/>',
                "non-private round (no DP guarantee)",
            )
        )
    if disagreeing:
        items.append(
            (
                '<path d="M4,-5l10,10m0,-10l-10,10" stroke="#b42318" stroke-width="2.5"/>',
                "disagrees with the recomputation",
            )
        )
    parts = [f'<g font-size="11" transform="translate({_LEFT} 14)">']
    offset = 0
    for symbol, text in items:
        parts.append(
            f'<g transform="translate({offset} 0)">{symbol}'
            f'<text x="22" y="4" fill="#1f2328">{_e(text)}</text></g>'
        )
        offset += 34 + 6 * len(text)
    parts.append("</g>")
    return "".join(parts)


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


def _facts(out: list[str], rows: Iterable[tuple[str, str]]) -> None:
    """A two-column table; both columns are already escaped HTML."""
    out.append('<table class="facts">')
    out.extend(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in rows)
    out.append("</table>")


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


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
    if _finite(value):
        return _e(f"{value:.4g}")
    return _e(value)


def _eps(value: Any) -> str:
    if value is None:
        return "—"
    if _finite(value):
        return _e(f"{value:.4f}")
    return _e(value)


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
