"""Preference pairs for DPO: the two row forms, FILE:LINE errors, and the demo's pairs."""

import json

import pytest

from conftest import write_jsonl
from fedtune.client_node.data import IGNORE_INDEX, DataError
from fedtune.client_node.preference_data import (
    load_preference_dataset,
    load_preference_pairs,
)
from fedtune.client_node.training_data import load_held_out, load_training_data
from fedtune.demo.data import generate_examples
from fedtune.demo.preferences import generate_preference_pairs, write_demo_preferences

GOOD = {"prompt": "Where is radiology?", "chosen": "Building A.", "rejected": "No idea."}


def test_both_row_forms_give_the_same_pair(tmp_path):
    chat = {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Where is radiology?"},
        ],
        "chosen": [{"role": "assistant", "content": "Building A."}],
        "rejected": "No idea.",
        "reason": "ignored",
    }
    path = write_jsonl(tmp_path / "p.jsonl", [{**GOOD, "system": "Be brief."}, chat])

    first, second = load_preference_pairs(path)

    assert first == second
    assert first.prompt[-1] == {"role": "user", "content": "Where is radiology?"}
    assert (first.chosen, first.rejected) == ("Building A.", "No idea.")


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("[1, 2]", "each line must be a JSON object"),
        ('{"prompt": "q"', "malformed JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "not a preference pair"),
        (json.dumps({"prompt": "q", "response": "a"}), "not a preference pair"),
        (json.dumps({"chosen": "a", "rejected": "b"}), "missing field 'prompt'"),
        (json.dumps({"prompt": "q", "chosen": "a"}), "missing field 'rejected'"),
        (json.dumps({**GOOD, "chosen": 3}), "field 'chosen' must be a string"),
        (json.dumps({**GOOD, "rejected": ""}), "field 'rejected' is empty"),
        (json.dumps({**GOOD, "rejected": GOOD["chosen"]}), "are the same answer"),
        (json.dumps({**GOOD, "prompt": []}), "non-empty list of messages"),
        (
            json.dumps({**GOOD, "prompt": [{"role": "assistant", "content": "hi"}]}),
            "the prompt's last message must be the user's",
        ),
        (
            json.dumps({**GOOD, "prompt": [{"role": "boss", "content": "secret text"}]}),
            "prompt[0] has a role other than",
        ),
        (
            json.dumps({**GOOD, "chosen": [{"role": "user", "content": "a"}]}),
            "chosen[0] must be an assistant message",
        ),
        (
            json.dumps({**GOOD, "chosen": [{"role": "assistant", "content": "a"}] * 2}),
            "exactly one assistant message",
        ),
    ],
)
def test_a_bad_row_is_named_by_file_and_line_without_its_text(tmp_path, row, problem):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + row + "\n", encoding="utf-8")

    with pytest.raises(DataError) as error:
        load_preference_pairs(path)

    message = str(error.value)
    assert message.startswith(f"{path}:3: ") and problem in message
    assert "\n" not in message and "secret text" not in message


def test_sft_data_under_dpo_and_pairs_under_sft_are_refused_in_one_line(tmp_path, tiny_tokenizer):
    conversations = write_jsonl(tmp_path / "chat.jsonl", generate_examples("bank", 3))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])

    with pytest.raises(DataError) as as_dpo:
        load_training_data(conversations, tiny_tokenizer, method="dpo", max_length=64)
    with pytest.raises(DataError) as as_sft:
        load_training_data(pairs, tiny_tokenizer, method="sft", max_length=64)

    assert str(as_dpo.value) == (
        f"{conversations}:1: not a preference pair (no 'chosen' or 'rejected'): "
        'training.method = "dpo" needs rows {"prompt", "chosen", "rejected"}'
    )
    assert "holds preference pairs" in str(as_sft.value) and "\n" not in str(as_sft.value)


def test_only_the_answer_tokens_are_labelled_and_the_prompt_is_shared(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])

    chosen_ids, chosen_labels, rejected_ids, rejected_labels = load_preference_dataset(
        path, tiny_tokenizer, max_length=64
    )[0]

    def answer(ids, labels):
        return tiny_tokenizer.decode(
            [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
        )

    assert answer(chosen_ids, chosen_labels).startswith("Building A.")
    assert answer(rejected_ids, rejected_labels).startswith("No idea.")
    first_label = int((chosen_labels != IGNORE_INDEX).nonzero()[0])
    assert first_label == int((rejected_labels != IGNORE_INDEX).nonzero()[0])
    assert chosen_ids[:first_label].tolist() == rejected_ids[:first_label].tolist()


def test_a_held_out_preference_file_is_evaluated_on_its_chosen_answers(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])

    held_out = load_held_out(path, tiny_tokenizer, max_length=64)

    ids, labels = held_out[0]
    kept = [t for t, lab in zip(ids.tolist(), labels.tolist(), strict=True) if lab != IGNORE_INDEX]
    assert tiny_tokenizer.decode(kept).startswith("Building A.")


def test_demo_pairs_are_deterministic_and_made_from_the_sft_records(tmp_path):
    first = write_demo_preferences(tmp_path / "a", domain="bank", train=30, held_out=5, seed=3)
    again = write_demo_preferences(tmp_path / "b", domain="bank", train=30, held_out=5, seed=3)
    other = write_demo_preferences(tmp_path / "c", domain="bank", train=30, held_out=5, seed=4)

    assert [p.read_text() for p in first] == [p.read_text() for p in again]
    assert first[0].read_text() != other[0].read_text()
    pairs = generate_preference_pairs("hospital", 200, seed=1)
    examples = generate_examples("hospital", 200, seed=1)
    for pair, example in zip(pairs, examples, strict=True):
        assert pair["prompt"] == example["messages"][:2]  # the same person's question
        assert pair["chosen"] == example["messages"][2]["content"]
        assert pair["rejected"] != pair["chosen"]
        assert pair["reason"].startswith("the worse answer ")


@pytest.mark.parametrize("domain", ["hospital", "bank"])
def test_demo_pairs_show_several_kinds_of_flaw(domain):
    reasons = {
        pair["reason"].split(" says ")[0].split(" triages ")[0]
        for pair in generate_preference_pairs(domain, 300)
    }

    assert len(reasons) >= 3


def test_a_wrong_figure_is_visible_in_the_answer():
    pairs = generate_preference_pairs("bank", 300)
    wrong = [p for p in pairs if " says " in p["reason"]]

    assert wrong
    for pair in wrong:
        said, right = (
            pair["reason"]
            .removeprefix("the worse answer says ")
            .split(" where the right figure is ")
        )
        assert right in pair["chosen"] and said in pair["rejected"]


def test_fedtune_data_demo_writes_preference_pairs_beside_the_sft_files(tmp_path, capsys):
    from fedtune.cli import main

    args = ["data", "demo", "--out", str(tmp_path), "--train", "5", "--held-out", "2"]

    assert main([*args, "--preferences"]) == 0
    for domain in ("hospital", "bank"):
        rows = (tmp_path / domain / "preferences_train.jsonl").read_text().splitlines()
        assert len(rows) == 5 and {"prompt", "chosen", "rejected", "reason"} <= set(
            json.loads(rows[0])
        )
        assert len(load_preference_pairs(tmp_path / domain / "preferences_held_out.jsonl")) == 2
    assert "pairs" in capsys.readouterr().out
