"""The test vectors of docs/ledger-format.md, computed with fedtune's own code.

``python tests/ledger_vectors.py`` prints them (to paste into the doc when the format changes
on purpose); tests/test_ledger_format_doc.py recomputes them and fails if the doc drifts.
The receipt is made with plain ``cryptography`` + ``rfc8785`` as the spec says (fedtune's
receipt module is not on this branch).
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.privacy.ledger import (
    GENESIS_HASH,
    LedgerEntry,
    entry_hash,
    seal_entry,
    sign_checkpoint,
)
from fedtune.privacy.signing import NodeKey, public_key_text

# RFC 8032 section 7.1, tests 1 and 2: an implementer can check the public keys there too.
NODE_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
WITNESS_SEED = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb"
NODE = "hospital-a"
EXPORTED_AT = "2026-12-01T12:00:00.000000Z"
SIGNED_AT = "2026-12-01T10:05:00.000000Z"
WITNESSED_AT = "2026-12-01T10:05:01.250000Z"

ENTRY_1 = {
    "node": NODE,
    "run_id": "run-1",
    "round": 1,
    "base_model_fingerprint": "sha256:" + "b" * 64,
    "data_fingerprint": "sha256:" + "d" * 64,
    "mode": "dp",
    "steps": 20,
    "sample_rate": 0.01,
    "noise_multiplier": 1.1,
    "max_grad_norm": 1.0,
    "delta": 1e-5,
    "epsilon_round": 0.5,
    "epsilon_after": 0.5,
    "epsilon_cap": 8.0,
    "accountant": "rdp",
    "accountant_version": "opacus-1.6.0",
    "kind": "training_round",
    "method": "dp-sgd",
    "privacy_unit": "example",
    "recorded_at": "2026-12-01T10:00:00.000000Z",
}
ENTRY_2 = {
    **ENTRY_1,
    "round": 2,
    "mode": "non-private",
    "noise_multiplier": None,
    "max_grad_norm": None,
    "delta": None,
    "epsilon_round": None,
    "epsilon_after": None,
    "epsilon_cap": None,
    "accountant": None,
    "accountant_version": None,
    "method": "none",
    "privacy_unit": None,
    "recorded_at": "2026-12-01T10:04:59.999999Z",
}
V1_NODE = "clinic-v1"
V1_ENTRY = {  # a version-1 entry (fedtune 0.1): no format, kind, method, privacy_unit
    **{k: v for k, v in ENTRY_1.items() if k not in ("kind", "method", "privacy_unit")},
    "node": V1_NODE,
    "seq": 1,
    "prev_hash": GENESIS_HASH,
}


def key_from_seed(seed_hex: str) -> NodeKey:
    return NodeKey(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)))


def file_line(record: dict[str, Any]) -> str:
    """A ledger file line as fedtune writes it (ledger_file._line)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


def vectors() -> dict[str, str]:
    """Every vector of the doc, by the name its ``<!-- vector: NAME -->`` marker gives."""
    node_key = key_from_seed(NODE_SEED)
    witness_key = key_from_seed(WITNESS_SEED)
    first = seal_entry(ENTRY_1, previous=None, key=node_key)
    second = seal_entry(ENTRY_2, previous=first, key=node_key)
    checkpoint = sign_checkpoint(node=NODE, head=second, key=node_key, signed_at=SIGNED_AT)
    receipt_fields = {
        "format": "fedtune-receipt/1",
        "node": NODE,
        "seq": second.seq,
        "head_hash": second.hash,
        "witness": public_key_text(witness_key.public_key),
        "witnessed_at": WITNESSED_AT,
    }
    receipt_message = rfc8785.dumps(receipt_fields)
    receipt = {**receipt_fields, "signature": witness_key.sign(receipt_message)}
    v1_hash = entry_hash(V1_ENTRY)
    v1 = LedgerEntry(**V1_ENTRY, hash=v1_hash, signature=node_key.sign(bytes.fromhex(v1_hash)))
    header = {
        "type": "header",
        "format": "fedtune-ledger/3",
        "node": NODE,
        "public_key": public_key_text(node_key.public_key),
        "exported_at": EXPORTED_AT,
    }
    lines = [
        header,
        {"type": "entry", **first.to_dict()},
        {"type": "entry", **second.to_dict()},
        {"type": "checkpoint", **checkpoint.to_dict()},
        {"type": "receipt", **receipt},
    ]
    return {
        "node-public-key": public_key_text(node_key.public_key),
        "witness-public-key": public_key_text(witness_key.public_key),
        "entry-1-canonical": rfc8785.dumps(first.payload()).decode("utf-8"),
        "entry-1-hash": first.hash,
        "entry-1-signature": first.signature,
        "entry-2-canonical": rfc8785.dumps(second.payload()).decode("utf-8"),
        "entry-2-hash": second.hash,
        "entry-2-signature": second.signature,
        "checkpoint-message": checkpoint.signed_message().decode("utf-8"),
        "checkpoint-signature": checkpoint.signature,
        "receipt-message": receipt_message.decode("utf-8"),
        "receipt-signature": receipt["signature"],
        "v1-entry-canonical": rfc8785.dumps(v1.payload()).decode("utf-8"),
        "v1-entry-hash": v1.hash,
        "v1-entry-signature": v1.signature,
        "file": "\n".join(file_line(record) for record in lines),
    }


if __name__ == "__main__":
    for name, value in vectors().items():
        print(f"<!-- vector: {name} -->\n```\n{value}\n```\n")
