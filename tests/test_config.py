from pathlib import Path

import pytest

from fedtune.platform.config import ConfigError, load_node_config, load_run_config

VALID = """
[node]
name = "hospital-a"

[data]
train = "data/train.jsonl"
eval = "data/held_out.jsonl"

[output]
dir = "out"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_valid_config_resolves_relative_paths_against_its_folder(tmp_path):
    config = load_node_config(write(tmp_path, VALID))

    assert config.data.train == tmp_path / "data" / "train.jsonl"
    assert config.output.dir == tmp_path / "out"
    assert config.node.state_dir == tmp_path / "node-state"
    assert config.model.spec == "smollm2-135m"
    assert config.privacy.mode == "dp"


def test_invalid_value_names_file_and_key(tmp_path):
    path = write(tmp_path, VALID + "\n[privacy]\ntarget_epsilon = -1\n")

    with pytest.raises(ConfigError) as error:
        load_node_config(path)

    assert str(path) in str(error.value)
    assert "privacy.target_epsilon" in str(error.value)


def test_unknown_key_is_refused_with_its_name(tmp_path):
    path = write(tmp_path, VALID + "\n[training]\nlearning_rat = 0.1\n")

    with pytest.raises(ConfigError, match=r"training\.learning_rat"):
        load_node_config(path)


def test_missing_section_names_it(tmp_path):
    path = write(tmp_path, '[node]\nname = "x"\n[output]\ndir = "o"\n')

    with pytest.raises(ConfigError, match=r"node\.toml: data: Field required"):
        load_node_config(path)


def test_physical_batch_larger_than_logical_is_refused(tmp_path):
    path = write(tmp_path, VALID + "\n[training]\nbatch_size = 8\nphysical_batch_size = 16\n")

    with pytest.raises(ConfigError, match="physical_batch_size"):
        load_node_config(path)


def test_malformed_toml_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_node_config(write(tmp_path, "[node\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_node_config(tmp_path / "absent.toml")


def test_the_documented_example_config_is_valid():
    example = Path(__file__).parent.parent / "examples" / "node.toml"

    config = load_node_config(example)

    assert config.node.name == "hospital"
    assert config.training.steps == 20


def test_the_documented_example_run_config_is_valid():
    example = Path(__file__).parent.parent / "examples" / "run.toml"

    config = load_run_config(example)

    assert [node.name for node in config.nodes] == ["hospital", "bank"]
    assert config.node_config("bank").privacy.planned_rounds == config.run.rounds
