"""`fedtune audit canaries` on a tiny random model: the audit has power without DP, stays
within the accounted epsilon with DP, and leaves the node's ledger and budget as they were."""

from __future__ import annotations

import ast
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.cli import main
from fedtune.client_node.node_train import run_node_training
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import load_node_config
from fedtune.platform.model.fingerprint import file_fingerprint
from fedtune.privacy.node_ledger import NodeLedger

PACKAGE = Path(__file__).resolve().parent.parent / "fedtune"
CANDIDATES = 63
# Enough for the power asserted below, with margin; measured (seeds fixed, Dec 2026): without DP
# 200 steps gave exposure 16.4 bits and membership bound 1.76, 150 gave 13.0 and 1.08 (cheaper
# by a quarter), 100 gave 11.9 and 0.86 (too close to the > 10 asserted).
STEPS = 150


def memorising_model_dir(folder: Path, tokenizer: Any) -> Path:
    """A tiny random Llama that LoRA can make memorise: with the default initialisation
    (std 0.02, tied embeddings) its logits stay too flat for any adapter to fit a secret."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.3,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def node_toml(folder: Path, model: Path, *, mode: str = "dp") -> Path:
    write_demo_data(folder / "data", domain="hospital", train=24, held_out=4)
    document = {
        "node": {"name": "hospital", "state_dir": str(folder / "state")},
        "model": {"spec": str(model)},
        "data": {
            "train": str(folder / "data/hospital/train.jsonl"),
            "eval": str(folder / "data/hospital/held_out.jsonl"),
            "max_length": 96,
        },
        "lora": {
            "r": 16,
            "alpha": 32,
            "train_a": True,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"],
        },
        "training": {
            "steps": 2,
            "batch_size": 16,
            "physical_batch_size": 16,
            "learning_rate": 0.003,
            "seed": 0,
            "torch_threads": 1,
        },
        "privacy": {"mode": mode, "target_epsilon": 2.0, "epsilon_cap": 10.0, "planned_rounds": 3},
        "output": {"dir": str(folder / "out")},
    }
    path = folder / f"node-{mode}.toml"
    path.write_text(tomli_w.dumps(document))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@dataclass(frozen=True)
class Audited:
    code: int
    result: dict[str, Any]
    html: str
    state_before: dict[str, str]
    state_after: dict[str, str]
    history_before: list
    history_after: list


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Audited:
    """A node that trained one real round (so its ledger holds an entry and its budget a
    spend), then `fedtune audit canaries` on it, with ledgers made unopenable meanwhile."""
    folder = tmp_path_factory.mktemp("canary-audit")
    model = memorising_model_dir(folder / "model", tiny_tokenizer)
    config_path = node_toml(folder, model)
    config = load_node_config(config_path)
    run_node_training(config, progress=False)
    fingerprint = file_fingerprint(config.data.train)
    ledger = NodeLedger(config.node.state_dir, node="hospital")
    history_before = ledger.dp_history(fingerprint)
    state_before = snapshot(config.node.state_dir)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the canary audit opened a ledger or asked the budget guard")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NodeLedger, "__init__", refuse)
        patch.setattr("fedtune.privacy.budget_guard.check_round", refuse)
        patch.setattr("fedtune.client_node.local_round.check_round", refuse)
        code = main(
            [
                "audit",
                "canaries",
                "--config",
                str(config_path),
                "--out",
                str(folder / "audit"),
                "--secrets",
                "2",
                "--repeats",
                "4",
                "--membership",
                "64",
                "--candidates",
                str(CANDIDATES),
                "--steps",
                str(STEPS),
                "--seed",
                "1",
                "--no-progress",
            ]
        )
    return Audited(
        code=code,
        result=json.loads((folder / "audit" / "canary_audit.json").read_text()),
        html=(folder / "audit" / "canary_audit.html").read_text(),
        state_before=state_before,
        state_after=snapshot(config.node.state_dir),
        history_before=history_before,
        history_after=NodeLedger(config.node.state_dir, node="hospital").dp_history(fingerprint),
    )


def run_of(audited: Audited, mode: str) -> dict[str, Any]:
    return next(run for run in audited.result["runs"] if run["mode"] == mode)


@pytest.mark.integration  # the audit's training run (150 steps): 24 s
def test_without_dp_the_planted_secrets_rank_first_and_membership_is_proven(audited):
    plain = run_of(audited, "non-private")

    assert [s["rank_in_sample"] for s in plain["secrets"]] == [1, 1]
    assert plain["exposure_sampled_mean"] == pytest.approx(math.log2(CANDIDATES + 1))
    assert plain["exposure_extrapolated_mean"] > 10  # of log2(10^6) = 19.9 bits
    assert plain["membership"]["epsilon_lower_bound"] > 0.5


@pytest.mark.integration  # the audit's training run (150 steps): 24 s
def test_with_dp_the_lower_bound_stays_below_the_accounted_epsilon(audited):
    private = run_of(audited, "dp")

    assert audited.code == 0
    assert private["epsilon"] == audited.result["privacy"]["epsilon"]
    assert private["epsilon"] <= audited.result["privacy"]["target_epsilon"] * 1.001
    assert private["membership"]["epsilon_lower_bound"] <= private["epsilon"]
    assert audited.result["verdict"]["lower_bound_within_epsilon"] is True
    assert (
        private["membership"]["epsilon_lower_bound"]
        < (run_of(audited, "non-private")["membership"]["epsilon_lower_bound"])
    )


@pytest.mark.integration  # the audit's training run (150 steps): 24 s
def test_the_audit_leaves_the_node_ledger_and_budget_untouched(audited):
    assert audited.state_after == audited.state_before  # ledger.db, key: same bytes, no new file
    assert audited.history_after == audited.history_before
    assert len(audited.history_before) == 1


@pytest.mark.integration  # the audit's training run (150 steps): 24 s
def test_the_report_shows_the_figures_of_the_json(audited):
    verdict = audited.result["verdict"]

    assert "✓ The measured lower bound" in audited.html
    assert f"{verdict['epsilon_lower_bound_dp']:.3f}" in audited.html
    assert f"{verdict['epsilon_lower_bound_non_private']:.3f}" in audited.html
    assert f"{verdict['epsilon']:.3f}" in audited.html
    for secret in run_of(audited, "dp")["secrets"]:
        assert secret["patient"] in audited.html


def test_the_audit_modules_import_no_ledger_and_no_budget_guard():
    forbidden = ("node_ledger", "ledger_store", "budget_guard", "ledger_file")
    for name in ("canary_audit.py", "canaries.py"):
        tree = ast.parse((PACKAGE / "client_node" / name).read_text())
        imported = [
            node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        ] + [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
        assert not [m for m in imported if any(word in m for word in forbidden)], name


# --- bad input ---------------------------------------------------------------------------


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str) -> None:
    code = main(["audit", "canaries", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("fedtune: error: "), err
    for word in words:
        assert word in lines[0], err


def test_a_missing_config_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere.toml"
    one_line_error(capsys, ["--config", str(missing), "--out", str(tmp_path / "o")], str(missing))


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--secrets", "0"], ["secrets", "at least 1"]),
        (["--repeats", "0"], ["repeats"]),
        (["--membership", "1"], ["membership", "at least 2"]),
        (["--candidates", "10", "--digits", "1"], ["candidates", "10^1"]),
        (["--confidence", "1.5"], ["confidence"]),
        (["--steps", "0"], ["steps"]),
    ],
)
def test_bad_options_are_one_line(tmp_path, capsys, tiny_model_dir, option, words):
    config = node_toml(tmp_path, tiny_model_dir)
    one_line_error(capsys, ["--config", str(config), "--out", str(tmp_path / "o"), *option], *words)


def test_a_non_private_node_has_nothing_to_audit(tmp_path, capsys, tiny_model_dir):
    config = node_toml(tmp_path, tiny_model_dir, mode="non-private")
    one_line_error(capsys, ["--config", str(config), "--out", str(tmp_path / "o")], "non-private")


def test_an_earlier_report_is_not_overwritten(tmp_path, capsys, tiny_model_dir):
    config = node_toml(tmp_path, tiny_model_dir)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "canary_audit.html").write_text("earlier")

    one_line_error(
        capsys, ["--config", str(config), "--out", str(tmp_path / "o")], "not overwritten"
    )
    assert (tmp_path / "o" / "canary_audit.html").read_text() == "earlier"


@pytest.mark.integration  # the audit's training run (150 steps): 24 s
def test_a_lower_bound_above_the_accounted_epsilon_is_reported_as_a_failure(audited):
    from fedtune.privacy.audit.canary_report import render_canary_report

    broken = json.loads(json.dumps(audited.result))
    broken["verdict"].update(lower_bound_within_epsilon=False, epsilon_lower_bound_dp=9.0)

    html = render_canary_report(broken)

    assert "EXCEEDS the accounted ε" in html
    assert "✓" not in html
