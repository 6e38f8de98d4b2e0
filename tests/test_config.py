from pathlib import Path

import pytest

from fedtune.platform.config import (
    ConfigError,
    TrainingSettings,
    load_coordinator_config,
    load_node_config,
    load_run_config,
)
from fedtune.privacy.training_defaults import DP_LEARNING_RATE, GRPO_LEARNING_RATE

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


def test_the_documented_example_coordinator_config_is_valid():
    example = Path(__file__).parent.parent / "examples" / "coordinator.toml"

    config = load_coordinator_config(example)

    assert config.coordinator.port == 9092
    assert config.tls.certificate == example.parent / "certs" / "server.pem"
    assert (
        config.database_url.startswith("sqlite:///") and "coordinator-state" in config.database_url
    )
    assert config.public_address == "127.0.0.1:9092"  # what local nodes dial on 0.0.0.0
    assert config.superlink_address == "127.0.0.1:9093"  # the SuperLink never leaves loopback


@pytest.mark.parametrize(
    ("section", "refusal"),
    [
        (  # the gateway listens on port, the SuperLink on superlink_port
            "[coordinator]\nport = 9092\nsuperlink_port = 9092\n",
            r"coordinator\.toml: coordinator: .*superlink_port",
        ),
        (
            "[gateway]\nrequests_per_second = 0\n",
            r"coordinator\.toml: gateway\.requests_per_second",
        ),
    ],
    ids=["superlink-port-equal-to-the-gateway-port", "gateway-rate-of-zero"],
)
def test_a_coordinator_setting_out_of_range_is_refused_naming_the_key(tmp_path, section, refusal):
    path = tmp_path / "coordinator.toml"
    path.write_text(
        section + '[tls]\nca_certificate = "ca.pem"\ncertificate = "s.pem"\nprivate_key = "s.key"\n'
    )

    with pytest.raises(ConfigError, match=refusal):
        load_coordinator_config(path)


def test_a_coordinator_config_cannot_name_a_superlink_host(tmp_path):
    path = tmp_path / "coordinator.toml"
    path.write_text(
        '[coordinator]\nsuperlink_host = "0.0.0.0"\n'
        '[tls]\nca_certificate = "ca.pem"\ncertificate = "s.pem"\nprivate_key = "s.key"\n'
    )

    with pytest.raises(ConfigError, match=r"coordinator\.superlink_host: Extra inputs"):
        load_coordinator_config(path)


def test_a_coordinator_config_without_tls_names_the_missing_section(tmp_path):
    path = tmp_path / "coordinator.toml"
    path.write_text("[coordinator]\nport = 9092\n")

    with pytest.raises(ConfigError, match=r"coordinator\.toml: tls: Field required"):
        load_coordinator_config(path)


