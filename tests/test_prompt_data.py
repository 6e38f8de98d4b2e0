"""GRPO's data: prompts with checkable answers, in plain and chat form, with FILE:LINE
errors that never quote a row."""

import json

import pytest

from conftest import write_jsonl
from fedtune.client_node.data import DataError
from fedtune.client_node.prompt_data import (
    holds_verifiable_prompts,
    load_prompt_dataset,
    load_prompt_rows,
    make_prompt_collate,
)


def test_plain_and_chat_rows_load_with_their_answers_and_places(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "Fee for 3 transfers at 2.50?", "answer": "7.50", "system": "Be exact."},
            {
                "prompt": [
                    {"role": "system", "content": "Triage nurse."},
                    {"role": "user", "content": "Findings: ..."},
                ],
                "answer": 2,
                "id": "ignored",
            },
        ],
    )

    rows = load_prompt_rows(path)

    assert [row.answer for row in rows] == ["7.50", "2"]
    assert rows[0].prompt[0] == {"role": "system", "content": "Be exact."}
    assert rows[1].prompt[-1]["role"] == "user"
    assert rows[1].where == f"{path}:2"
    assert holds_verifiable_prompts(path)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "q"}, "missing field 'answer'.*grpo"),
        ({"answer": "1"}, "missing field 'prompt'"),
        ({"prompt": "q", "answer": "  "}, "field 'answer' is empty"),
        ({"prompt": "q", "answer": ["secret"]}, "field 'answer' must be a string or a number"),
        (
            {"prompt": [{"role": "assistant", "content": "x"}], "answer": "1"},
            "the prompt's last message",
        ),
    ],
)
def test_a_bad_row_is_named_by_file_and_line_without_its_text(tmp_path, row, problem):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "answer": "1"}) + "\n\n" + json.dumps(row) + "\n")

    with pytest.raises(DataError, match=f"{path}:3: {problem}") as caught:
        load_prompt_rows(path)
    assert "secret" not in str(caught.value)


def test_malformed_json_and_other_files_are_refused(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "q", "answer": "1"}\n{"prompt": \n')
    with pytest.raises(DataError, match=f"{path}:2: malformed JSON"):
        load_prompt_rows(path)
    csv = tmp_path / "train.csv"
    csv.write_text("prompt,answer\nq,1\n")
    with pytest.raises(DataError, match="JSONL"):
        load_prompt_rows(csv)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "response": "a"}])
    assert not holds_verifiable_prompts(sft) and not holds_verifiable_prompts(csv)


def test_prompts_end_with_the_generation_prompt_and_are_left_padded(tmp_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": "short", "answer": "1"}, {"prompt": "a much longer question", "answer": "2"}],
    )
    data = load_prompt_dataset(path, tiny_tokenizer, max_length=64)
    generation_prompt = tiny_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)

    batch = make_prompt_collate(tiny_tokenizer.pad_token_id)([data[0], data[1]])

    tail = generation_prompt["input_ids"]
    assert data.prompt_ids[0][-len(tail) :] == tail
    assert batch["row"].tolist() == [0, 1]
    assert batch["prompt_attention_mask"][0, 0] == 0  # the shorter prompt is padded on the left
    assert batch["prompt_attention_mask"][:, -1].tolist() == [1, 1]
    cut = load_prompt_dataset(path, tiny_tokenizer, max_length=5)
    assert cut.prompt_ids[1] == data.prompt_ids[1][-5:]  # cut from the left
