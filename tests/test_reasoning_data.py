"""Reasoning data in the DeepSeek-R1 style (``<think>...</think>`` before the answer),
rendered with the model's chat template; ``loss_on_thinking`` decides whether the thinking
is learnt."""

from __future__ import annotations

import copy

import pytest

from conftest import write_jsonl
from fedtune.client_node.data import (
    IGNORE_INDEX,
    load_chat_dataset,
    load_conversations,
    tokenize_conversation,
)
from fedtune.platform.config import DataConfig

# The shape of DeepSeek-R1-Distill's template (tools left out): the system prompt first,
# every assistant turn rendered without its thinking, and a generation prompt that opens it.
R1_TEMPLATE = (
    "{% set ns = namespace(system_prompt='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
THINKING = "The clinic map lists cardiology in building B."
ANSWER = "Building B, floor 2."
REASONED = {"prompt": "Where is cardiology?", "reasoning": THINKING, "response": ANSWER}


@pytest.fixture(scope="module")
def r1_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = R1_TEMPLATE
    return tokenizer


def labelled(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX]
    )


def test_a_reasoning_field_becomes_thinking_before_the_answer(tmp_path):
    (conversation,) = load_conversations(write_jsonl(tmp_path / "d.jsonl", [REASONED]))

    assert conversation[-1] == {
        "role": "assistant",
        "content": f"<think>\n{THINKING}\n</think>\n\n{ANSWER}",
    }


@pytest.mark.parametrize(
    ("loss_on_thinking", "learnt"),
    [
        (True, f"<think>\n{THINKING}\n</think>\n\n{ANSWER}<|im_end|>\n"),
        (False, f"{ANSWER}<|im_end|>\n"),
    ],
)
def test_a_template_that_keeps_the_thinking_learns_it_only_when_asked(
    tmp_path, tiny_tokenizer, loss_on_thinking, learnt
):
    (conversation,) = load_conversations(write_jsonl(tmp_path / "d.jsonl", [REASONED]))

    example = tokenize_conversation(
        conversation, tiny_tokenizer, max_length=256, loss_on_thinking=loss_on_thinking
    )

    assert f"<think>\n{THINKING}\n</think>" in tiny_tokenizer.decode(example.input_ids)
    assert labelled(tiny_tokenizer, example) == learnt


@pytest.mark.parametrize(
    ("loss_on_thinking", "learnt"),
    [
        (True, f"{THINKING}\n</think>\n\n{ANSWER}<｜end▁of▁sentence｜>"),
        (False, f"{ANSWER}<｜end▁of▁sentence｜>"),
    ],
)
def test_an_r1_template_renders_the_final_answer_after_its_generation_prompt(
    r1_tokenizer, loss_on_thinking, learnt
):
    """R1's template drops the thinking of every assistant turn it renders: the final turn
    is written after the generation prompt (which opens the thinking) with its thinking."""
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is cardiology?"},
        {"role": "assistant", "content": f"<think>\n{THINKING}\n</think>\n\n{ANSWER}"},
    ]

    example = tokenize_conversation(
        conversation, r1_tokenizer, max_length=256, loss_on_thinking=loss_on_thinking
    )

    text = r1_tokenizer.decode(example.input_ids)
    assert text == (
        "<|im_start|>Be brief.<｜User｜>Where is cardiology?<｜Assistant｜><think>\n"
        f"{THINKING}\n</think>\n\n{ANSWER}<｜end▁of▁sentence｜>"
    )
    assert labelled(r1_tokenizer, example) == learnt


def test_an_r1_conversation_learns_its_last_turn_with_the_history_as_the_template_renders_it(
    r1_tokenizer,
):
    conversation = [
        {"role": "user", "content": "Where is cardiology?"},
        {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nBuilding B."},
        {"role": "user", "content": "And radiology?"},
        {"role": "assistant", "content": f"<think>\n{THINKING}\n</think>\n\nBuilding A."},
    ]

    example = tokenize_conversation(conversation, r1_tokenizer, max_length=256)

    text = r1_tokenizer.decode(example.input_ids)
    assert "old thoughts" not in text  # as at inference: the history holds no thinking
    assert "<｜Assistant｜>\n\nBuilding B.<｜end▁of▁sentence｜><｜User｜>And radiology?" in text
    assert labelled(r1_tokenizer, example) == (
        f"{THINKING}\n</think>\n\nBuilding A.<｜end▁of▁sentence｜>"
    )


def test_loss_on_thinking_reaches_the_data_set_from_the_config(tmp_path, r1_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [REASONED])
    config = DataConfig.model_validate(
        {"train": str(path), "eval": str(path), "loss_on_thinking": False}
    )

    data = load_chat_dataset(
        config.train, r1_tokenizer, max_length=256, loss_on_thinking=config.loss_on_thinking
    )

    assert DataConfig(train=path, eval=path).loss_on_thinking is True
    assert labelled(r1_tokenizer, data.examples[0]) == f"{ANSWER}<｜end▁of▁sentence｜>"
