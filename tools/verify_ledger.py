#!/usr/bin/env python3
"""Verify a fedtune epsilon ledger file without fedtune, from docs/ledger-format.md alone.

    python tools/verify_ledger.py LEDGER.jsonl --public-key KEY [--witness-key KEY]
        [--coordinator-copy COPY.jsonl]

KEY: the base64 text of a raw 32-byte Ed25519 public key, or a PEM file. Prints one line,
"VERIFIED node N: ..." (exit 0) or "FAILED: <class>: <detail>" (exit 1), notes on stderr;
exit 2 when the input cannot be used. Needs only the standard library, cryptography, rfc8785.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import io
import json
import math
import re
import sys
from datetime import datetime
from pathlib import Path

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

GENESIS = "0" * 64
FILE_FORMATS = ("fedtune-ledger/1", "fedtune-ledger/2", "fedtune-ledger/3")
V1_FIELDS = (
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
V2_FIELDS = (*V1_FIELDS, "format", "kind", "method", "privacy_unit")
OPTIONAL_NUMBERS = (
    "noise_multiplier",
    "max_grad_norm",
    "delta",
    "epsilon_round",
    "epsilon_after",
    "epsilon_cap",
)
DP_REQUIRED = (
    "noise_multiplier",
    "max_grad_norm",
    "delta",
    "epsilon_round",
    "epsilon_after",
    "accountant",
)
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
UNIT_OF_METHOD = {
    "dp-sgd": "example",
    "dp-sgd-seeded-noise": "example",
    "dp-dpo": "preference_pair",
    "dp-dpo-seeded-noise": "preference_pair",
    "dp-grpo": "prompt",
    "dp-grpo-seeded-noise": "prompt",
    "gaussian": "example",
    "node-level-dp": "node",
}
CHECKPOINT_FIELDS = ("node", "seq", "head_hash", "signed_at", "signature")
RECEIPT_FIELDS = ("format", "node", "seq", "head_hash", "witness", "witnessed_at", "signature")
HEX = re.compile(r"[0-9a-f]{64}")
TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(\.[0-9]{1,6})?Z"
)
MAX_INT = 2**53 - 1


class Failed(Exception):
    """Verification failed: ``kind`` is the failure class of the doc's section 6."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")


class Unusable(Exception):
    """The input cannot be used at all (exit 2)."""


