"""The epsilon ledger: one signed, hash-chained entry per training round of a node.

Each entry records what an accountant needs to replay the round (steps, sample rate, noise
multiplier, clip norm, delta) and the epsilon it reports, for one data set of one node.
Entries are sealed in order: an entry's ``hash`` is SHA-256 over the 32 raw bytes of the
previous entry's hash followed by the RFC 8785 canonical JSON of its payload (``prev_hash``
included), and its ``signature`` is the node's Ed25519 signature of the 32 raw hash bytes.
An edited entry no longer matches its hash; a re-hashed one no longer matches its signature;
a deleted, inserted or reordered one breaks the ``seq`` / ``prev_hash`` chain. Only a cut-off
tail leaves a valid chain behind, so a ledger travels with a signed :class:`Checkpoint` of
its head.

Verifying costs one canonical JSON and SHA-256 per entry (tens of microseconds) and one
Ed25519 verification (more); large ledgers verify their signatures in parallel processes
while the chain is hashed in this one.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import multiprocessing
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedtune.common.errors import FedtuneError
from fedtune.privacy.signing import NodeKey, decode_signature, verify_signature

GENESIS_HASH = "0" * 64
# The ledger file's format: /3 files may end with the coordinator's receipts, /2 files may
# hold version-2 entries; /1 and /2 files are still read.
LEDGER_FORMAT = "fedtune-ledger/3"
LEDGER_FORMATS_READ = ("fedtune-ledger/1", "fedtune-ledger/2", LEDGER_FORMAT)
# The format of the entries sealed now. Entries without a ``format`` field are version 1
# (fedtune 0.1): they verify as they were sealed and are read as training rounds.
ENTRY_FORMAT = "fedtune-entry/2"
# What an entry records: a training round, or metrics released under DP
# (:mod:`fedtune.privacy.metric_release`). A reader that meets a kind it does not know says
# so instead of misreading the entry.
KINDS = ("training_round", "metric_release")
# How the round was made private (``gaussian``: a metric release's Gaussian mechanism;
# ``dp-dpo``: DP-SGD on the DPO loss, one preference pair per row; ``dp-grpo``: DP-SGD on the
# GRPO loss, one prompt with its reference answer per row), and whose privacy its
# epsilon is about.
METHODS = (
    "dp-sgd",
    "dp-sgd-seeded-noise",
    "dp-dpo",
    "dp-dpo-seeded-noise",
    "dp-grpo",
    "dp-grpo-seeded-noise",
    "node-level-dp",
    "gaussian",
    "none",
)
PRIVACY_UNITS = ("example", "preference_pair", "prompt", "node")
V1_PAYLOAD_FIELDS: tuple[str, ...] = (
    "seq",
    "node",
    "run_id",
    "round",
    "base_model_fingerprint",
    "data_fingerprint",
    "mode",
    "steps",
    "sample_rate",
    "noise_multiplier",
    "max_grad_norm",
    "delta",
    "epsilon_round",
    "epsilon_after",
    "epsilon_cap",
    "accountant",
    "accountant_version",
    "recorded_at",
    "prev_hash",
)
VERSIONED_FIELDS: tuple[str, ...] = ("format", "kind", "method", "privacy_unit")
PAYLOAD_FIELDS: tuple[str, ...] = V1_PAYLOAD_FIELDS + VERSIONED_FIELDS
SEALED_FIELDS: tuple[str, ...] = ("hash", "signature")
MODES = ("dp", "non-private")
ACCOUNTANTS = ("rdp", "prv")
# Above this many entries, signatures are verified in worker processes.
PARALLEL_THRESHOLD = 2_000

Mode = Literal["dp", "non-private"]

_DERIVED_FIELDS = frozenset({"seq", "prev_hash"})
_INT_FIELDS = ("seq", "round", "steps")
_TEXT_FIELDS = ("node", "run_id", "base_model_fingerprint", "data_fingerprint")
_OPTIONAL_NUMBER_FIELDS = (
    "noise_multiplier",
    "max_grad_norm",
    "delta",
    "epsilon_round",
    "epsilon_after",
    "epsilon_cap",
)
_DP_REQUIRED_FIELDS = (
    "noise_multiplier",
    "max_grad_norm",
    "delta",
    "epsilon_round",
    "epsilon_after",
    "accountant",
)
_MAX_JSON_INT = 2**53 - 1  # RFC 8785 (I-JSON) integers
# Whose privacy each private method protects.
_UNIT_OF_METHOD = {
    "dp-sgd": "example",
    "dp-sgd-seeded-noise": "example",
    "dp-dpo": "preference_pair",
    "dp-dpo-seeded-noise": "preference_pair",
    "dp-grpo": "prompt",
    "dp-grpo-seeded-noise": "prompt",
    "gaussian": "example",
    "node-level-dp": "node",
}


# The private method of each training method (``training.method``); "-seeded-noise" names
# it apart when the noise came from a seeded generator (reproducible: it protects no one).
_PRIVATE_METHOD_OF_TRAINING = {"sft": "dp-sgd", "dpo": "dp-dpo", "grpo": "dp-grpo"}


def training_round_method(training_method: str, *, private: bool, seeded: bool) -> str:
    """The ``method`` a training round's entry records for a node training with
    ``training_method`` (``sft``, ``dpo``, ``grpo``); ``none`` when not private."""
    if not private:
        return "none"
    name = _PRIVATE_METHOD_OF_TRAINING[training_method]
    return f"{name}-seeded-noise" if seeded else name


def training_round_methods(training_method: str) -> frozenset[str]:
    """Every ``method`` a training round of ``training_method`` may record."""
    return frozenset(
        training_round_method(training_method, private=private, seeded=seeded)
        for private in (True, False)
        for seeded in (True, False)
    )


def privacy_unit_of(method: str) -> str:
    """Whose privacy a private ``method``'s epsilon is about (``KeyError`` for ``none``)."""
    return _UNIT_OF_METHOD[method]


