"""The ledger file an auditor verifies offline: JSON Lines, one object per line.

Line 1 is a header ``{"type": "header", "format": "fedtune-ledger/3", "node", "public_key",
"exported_at"}`` (``/1`` and ``/2`` files, from before entries had a format and before
receipts, are read too); then one ``{"type": "entry", ...}`` line per entry in seq order
(payload, ``hash``, ``signature``); then the signed ``{"type": "checkpoint", ...}`` of the
head; then the coordinator's ``{"type": "receipt", ...}`` lines by seq
(:mod:`fedtune.privacy.receipts`). The header's public key is a hint only: an auditor verifies
against the key the node enrolled, obtained out of band, and checks receipts against the
coordinator's witness key, obtained the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.common.errors import AlreadyExistsError, FedtuneError, unreadable
from fedtune.privacy.ledger import (
    GENESIS_HASH,
    LEDGER_FORMAT,
    LEDGER_FORMATS_READ,
    PARALLEL_THRESHOLD,
    Checkpoint,
    LedgerEntry,
    LedgerFormatError,
    LedgerProblem,
    utc_now_text,
    verify_chain,
)
from fedtune.privacy.receipts import Receipt, check_witnessed, head_problem
from fedtune.privacy.signing import load_public_key, public_key_text, verify_signature

HEADER_FIELDS = ("format", "node", "public_key", "exported_at")


@dataclass(frozen=True)
class LedgerFile:
    """A parsed ledger file; ``entry_lines[i]`` is the line number of ``entries[i]``."""

    path: Path
    header: dict[str, Any]
    entries: tuple[LedgerEntry, ...]
    checkpoint: Checkpoint | None
    entry_lines: tuple[int, ...]
    header_line: int = 1
    checkpoint_line: int | None = None
    receipts: tuple[Receipt, ...] = ()
    receipt_lines: tuple[int, ...] = ()


@dataclass(frozen=True)
class LedgerVerification:
    """What :func:`verify_ledger_file` found.

    ``problem`` is the first bad entry (or checkpoint), with its line; ``summary`` describes
    the file's contents (trustworthy only when ``ok``); ``notes`` are remarks that do not make
    the ledger invalid, such as a header naming another key than the one trusted.
    """

    path: Path
    ok: bool
    problem: LedgerProblem | None
    summary: dict[str, Any]
    notes: tuple[str, ...] = field(default=())


def write_ledger_file(
    path: Path,
    *,
    node: str,
    public_key: Ed25519PublicKey | str,
    entries: Sequence[LedgerEntry],
    checkpoint: Checkpoint,
    receipts: Sequence[Receipt] = (),
    overwrite: bool = False,
    exported_at: str | None = None,
) -> None:
    """Export ``node``'s ``entries``, the ``checkpoint`` of their head and the coordinator's
    ``receipts`` to ``path``.

    ``public_key`` is the node's key (or its base64 text) for the header. The file appears
    whole or not at all; an existing file is refused unless ``overwrite``.
    """
    path = Path(path)
    key_text = public_key_text(
        public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)
    )
    for entry in entries:
        if entry.node != node:
            raise ValueError(f"entry seq {entry.seq} belongs to node {entry.node!r}, not {node!r}")
    if checkpoint.node != node:
        raise ValueError(f"the checkpoint belongs to node {checkpoint.node!r}, not {node!r}")
    for receipt in receipts:
        if receipt.node != node:
            raise ValueError(f"a receipt belongs to node {receipt.node!r}, not {node!r}")
    head_seq = entries[-1].seq if entries else 0
    head_hash = entries[-1].hash if entries else GENESIS_HASH
    if (checkpoint.seq, checkpoint.head_hash) != (head_seq, head_hash):
        raise ValueError(
            f"the checkpoint signs seq {checkpoint.seq}, but the entries end at seq {head_seq} "
            "(or another head hash): sign a checkpoint of the last entry"
        )
    if path.exists() and not overwrite:
        raise AlreadyExistsError(f"{path} already exists; it is not overwritten")
    header = {
        "type": "header",
        "format": LEDGER_FORMAT,
        "node": node,
        "public_key": key_text,
        "exported_at": exported_at or utc_now_text(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(_line(header))
            for entry in entries:
                handle.write(_line({"type": "entry", **entry.to_dict()}))
            handle.write(_line({"type": "checkpoint", **checkpoint.to_dict()}))
            for receipt in sorted(receipts, key=lambda r: r.seq):
                handle.write(_line({"type": "receipt", **receipt.to_dict()}))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # an export is for others to read; mkstemp made it 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_ledger_file(path: Path) -> LedgerFile:
    """Parse ``path``; ``LedgerFormatError`` names the file and line of the first bad line,
    ``UnreadableLedgerError`` a file that cannot be opened.

    Checks the form of each line, not hashes or signatures (see :func:`verify_ledger_file`).
    The checkpoint is None when the file has none.
    """
    path = Path(path)
    reader = _Reader()
    number = 0
    try:
        with path.open(encoding="utf-8") as handle:
            for number, text in enumerate(handle, start=1):
                if text.strip():
                    reader.add(text, number)
    except UnicodeDecodeError:
        number += 1
        raise _located(path, number, "not UTF-8 text") from None
    except _LineError as error:
        raise _located(path, number, str(error), seq=error.seq) from None
    except OSError as error:  # missing, a folder: nothing to verify, not a failed verification
        raise UnreadableLedgerError(f"ledger file {unreadable(path, error)}") from None
    if reader.header is None:
        raise LedgerFormatError(
            f"{path} is empty: expected a ledger header line", line=1, detail="empty file"
        )
    return LedgerFile(
        path=path,
        header=reader.header,
        entries=tuple(reader.entries),
        checkpoint=reader.checkpoint,
        entry_lines=tuple(reader.entry_lines),
        header_line=reader.header_line,
        checkpoint_line=reader.checkpoint_line,
        receipts=tuple(reader.receipts),
        receipt_lines=tuple(reader.receipt_lines),
    )


class UnreadableLedgerError(FedtuneError, ValueError):
    """A ledger file cannot be opened at all (missing, a folder, no permission)."""


class _LineError(FedtuneError, ValueError):
    def __init__(self, message: str, *, seq: int | None = None):
        super().__init__(message)
        self.seq = seq


def _located(path: Path, number: int, detail: str, *, seq: int | None = None) -> LedgerFormatError:
    return LedgerFormatError(
        f"{path}, line {number}: {detail}", line=number, seq=seq, detail=detail
    )


class _Reader:
    """The state of reading a ledger file line by line; ``add`` raises ``_LineError``."""

    def __init__(self) -> None:
        self.header: dict[str, Any] | None = None
        self.header_line = 1
        self.entries: list[LedgerEntry] = []
        self.entry_lines: list[int] = []
        self.checkpoint: Checkpoint | None = None
        self.checkpoint_line: int | None = None
        self.receipts: list[Receipt] = []
        self.receipt_lines: list[int] = []

    def add(self, text: str, number: int) -> None:
        record = _parse_line(text)
        kind = record.pop("type", None)
        if self.header is None:
            if kind != "header":
                raise _LineError(
                    "the first line must be the header "
                    f'({{"type": "header", "format": "{LEDGER_FORMAT}", ...}})'
                )
            self.header = _checked_header(record)
            self.header_line = number
        elif kind == "entry":
            if self.checkpoint is not None:
                raise _LineError("an entry after the checkpoint line")
            try:
                self.entries.append(LedgerEntry.from_dict(record))
            except LedgerFormatError as error:
                raise _LineError(error.detail, seq=error.seq) from None
            self.entry_lines.append(number)
        elif kind == "checkpoint":
            if self.checkpoint is not None:
                raise _LineError("a second checkpoint line")
            if self.receipts:
                raise _LineError("the checkpoint line after a receipt line")
            try:
                self.checkpoint = Checkpoint.from_dict(record)
            except LedgerFormatError as error:
                raise _LineError(error.detail) from None
            self.checkpoint_line = number
        elif kind == "receipt":
            self._add_receipt(record, number)
        elif kind == "header":
            raise _LineError("a second header line")
        else:
            raise _LineError(f"unknown line type {kind!r} (expected entry, checkpoint or receipt)")

    def _add_receipt(self, record: dict[str, Any], number: int) -> None:
        assert self.header is not None
        if self.header["format"] != LEDGER_FORMAT:
            raise _LineError(f"a receipt line in a {self.header['format']} file (receipts: /3 on)")
        if self.checkpoint is None:
            raise _LineError("a receipt line before the checkpoint line")
        try:
            receipt = Receipt.from_dict(record)
        except LedgerFormatError as error:
            raise _LineError(str(error)) from None
        if self.receipts and receipt.seq < self.receipts[-1].seq:
            before = self.receipts[-1].seq
            raise _LineError(f"receipt for seq {receipt.seq} after one for seq {before}")
        self.receipts.append(receipt)
        self.receipt_lines.append(number)


def verify_ledger_file(
    path: Path,
    *,
    public_key: Ed25519PublicKey | str | Path,
    witness_key: Ed25519PublicKey | str | Path | None = None,
    coordinator_copy: Path | None = None,
    parallel_threshold: int = PARALLEL_THRESHOLD,
    workers: int | None = None,
) -> LedgerVerification:
    """Verify the ledger file at ``path`` against the trusted ``public_key``.

    Every entry must follow the one before it and verify under ``public_key``, and the
    checkpoint must sign the last entry; the first problem found is reported with its line.
    A malformed file fails too (its first bad line is the problem). With ``witness_key`` (the
    coordinator's), the file's receipts must verify and the ledger must reach every head they
    countersign; with ``coordinator_copy`` (an export of the coordinator's copy of this node's
    ledger), every entry and receipt there too: a rolled-back or forked ledger fails.
    ``parallel_threshold`` and ``workers`` are passed to
    :func:`~fedtune.privacy.ledger.verify_chain`.
    """
    path = Path(path)
    try:
        ledger = read_ledger_file(path)
        copy = read_ledger_file(coordinator_copy) if coordinator_copy is not None else None
    except LedgerFormatError as error:
        problem = LedgerProblem(seq=error.seq, position=None, reason=error.detail, line=error.line)
        return LedgerVerification(path=path, ok=False, problem=problem, summary={})
    return verify_ledger(
        ledger,
        public_key=public_key,
        witness_key=witness_key,
        coordinator_copy=copy,
        parallel_threshold=parallel_threshold,
        workers=workers,
    )


def verify_ledger(
    ledger: LedgerFile,
    *,
    public_key: Ed25519PublicKey | str | Path,
    witness_key: Ed25519PublicKey | str | Path | None = None,
    coordinator_copy: LedgerFile | None = None,
    parallel_threshold: int = PARALLEL_THRESHOLD,
    workers: int | None = None,
) -> LedgerVerification:
    """:func:`verify_ledger_file` on a ledger file (and coordinator's copy) already read."""
    path = ledger.path
    if not isinstance(public_key, Ed25519PublicKey):
        public_key = load_public_key(public_key)
    if witness_key is not None and not isinstance(witness_key, Ed25519PublicKey):
        witness_key = load_public_key(witness_key)
    notes = []
    trusted = public_key_text(public_key)
    if ledger.header["public_key"] != trusted:
        notes.append(
            f"the file's header names public key {ledger.header['public_key']}, not the trusted "
            f"key {trusted} given for verification; the given key was used"
        )
    summary = summarize_entries(ledger.entries, node=ledger.header["node"])
    result = verify_chain(
        ledger.entries,
        public_key=public_key,
        checkpoint=ledger.checkpoint,
        parallel_threshold=parallel_threshold,
        workers=workers,
    )
    found = result.problem or _header_problem(ledger)
    if found is not None:
        problem = _with_line(found, ledger)
        return LedgerVerification(
            path=path, ok=False, problem=problem, summary=summary, notes=tuple(notes)
        )
    found, witness_notes = _witness_problem(ledger, witness_key, summary)
    if found is None and coordinator_copy is not None:
        found = _copy_problem(ledger, coordinator_copy, public_key, witness_key, summary)
    if found is not None:
        return LedgerVerification(
            path=path, ok=False, problem=found, summary=summary, notes=tuple(notes)
        )
    notes.extend(witness_notes)
    notes.extend(_content_notes(ledger.entries))
    return LedgerVerification(path=path, ok=True, problem=None, summary=summary, notes=tuple(notes))


def _witness_problem(
    ledger: LedgerFile, witness_key: Ed25519PublicKey | None, summary: dict[str, Any]
) -> tuple[LedgerProblem | None, list[str]]:
    """The file's receipts checked against ``witness_key`` (not checked without one)."""
    if witness_key is None:
        if ledger.receipts:
            return None, [
                f"{len(ledger.receipts)} receipts from the coordinator not checked: give its "
                "witness key to check them (a rolled-back ledger is caught only then)"
            ]
        return None, []
    check = check_witnessed(
        ledger.entries, ledger.receipts, node=ledger.header["node"], witness_key=witness_key
    )
    summary["witnessed_seq"] = check.witnessed_seq
    if check.problem is None:
        return None, list(check.notes)
    lines = {r.seq: line for r, line in zip(ledger.receipts, ledger.receipt_lines, strict=True)}
    return LedgerProblem(
        seq=check.seq, position=None, reason=check.problem, line=lines.get(check.seq or -1)
    ), []


def _copy_problem(
    ledger: LedgerFile,
    copy: LedgerFile,
    public_key: Ed25519PublicKey,
    witness_key: Ed25519PublicKey | None,
    summary: dict[str, Any],
) -> LedgerProblem | None:
    """Whether ``ledger`` reaches, unchanged, every entry the coordinator's ``copy`` holds
    (evidence where the node's key signed it) and every receipt there (with ``witness_key``)."""
    node = ledger.header["node"]
    if copy.header["node"] != node:
        return _copy_says(f"it is node {copy.header['node']!r}'s ledger, not {node!r}'s")
    by_seq = {entry.seq: entry for entry in ledger.entries}
    last = ledger.entries[-1].seq if ledger.entries else 0
    for entry in copy.entries:
        signed = verify_signature(
            public_key, signature=entry.signature, message=bytes.fromhex(entry.hash)
        )
        if not entry.content_matches() or not signed or entry.node != node:
            return _copy_says(f"seq {entry.seq} there does not verify under the node's key")
        problem = head_problem(by_seq, last, entry.seq, entry.hash, entry.recorded_at)
        if problem is not None:
            return LedgerProblem(seq=entry.seq, position=None, reason=_by_copy(problem))
    if witness_key is not None:
        check = check_witnessed(ledger.entries, copy.receipts, node=node, witness_key=witness_key)
        if check.problem is not None:
            return LedgerProblem(seq=check.seq, position=None, reason=_by_copy(check.problem))
    summary["coordinator_copy_entries"] = len(copy.entries)
    return None


def _by_copy(problem: str) -> str:
    return problem.replace("the coordinator witnessed", "the coordinator's copy holds", 1)


def _copy_says(detail: str) -> LedgerProblem:
    return LedgerProblem(
        seq=None, position=None, reason=f"the coordinator's copy cannot be compared: {detail}"
    )


def summarize_entries(entries: Sequence[LedgerEntry], *, node: str) -> dict[str, Any]:
    """Runs, data sets and the epsilon each has spent, from ``entries`` in seq order.

    A data set's ``epsilon`` is the last non-null ``epsilon_after`` recorded for it, with that
    entry's ``delta``, ``accountant`` and ``epsilon_cap``; ``rounds`` counts all its rounds,
    ``non_private_rounds`` those trained without DP (after which no epsilon bounds it).
    """
    data_sets: dict[str, dict[str, Any]] = {}
    for entry in entries:
        item = data_sets.setdefault(
            entry.data_fingerprint,
            {
                "epsilon": None,
                "delta": None,
                "accountant": None,
                "epsilon_cap": None,
                "rounds": 0,
                "non_private_rounds": 0,
                "metric_releases": 0,
            },
        )
        if entry.entry_kind == "metric_release":
            item["metric_releases"] += 1
        else:
            item["rounds"] += 1
        if entry.mode == "non-private":
            item["non_private_rounds"] += 1
        if entry.epsilon_after is not None:
            item["epsilon"] = entry.epsilon_after
            item["delta"] = entry.delta
            item["accountant"] = entry.accountant
            item["epsilon_cap"] = entry.epsilon_cap
    return {
        "node": node,
        "entries": len(entries),
        "runs": sorted({entry.run_id for entry in entries}),
        "data_sets": data_sets,
        "first_recorded_at": entries[0].recorded_at if entries else None,
        "last_recorded_at": entries[-1].recorded_at if entries else None,
    }


def format_verification(result: LedgerVerification) -> str:
    """The verdict as an auditor reads it: the summary when valid, else the first problem."""
    lines = []
    if not result.ok:
        assert result.problem is not None
        lines.append(f"FAILED  {result.path}")
        lines.append(f"  {result.problem}")
    else:
        summary = result.summary
        count = summary["entries"]
        lines.append(f"VERIFIED  {result.path}")
        lines.append(
            f"  node {summary['node']}: {count} {'entry' if count == 1 else 'entries'}, "
            "chain intact, every signature valid, head signed" + _witness_text(summary)
        )
        if count:
            lines.append(
                f"  recorded {summary['first_recorded_at']} to {summary['last_recorded_at']}"
            )
            lines.append(f"  runs: {', '.join(summary['runs'])}")
        for fingerprint, item in summary["data_sets"].items():
            lines.append(f"  data set {fingerprint}")
            lines.append(f"    {_epsilon_text(item)}")
    lines.extend(f"  note: {note}" for note in result.notes)
    return "\n".join(lines)


def _witness_text(summary: dict[str, Any]) -> str:
    parts = []
    if "witnessed_seq" in summary:
        parts.append(f", witnessed by the coordinator up to seq {summary['witnessed_seq']}")
    if "coordinator_copy_entries" in summary:
        parts.append(
            f", every one of the coordinator's {summary['coordinator_copy_entries']} copied "
            "entries present and unchanged"
        )
    return "".join(parts)


def _epsilon_text(item: dict[str, Any]) -> str:
    rounds = item["rounds"]
    parts = [f"{rounds} {'round' if rounds == 1 else 'rounds'}"]
    if item["epsilon"] is not None:
        parts.insert(
            0,
            f"epsilon {item['epsilon']:.4g} at delta {item['delta']:g} ({item['accountant']})",
        )
    if item["epsilon_cap"] is not None:
        parts.append(f"cap {item['epsilon_cap']:g}")
    if item.get("metric_releases"):
        parts.append(f"{item['metric_releases']} metric releases")
    if item["non_private_rounds"]:
        parts.append(f"{item['non_private_rounds']} non-private: no differential-privacy guarantee")
    return ", ".join(parts)


def _content_notes(entries: Sequence[LedgerEntry]) -> list[str]:
    """Remarks on what a valid ledger says: spending over a cap, epsilon going down."""
    notes = []
    last: dict[str, LedgerEntry] = {}
    for entry in entries:
        if (
            entry.epsilon_after is not None
            and entry.epsilon_cap is not None
            and entry.epsilon_after > entry.epsilon_cap
        ):
            notes.append(
                f"seq {entry.seq}: epsilon {entry.epsilon_after:g} exceeds the cap "
                f"{entry.epsilon_cap:g} in force for data set {entry.data_fingerprint}"
            )
        before = last.get(entry.data_fingerprint)
        if (
            before is not None
            and entry.epsilon_after is not None
            and before.epsilon_after is not None
            and (before.accountant, before.delta) == (entry.accountant, entry.delta)
            and entry.epsilon_after < before.epsilon_after
        ):
            notes.append(
                f"seq {entry.seq}: epsilon of data set {entry.data_fingerprint} went down from "
                f"{before.epsilon_after:g} (seq {before.seq}) to {entry.epsilon_after:g}"
            )
        if entry.epsilon_after is not None:
            last[entry.data_fingerprint] = entry
    return notes


def _header_problem(ledger: LedgerFile) -> LedgerProblem | None:
    node = ledger.header["node"]
    if ledger.entries and ledger.entries[0].node != node:
        return LedgerProblem(
            seq=ledger.entries[0].seq,
            position=0,
            reason=f"the entries are node {ledger.entries[0].node!r}'s, the header says {node!r}",
        )
    if ledger.checkpoint is not None and ledger.checkpoint.node != node:
        return LedgerProblem(
            seq=None,
            position=None,
            reason=f"the checkpoint is node {ledger.checkpoint.node!r}'s, the header says {node!r}",
        )
    return None


def _with_line(problem: LedgerProblem, ledger: LedgerFile) -> LedgerProblem:
    line: int | None = ledger.checkpoint_line  # a cut tail, or the checkpoint itself
    if problem.position is not None and problem.position < len(ledger.entry_lines):
        line = ledger.entry_lines[problem.position]
    return LedgerProblem(
        seq=problem.seq, position=problem.position, reason=problem.reason, line=line
    )


def _checked_header(record: dict[str, Any]) -> dict[str, Any]:
    missing = [name for name in HEADER_FIELDS if name not in record]
    if missing:
        raise _LineError(f"header is missing fields: {', '.join(missing)}")
    if record["format"] not in LEDGER_FORMATS_READ:
        raise _LineError(
            f"format {record['format']!r} is not one this version of fedtune reads "
            f"({', '.join(LEDGER_FORMATS_READ)}): upgrade fedtune to read it"
        )
    for name in ("node", "public_key", "exported_at"):
        if not isinstance(record[name], str) or not record[name]:
            raise _LineError(f"header {name} must be a non-empty string")
    return record


def _parse_line(text: str) -> dict[str, Any]:
    try:
        record = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as error:
        raise _LineError(f"not valid JSON ({error.msg}, column {error.colno})") from None
    except ValueError as error:
        raise _LineError(str(error)) from None
    if not isinstance(record, dict):
        raise _LineError("not a JSON object")
    return record


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        keys = [key for key, _ in pairs]
        twice = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(f"field {', '.join(twice)} appears more than once")
    return record


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


__all__ = [
    "LedgerFile",
    "LedgerVerification",
    "format_verification",
    "read_ledger_file",
    "summarize_entries",
    "verify_ledger_file",
    "write_ledger_file",
]
