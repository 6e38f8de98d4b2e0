"""An exported ledger file, tampered with line by line: verification names the first bad entry.

The file built here has a header (line 1), entries seq 1-6 (lines 2-7) and a checkpoint
(line 8): two runs, two data sets, one non-private round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedtune.privacy.ledger import (
    PAYLOAD_FIELDS,
    LedgerEntry,
    LedgerFormatError,
    entry_hash,
    seal_entry,
    sign_checkpoint,
)
from fedtune.privacy.ledger_file import (
    format_verification,
    read_ledger_file,
    verify_ledger_file,
    write_ledger_file,
)
from fedtune.privacy.signing import NodeKey

NODE = "hospital-a"
DATA_A = "sha256:" + "a" * 64
DATA_B = "sha256:" + "b" * 64
# (run, round, data set, mode, epsilon_round, epsilon_after)
ROUNDS = [
    ("run-a", 1, DATA_A, "dp", 0.5, 0.5),
    ("run-a", 2, DATA_A, "dp", 0.5, 1.0),
    ("run-a", 3, DATA_A, "dp", 0.5, 1.4),
    ("run-b", 1, DATA_B, "dp", 0.6, 0.6),
    ("run-b", 2, DATA_B, "non-private", None, None),
    ("run-b", 3, DATA_A, "dp", 0.5, 1.9),
]
CONTENT_FIELDS = [name for name in PAYLOAD_FIELDS if name not in ("seq", "prev_hash")]


def round_fields(index: int, *, run: str, round_: int, data: str, mode: str, **eps: Any) -> dict:
    private = mode == "dp"
    return {
        "node": NODE,
        "run_id": run,
        "round": round_,
        "base_model_fingerprint": "sha256:" + "f" * 64,
        "data_fingerprint": data,
        "mode": mode,
        "steps": 20,
        "sample_rate": 0.01,
        "noise_multiplier": 1.1 if private else None,
        "max_grad_norm": 1.0 if private else None,
        "delta": 1e-5 if private else None,
        "epsilon_round": eps["epsilon_round"],
        "epsilon_after": eps["epsilon_after"],
        "epsilon_cap": 8.0 if private else None,
        "accountant": "rdp" if private else None,
        "accountant_version": "opacus-1.6.0" if private else None,
        "kind": "training_round",
        "method": "dp-sgd" if private else "none",
        "privacy_unit": "example" if private else None,
        "recorded_at": f"2026-11-23T19:{index:02d}:00.000000Z",
    }


def seal_ledger(key: NodeKey, count: int) -> list[LedgerEntry]:
    """``count`` entries cycling through ``ROUNDS``."""
    entries: list[LedgerEntry] = []
    for index in range(count):
        run, round_, data, mode, epsilon_round, epsilon_after = ROUNDS[index % len(ROUNDS)]
        fields = round_fields(
            index % 60,
            run=run,
            round_=round_,
            data=data,
            mode=mode,
            epsilon_round=epsilon_round,
            epsilon_after=epsilon_after,
        )
        entries.append(seal_entry(fields, previous=entries[-1] if entries else None, key=key))
    return entries


def export(path: Path, key: NodeKey, entries: list[LedgerEntry]) -> Path:
    checkpoint = sign_checkpoint(node=NODE, head=entries[-1], key=key)
    write_ledger_file(
        path, node=NODE, public_key=key.public_key, entries=entries, checkpoint=checkpoint
    )
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def key() -> NodeKey:
    return NodeKey.generate()


@pytest.fixture
def ledger(tmp_path: Path, key: NodeKey) -> Path:
    return export(tmp_path / "ledger.jsonl", key, seal_ledger(key, len(ROUNDS)))


def test_untampered_file_verifies_with_its_summary(ledger: Path, key: NodeKey) -> None:
    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert result.ok, result.problem
    assert result.summary["node"] == NODE
    assert result.summary["entries"] == 6
    assert result.summary["runs"] == ["run-a", "run-b"]
    assert result.summary["first_recorded_at"] == "2026-11-23T19:00:00.000000Z"
    assert result.summary["last_recorded_at"] == "2026-11-23T19:05:00.000000Z"
    assert result.summary["data_sets"] == {
        DATA_A: {
            "epsilon": 1.9,
            "delta": 1e-5,
            "accountant": "rdp",
            "epsilon_cap": 8.0,
            "rounds": 4,
            "non_private_rounds": 0,
            "metric_releases": 0,
        },
        DATA_B: {
            "epsilon": 0.6,
            "delta": 1e-5,
            "accountant": "rdp",
            "epsilon_cap": 8.0,
            "rounds": 2,
            "non_private_rounds": 1,
            "metric_releases": 0,
        },
    }


def test_verified_report_shows_each_data_sets_epsilon(ledger: Path, key: NodeKey) -> None:
    text = format_verification(verify_ledger_file(ledger, public_key=key.public_key))

    assert text.startswith("VERIFIED")
    assert f"data set {DATA_A}\n    epsilon 1.9 at delta 1e-05 (rdp), 4 rounds, cap 8" in text
    assert "1 non-private: no differential-privacy guarantee" in text


def test_edited_field_is_reported_as_edited(ledger: Path, key: NodeKey) -> None:
    lines = read_lines(ledger)
    lines[3]["epsilon_after"] = 0.2  # seq 3
    write_lines(ledger, lines)

    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert not result.ok and result.problem is not None
    assert (result.problem.seq, result.problem.line) == (3, 4)
    assert "edited" in result.problem.reason


def test_edit_with_hash_recomputed_without_the_key_fails_its_signature(
    ledger: Path, key: NodeKey
) -> None:
    lines = read_lines(ledger)
    lines[3]["epsilon_after"] = 0.2
    lines[3]["hash"] = entry_hash({name: lines[3][name] for name in PAYLOAD_FIELDS})
    write_lines(ledger, lines)

    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert result.problem is not None and result.problem.seq == 3
    assert "signature does not match" in result.problem.reason


def test_deleted_entry_is_reported_missing(ledger: Path, key: NodeKey) -> None:
    lines = read_lines(ledger)
    del lines[3]  # seq 3
    write_lines(ledger, lines)

    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert result.problem is not None and result.problem.seq == 4
    assert "seq 3 is missing" in result.problem.reason


def test_duplicated_entry_is_reported_duplicated(ledger: Path, key: NodeKey) -> None:
    lines = read_lines(ledger)
    lines.insert(4, dict(lines[3]))  # a second seq 3, on line 5
    write_lines(ledger, lines)

    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert result.problem is not None
    assert (result.problem.seq, result.problem.line) == (3, 5)
    assert "duplicated" in result.problem.reason


def test_entry_inserted_with_another_key_fails_its_signature(ledger: Path, key: NodeKey) -> None:
    lines = read_lines(ledger)
    seq_3 = LedgerEntry.from_dict({k: v for k, v in lines[3].items() if k != "type"})
    fields = {name: getattr(seq_3, name) for name in CONTENT_FIELDS}
    forged = seal_entry({**fields, "epsilon_after": 0.0}, previous=seq_3, key=NodeKey.generate())
    lines.insert(4, {"type": "entry", **forged.to_dict()})  # a forged seq 4 on line 5
    write_lines(ledger, lines)

    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert result.problem is not None
    assert (result.problem.seq, result.problem.line) == (4, 5)
    assert "signature does not match" in result.problem.reason


def test_reordered_entries_are_reported_out_of_order(ledger: Path, key: NodeKey) -> None:
    lines = read_lines(ledger)
    lines[3], lines[4] = lines[4], lines[3]  # seq 4 now before seq 3
    write_lines(ledger, lines)

    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert result.problem is not None
    assert (result.problem.seq, result.problem.line) == (4, 4)
    assert "out of order" in result.problem.reason


@pytest.mark.parametrize("seq", [2**40, 2**53 - 1])
def test_a_huge_seq_out_of_order_is_reported_without_listing_every_missing_seq(
    ledger: Path, key: NodeKey, seq: int
) -> None:
    """Found by differential fuzzing against the independent verifier: a seq near 2**53 in
    the middle of a ledger made verification list every missing seq (memory without end)."""
    lines = read_lines(ledger)
    lines[2]["seq"] = seq  # entry 2 claims a far-away seq; entries 3-6 follow it
    write_lines(ledger, lines)

    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert result.problem is not None and result.problem.seq == seq
    assert "more" in result.problem.reason and "missing" in result.problem.reason


def test_contents_swapped_under_kept_hashes_are_reported_edited(ledger: Path, key: NodeKey) -> None:
    lines = read_lines(ledger)
    for name in CONTENT_FIELDS:  # seq 3 and seq 4 trade contents, keep chain and signatures
        lines[3][name], lines[4][name] = lines[4][name], lines[3][name]
    write_lines(ledger, lines)

    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert result.problem is not None and result.problem.seq == 3
    assert "edited" in result.problem.reason


def test_whole_payloads_swapped_under_kept_hashes_break_the_order(
    ledger: Path, key: NodeKey
) -> None:
    lines = read_lines(ledger)
    for name in PAYLOAD_FIELDS:
        lines[3][name], lines[4][name] = lines[4][name], lines[3][name]
    write_lines(ledger, lines)

    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert result.problem is not None
    assert (result.problem.seq, result.problem.line) == (4, 4)
    assert "out of order" in result.problem.reason


def test_cut_tail_under_the_signed_checkpoint_is_reported(ledger: Path, key: NodeKey) -> None:
    lines = read_lines(ledger)
    del lines[5:7]  # seq 5 and 6; the checkpoint still signs seq 6
    write_lines(ledger, lines)

    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert result.problem is not None
    assert result.problem.seq == 5
    assert "tail cut" in result.problem.reason and "ends at seq 4" in result.problem.reason


def test_cut_tail_with_its_checkpoint_removed_is_reported(ledger: Path, key: NodeKey) -> None:
    lines = read_lines(ledger)
    del lines[5:]  # seq 5, seq 6 and the checkpoint
    write_lines(ledger, lines)

    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert not result.ok and result.problem is not None
    assert "no signed checkpoint" in result.problem.reason


def test_edited_checkpoint_fails_its_signature(ledger: Path, key: NodeKey) -> None:
    lines = read_lines(ledger)
    lines[-1]["seq"] = 4  # claim a shorter ledger to hide seq 5-6
    write_lines(ledger, lines)

    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert result.problem is not None and result.problem.line == 8
    assert "checkpoint's signature does not match" in result.problem.reason


def test_wrong_public_key_fails_at_the_first_entry_and_notes_the_header(
    ledger: Path,
) -> None:
    other = NodeKey.generate()

    result = verify_ledger_file(ledger, public_key=other.public_key)

    assert result.problem is not None and result.problem.seq == 1
    assert "signature does not match" in result.problem.reason
    assert any("header names public key" in note for note in result.notes)


def test_failed_report_names_the_line_and_entry(ledger: Path, key: NodeKey) -> None:
    lines = read_lines(ledger)
    del lines[3]
    write_lines(ledger, lines)

    text = format_verification(verify_ledger_file(ledger, public_key=key.public_key))

    assert text.startswith("FAILED")
    assert "line 4, entry seq 4: seq 4 follows seq 2" in text


def test_malformed_line_is_a_format_error_naming_file_and_line(ledger: Path) -> None:
    text = ledger.read_text(encoding="utf-8").splitlines()
    text[2] = text[2][:40]
    ledger.write_text("\n".join(text) + "\n", encoding="utf-8")

    with pytest.raises(LedgerFormatError, match=rf"{ledger.name}, line 3: not valid JSON"):
        read_ledger_file(ledger)


def test_malformed_line_fails_verification_at_that_line(ledger: Path, key: NodeKey) -> None:
    lines = read_lines(ledger)
    lines[2]["steps"] = "twenty"  # seq 2
    write_lines(ledger, lines)

    result = verify_ledger_file(ledger, public_key=key.public_key)

    assert result.problem is not None
    assert (result.problem.seq, result.problem.line) == (2, 3)
    assert "steps must be an integer" in result.problem.reason


def test_existing_file_is_not_overwritten(ledger: Path, key: NodeKey) -> None:
    entries = read_ledger_file(ledger).entries
    checkpoint = sign_checkpoint(node=NODE, head=entries[-1], key=key)

    with pytest.raises(FileExistsError, match="not overwritten"):
        write_ledger_file(
            ledger, node=NODE, public_key=key.public_key, entries=entries, checkpoint=checkpoint
        )


@pytest.fixture(scope="module")
def long_ledger(key: NodeKey) -> list[LedgerEntry]:
    return seal_ledger(key, 120)


def test_parallel_verification_reports_a_bad_signature_in_the_middle(
    tmp_path: Path, key: NodeKey, long_ledger: list[LedgerEntry]
) -> None:
    path = export(tmp_path / "ledger.jsonl", key, long_ledger)
    lines = read_lines(path)
    lines[70]["signature"] = NodeKey.generate().sign(bytes.fromhex(lines[70]["hash"]))  # seq 70
    write_lines(path, lines)

    parallel = verify_ledger_file(path, public_key=key.public_key, parallel_threshold=10, workers=2)
    sequential = verify_ledger_file(path, public_key=key.public_key, workers=1)

    assert parallel.problem is not None and parallel.problem.seq == 70
    assert "signature does not match" in parallel.problem.reason
    assert parallel.problem == sequential.problem


def test_parallel_verification_reports_an_earlier_chain_problem_first(
    tmp_path: Path, key: NodeKey, long_ledger: list[LedgerEntry]
) -> None:
    path = export(tmp_path / "ledger.jsonl", key, long_ledger)
    lines = read_lines(path)
    lines[90]["signature"] = NodeKey.generate().sign(bytes.fromhex(lines[90]["hash"]))  # seq 90
    lines[40]["steps"] = 21  # seq 40
    write_lines(path, lines)

    result = verify_ledger_file(path, public_key=key.public_key, parallel_threshold=10, workers=2)

    assert result.problem is not None and result.problem.seq == 40
    assert "edited" in result.problem.reason
