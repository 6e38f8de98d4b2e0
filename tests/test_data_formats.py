"""Data files in JSONL, CSV and Parquet: the same conversations, the same FILE:ROW errors,
and hostile files refused in one line."""

from __future__ import annotations

import csv

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_cli_bad_input import fails_in_one_line, node_toml

from conftest import write_jsonl
from fedtune.client_node import data_files
from fedtune.client_node.data import DataError, load_chat_dataset, load_conversations

RECORDS = [
    {"prompt": "Where is cardiology?", "response": "Building B, floor 2.", "system": "Be brief."},
    {"prompt": "And radiology?", "response": "Building A, basement."},
]
CHATS = [
    {
        "messages": [
            {"role": "user", "content": "Where is cardiology?"},
            {"role": "assistant", "content": "Building B, floor 2."},
            {"role": "user", "content": "And radiology?"},
            {"role": "assistant", "content": "Building A, basement."},
        ]
    }
]


def write_csv(path, text: str):
    path.write_text(text, encoding="utf-8", newline="")
    return path


def write_parquet(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return path


def test_csv_prompt_response_rows_read_as_the_same_conversations_as_jsonl(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    csv = write_csv(
        tmp_path / "d.csv",
        "id,prompt,response,system\n"
        '1,Where is cardiology?,"Building B, floor 2.",Be brief.\n'
        '2,And radiology?,"Building A, basement.",\n',
    )

    assert load_conversations(csv) == load_conversations(jsonl)


def test_parquet_reads_both_record_forms_as_jsonl_does(tmp_path):
    flat = write_parquet(
        tmp_path / "flat.parquet",
        {
            "prompt": [r["prompt"] for r in RECORDS],
            "response": [r["response"] for r in RECORDS],
            "system": [r.get("system") for r in RECORDS],  # null in the second row
        },
    )
    chats = write_parquet(tmp_path / "chat.parquet", {"messages": [c["messages"] for c in CHATS]})

    assert load_conversations(flat) == load_conversations(
        write_jsonl(tmp_path / "f.jsonl", RECORDS)
    )
    assert load_conversations(chats) == load_conversations(write_jsonl(tmp_path / "c.jsonl", CHATS))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_csv_or_parquet_file_trains_like_jsonl(tmp_path, tiny_tokenizer, suffix):
    path = tmp_path / f"train{suffix}"
    if suffix == ".csv":
        write_csv(path, "prompt,response\nHi?,Hello.\n")
    else:
        write_parquet(path, {"prompt": ["Hi?"], "response": ["Hello."]})

    dataset = load_chat_dataset(path, tiny_tokenizer, max_length=64)
    reference = load_chat_dataset(
        write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Hi?", "response": "Hello."}]),
        tiny_tokenizer,
        max_length=64,
    )

    assert dataset.examples == reference.examples


def test_an_unknown_suffix_is_refused_naming_the_formats(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text('{"prompt": "a", "response": "b"}\n')

    with pytest.raises(
        DataError, match=r"unknown data file type '\.txt'.*\.jsonl.*\.csv.*\.parquet"
    ):
        load_conversations(path)


# Bad rows: (file name, writer, expected "FILE:ROW: problem" tail).
BAD_ROWS = {
    "csv missing column": (
        "d.csv",
        lambda p: write_csv(p, "prompt,answer\na,b\n"),
        ":1: missing column 'response'",
    ),
    "csv empty response": (
        "d.csv",
        lambda p: write_csv(p, "prompt,response\na,b\nc,\n"),
        ":3: field 'response' is empty",
    ),
    "csv row of the wrong width": (
        "d.csv",
        lambda p: write_csv(p, "prompt,response\na,b\nsecret,b,c\n"),
        ":3: 3 fields, but the header names 2",
    ),
    "csv unterminated quote, counted from the record's first line": (
        "d.csv",
        lambda p: write_csv(p, 'prompt,response\na,b\nc,"d\nsecret\n'),
        ":3: malformed CSV",
    ),
    "csv chat form": (
        "d.csv",
        lambda p: write_csv(p, "messages\n[]\n"),
        ":1: a CSV file holds prompt and response columns; write chat conversations as JSONL",
    ),
    "parquet missing column": (
        "d.parquet",
        lambda p: write_parquet(p, {"prompt": ["a"], "answer": ["b"]}),
        ": missing column 'response'",
    ),
    "parquet empty text": (
        "d.parquet",
        lambda p: write_parquet(p, {"prompt": ["a", " "], "response": ["b", "c"]}),
        ":2: field 'prompt' is empty",
    ),
    "parquet wrong type": (
        "d.parquet",
        lambda p: write_parquet(p, {"prompt": ["a", "b"], "response": [b"secret", b"x"]}),
        ":1: field 'response' must be a string, not bytes",
    ),
    "parquet null required field": (
        "d.parquet",
        lambda p: write_parquet(p, {"prompt": ["a", None], "response": ["b", "c"]}),
        ":2: missing field 'prompt'",
    ),
    "parquet chat with a bad role": (
        "d.parquet",
        lambda p: write_parquet(p, {"messages": [[{"role": "robot", "content": "secret"}]]}),
        r":1: messages\[0\] has a role other than",
    ),
    "jsonl wrong type": (
        "d.jsonl",
        lambda p: write_jsonl(p, [{"prompt": 7, "response": "b"}]),
        ":1: field 'prompt' must be a string, not int",
    ),
    "jsonl empty assistant message": (
        "d.jsonl",
        lambda p: write_jsonl(
            p,
            [
                {
                    "messages": [
                        {"role": "user", "content": "a"},
                        {"role": "assistant", "content": ""},
                    ]
                }
            ],
        ),
        r":1: messages\[1\] is an empty assistant message",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_name_file_row_and_problem_but_not_the_text(tmp_path, case):
    name, write, problem = BAD_ROWS[case]
    path = tmp_path / name
    write(path)

    with pytest.raises(DataError, match=f"^{path}{problem}") as error:
        load_conversations(path)
    assert "secret" not in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["train.csv", "train.parquet"])
def test_binary_garbage_is_refused_in_one_line(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"prompt,response\n" + bytes(range(256)) * 64)

    with pytest.raises(DataError) as error:
        load_conversations(path)
    message = str(error.value)
    assert message.startswith(f"{path}")
    assert "UTF-8" in message or "malformed CSV" in message or "not a readable Parquet" in message


def test_a_truncated_parquet_file_is_refused(tmp_path):
    whole = write_parquet(
        tmp_path / "whole.parquet", {"prompt": ["a"] * 50, "response": ["b"] * 50}
    )
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    with pytest.raises(DataError, match=rf"^{cut}: not a readable Parquet file"):
        load_conversations(cut)


def test_a_csv_field_over_the_limit_names_its_row(tmp_path, monkeypatch):
    monkeypatch.setattr(data_files, "CSV_FIELD_LIMIT", 10_000)
    path = write_csv(tmp_path / "train.csv", f"prompt,response\na,b\nc,{'x' * 20_000}\n")

    try:
        with pytest.raises(DataError, match=rf"^{path}:3: malformed CSV: field larger than"):
            load_conversations(path)
    finally:
        csv.field_size_limit(128 * 1024)  # Python's default: the limit is process-wide


def test_a_huge_csv_row_within_the_limit_costs_bounded_work(tmp_path, tiny_tokenizer):
    path = write_csv(
        tmp_path / "train.csv",
        f"prompt,response\nWhere?,{'Building B. ' * 1_000_000}\nHi?,Hello.\n",
    )

    dataset = load_chat_dataset(path, tiny_tokenizer, max_length=64)

    assert len(dataset) == 2 and len(dataset.examples[0].input_ids) == 64


def test_a_parquet_file_that_unpacks_too_large_is_refused_before_reading(tmp_path, monkeypatch):
    """A compression bomb: a small file declaring much more data than it holds."""
    path = tmp_path / "train.parquet"
    pq.write_table(
        pa.table({"prompt": ["a"] * 4, "response": ["x" * 1_000_000] * 4}), path, compression="zstd"
    )
    monkeypatch.setattr(data_files, "PARQUET_MAX_UNCOMPRESSED", 1_000_000)

    with pytest.raises(DataError, match=rf"^{path}: the Parquet file unpacks to \d+ bytes"):
        load_conversations(path)
    assert path.stat().st_size < 100_000


@pytest.mark.parametrize(
    ("name", "content", "named"),
    [
        ("train.parquet", bytes(range(256)) * 16, "not a readable Parquet file"),
        ("train.csv", b"prompt,response\n" + bytes(range(256)) * 16, "UTF-8"),
        ("train.csv", b"prompt,response\na,\n", "field 'response' is empty"),
    ],
)
def test_the_node_refuses_a_hostile_file_in_one_line(
    tmp_path, capsys, tiny_model_dir, name, content, named
):
    data = tmp_path / name
    data.write_bytes(content)
    config = node_toml(tmp_path, data, f'[model]\nspec = "{tiny_model_dir}"\n')

    fails_in_one_line(capsys, ["node", "train", "--config", str(config)], str(data), named)
