from fedtune.cli import main


def test_data_demo_writes_both_domains(tmp_path, capsys):
    assert main(["data", "demo", "--out", str(tmp_path), "--train", "30", "--held-out", "5"]) == 0

    for domain in ("hospital", "bank"):
        assert len((tmp_path / domain / "train.jsonl").read_text().splitlines()) == 30
        assert len((tmp_path / domain / "held_out.jsonl").read_text().splitlines()) == 5


def test_demo_compares_dp_with_non_private_training(tmp_path, tiny_model_dir, capsys):
    workdir = tmp_path / "demo"

    code = main(["demo", "--workdir", str(workdir), "--model", str(tiny_model_dir), "--compare"])

    out = capsys.readouterr().out
    assert code == 0
    assert "NON-PRIVATE" in out and "epsilon" in out
    assert len(list((workdir / "out").glob("*/*/adapter/adapter_model.safetensors"))) == 2


def test_demo_refuses_a_used_folder(tmp_path, capsys):
    (tmp_path / "something").write_text("keep me")

    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    assert "new or empty folder" in capsys.readouterr().err
    assert (tmp_path / "something").read_text() == "keep me"
