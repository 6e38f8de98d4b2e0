import re
import tomllib
import xml.etree.ElementTree as ET
from importlib.resources import files
from pathlib import Path

import pytest

from fedtune.privacy.accounting import epsilon_of
from fedtune.privacy.audit.independent_accounting import recompute_ledger
from fedtune.privacy.audit.report import render_report, write_report

DELTA = 1e-5
OK = {"ok": True, "problem": None, "summary": {"entries": 6}, "public_key": "ed25519:q83vEjRW"}
# (data set, noise multiplier, sample rate, steps), or (data set, None...) for a non-private round
PLAN = [
    ("sha256:" + "a" * 64, 1.1, 0.02, 20),
    ("sha256:" + "b" * 64, 2.0, 0.01, 50),
    ("sha256:" + "a" * 64, 1.1, 0.02, 20),
    ("sha256:" + "a" * 64, None, None, 20),
    ("sha256:" + "b" * 64, 1.5, 0.03, 30),
    ("sha256:" + "a" * 64, 1.3, 0.04, 25),
]


def ledger(node="hospital-node", run_id="run-1"):
    entries, histories = [], {}
    for seq, (data, sigma, q, steps) in enumerate(PLAN):
        entry = {
            "seq": seq,
            "node": node,
            "run_id": run_id,
            "round": seq + 1,
            "data_fingerprint": data,
            "steps": steps,
            "recorded_at": f"2026-03-01T10:{seq:02d}:00Z",
            "epsilon_cap": 8.0,
        }
        if sigma is None:
            entry.update(mode="non-private", sample_rate=0.02, accountant=None)
        else:
            history = histories.setdefault(data, [])
            history.append((sigma, q, steps))
            entry.update(
                mode="dp",
                sample_rate=q,
                noise_multiplier=sigma,
                max_grad_norm=1.0,
                delta=DELTA,
                epsilon_round=epsilon_of([(sigma, q, steps)], delta=DELTA, accountant="rdp"),
                epsilon_after=epsilon_of(history, delta=DELTA, accountant="rdp"),
                accountant="rdp",
                accountant_version="opacus-1.6.0",
            )
        entries.append(entry)
    return entries


def render(entries, verification=OK):
    return render_report(
        entries,
        verification=verification,
        recomputations=recompute_ledger(entries),
        generated_at="2026-03-02T00:00:00Z",
    )


def rows(html):
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return re.findall(r"<tr[^>]*>.*?</tr>", body)


def test_a_verified_ledger_shows_ok_prominently():
    html = render(ledger())

    assert '<div class="verdict ok">✓ Ledger verified' in html
    assert "verdict fail" not in html


def test_a_failed_verification_shows_the_problem_in_red():
    failed = {"ok": False, "problem": "entry seq 3: signature does not verify", "summary": {}}

    html = render(ledger(), verification=failed)

    assert (
        '<div class="verdict fail">✗ Ledger verification FAILED: '
        "entry seq 3: signature does not verify</div>" in html
    )


def test_the_header_names_the_node_and_its_public_key():
    html = render(ledger())

    assert "<tr><th>Node</th><td>hospital-node</td></tr>" in html
    assert "<code>ed25519:q83vEjRW</code>" in html


def test_each_data_set_gets_one_chart_with_its_cap():
    html = render(ledger())

    charts = re.findall(r"<svg.*?</svg>", html, re.S)
    assert len(charts) == 2
    for chart in charts:
        assert "cap ε = 8" in chart
        assert 'stroke-dasharray="6 4"' in chart
        assert "<polyline" in chart
        ET.fromstring(chart)  # well-formed XML, as SVG must be


def test_the_table_has_a_row_per_entry():
    entries = ledger()

    html = render(entries)

    assert len(rows(html)) == len(entries)


