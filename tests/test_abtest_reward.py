"""The A/B metric ``reward`` (held-out GRPO prompts): its paired test and bound at the
coordinator, the node's per-prompt scores under a crafted reward whose figure is known, the
DP release's clipping, and the A/B message's DPO beta checked at the node's boundary."""

import importlib
import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from test_client_app import LORA, fresh_process_cache  # noqa: F401

from conftest import build_tiny_model
from fedtune.client_node.client_app import abtest_reply
from fedtune.client_node.grpo import GRPOSettings, greedy_rewards
from fedtune.client_node.metric_policy import dp_scores_content, score_range
from fedtune.client_node.prompt_data import load_prompt_dataset
from fedtune.client_node.rewards import ENTRY_POINT_GROUP, RewardScorer
from fedtune.coordinator.ab_statistics import compare_paired, metric_bounds
from fedtune.coordinator.abtest import parse_reply
from fedtune.demo.data import write_demo_data
from fedtune.demo.verifiable import write_demo_prompts
from fedtune.platform.config import (
    MAX_GRPO_REWARDS,
    DataConfig,
    ModelConfig,
    NodeConfig,
    NodeSettings,
    PrivacySettings,
    TrainingSettings,
)
from fedtune.platform.model.fingerprint import model_dir_fingerprint
from fedtune.platform.model.lora import adapter_arrays, attach_lora
from fedtune.platform.wire.messages import AbTestInstructions, arrays_to_record
from fedtune.privacy.node_ledger import NodeLedger

CPU = torch.device("cpu")

# --- the coordinator's statistics ----------------------------------------------------------------


def test_reward_is_compared_with_the_wilcoxon_test_and_a_paired_bootstrap_interval():
    """Sums of two 0/1 rewards on 30 prompts: B gains a point on 12, loses one on 2."""
    a = [0.0, 1.0, 1.0, 2.0, 0.0, 1.0] * 5
    gains = [i for i, score in enumerate(a) if score < 2.0][:12]
    losses = [i for i, score in enumerate(a) if score > 0.0 and i not in gains][:2]
    b = [s + (i in gains) - (i in losses) for i, s in enumerate(a)]

    result = compare_paired("reward", a, b)

    assert result.test == "Wilcoxon signed-rank + paired bootstrap CI"
    assert result.higher_is_better
    assert result.difference == pytest.approx(np.mean(np.subtract(b, a)))
    assert result.ci_low < result.difference < result.ci_high
    assert result.verdict == "b better" and result.p_value < 0.05
    assert result.detail["ties"] > 0  # most prompts score the same under A and B


def test_a_reward_outside_the_fixed_bound_is_refused():
    assert metric_bounds("reward") == (0.0, float(MAX_GRPO_REWARDS))
    with pytest.raises(ValueError, match=r"reward scores b must lie in \[0.0, 3.0\]"):
        compare_paired("reward", [1.0, 2.0], [1.0, 4.0])


def reply(content: RecordDict, node_id: int = 7) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=node_id,
        dst_node_id=1,
        reply_to_message_id="sent",
        group_id="1",
        created_at=0.0,
        ttl=600.0,
        message_type="evaluate.abtest",
    )
    return Message(content=content, metadata=metadata)


def test_a_node_claiming_rewards_above_the_bound_is_left_out_not_trusted():
    """A node that states a reward of 1000 per prompt would outweigh every honest node's
    scores in the pooled test: the coordinator bounds it (MAX_GRPO_REWARDS), whatever the
    node says its range is."""
    inflated = RecordDict(
        {
            "scores": MetricRecord({"reward/a": [0.0, 1.0], "reward/b": [1000.0, 1000.0]}),
            "node": ConfigRecord({"name": "mallory", "reward-range": 1000.0}),
        }
    )
    with pytest.raises(ValueError, match=r"mallory: reward scores of B lie outside \[0, 3\]"):
        parse_reply(reply(inflated), ["reward"])


def test_noisy_sums_that_no_scores_in_range_could_give_are_left_out():
    released = {"reward/n": 10.0, "reward/sum_a": 5.0, "reward/sum_d2": 30.0}
    honest = {**released, "reward/sum_b": 12.0, "reward/noise-sd": 0.5}
    forged = {**released, "reward/sum_b": 400.0, "reward/noise-sd": 0.5}

    def content(scores):
        return RecordDict(
            {
                "scores": MetricRecord(scores),
                "abtest": ConfigRecord({"dp": True}),
                "node": ConfigRecord({"name": "bank"}),
            }
        )

    assert parse_reply(reply(content(honest)), ["reward"]).summaries["reward"].n == 10
    with pytest.raises(ValueError, match=r"bank: reward sum of B \(400\) cannot come from 10"):
        parse_reply(reply(content(forged)), ["reward"])