# --- form (sections 2 and 3) ----------------------------------------------------------------


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def is_int(v: object, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= MAX_INT


def is_number(v: object) -> bool:  # finite, >= 0, an integer within 2**53 - 1
    return (isinstance(v, float) and math.isfinite(v) and v >= 0) or (
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_INT
    )


def is_text(v: object) -> bool:
    return isinstance(v, str) and v != ""


def is_hash(v: object) -> bool:
    return isinstance(v, str) and HEX.fullmatch(v) is not None


def is_time(v: object) -> bool:
    match = TIME.fullmatch(v) if isinstance(v, str) else None
    try:
        return match is not None and bool(datetime(*(int(g) for g in match.groups()[:6])))
    except ValueError:  # not a real date and time
        return False


def raw_base64(value: object, size: int) -> bytes | None:
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size else None


def optional(rule):  # type: ignore[no-untyped-def]
    return lambda v: v is None or rule(v)


RULES = {  # field: (rule, what it must be)
    "seq": (lambda v: is_int(v, 1), "an integer >= 1"),
    "round": (lambda v: is_int(v, 0), "an integer >= 0"),
    "steps": (lambda v: is_int(v, 0), "an integer >= 0"),
    "mode": (lambda v: v in ("dp", "non-private"), "dp or non-private"),
    "sample_rate": (is_number, "a finite number >= 0"),
    "accountant": (lambda v: v in ("rdp", "prv", None), "rdp, prv or null"),
    "accountant_version": (optional(is_text), "a non-empty string or null"),
    "signature": (lambda v: raw_base64(v, 64) is not None, "base64 of 64 bytes"),
    "witness": (lambda v: raw_base64(v, 32) is not None, "base64 of a 32-byte key"),
    "kind": (
        lambda v: v in ("training_round", "metric_release"),
        "a known kind (training_round, metric_release)",
    ),
    "method": (lambda v: v in METHODS, "one of " + ", ".join(METHODS)),
    "privacy_unit": (
        lambda v: v in ("example", "preference_pair", "prompt", "node", None),
        "example, preference_pair, prompt, node or null",
    ),
    "format": (lambda v: True, ""),
    **{name: (optional(is_number), "a finite number >= 0 or null") for name in OPTIONAL_NUMBERS},
    **{
        name: (is_text, "a non-empty string")
        for name in (
            "node",
            "run_id",
            "base_model_fingerprint",
            "data_fingerprint",
            "public_key",
            "exported_at",
        )
    },
    **{name: (is_hash, "64 lowercase hex digits") for name in ("prev_hash", "hash", "head_hash")},
    **{
        name: (is_time, "a UTC time like 2026-12-01T10:00:00.000000Z")
        for name in ("recorded_at", "signed_at", "witnessed_at")
    },
}


def check_fields(record: dict, fields: tuple, what: str, exact: bool = True, **rules) -> None:
    missing = [name for name in fields if name not in record]
    unknown = sorted(name for name in record if name not in fields) if exact else []
    need(not missing, f"{what}: missing fields: {', '.join(missing)}")
    need(not unknown, f"{what}: unknown fields: {', '.join(unknown)}")
    for name in fields:
        rule, must = rules.get(name) or RULES[name]
        need(rule(record[name]), f"{what}: {name} must be {must}")


def check_entry(record: dict) -> None:
    if "format" in record:
        need(
            record["format"] == "fedtune-entry/2",
            f"entry format {record['format']!r} is not known: written by another version",
        )
    v2 = "format" in record
    check_fields(record, (V2_FIELDS if v2 else V1_FIELDS) + ("hash", "signature"), "entry")
    dp = record["mode"] == "dp"
    need(not dp or record["sample_rate"] <= 1, "sample_rate of a dp round must be at most 1")
    need(record["delta"] is None or 0 < record["delta"] < 1, "delta must be in (0, 1)")
    need(
        not dp or all(record[name] is not None for name in DP_REQUIRED),
        f"a dp round needs {', '.join(DP_REQUIRED)}",
    )
    need(dp or record["epsilon_round"] is None, "a non-private round's epsilon_round is null")
    if v2:
        need(dp == (record["method"] != "none"), "method is 'none' exactly when non-private")
        need(
            record["privacy_unit"] == (UNIT_OF_METHOD.get(record["method"]) if dp else None),
            "privacy_unit must be node for node-level-dp, preference_pair for dp-dpo and "
            "dp-dpo-seeded-noise, prompt for dp-grpo and dp-grpo-seeded-noise, example for the "
            "other dp methods, null when non-private",
        )
        need(
            (record["kind"] == "metric_release") == (record["method"] == "gaussian"),
            "a metric_release is made private by the gaussian method, and only it",
        )


def unique_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    need(len(set(keys)) == len(keys), "a key appears twice")
    return dict(pairs)


def read_ledger(path: Path, label: str = "") -> dict:
    """Section 3: the header, entries, checkpoint and receipts, or Failed("malformed")."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise Unusable(f"cannot read {path}: {error.strerror or error}") from None
    ledger: dict = {"header": None, "entries": [], "checkpoint": None, "receipts": []}
    number = 0
    try:
        lines = io.StringIO(data.decode("utf-8"), newline=None)  # LF, CR LF, CR only
        for number, line in enumerate(lines, start=1):  # noqa: B007 (used on error)
            if line.strip():
                add_line(ledger, line)
    except UnicodeDecodeError:
        raise Failed("malformed", f"{label}{path}: not UTF-8 text") from None
    except ValueError as error:
        raise Failed("malformed", f"{label}{path}, line {number}: {error}") from None
    if ledger["header"] is None:
        raise Failed("malformed", f"{label}{path}: empty, no header line")
    return ledger


def add_line(ledger: dict, line: str) -> None:
    try:
        record = json.loads(line, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg})") from None
    need(isinstance(record, dict), "not a JSON object")
    json.dumps(record, ensure_ascii=False).encode("utf-8")  # lone surrogates: UnicodeError
    kind = record.pop("type", None)
    if ledger["header"] is None:
        need(kind == "header", "the first line must be the header")
        check_fields(record, ("format", "node", "public_key", "exported_at"), "header", False)
        need(record["format"] in FILE_FORMATS, f"file format {record['format']!r} is not known")
        ledger["header"] = record
    elif kind == "entry":
        need(ledger["checkpoint"] is None, "an entry after the checkpoint")
        check_entry(record)
        ledger["entries"].append(record)
    elif kind == "checkpoint":
        need(ledger["checkpoint"] is None, "a second checkpoint")
        check_fields(record, CHECKPOINT_FIELDS, "checkpoint", seq=RULES["round"])
        ledger["checkpoint"] = record
    elif kind == "receipt":
        need(ledger["header"]["format"] == "fedtune-ledger/3", "a receipt in a /1 or /2 file")
        need(ledger["checkpoint"] is not None, "a receipt before the checkpoint")
        check_fields(record, RECEIPT_FIELDS, "receipt")
        need(record["format"] == "fedtune-receipt/1", "receipt: format must be fedtune-receipt/1")
        need(
            not ledger["receipts"] or record["seq"] >= ledger["receipts"][-1]["seq"],
            "receipts out of seq order",
        )
        ledger["receipts"].append(record)
    else:
        need(kind != "header", "a second header")
        raise ValueError(f"unknown line type {kind!r}")


# --- signatures and chain (sections 5 and 7) --------------------------------------------------


def signed(key: Ed25519PublicKey, signature: str, message: bytes) -> bool:
    try:
        key.verify(base64.b64decode(signature), message)
    except InvalidSignature:
        return False
    return True


def entry_hash(entry: dict) -> str:
    payload = {name: entry[name] for name in (V2_FIELDS if "format" in entry else V1_FIELDS)}
    canonical = rfc8785.dumps(payload)
    return hashlib.sha256(bytes.fromhex(entry["prev_hash"]) + canonical).hexdigest()


def seq_detail(entries: list, index: int, expected: int) -> str:
    seq = entries[index]["seq"]
    where = f"entry seq {seq} stands where seq {expected} belongs"
    earlier = [e for e in entries[:index] if e["seq"] == seq]
    if earlier:
        same = earlier[0]["hash"] == entries[index]["hash"]
        return f"{where}: seq {seq} a second time ({'duplicated' if same else 'inserted'})"
    if seq > expected and all(e["seq"] != expected for e in entries[index + 1 :]):
        return f"{where}: seq {expected}-{seq - 1} missing (deleted)"
    return f"{where}: entries reordered (or inserted)"


def verify_chain(ledger: dict, key: Ed25519PublicKey) -> None:
    entries, previous = ledger["entries"], None
    for index, entry in enumerate(entries):
        expected = 1 if previous is None else previous["seq"] + 1
        if entry["seq"] != expected:
            raise Failed("chain", seq_detail(entries, index, expected))
        seq = f"entry seq {entry['seq']}"
        if previous is not None and entry["node"] != previous["node"]:
            raise Failed("chain", f"{seq}: node changes from {previous['node']!r}")
        if entry["prev_hash"] != (GENESIS if previous is None else previous["hash"]):
            raise Failed("chain", f"{seq}: prev_hash is not the previous hash (spliced in)")
        if entry_hash(entry) != entry["hash"]:
            raise Failed("content", f"{seq}: content does not match its hash (edited)")
        if previous is not None and "format" in previous and "format" not in entry:
            raise Failed("chain", f"{seq}: a version-1 entry after a version-2 one")
        if not signed(key, entry["signature"], bytes.fromhex(entry["hash"])):
            raise Failed("signature", f"{seq}: not signed by the node key")
        previous = entry
    point = ledger["checkpoint"]
    if point is None:
        raise Failed("checkpoint", "missing: a cut-off tail would go unseen")
    message = rfc8785.dumps({name: point[name] for name in CHECKPOINT_FIELDS[:4]})
    if not signed(key, point["signature"], message):
        raise Failed("checkpoint", "its signature does not match the node key")
    last_seq = previous["seq"] if previous else 0
    if previous is not None and point["node"] != previous["node"]:
        raise Failed("checkpoint", f"it names node {point['node']!r}, the entries another")
    if point["seq"] > last_seq:
        raise Failed(
            "checkpoint",
            f"tail cut: the ledger ends at seq {last_seq} but the "
            f"checkpoint signs seq {point['seq']}",
        )
    if point["seq"] < last_seq:
        raise Failed(
            "checkpoint",
            f"stale: it signs seq {point['seq']} but the ledger goes on to seq {last_seq}",
        )
    if point["head_hash"] != (previous["hash"] if previous else GENESIS):
        raise Failed("checkpoint", f"head replaced: seq {last_seq} is not the signed head")
    node = ledger["header"]["node"]
    if (entries and entries[0]["node"] != node) or point["node"] != node:
        raise Failed("malformed", f"the header names node {node!r}, the entries another")


def check_head(ledger: dict, seq: int, head_hash: str, when: str, who: str) -> None:
    """Sections 7.3 and 7.4: the ledger must reach head (seq, head_hash) unchanged."""
    entries = ledger["entries"]
    last = entries[-1]["seq"] if entries else 0
    if seq > last:
        raise Failed(
            "rollback",
            f"rolled back: {who} seq {seq} (at {when}) but the ledger ends at seq {last}",
        )
    ours = entries[seq - 1]["hash"]  # the chain is verified: entries[i] has seq i + 1
    if ours != head_hash:
        raise Failed(
            "fork",
            f"forked: {who} seq {seq} with hash {head_hash[:12]}, the "
            f"ledger's seq {seq} has hash {ours[:12]}",
        )


def check_receipts(ledger: dict, receipts: list, witness: Ed25519PublicKey, who: str) -> int:
    node, w_text = ledger["header"]["node"], key_text(witness)
    others = [r for r in receipts if r["witness"] != w_text]
    if others:
        print(f"note: {len(others)} receipts from other witnesses set aside", file=sys.stderr)
    receipts = [r for r in receipts if r["witness"] == w_text]
    for receipt in receipts:
        s = receipt["seq"]
        if receipt["node"] != node:
            raise Failed("receipt", f"receipt for seq {s} names node {receipt['node']!r}")
        message = rfc8785.dumps({name: receipt[name] for name in RECEIPT_FIELDS[:6]})
        if not signed(witness, receipt["signature"], message):
            raise Failed(
                "receipt", f"receipt for seq {s}: signature does not match the witness key"
            )
    for receipt in sorted(receipts, key=lambda r: r["seq"]):
        check_head(ledger, receipt["seq"], receipt["head_hash"], receipt["witnessed_at"], who)
    return max((r["seq"] for r in receipts), default=0)


def check_copy(
    ledger: dict, copy: dict, key: Ed25519PublicKey, witness: Ed25519PublicKey | None
) -> int:
    node, who = ledger["header"]["node"], "the coordinator's copy holds"
    if copy["header"]["node"] != node:
        raise Failed("malformed", f"coordinator copy: it is node {copy['header']['node']!r}'s")
    for entry in copy["entries"]:
        seq = f"coordinator copy: entry seq {entry['seq']}"
        if entry["node"] != node:
            raise Failed("malformed", f"{seq}: of node {entry['node']!r}")
        if entry_hash(entry) != entry["hash"]:
            raise Failed("content", f"{seq}: content does not match its hash")
        if not signed(key, entry["signature"], bytes.fromhex(entry["hash"])):
            raise Failed("signature", f"{seq}: not signed by the node key")
        check_head(ledger, entry["seq"], entry["hash"], entry["recorded_at"], who)
    if witness is not None:
        check_receipts(ledger, copy["receipts"], witness, who)
    return len(copy["entries"])


# --- keys and the command ---------------------------------------------------------------------


def key_text(key: Ed25519PublicKey) -> str:
    return base64.b64encode(key.public_bytes_raw()).decode("ascii")


def load_key(value: str, what: str) -> Ed25519PublicKey:
    try:
        data = Path(value).read_bytes() if Path(value).is_file() else value.encode()
    except (OSError, ValueError) as error:
        raise Unusable(f"cannot read the {what} key {value}: {error}") from None
    data = data.strip()
    if data.startswith(b"-----BEGIN"):
        try:
            key = load_pem_public_key(data)
        except ValueError:
            key = None
        if isinstance(key, Ed25519PublicKey):
            return key
        raise Unusable(f"the {what} key is not an Ed25519 public key in PEM")
    raw = raw_base64(data.decode("ascii", errors="replace"), 32)
    if raw is None:
        raise Unusable(f"the {what} key is neither a PEM file nor base64 of 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify(args: argparse.Namespace) -> tuple[str, list[str]]:
    key = load_key(args.public_key, "public")
    witness = load_key(args.witness_key, "witness") if args.witness_key else None
    ledger = read_ledger(args.ledger)
    copy = (
        read_ledger(args.coordinator_copy, "coordinator copy ") if args.coordinator_copy else None
    )
    header, entries, notes = ledger["header"], ledger["entries"], []
    if header["public_key"] != key_text(key):
        notes.append(
            "the header names another public key than the one given; the given one was used"
        )
    try:
        verify_chain(ledger, key)
        last = entries[-1]["seq"] if entries else 0
        done = f"{len(entries)} entries, chain intact, every signature valid, head signed"
        if witness is None:
            if ledger["receipts"]:
                notes.append(f"{len(ledger['receipts'])} receipts not checked: no witness key")
        else:
            seen = check_receipts(ledger, ledger["receipts"], witness, "the coordinator witnessed")
            done += f", witnessed to seq {seen}"
            if not ledger["receipts"]:
                notes.append("no receipt: nothing in the file shows the coordinator saw it")
            elif seen < last:
                notes.append(
                    f"seq {seen + 1}-{last} not witnessed (trained alone, or receipts removed)"
                )
        if copy is not None:
            done += (
                f", {check_copy(ledger, copy, key, witness)} entries of the coordinator's "
                "copy matched"
            )
    except (rfc8785.CanonicalizationError, UnicodeError) as error:  # unreachable after reading
        raise Failed("malformed", f"cannot canonicalize: {error}") from None
    return f"VERIFIED node {header['node']}: {done}", notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ledger", type=Path)
    parser.add_argument("--public-key", required=True, help="the node's key: base64 or PEM file")
    parser.add_argument("--witness-key", help="the coordinator's witness key: base64 or PEM")
    parser.add_argument("--coordinator-copy", type=Path, help="the coordinator's export")
    args = parser.parse_args(argv)
    try:
        verdict, notes = verify(args)
    except Unusable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Failed as failure:
        print(f"FAILED: {failure}")
        return 1
    print(verdict)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