def test_a_disagreeing_entry_is_highlighted_and_counted():
    entries = ledger()
    entries[4]["epsilon_after"] /= 2

    html = render(entries)

    highlighted = [row for row in rows(html) if 'class="disagree"' in row]
    assert len(highlighted) == 1
    assert highlighted[0].startswith('<tr class="disagree"><td>4</td>')
    assert '<span class="no">✗</span>' in highlighted[0]
    assert "<strong>4 of 5</strong> differentially private entries agree" in html
    assert "1 entry disagrees" in html


def test_a_non_private_round_is_flagged_for_its_data_set():
    html = render(ledger())

    assert "No DP guarantee for this data set: 1 non-private round(s) (seq 3)" in html
    assert sum('class="nonprivate"' in row for row in rows(html)) == 1


def test_values_from_the_ledger_are_escaped():
    entries = ledger(node="<script>alert(1)</script>", run_id='run"><script>x()</script>')

    html = render(entries)

    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "run&#34;&gt;&lt;script&gt;x()&lt;/script&gt;" in html  # markupsafe's &#34;


def test_a_hostile_value_cannot_leave_its_attribute_or_add_one():
    hostile = 'sha256:x" onmouseover="alert(1)'
    entries = [{**entry, "data_fingerprint": hostile} for entry in ledger()]
    entries[0]["recorded_at"] = "<img src=x onerror=alert(1)>"  # a text cell and a tooltip

    html = render(entries)

    assert 'onmouseover="' not in html and "<img" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert 'title="sha256:x&#34; onmouseover=&#34;alert(1)"' in html


def test_the_template_ships_with_the_package():
    """A wheel carries it (package data), and it has no script of its own."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    template = files("fedtune.privacy.audit").joinpath("templates/report.html.j2")

    assert (
        "templates/*.j2" in pyproject["tool"]["setuptools"]["package-data"]["fedtune.privacy.audit"]
    )
    assert template.is_file() and "<script" not in template.read_text(encoding="utf-8")


def test_write_report_refuses_to_overwrite(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("earlier report", encoding="utf-8")

    with pytest.raises(FileExistsError, match="not overwritten"):
        write_report(target, "<html></html>")

    assert target.read_text(encoding="utf-8") == "earlier report"


def test_write_report_replaces_a_file_when_asked(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("earlier report", encoding="utf-8")

    write_report(target, "<html>new</html>", overwrite=True)

    assert target.read_text(encoding="utf-8") == "<html>new</html>"


def test_the_egress_manifest_is_shown_when_given_and_escaped():
    manifest = {
        "node": "<b>hospital</b>",
        "settings": {"release_metrics": "plain"},
        "replies": [
            {
                "message_type": "train",
                "variant": "update",
                "meaning": "the adapter",
                "records": [
                    {
                        "name": "metrics",
                        "kind": "metrics",
                        "meaning": "figures",
                        "fields": [
                            {
                                "name": "train-loss",
                                "type": "float",
                                "protection": ["plain"],
                                "meaning": "<script>x</script>",
                            }
                        ],
                    }
                ],
            }
        ],
        "flower": [
            {"name": "SendNodeHeartbeat", "when": "every 30 s", "meaning": "alive", "fields": []}
        ],
        "notes": ["a note"],
    }

    shown = render_report(
        ledger(), verification=OK, recomputations=[], generated_at="x", egress=manifest
    )
    without = render(ledger())

    assert "What leaves a node" in shown and "What leaves a node" not in without
    assert "<code>train-loss</code>" in shown and "SendNodeHeartbeat" in shown
    assert "<script>x</script>" not in shown and "&lt;b&gt;hospital&lt;/b&gt;" in shown


def test_the_style_sheet_reaches_the_page_intact():
    """Autoescaping the style as a value turned its quotes into entities, which a browser
    does not decode inside <style>: the font declaration was dropped."""
    html = render(ledger())
    style = html.split("<style>", 1)[1].split("</style>", 1)[0]

    assert 'font:14px/1.45 system-ui,-apple-system,"Segoe UI"' in style
    assert "&#34;" not in style