# --- the node's scores -------------------------------------------------------------------------


def test_greedy_rewards_score_each_prompts_most_likely_completion_in_row_order(
    tmp_path, tiny_tokenizer
):
    """Left-padded batches give each prompt the completion it gets alone; bounded, a reward
    counts at most 1 and at least 0."""
    rows = [{"prompt": f"fee for {n} transfers" + " now" * n, "answer": str(n)} for n in range(5)]
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = load_prompt_dataset(path, tiny_tokenizer, max_length=48)
    model = build_tiny_model(len(tiny_tokenizer), seed=3).eval()
    settings = GRPOSettings(max_completion_tokens=5)
    scorer = RewardScorer(
        names=("length", "negative"),
        functions=(lambda text, answer: len(text) / 4, lambda text, answer: -1.0),
    )

    scored = greedy_rewards(
        model,
        prompts,
        tokenizer=tiny_tokenizer,
        scorer=scorer,
        settings=settings,
        device=CPU,
        rows=[4, 0, 2],
        bounded=True,
    )

    expected = []
    for index in (4, 0, 2):
        ids = torch.tensor([prompts.prompt_ids[index]])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=tiny_tokenizer.pad_token_id,
            eos_token_id=tiny_tokenizer.eos_token_id,
        )
        expected.append(tiny_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert [text for _, text in scored] == expected
    assert [reward for reward, _ in scored] == [min(len(t) / 4, 1.0) for t in expected]


@pytest.fixture
def crafted_reward(tmp_path, monkeypatch):
    """An installed reward whose figure is known without the model: 3.0 when the answer's
    characters add up to an odd number, else -1.0 (an A/B test counts them as 1 and 0)."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "parity_reward.py").write_text(
        textwrap.dedent(
            """
            def parity(completion, answer):
                return 3.0 if sum(map(ord, answer)) % 2 else -1.0
            """
        )
    )
    info = folder / "parity_reward-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: parity-reward\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nparity = parity_reward:parity\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("parity_reward", None)


def prompt_node(tmp_path, model_dir, *, held_out="grpo_held_out.jsonl", release="plain"):
    write_demo_data(tmp_path / "data", domain="bank", train=8, held_out=4)
    write_demo_prompts(tmp_path / "data", domain="bank", train=8, held_out=7)
    return NodeConfig(
        node=NodeSettings(name="bank", state_dir=tmp_path / "state"),
        model=ModelConfig(spec=str(model_dir)),
        data=DataConfig(
            train=tmp_path / "data/bank/grpo_train.jsonl",
            eval=tmp_path / "data/bank" / held_out,
            max_length=160,
        ),
        training=TrainingSettings(
            method="grpo",
            physical_batch_size=4,
            grpo_rewards=["parity", "format"],
            grpo_max_completion_tokens=4,
        ),
        privacy=PrivacySettings(target_epsilon=1000.0, release_metrics=release),
    )


def abtest_content(model_dir, arrays, metrics, *, dpo_beta=0.1) -> RecordDict:
    instructions = AbTestInstructions(
        test_id="ab-1",
        base_model_fingerprint=model_dir_fingerprint(model_dir),
        version_a="base",
        version_b="run/1",
        lora_a=None,
        lora_b=LORA,
        metrics=metrics,
        max_examples=5,
        max_new_tokens=4,
        dpo_beta=dpo_beta,
    )
    return RecordDict({"abtest": instructions.to_record(), "arrays-b": arrays_to_record(arrays)})


@pytest.fixture
def adapter(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LORA)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2)
    return adapter_arrays(model)


def test_a_node_scores_each_held_out_prompt_for_both_versions_on_the_same_rows(
    tmp_path, tiny_model_dir, crafted_reward, adapter
):
    node = prompt_node(tmp_path, tiny_model_dir)
    answers = [
        json.loads(line)["answer"]
        for line in (tmp_path / "data/bank/grpo_held_out.jsonl").read_text().splitlines()
    ][:5]
    # parity counted in [0, 1]; the tiny random model never writes the format in 4 tokens.
    expected = [1.0 if sum(map(ord, a)) % 2 else 0.0 for a in answers]
    assert 0 < sum(expected) < 5  # the figure tells rows apart

    reply_content = abtest_reply(node, abtest_content(tiny_model_dir, adapter, ("loss", "reward")))

    scores = reply_content.metric_records["scores"]
    assert scores["reward/a"] == expected and scores["reward/b"] == expected
    assert len(scores["loss/a"]) == len(scores["loss/b"]) == 5  # the same prompts
    assert scores["loss/a"] != scores["loss/b"]
    assert reply_content.config_records["abtest"]["examples"] == 5


def test_a_node_without_held_out_prompts_declines_the_reward_in_one_line(
    tmp_path, tiny_model_dir, crafted_reward, adapter
):
    node = prompt_node(tmp_path, tiny_model_dir, held_out="held_out.jsonl")

    reply_content = abtest_reply(node, abtest_content(tiny_model_dir, adapter, ("reward",)))

    reason = str(reply_content.config_records["decline"]["reason"])
    assert "holds no held-out GRPO prompts" in reason and "held_out.jsonl" in reason
    assert "\n" not in reason and not reply_content.metric_records


def test_a_node_that_lacks_one_of_its_rewards_declines_saying_which(
    tmp_path, tiny_model_dir, adapter
):
    node = prompt_node(tmp_path, tiny_model_dir)  # "parity" is not installed here

    reply_content = abtest_reply(node, abtest_content(tiny_model_dir, adapter, ("reward",)))

    assert "unknown reward 'parity'" in str(reply_content.config_records["decline"]["reason"])
    assert not reply_content.metric_records


@pytest.mark.parametrize("beta", [float("nan"), -1.0, 0.0, 1e6, float("inf")])
def test_an_ab_message_with_a_dpo_beta_the_node_would_refuse_is_declined(
    tmp_path, tiny_model_dir, crafted_reward, adapter, beta
):
    """A coordinator's beta meets the node's rule for training.dpo_beta (positive, finite,
    at most 100): a NaN would make every margin NaN, a negative one flip its sign."""
    node = prompt_node(tmp_path, tiny_model_dir)
    content = abtest_content(tiny_model_dir, adapter, ("loss", "reward"), dpo_beta=beta)

    reply_content = abtest_reply(node, content)

    said = str(reply_content.config_records["decline"]["reason"])
    assert "abtest.dpo_beta" in said and "\n" not in said
    assert not reply_content.metric_records  # no scores sent


def test_a_dp_release_clips_each_prompts_reward_to_the_nodes_range(tmp_path):
    node = NodeConfig(
        node=NodeSettings(name="bank", state_dir=tmp_path / "state"),
        model=ModelConfig(),
        data=DataConfig(train=tmp_path / "t.jsonl", eval=tmp_path / "e.jsonl"),
        training=TrainingSettings(method="grpo", grpo_rewards=["answer_exact", "format"]),
        privacy=PrivacySettings(
            target_epsilon=1000.0, release_metrics="dp", metric_noise_multiplier=0.05
        ),
    )
    assert score_range(node, "reward") == (0.0, 2.0)
    rewards_a = [1.0] * 40
    rewards_b = [2.0] * 38 + [50.0, -7.0]  # an operator's reward gone wild counts 2.0 and 0.0
    ledger = NodeLedger(tmp_path / "state", node="bank")

    content = dp_scores_content(
        node,
        {"reward": {"a": rewards_a, "b": rewards_b}},
        identity=ConfigRecord({"name": "bank"}),
        ledger=ledger,
        held_out_fingerprint="sha256:" + "1" * 64,
        base_model_fingerprint="sha256:" + "2" * 64,
        test_id="ab-1",
    )

    scores = content.metric_records["scores"]
    noise = scores["reward/noise-sd"]
    assert noise == pytest.approx(0.05 * np.sqrt(4) * 2.0)  # sensitivity sqrt(4), width 2
    assert scores["reward/sum_a"] == pytest.approx(40.0, abs=6 * noise + 2)
    assert scores["reward/sum_b"] == pytest.approx(78.0, abs=6 * noise + 2)  # not 119
    [entry] = ledger.entries()
    assert entry.kind == "metric_release"
    ledger.close()
