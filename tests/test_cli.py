import hashlib
import json
import tomllib
from pathlib import Path

import psutil
import pytest

from fedtune.cli import main
from fedtune.demo import run as demo_run
from fedtune.demo.run import demo_dtype
from fedtune.platform.config import ConfigError

pytestmark = pytest.mark.simulation


def test_data_demo_writes_both_domains(tmp_path, capsys):
    assert main(["data", "demo", "--out", str(tmp_path), "--train", "30", "--held-out", "5"]) == 0

    for domain in ("hospital", "bank"):
        assert len((tmp_path / domain / "train.jsonl").read_text().splitlines()) == 30
        assert len((tmp_path / domain / "held_out.jsonl").read_text().splitlines()) == 5


def test_demo_trains_two_nodes_together_and_writes_database_adapters_and_summary(
    tmp_path, tiny_model_dir, capsys
):
    workdir = tmp_path / "demo"

    code = main(
        [
            "demo",
            "--workdir",
            str(workdir),
            "--model",
            str(tiny_model_dir),
            "--rounds",
            "2",
            "--steps",
            "1",
        ]
    )

    out = capsys.readouterr().out
    assert code == 0
    dtype = demo_dtype("auto")  # bfloat16 base weights where the CPU computes them natively
    assert tomllib.loads((workdir / "run.toml").read_text())["model"]["dtype"] == dtype
    assert f"base weights in {dtype}" in out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["run"]["status"] == "finished"
    assert set(summary["nodes"]) == {"hospital", "bank"}
    for name, node in summary["nodes"].items():
        assert node["epsilon_after"] <= 8.0 * 1.001 and node["delta"] == 1e-5
        assert node["signed"] and node["method"] in ("dp-sgd", "dp-sgd-seeded-noise")
        for figure in ("base_perplexity", "first_round_perplexity", "final_global_perplexity"):
            assert node[figure] > 1
        row = next(line for line in out.splitlines() if line.startswith(f"{name} "))
        assert f"{node['final_global_perplexity']:.2f}" in row
    for number, entry in enumerate(summary["rounds"], start=1):
        assert Path(entry["adapter"]) == workdir / "adapters" / f"round-{number}"
        digest = hashlib.sha256(
            (workdir / "adapters" / f"round-{number}" / "adapter_model.safetensors").read_bytes()
        )
        assert entry["adapter_sha256"] == digest.hexdigest()
    assert (workdir / "fedtune.db").is_file()
    assert not [
        p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("ray::")
    ]


def test_the_demo_takes_bfloat16_base_weights_only_where_the_device_computes_them_natively(
    monkeypatch,
):
    monkeypatch.setattr(demo_run, "native_bfloat16", lambda device: False)
    assert demo_dtype("auto") == "float32"
    monkeypatch.setattr(demo_run, "native_bfloat16", lambda device: True)
    assert demo_dtype("auto") == "bfloat16"
    assert demo_dtype("float32") == "float32"
    with pytest.raises(ConfigError, match="--dtype 'half'"):
        demo_dtype("half")


def test_demo_refuses_a_used_folder(tmp_path, capsys):
    (tmp_path / "something").write_text("keep me")

    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    assert "new or empty folder" in capsys.readouterr().err
    assert (tmp_path / "something").read_text() == "keep me"


def test_simulate_refuses_an_output_folder_that_holds_a_run(tmp_path, capsys):
    (tmp_path / "out" / "adapters" / "round-1").mkdir(parents=True)
    (tmp_path / "run.toml").write_text(
        '[[nodes]]\nname = "a"\ntrain = "t.jsonl"\neval = "e.jsonl"\n[output]\ndir = "out"\n'
    )

    assert main(["simulate", "--config", str(tmp_path / "run.toml")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "out" / "adapters" / "round-1").is_dir()


def test_the_deployment_demo_runs_secure_aggregation_unless_a_comparison_asks_otherwise():
    from fedtune.demo.local_deployment import demo_run
    from fedtune.platform.config import RunConfig

    secure = RunConfig.model_validate(demo_run(rounds=3, steps=4, model="smollm2-135m"))
    assert secure.aggregation.secure
    plain = demo_run(rounds=3, steps=4, model="smollm2-135m", secure=False)
    assert not RunConfig.model_validate(plain).aggregation.secure