_HEX_HASH = re.compile(r"[0-9a-f]{64}")
_UTC_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")
_CHECKPOINT_FIELDS = ("node", "seq", "head_hash", "signed_at", "signature")

SIGNATURE_REASON = (
    "signature does not match the public key: signed with another key, or its content and "
    "hash were changed without the key"
)
CONTENT_REASON = "content does not match its hash: the entry was edited after it was sealed"


class LedgerFormatError(FedtuneError, ValueError):
    """A ledger entry, checkpoint or file is malformed (missing, unknown or mistyped fields).

    ``line`` and ``seq`` locate the problem when known; ``detail`` is the message without
    the location.
    """

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        seq: int | None = None,
        detail: str | None = None,
    ):
        super().__init__(message)
        self.line = line
        self.seq = seq
        self.detail = message if detail is None else detail


def utc_now_text() -> str:
    """Now, in UTC, as ISO 8601 with microseconds and a ``Z``: ``2026-11-23T19:00:00.123456Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- entries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEntry:
    """One sealed round: the payload fields, its ``hash`` and its ``signature``.

    Construction checks every field (types, finiteness, ranges) and raises
    :class:`LedgerFormatError` naming the first bad one; it does not check the hash or the
    signature (see :func:`check_entry`).
    """

    seq: int
    node: str
    run_id: str
    round: int
    base_model_fingerprint: str
    data_fingerprint: str
    mode: Mode
    steps: int
    sample_rate: float
    noise_multiplier: float | None
    max_grad_norm: float | None
    delta: float | None
    epsilon_round: float | None
    epsilon_after: float | None
    epsilon_cap: float | None
    accountant: Literal["rdp", "prv"] | None
    accountant_version: str | None
    recorded_at: str
    prev_hash: str
    hash: str
    signature: str
    # Version 2 on (None in a version-1 entry, where they are not part of the payload).
    format: str | None = None
    kind: str | None = None
    method: str | None = None
    privacy_unit: str | None = None

    def __post_init__(self) -> None:
        try:
            normalised = _checked_payload(self.payload())
            _check_hex_hash("hash", self.hash)
            if not isinstance(self.signature, str) or decode_signature(self.signature) is None:
                raise ValueError("signature must be the base64 text of a 64-byte signature")
        except ValueError as error:
            seq = self.seq if _is_int(self.seq) else None
            raise LedgerFormatError(
                _with_seq(str(error), seq), seq=seq, detail=str(error)
            ) from None
        for name in (*_OPTIONAL_NUMBER_FIELDS, "sample_rate"):
            object.__setattr__(self, name, normalised[name])

    def payload(self) -> dict[str, Any]:
        """The hashed fields (``prev_hash`` included): a version-1 entry's without the
        versioned fields, exactly as it was sealed."""
        return {name: getattr(self, name) for name in _payload_fields(self.format)}

    @property
    def entry_kind(self) -> str:
        """What the entry records (a version-1 entry is a training round)."""
        return self.kind or "training_round"

    @property
    def privacy_method(self) -> str:
        """How the round was made private (inferred for a version-1 entry from its mode)."""
        if self.format is not None and self.method is not None:  # always both in version 2
            return self.method
        return version_one_reading(self.mode)[0]

    @property
    def protected_unit(self) -> str | None:
        """Whose privacy the epsilon is about (inferred for a version-1 entry)."""
        return self.privacy_unit if self.format is not None else version_one_reading(self.mode)[1]

    def to_dict(self) -> dict[str, Any]:
        """Payload, ``hash`` and ``signature``: what a ledger file's entry line holds."""
        return {**self.payload(), "hash": self.hash, "signature": self.signature}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEntry:
        """The entry ``data`` describes; ``LedgerFormatError`` names missing, unknown or
        mistyped fields."""
        if not isinstance(data, Mapping):
            raise LedgerFormatError(f"a ledger entry must be a JSON object, got {_kind(data)}")
        seq = data.get("seq") if _is_int(data.get("seq")) else None
        if "format" in data and data["format"] != ENTRY_FORMAT:
            detail = (
                f"entry format {data['format']!r} is not one this version of fedtune reads "
                f"({ENTRY_FORMAT!r}, or none for version 1): it was written by another "
                "version; upgrade fedtune to read it"
            )
            raise LedgerFormatError(_with_seq(detail, seq), seq=seq, detail=detail)
        fields = _payload_fields(data.get("format")) + SEALED_FIELDS
        missing = [name for name in fields if name not in data]
        unknown = sorted(str(name) for name in data if name not in fields)
        if missing or unknown:
            parts = []
            if missing:
                parts.append("missing fields: " + ", ".join(missing))
            if unknown:
                parts.append("unknown fields: " + ", ".join(unknown))
            detail = "; ".join(parts)
            raise LedgerFormatError(_with_seq(detail, seq), seq=seq, detail=detail)
        return cls(**{name: data[name] for name in fields})

    def content_matches(self) -> bool:
        """Whether ``hash`` is the hash of this entry's payload."""
        return entry_hash(self.payload()) == self.hash


