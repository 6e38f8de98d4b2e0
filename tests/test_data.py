import pytest

from conftest import write_jsonl
from fedtune.client_node.data import (
    IGNORE_INDEX,
    DataError,
    load_chat_dataset,
    load_conversations,
    max_chars,
    tokenize_conversation,
)

CHAT = {
    "messages": [
        {"role": "user", "content": "Where is cardiology?"},
        {"role": "assistant", "content": "Building B, floor 2."},
        {"role": "user", "content": "And radiology?"},
        {"role": "assistant", "content": "Building A, basement."},
    ]
}


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab != IGNORE_INDEX]
    )


def test_chat_is_rendered_with_template_and_only_assistant_tokens_are_labelled(tiny_tokenizer):
    example = tokenize_conversation(CHAT["messages"], tiny_tokenizer, max_length=512)

    text = tiny_tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a test assistant.<|im_end|>")
    assert "<|im_start|>user\nWhere is cardiology?<|im_end|>" in text
    assert labelled_text(tiny_tokenizer, example) == (
        "Building B, floor 2.<|im_end|>\nBuilding A, basement.<|im_end|>\n"
    )


def test_prompt_response_form_becomes_a_chat(tmp_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "Hi?", "response": "Hello.", "system": "S."}]
    )

    (conversation,) = load_conversations(path)
    example = tokenize_conversation(conversation, tiny_tokenizer, max_length=512)

    assert [m["role"] for m in conversation] == ["system", "user", "assistant"]
    assert labelled_text(tiny_tokenizer, example) == "Hello.<|im_end|>\n"


def test_truncation_keeps_at_most_max_length_tokens(tiny_tokenizer):
    example = tokenize_conversation(CHAT["messages"], tiny_tokenizer, max_length=30)

    assert len(example.input_ids) == len(example.labels) == 30


def test_examples_whose_answer_is_truncated_away_are_dropped_and_counted(tmp_path, tiny_tokenizer):
    long_prompt = {"prompt": "word " * 300, "response": "short"}
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, long_prompt])

    dataset = load_chat_dataset(path, tiny_tokenizer, max_length=100)

    assert len(dataset) == 1
    assert dataset.dropped == 1


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", \n')

    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        load_conversations(path)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "only a prompt"}, "missing field 'response'"),
        ({"text": "x"}, "missing field 'messages'"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] is missing field 'content'"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "has a role other than"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
        (["not", "an", "object"], "must be a JSON object"),
    ],
)
def test_bad_records_name_file_line_and_problem(tmp_path, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [CHAT, record])

    with pytest.raises(DataError, match=rf"{path}:2: .*{message}"):
        load_conversations(path)


def test_empty_data_set_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n  \n")

    with pytest.raises(DataError, match=rf"{path}: the data set is empty"):
        load_conversations(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_conversations(tmp_path / "absent.jsonl")


class RecordingTokenizer:
    """The test tokenizer, recording the size of every text it renders or tokenizes."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.longest = 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, conversation, **kwargs):
        self.longest = max(self.longest, *(len(m["content"]) for m in conversation))
        return self._tokenizer.apply_chat_template(conversation, **kwargs)

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self._tokenizer(text, **kwargs)


def test_a_huge_line_costs_bounded_work_and_keeps_its_first_tokens(tmp_path, tiny_tokenizer):
    """One 50 MB line once took minutes and 15 GB: only what max_length can use is tokenized."""
    path = tmp_path / "train.jsonl"
    answer = "Building B, floor 2. " * (50_000_000 // 21)
    huge = {
        "messages": [
            {"role": "user", "content": "Where?"},
            {"role": "assistant", "content": answer},
        ]
    }
    write_jsonl(path, [huge, CHAT])
    recording = RecordingTokenizer(tiny_tokenizer)

    data = load_chat_dataset(path, recording, max_length=64)

    assert recording.longest <= max_chars(64)
    assert len(data) == 2 and len(data.examples[0].input_ids) == 64
    # The first 1500 characters hold more than 64 tokens and are below the bound: unbounded.
    unbounded = tokenize_conversation(
        [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": answer[:1500]}],
        tiny_tokenizer,
        max_length=64,
    )
    assert data.examples[0] == unbounded


def test_a_binary_data_file_is_named_without_its_content(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "secret", "response": "b"}\n' + bytes(range(128, 256)))

    with pytest.raises(DataError, match="not UTF-8") as error:
        load_conversations(path)
    assert str(path) in str(error.value) and "secret" not in str(error.value)
