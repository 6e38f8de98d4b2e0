"""The canary audit's HTML page (``templates/canaries.html.j2``), from its JSON result.

Same machinery as the ledger report (:mod:`fedtune.privacy.audit.report`): one self-contained
page, jinja2 with autoescaping, no JavaScript; the exposure of each secret with and without
DP is an inline SVG bar chart. This module works out texts and geometry only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedtune.privacy.audit.report import TEMPLATES

TITLE = "Empirical privacy audit with canaries"
_W, _LEFT, _RIGHT, _TOP, _ROW, _BAR = 760, 190, 40, 30, 34, 12


def render_canary_report(result: Mapping[str, Any]) -> str:
    """The page for a result of :func:`fedtune.client_node.canary_audit.audit_canaries`."""
    runs = {run["mode"]: run for run in result["runs"]}
    verdict = result["verdict"]
    privacy, training, options = result["privacy"], result["training"], result["options"]
    return TEMPLATES.get_template("canaries.html.j2").render(
        title=f"{TITLE} — node {result['node']}",
        ok=bool(verdict["lower_bound_within_epsilon"]),
        epsilon=f"{verdict['epsilon']:.3f}",
        bound_dp=f"{verdict['epsilon_lower_bound_dp']:.3f}",
        bound_plain=_bound(verdict["epsilon_lower_bound_non_private"]),
        confidence=f"{options['confidence']:.0%}",
        facts=[
            (
                "Base model",
                f"{result['base_model']['spec']} ({result['base_model']['fingerprint']})",
            ),
            (
                "Training data",
                f"{result['data_set']['train']} ({result['data_set']['fingerprint']})",
            ),
            (
                "Planted copy",
                f"{result['data_set']['examples_with_canaries']} examples, "
                f"{result['data_set']['planted_examples']} of them canaries; "
                f"{result['data_set']['copy']}",
            ),
            (
                "Plan (both runs)",
                f"{training['steps']} steps, logical batch {training['batch_size']} "
                f"(sample rate {training['sample_rate']:.4g}), learning rate "
                f"{training['learning_rate']:g}, {training['optimizer']}",
            ),
            (
                "DP settings",
                f"noise multiplier {privacy['noise_multiplier']:.4g}, clip norm "
                f"{privacy['max_grad_norm']:g}, delta {privacy['delta']:g}, "
                f"{privacy['accountant']} accountant: epsilon {privacy['epsilon']:.4f} for "
                f"this training (node target {privacy['target_epsilon']:g} over "
                f"{privacy['planned_rounds']} planned round(s))",
            ),
            ("Ledger and budget", result["ledger"]),
            ("Device", result["device"]),
            ("Finished", result["finished_at"]),
        ],
        runs=[_run_row(runs[mode]) for mode in ("dp", "non-private") if mode in runs],
        secrets=_secret_rows(runs),
        chart=_chart(runs, result),
        options=options,
        space_bits=f"{math.log2(result['canary_format']['secret_space']):.1f}",
        sample_bits=f"{math.log2(options['candidates'] + 1):.1f}",
        canary_format=result["canary_format"],
    )


def _bound(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"


def _run_row(run: Mapping[str, Any]) -> dict[str, Any]:
    member = run["membership"]
    return {
        "mode": "DP-SGD" if run["mode"] == "dp" else "non-private",
        "epsilon": f"{run['epsilon']:.3f}" if run["epsilon"] is not None else "∞ (no DP)",
        "bound": f"{member['epsilon_lower_bound']:.3f}",
        "guesses": f"{member['correct']} of {member['guesses']} "
        f"(k+ {member['guesses_in']}, k− {member['guesses_out']}; "
        f"{member['included']} of {member['canaries']} planted)",
        "exposure_sampled": f"{run['exposure_sampled_mean']:.2f}",
        "exposure_extrapolated": f"{run['exposure_extrapolated_mean']:.2f}",
        "loss": "—"
        if run["train_loss_last"] is None
        else f"{run['train_loss_first']:.3f} → {run['train_loss_last']:.3f}",
        "seconds": f"{run['seconds']:.0f}",
    }


def _secret_rows(runs: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    first = next(iter(runs.values()))
    for index, secret in enumerate(first["secrets"]):
        row: dict[str, Any] = {
            "patient": secret["patient"],
            "secret": secret["secret"],
            "copies": secret["copies"],
            "cells": [],
        }
        for mode in ("dp", "non-private"):
            if mode in runs:
                own = runs[mode]["secrets"][index]
                row["cells"] += [
                    str(own["rank_in_sample"]),
                    f"{own['exposure_sampled']:.2f}",
                    f"{own['exposure_extrapolated']:.2f}",
                ]
        rows.append(row)
    return rows


def _chart(runs: Mapping[str, Mapping[str, Any]], result: Mapping[str, Any]) -> dict[str, Any]:
    """Horizontal bars: each secret's extrapolated exposure with DP and without; the
    sample's limit and the space's maximum as vertical lines."""
    top = math.log2(result["canary_format"]["secret_space"])
    sample = math.log2(result["options"]["candidates"] + 1)
    plot = _W - _LEFT - _RIGHT
    first = next(iter(runs.values()))
    height = _TOP + _ROW * len(first["secrets"]) + 40

    def x(bits: float) -> float:
        return round(_LEFT + max(0.0, min(bits, top)) / top * plot, 1)

    bars = []
    for index, secret in enumerate(first["secrets"]):
        y0 = _TOP + index * _ROW
        for offset, mode, colour in ((0, "dp", "#0969da"), (_BAR + 2, "non-private", "#b42318")):
            if mode not in runs:
                continue
            bits = runs[mode]["secrets"][index]["exposure_extrapolated"]
            bars.append(
                {
                    "x": _LEFT,
                    "y": y0 + offset,
                    "width": round(x(bits) - _LEFT, 1),
                    "height": _BAR,
                    "colour": colour,
                    "tip": f"{secret['patient']}, {mode}: {bits:.2f} bits",
                }
            )
    ticks = [(x(t), f"{t:g}") for t in range(0, math.floor(top) + 1, 5)]
    return {
        "width": _W,
        "height": height,
        "left": _LEFT,
        "right": _LEFT + plot,
        "top": _TOP,
        "bottom": height - 30,
        "labels": [
            (_LEFT - 8, _TOP + i * _ROW + _BAR + 2, s["patient"])
            for i, s in enumerate(first["secrets"])
        ],
        "bars": bars,
        "ticks": ticks,
        "sample_x": x(sample),
        "top_x": x(top),
    }