def test_a_deployed_node_config_resolves_its_key_paths(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(
        '[node]\nname = "hospital"\n[data]\ntrain = "t.jsonl"\neval = "e.jsonl"\n'
        '[coordinator]\naddress = "coordinator:9092"\nroot_certificates = "ca.pem"\n'
        'auth_key = "state/auth_key"\n'
    )

    config = load_node_config(path)

    assert config.coordinator is not None
    assert config.coordinator.auth_key == tmp_path / "state" / "auth_key"
    assert config.coordinator.require_secure_aggregation


def test_a_node_address_without_a_port_is_refused(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(
        '[node]\nname = "hospital"\n[data]\ntrain = "t.jsonl"\neval = "e.jsonl"\n'
        '[coordinator]\naddress = "coordinator"\nroot_certificates = "ca.pem"\nauth_key = "k"\n'
    )

    with pytest.raises(ConfigError, match=r"coordinator\.address"):
        load_node_config(path)


def test_dpo_is_chosen_with_its_beta_and_shared_budget_files_resolve(tmp_path):
    path = write(
        tmp_path,
        VALID.replace("[output]", 'shares_budget_with = ["data/sft.jsonl"]\n\n[output]')
        + '\n[training]\nmethod = "dpo"\ndpo_beta = 0.3\n',
    )

    config = load_node_config(path)

    assert (config.training.method, config.training.dpo_beta) == ("dpo", 0.3)
    assert config.data.shares_budget_with == [tmp_path / "data" / "sft.jsonl"]
    assert load_node_config(write(tmp_path, VALID)).training.method == "sft"


@pytest.mark.parametrize(
    ("training", "problem"),
    [
        ('method = "ppo"', "training.method: Input should be 'sft', 'dpo' or 'grpo'"),
        ('method = "dpo"\ndpo_beta = 0', "training.dpo_beta: Input should be greater than 0"),
        ('method = "dpo"\ndpo_beta = "0.1"', "training.dpo_beta: Input should be a valid number"),
        ("dpo_beta = 0.2", 'training: dpo_beta is set but method is "sft", not "dpo"'),
        ("grpo_group_size = 8", 'training: grpo_group_size is set but method is "sft", not "grpo"'),
        (
            'method = "dpo"\ngrpo_rewards = ["format"]',
            'training: grpo_rewards is set but method is "dpo", not "grpo"',
        ),
        ('method = "grpo"\ngrpo_group_size = 1', "training.grpo_group_size: Input should be"),
        ('method = "grpo"\ngrpo_clip_ratio = 1', "training.grpo_clip_ratio: Input should be"),
        ('method = "grpo"\ngrpo_rewards = []', "training.grpo_rewards: List should have"),
    ],
)
def test_a_bad_training_method_or_beta_names_the_key(tmp_path, training, problem):
    path = write(tmp_path, VALID + f"\n[training]\n{training}\n")

    with pytest.raises(ConfigError) as error:
        load_node_config(path)

    assert f"{path}: {problem}" in str(error.value)


def test_a_simulated_nodes_shared_budget_files_reach_its_node_config(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[training]\nmethod = "dpo"\n\n[[nodes]]\nname = "bank"\ntrain = "d/pairs.jsonl"\n'
        'eval = "d/held.jsonl"\nshares_budget_with = ["d/sft.jsonl"]\n\n[output]\ndir = "out"\n'
    )

    node = load_run_config(path).node_config("bank")

    assert node.data.shares_budget_with == [tmp_path / "d" / "sft.jsonl"]
    assert node.training.method == "dpo"


def test_grpo_is_chosen_with_its_settings(tmp_path):
    path = write(
        tmp_path,
        VALID + '\n[training]\nmethod = "grpo"\ngrpo_group_size = 6\ngrpo_beta = 0\n'
        'grpo_rewards = ["answer_numeric", "format"]\ngrpo_numeric_tolerance = 0.01\n',
    )

    training = load_node_config(path).training

    assert (training.method, training.grpo_group_size, training.grpo_beta) == ("grpo", 6, 0.0)
    assert training.grpo_rewards == ["answer_numeric", "format"]
    assert training.grpo_numeric_tolerance == 0.01
    assert training.grpo_max_completion_tokens == 96  # room for the worked format
    assert training.learning_rate == GRPO_LEARNING_RATE  # not SFT's: it wrecks the policy


def test_a_grpo_learning_rate_that_is_set_is_kept_and_sft_keeps_its_default(tmp_path):
    grpo = write(tmp_path, VALID + '\n[training]\nmethod = "grpo"\nlearning_rate = 0.02\n')

    assert load_node_config(grpo).training.learning_rate == 0.02
    assert TrainingSettings().learning_rate == DP_LEARNING_RATE
    assert TrainingSettings(method="dpo").learning_rate == DP_LEARNING_RATE


def test_dumped_training_settings_validate_again_as_a_deployment_job_does():
    for settings in (
        TrainingSettings(),
        TrainingSettings(method="dpo", dpo_beta=0.3),
        TrainingSettings(method="grpo", grpo_group_size=3, grpo_rewards=["format"]),
    ):
        assert TrainingSettings.model_validate_json(settings.model_dump_json()) == settings