def version_one_reading(mode: str) -> tuple[str, str | None]:
    """The method and privacy unit of a round recorded before entries said them (a version-1
    entry, or a fedtune 0.1 report): fedtune 0.1 trained with DP-SGD over examples, or
    without DP."""
    return ("dp-sgd", "example") if mode == "dp" else ("none", None)


def entry_hash(payload: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the 32 raw bytes of ``payload["prev_hash"]`` followed by the RFC 8785
    canonical JSON of ``payload`` (all its fields, ``prev_hash`` included)."""
    prev_hash = payload.get("prev_hash")
    _check_hex_hash("prev_hash", prev_hash)
    assert isinstance(prev_hash, str)
    return hashlib.sha256(bytes.fromhex(prev_hash) + rfc8785.dumps(dict(payload))).hexdigest()


def seal_entry(
    fields: Mapping[str, Any], *, previous: LedgerEntry | None, key: NodeKey
) -> LedgerEntry:
    """The entry that follows ``previous`` (None: the first), hashed and signed with ``key``.

    ``fields`` holds every payload field except ``seq`` and ``prev_hash``, which come from
    ``previous``; ``recorded_at`` may be left out and is then now. Raises ``ValueError``
    naming a missing, unknown or invalid field (NaN and infinity are refused: use None).
    """
    given = dict(fields)
    derived = sorted(_DERIVED_FIELDS & given.keys())
    if derived:
        raise ValueError(
            f"seal_entry derives {' and '.join(derived)} from the previous entry; leave "
            f"{'them' if len(derived) > 1 else 'it'} out"
        )
    given.setdefault("recorded_at", utc_now_text())
    given.setdefault("format", ENTRY_FORMAT)
    expected = [name for name in PAYLOAD_FIELDS if name not in _DERIVED_FIELDS]
    missing = [name for name in expected if name not in given]
    unknown = sorted(str(name) for name in given if name not in expected)
    if missing:
        raise ValueError("missing ledger fields: " + ", ".join(missing))
    if unknown:
        raise ValueError("unknown ledger fields: " + ", ".join(unknown))
    if previous is not None and given["node"] != previous.node:
        raise ValueError(
            f"entry for node {given['node']!r} cannot follow an entry of node {previous.node!r}"
        )
    payload = _checked_payload(
        {
            **given,
            "seq": 1 if previous is None else previous.seq + 1,
            "prev_hash": GENESIS_HASH if previous is None else previous.hash,
        }
    )
    digest = entry_hash(payload)
    return LedgerEntry(**payload, hash=digest, signature=key.sign(bytes.fromhex(digest)))


# --- checkpoints --------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A node's signature over its ledger's head: the last ``seq`` and its hash.

    ``seq`` is 0 and ``head_hash`` is ``GENESIS_HASH`` for an empty ledger. The signature is
    over the RFC 8785 canonical JSON of ``{node, seq, head_hash, signed_at}``.
    """

    node: str
    seq: int
    head_hash: str
    signed_at: str
    signature: str

    def __post_init__(self) -> None:
        try:
            _check_text("node", self.node)
            _check_int("seq", self.seq, minimum=0)
            _check_hex_hash("head_hash", self.head_hash)
            _check_time("signed_at", self.signed_at)
            if not isinstance(self.signature, str) or decode_signature(self.signature) is None:
                raise ValueError("signature must be the base64 text of a 64-byte signature")
        except ValueError as error:
            raise LedgerFormatError(f"checkpoint: {error}") from None

    def signed_message(self) -> bytes:
        """The bytes the signature covers."""
        return _checkpoint_message(
            node=self.node, seq=self.seq, head_hash=self.head_hash, signed_at=self.signed_at
        )

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _CHECKPOINT_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        """The checkpoint ``data`` describes; ``LedgerFormatError`` names bad fields."""
        if not isinstance(data, Mapping):
            raise LedgerFormatError(f"a checkpoint must be a JSON object, got {_kind(data)}")
        missing = [name for name in _CHECKPOINT_FIELDS if name not in data]
        unknown = sorted(str(name) for name in data if name not in _CHECKPOINT_FIELDS)
        if missing:
            raise LedgerFormatError("checkpoint: missing fields: " + ", ".join(missing))
        if unknown:
            raise LedgerFormatError("checkpoint: unknown fields: " + ", ".join(unknown))
        return cls(**{name: data[name] for name in _CHECKPOINT_FIELDS})


def sign_checkpoint(
    *, node: str, head: LedgerEntry | None, key: NodeKey, signed_at: str | None = None
) -> Checkpoint:
    """``key``'s signature over the head of ``node``'s ledger (``head`` None: empty ledger)."""
    if head is not None and head.node != node:
        raise ValueError(f"the head entry belongs to node {head.node!r}, not {node!r}")
    seq = 0 if head is None else head.seq
    head_hash = GENESIS_HASH if head is None else head.hash
    signed_at = signed_at or utc_now_text()
    message = _checkpoint_message(node=node, seq=seq, head_hash=head_hash, signed_at=signed_at)
    return Checkpoint(
        node=node, seq=seq, head_hash=head_hash, signed_at=signed_at, signature=key.sign(message)
    )


def _checkpoint_message(*, node: str, seq: int, head_hash: str, signed_at: str) -> bytes:
    return rfc8785.dumps({"node": node, "seq": seq, "head_hash": head_hash, "signed_at": signed_at})


# --- verification -------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerProblem:
    """The first thing wrong with a ledger.

    ``seq`` is the bad entry's seq (for a cut tail, the first missing seq; None for a problem
    of the checkpoint itself), ``position`` its 0-based index in the sequence verified, and
    ``line`` its line in a ledger file when there is one.
    """

    seq: int | None
    position: int | None
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.seq is not None:
            where.append(f"entry seq {self.seq}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason


@dataclass(frozen=True)
class ChainVerification:
    """Result of :func:`verify_chain`: ``entries_checked`` counts the entries found good
    before the first problem (all of them when ``ok``)."""

    ok: bool
    problem: LedgerProblem | None
    entries_checked: int


def check_entry(
    entry: LedgerEntry, *, previous: LedgerEntry | None, public_key: Ed25519PublicKey
) -> str | None:
    """Why ``entry`` does not follow ``previous`` (None: it should be the first) or does not
    verify under ``public_key``; None when it does.

    Checked in order: ``seq``, node, ``prev_hash``, content against ``hash``, signature.
    """
    reason = _chain_problem(entry, previous)
    if reason is not None:
        return reason
    if not verify_signature(public_key, signature=entry.signature, message=_raw(entry.hash)):
        return SIGNATURE_REASON
    return None


def verify_chain(
    entries: Sequence[LedgerEntry],
    *,
    public_key: Ed25519PublicKey,
    checkpoint: Checkpoint | None,
    parallel_threshold: int = PARALLEL_THRESHOLD,
    workers: int | None = None,
) -> ChainVerification:
    """Check every entry in order, then that ``checkpoint`` signs the last one.

    Reports the first bad entry, exactly as checking the entries one by one would. With more
    than ``parallel_threshold`` entries and more than one worker (default: the CPUs this
    process may use), signatures are verified in worker processes while this one hashes the
    chain. A missing checkpoint fails: without it a cut-off tail goes unseen.
    """
    if parallel_threshold < 0:
        raise ValueError(f"parallel_threshold must be >= 0, got {parallel_threshold}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    workers = workers or _usable_cpus()
    if len(entries) > parallel_threshold and workers > 1:
        try:
            position, reason = _first_problem_parallel(entries, public_key, workers=workers)
        except (BrokenProcessPool, OSError):  # no worker processes here: do it all in this one
            position, reason = _first_problem_sequential(entries, public_key)
    else:
        position, reason = _first_problem_sequential(entries, public_key)
    if position is not None:
        assert reason is not None
        problem = LedgerProblem(seq=entries[position].seq, position=position, reason=reason)
        return ChainVerification(ok=False, problem=problem, entries_checked=position)
    late = _checkpoint_problem(entries, checkpoint, public_key)
    return ChainVerification(ok=late is None, problem=late, entries_checked=len(entries))


def _chain_problem(entry: LedgerEntry, previous: LedgerEntry | None) -> str | None:
    """Everything but the signature: seq, node, prev_hash, content."""
    if entry.seq != _expected_seq(previous):
        return _seq_reason(entry, previous)
    if previous is not None and entry.node != previous.node:
        return f"node {entry.node!r} differs from the previous entry's node {previous.node!r}"
    if previous is None:
        if entry.prev_hash != GENESIS_HASH:
            return "prev_hash of the first entry is not the genesis hash (0 x 64)"
    elif entry.prev_hash != previous.hash:
        return (
            f"prev_hash does not match the hash of the entry before it (seq {previous.seq}): "
            "it was not sealed after that entry (spliced in or replaced)"
        )
    if entry_hash(entry.payload()) != entry.hash:
        return CONTENT_REASON
    if previous is not None and previous.format is not None and entry.format is None:
        return (
            "a version-1 entry after a version-2 one: fedtune never seals an entry in an older "
            "format than the one before it"
        )
    return None


def _expected_seq(previous: LedgerEntry | None) -> int:
    return 1 if previous is None else previous.seq + 1


def _seq_reason(entry: LedgerEntry, previous: LedgerEntry | None) -> str:
    """Why ``entry.seq`` cannot follow ``previous``, from these two entries alone."""
    expected = _expected_seq(previous)
    if previous is None:
        return f"the ledger starts at seq {entry.seq}: {_missing(1, entry.seq - 1)}"
    if entry.seq > expected:
        return f"seq {entry.seq} follows seq {previous.seq}: {_missing(expected, entry.seq - 1)}"
    if entry.seq == previous.seq:
        return f"seq {entry.seq} repeats the previous entry's seq: duplicated or inserted entry"
    return f"seq {entry.seq} follows seq {previous.seq}: out of order, or an inserted entry"


def _seq_reason_in_context(entries: Sequence[LedgerEntry], position: int) -> str:
    """Like :func:`_seq_reason`, told apart further by the entries before and after."""
    entry = entries[position]
    previous = entries[position - 1] if position else None
    expected = _expected_seq(previous)
    if entry.seq < expected:
        for index in range(position):
            if entries[index].seq == entry.seq:
                if entries[index].hash == entry.hash:
                    return f"seq {entry.seq} appears a second time, a copy: duplicated entry"
                return f"seq {entry.seq} appears a second time, with other content: inserted entry"
        return _seq_reason(entry, previous)
    later = {e.seq for e in entries[position + 1 :]}
    if expected in later:
        return (
            f"seq {entry.seq} stands where seq {expected} belongs, and seq {expected} comes "
            "later: entries out of order"
        )
    # Counted, not listed: a forged seq near 2**53 must not make a list that long.
    present = sum(1 for seq in later if expected <= seq < entry.seq)
    absent_count = entry.seq - expected - present
    if present == 0:
        return _seq_reason(entry, previous)
    absent = list(
        itertools.islice((seq for seq in range(expected, entry.seq) if seq not in later), 5)
    )
    return (
        f"seq {entry.seq} stands where seq {expected} belongs: entries out of order, and "
        f"seq {_listed(absent, absent_count)} missing (deleted?)"
    )


def _listed(shown_numbers: Sequence[int], total: int) -> str:
    shown = ", ".join(map(str, shown_numbers))
    more = total - len(shown_numbers)
    return shown if more <= 0 else f"{shown} and {more} more"


def _missing(first: int, last: int) -> str:
    if first == last:
        return f"seq {first} is missing (deleted?)"
    return f"{last - first + 1} entries (seq {first}-{last}) are missing (deleted?)"


def _first_problem_sequential(
    entries: Sequence[LedgerEntry], public_key: Ed25519PublicKey
) -> tuple[int | None, str | None]:
    previous = None
    for position, entry in enumerate(entries):
        reason = check_entry(entry, previous=previous, public_key=public_key)
        if reason is not None:
            if entry.seq != _expected_seq(previous):
                reason = _seq_reason_in_context(entries, position)
            return position, reason
        previous = entry
    return None, None


def _first_chain_problem(entries: Sequence[LedgerEntry]) -> tuple[int | None, str | None]:
    previous = None
    for position, entry in enumerate(entries):
        reason = _chain_problem(entry, previous)
        if reason is not None:
            if entry.seq != _expected_seq(previous):
                reason = _seq_reason_in_context(entries, position)
            return position, reason
        previous = entry
    return None, None


def _first_problem_parallel(
    entries: Sequence[LedgerEntry], public_key: Ed25519PublicKey, *, workers: int
) -> tuple[int | None, str | None]:
    """Signatures in ``workers`` processes, chain here; the earliest problem wins, and for
    one entry the chain's reason comes before the signature's (as in :func:`check_entry`)."""
    raw_key = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    size = max(256, math.ceil(len(entries) / (workers * 8)))
    starts = range(0, len(entries), size)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_process_context())
    try:
        futures: list[Future[int | None]] = [
            pool.submit(
                _first_bad_signature,
                raw_key,
                start,
                [(e.hash, e.signature) for e in entries[start : start + size]],
            )
            for start in starts
        ]
        chain_position, chain_reason = _first_chain_problem(entries)
        limit = len(entries) if chain_position is None else chain_position + 1
        for start, future in zip(starts, futures, strict=True):
            if start >= limit:
                break
            bad = future.result()
            if bad is not None and bad < limit:
                if bad == chain_position:
                    break
                return bad, SIGNATURE_REASON
        return chain_position, chain_reason
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _first_bad_signature(
    public_key_raw: bytes, start: int, items: list[tuple[str, str]]
) -> int | None:
    """Index (from ``start``) of the first (hash, signature) pair that does not verify."""
    key = Ed25519PublicKey.from_public_bytes(public_key_raw)
    for offset, (digest, signature) in enumerate(items):
        if not verify_signature(key, signature=signature, message=_raw(digest)):
            return start + offset
    return None


def _checkpoint_problem(
    entries: Sequence[LedgerEntry], checkpoint: Checkpoint | None, public_key: Ed25519PublicKey
) -> LedgerProblem | None:
    if checkpoint is None:
        return LedgerProblem(
            seq=None,
            position=None,
            reason="no signed checkpoint of the ledger's head: a cut-off tail would go unseen",
        )
    if not verify_signature(
        public_key, signature=checkpoint.signature, message=checkpoint.signed_message()
    ):
        return LedgerProblem(
            seq=None,
            position=None,
            reason="the checkpoint's signature does not match the public key",
        )
    last = entries[-1] if entries else None
    last_seq = 0 if last is None else last.seq
    if last is not None and checkpoint.node != last.node:
        return LedgerProblem(
            seq=None,
            position=None,
            reason=f"the checkpoint is for node {checkpoint.node!r}, the entries for {last.node!r}",
        )
    if checkpoint.seq > last_seq:
        cut = checkpoint.seq - last_seq
        return LedgerProblem(
            seq=last_seq + 1,
            position=len(entries),
            reason=(
                f"tail cut: the ledger ends at seq {last_seq} but the signed checkpoint covers "
                f"seq {checkpoint.seq} ({cut} {'entry' if cut == 1 else 'entries'} missing at "
                "the end)"
            ),
        )
    if checkpoint.seq < last_seq:
        return LedgerProblem(
            seq=checkpoint.seq + 1,
            position=checkpoint.seq,
            reason=(
                f"entries after the signed checkpoint: the ledger goes on to seq {last_seq} but "
                f"the checkpoint covers only seq {checkpoint.seq} (appended later, or a stale "
                "checkpoint)"
            ),
        )
    if checkpoint.head_hash != (GENESIS_HASH if last is None else last.hash):
        return LedgerProblem(
            seq=last.seq if last is not None else None,
            position=len(entries) - 1 if last is not None else None,
            reason=(
                "the checkpoint's head hash does not match the last entry: the head was replaced"
            ),
        )
    return None


def _process_context() -> multiprocessing.context.BaseContext:
    """A fork server where there is one (safe in a process with threads), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _raw(digest: str) -> bytes:
    return bytes.fromhex(digest)


# --- field checks -------------------------------------------------------------------------


def _payload_fields(entry_format: object) -> tuple[str, ...]:
    return V1_PAYLOAD_FIELDS if entry_format is None else PAYLOAD_FIELDS


def _check_versioned(out: Mapping[str, Any]) -> None:
    """The version-2 fields: a known format and kind, and a method and privacy unit that
    fit the mode."""
    if out["format"] != ENTRY_FORMAT:
        raise ValueError(f"format must be {ENTRY_FORMAT!r}, got {out['format']!r}")
    if out["kind"] not in KINDS:
        raise ValueError(
            f"kind {out['kind']!r} is not one this version of fedtune knows "
            f"({', '.join(KINDS)}); upgrade fedtune to read it"
        )
    if out["method"] not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {out['method']!r}")
    if (out["kind"] == "metric_release") != (out["method"] == "gaussian"):
        raise ValueError("a metric_release is made private by the 'gaussian' method, and only it")
    if out["kind"] == "metric_release" and (out["mode"], out["privacy_unit"]) != ("dp", "example"):
        raise ValueError("a metric_release is a dp release about examples")
    private = out["mode"] == "dp"
    if private and out["method"] == "none":
        raise ValueError("a dp round needs a method other than 'none'")
    if not private and out["method"] != "none":
        raise ValueError(f"a non-private round's method is 'none', got {out['method']!r}")
    if private and out["privacy_unit"] != _UNIT_OF_METHOD[out["method"]]:
        raise ValueError(
            f"privacy_unit of a {out['method']} entry must be "
            f"{_UNIT_OF_METHOD[out['method']]!r}, got {out['privacy_unit']!r}"
        )
    if not private and out["privacy_unit"] is not None:
        raise ValueError("a non-private round protects nobody: privacy_unit must be null")


def _checked_payload(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with numbers as floats; ``ValueError`` naming the first bad field."""
    out = dict(values)
    if out.get("format") is not None:
        _check_versioned(out)
    for name in _INT_FIELDS:
        _check_int(name, out[name], minimum=1 if name == "seq" else 0)
    for name in _TEXT_FIELDS:
        _check_text(name, out[name])
    if out["mode"] not in MODES:
        raise ValueError(f"mode must be 'dp' or 'non-private', got {out['mode']!r}")
    out["sample_rate"] = _check_number("sample_rate", out["sample_rate"])
    if out["sample_rate"] < 0:
        raise ValueError(f"sample_rate must not be negative, got {out['sample_rate']!r}")
    if out["mode"] == "dp" and out["sample_rate"] > 1:  # a batch share may exceed 1 without DP
        raise ValueError(f"sample_rate of a dp round must be at most 1, got {out['sample_rate']!r}")
    for name in _OPTIONAL_NUMBER_FIELDS:
        if out[name] is not None:
            out[name] = _check_number(name, out[name])
            if out[name] < 0:
                raise ValueError(f"{name} must not be negative, got {out[name]!r}")
    if out["delta"] is not None and not 0 < out["delta"] < 1:
        raise ValueError(f"delta must be in (0, 1), got {out['delta']!r}")
    if out["accountant"] is not None and out["accountant"] not in ACCOUNTANTS:
        raise ValueError(f"accountant must be 'rdp', 'prv' or null, got {out['accountant']!r}")
    if out["accountant_version"] is not None:
        _check_text("accountant_version", out["accountant_version"])
    if out["mode"] == "dp":
        absent = [name for name in _DP_REQUIRED_FIELDS if out[name] is None]
        if absent:
            raise ValueError("a dp round needs " + ", ".join(absent) + " (got null)")
    elif out["epsilon_round"] is not None:
        raise ValueError("a non-private round has no finite epsilon: epsilon_round must be null")
    _check_time("recorded_at", out["recorded_at"])
    _check_hex_hash("prev_hash", out["prev_hash"])
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {_kind(value)}")
    assert isinstance(value, int)
    if not minimum <= value <= _MAX_JSON_INT:
        raise ValueError(f"{name} must be between {minimum} and 2**53 - 1, got {value}")


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {_kind(value)}")
    if isinstance(value, int) and abs(value) > _MAX_JSON_INT:
        raise ValueError(f"{name} is too large for JSON: {value}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number} (non-private rounds use null)")
    return number


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {_kind(value)}")
    try:  # JSON can spell a lone surrogate (\ud800), which RFC 8785 cannot canonicalise
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not valid Unicode text (a lone surrogate)") from None


def _check_hex_hash(name: str, value: object) -> None:
    if not isinstance(value, str) or not _HEX_HASH.fullmatch(value):
        raise ValueError(f"{name} must be 64 lowercase hex digits, got {_kind(value)}")


def _check_time(name: str, value: object) -> None:
    if not isinstance(value, str) or not _UTC_TIME.fullmatch(value):
        raise ValueError(
            f"{name} must be UTC ISO 8601 ending in Z (2026-11-23T19:00:00.123456Z), "
            f"got {_kind(value)}"
        )
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} is not a valid date and time: {value!r}") from None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value) if len(value) <= 70 else repr(value[:67] + "...")
    if isinstance(value, bool | int | float):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


def _with_seq(message: str, seq: int | None) -> str:
    return message if seq is None else f"entry seq {seq}: {message}"


__all__ = [
    "ACCOUNTANTS",
    "CONTENT_REASON",
    "ENTRY_FORMAT",
    "GENESIS_HASH",
    "KINDS",
    "LEDGER_FORMAT",
    "LEDGER_FORMATS_READ",
    "METHODS",
    "MODES",
    "PARALLEL_THRESHOLD",
    "PAYLOAD_FIELDS",
    "PRIVACY_UNITS",
    "SEALED_FIELDS",
    "SIGNATURE_REASON",
    "V1_PAYLOAD_FIELDS",
    "VERSIONED_FIELDS",
    "ChainVerification",
    "Checkpoint",
    "LedgerEntry",
    "LedgerFormatError",
    "LedgerProblem",
    "check_entry",
    "entry_hash",
    "privacy_unit_of",
    "seal_entry",
    "sign_checkpoint",
    "training_round_method",
    "training_round_methods",
    "utc_now_text",
    "verify_chain",
    "version_one_reading",
]
