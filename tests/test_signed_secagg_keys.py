"""Signed SecAgg+ keys against enrollment certificates: a coordinator that relays the keys can
neither substitute one nor invent a peer.

Flower's own SecAggPlusWorkflow drives the guarded mods of the nodes in this process through
fedtune's relay (coordinator/secagg_peers.py), as in test_secagg_guard; each node has its
own Ed25519 key and a certificate from a CA made in the test. Each attack is what a malicious
coordinator could do to the share-keys message between the relay and the nodes.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from test_secagg_guard import (  # the in-process harness, and its autouse fixtures
    NODES,
    InProcessGrid,
    assert_refused,
    run_round,
    sent_bytes,
    server_app_identity,  # noqa: F401
    strong_masks,  # noqa: F401
    weighted_mean,
)

from fedtune.client_node.secagg_guard import NodeIdentity, make_guarded_secaggplus_mod
from fedtune.coordinator.secagg_peers import SignedKeyRelay
from fedtune.platform.security.enrollment_certificates import (
    KEY_SIGNATURE_RECORD,
    PEERS_RECORD,
    EnrollmentCertificateError,
    certify_enrollment,
    keys_signed_by,
    load_ca_certificate,
    load_ca_private_key,
    sign_keys,
    verify_certificate,
)
from fedtune.platform.security.tls import init_certificates
from fedtune.privacy.signing import NodeKey

AUTH_KEY = "ecdsa-sha2-nistp384 AAAA-not-checked-here"


class Consortium:
    """A CA, and per node its name, ledger key and certificate."""

    def __init__(self, folder):
        paths = init_certificates(folder / "consortium")
        self.rogue_ca_key = load_ca_private_key(init_certificates(folder / "rogue").ca_key)
        self.ca_key = load_ca_private_key(paths.ca_key)
        self.ca_certificate = load_ca_certificate(paths.ca_cert)
        self.keys = {node: NodeKey.generate() for node in NODES}
        self.names = {node: f"node-{node}" for node in NODES}
        self.certificates = {
            self.names[node]: self.certify(self.names[node], key).decode()
            for node, key in self.keys.items()
        }

    def certify(self, name: str, key: NodeKey, *, ca_key=None) -> bytes:
        return certify_enrollment(
            name=name,
            auth_public_key=AUTH_KEY,
            ledger_public_key=key.public_key_text(),
            ca_key=ca_key or self.ca_key,
        )

    def identity(self, node: int) -> NodeIdentity:
        return NodeIdentity(self.names[node], self.keys[node], self.ca_certificate)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> Consortium:
    return Consortium(tmp_path_factory.mktemp("ca"))


MessageTamper = Callable[[int, Message, "SignedGrid"], None]


class SignedGrid(InProcessGrid):
    """Nodes with identities (each its own guarded mod); ``change`` alters each share-keys
    message after fedtune's relay added the proofs (a malicious coordinator)."""

    def __init__(self, consortium: Consortium, nodes, *, change: MessageTamper | None = None):
        mods = {
            node: make_guarded_secaggplus_mod(identity=consortium.identity(node)) for node in nodes
        }
        super().__init__(nodes, mod=lambda m, c, n: mods[m.metadata.dst_node_id](m, c, n))
        self.consortium = consortium
        self.change = change
        self.share_keys_sent: list[Message] = []

    def enrolled_name(self, node_id) -> str:
        return self.consortium.names[int(node_id)]

    def deliver(self, message: Message) -> Message:
        configs = message.content.config_records[RECORD_KEY_CONFIGS]
        if configs[Key.STAGE] == Stage.SHARE_KEYS:
            if self.change is not None:
                self.change(message.metadata.dst_node_id, message, self)
            self.share_keys_sent.append(copy.deepcopy(message))
        return super().deliver(message)


def signed_round(grid: SignedGrid, *, threshold: float = 0.75):
    relay = SignedKeyRelay(grid, grid.consortium.certificates)  # type: ignore[arg-type]
    return run_round(grid, threshold=threshold, via=relay)


def test_an_honest_round_with_signed_keys_gives_the_weighted_mean(consortium):
    grid = SignedGrid(consortium, NODES)

    mean = signed_round(grid)

    assert mean is not None
    assert np.abs(mean - weighted_mean(NODES)).max() < 1e-4
    assert not any(reply.has_error() for _, _, reply in grid.replies)
    for reply in grid.stage_replies(Stage.SETUP):  # each node signed its own keys
        assert KEY_SIGNATURE_RECORD in reply.content.config_records
    for message in grid.share_keys_sent:  # and each key list came with every peer's proof
        listed = {k for k in message.content.config_records[RECORD_KEY_CONFIGS] if k != Key.STAGE}
        assert set(message.content.config_records[PEERS_RECORD]) == listed


def substituted_keys(node: int, message: Message, grid: SignedGrid) -> None:
    """The coordinator's own key pair in place of node 1004's (it would know the secrets)."""
    if node != 1004:
        configs = message.content.config_records[RECORD_KEY_CONFIGS]
        configs["1004"] = [public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2)]


def own_key_signed_for_the_peer(node: int, message: Message, grid: SignedGrid) -> None:
    """Substituted keys with a signature by a key the coordinator holds, in a certificate
    from a CA of its own for node 1004's name."""
    if node == 1004:
        return
    key = NodeKey.generate()
    pk1, pk2 = (public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2))
    message.content.config_records[RECORD_KEY_CONFIGS]["1004"] = [pk1, pk2]
    statement = {
        "run_id": message.metadata.run_id,
        "group_id": message.metadata.group_id,
        "node_id": 1004,
        "pk1": pk1,
        "pk2": pk2,
    }
    certificate = grid.consortium.certify("node-1004", key, ca_key=grid.consortium.rogue_ca_key)
    message.content.config_records[PEERS_RECORD]["1004"] = [
        certificate,
        sign_keys(key, **statement).encode(),
    ]


def invented_peer(node: int, message: Message, grid: SignedGrid) -> None:
    """A fifth "node" the coordinator made up, with a self-made certificate."""
    own_key_signed_for_the_peer(node, message, grid)
    records = message.content.config_records
    records[RECORD_KEY_CONFIGS]["999"] = records[RECORD_KEY_CONFIGS].pop("1004")
    records[PEERS_RECORD]["999"] = records[PEERS_RECORD].pop("1004")


def one_node_twice(node: int, message: Message, grid: SignedGrid) -> None:
    """Node 1003's certified, signed entry also under 1004's id."""
    records = message.content.config_records
    if node != 1004:
        records[RECORD_KEY_CONFIGS]["1004"] = records[RECORD_KEY_CONFIGS]["1003"]
        records[PEERS_RECORD]["1004"] = records[PEERS_RECORD]["1003"]


def proofs_dropped(node: int, message: Message, grid: SignedGrid) -> None:
    del message.content.config_records[PEERS_RECORD]


def one_proof_dropped(node: int, message: Message, grid: SignedGrid) -> None:
    if node != 1004:
        del message.content.config_records[PEERS_RECORD]["1004"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (substituted_keys, "node 1004's SecAgg+ keys are not signed by 'node-1004'"),
        (own_key_signed_for_the_peer, "node 1004: enrollment certificate of 'node-1004': not"),
        (invented_peer, "node 999: enrollment certificate of 'node-1004': not signed by"),
        (one_node_twice, "node 1004's SecAgg+ keys are not signed by 'node-1003'"),
        (proofs_dropped, "the peers' keys come without enrollment certificates and signatures"),
        (one_proof_dropped, "node 1004's keys come without its certificate and signature"),
    ],
)
def test_keys_a_coordinator_substituted_or_invented_are_refused_by_every_honest_node(
    consortium, change, reason
):
    grid = SignedGrid(consortium, NODES, change=change)

    assert signed_round(grid) is None

    replies = grid.stage_replies(Stage.SHARE_KEYS)
    honest = [reply for reply in replies if reply.metadata.src_node_id != 1004]
    if change is proofs_dropped:
        honest = replies
    assert len(honest) >= 3
    assert_refused(honest, reason)
    assert sent_bytes(honest) == []  # no honest node handed out a key share
    assert grid.trained == []


def test_a_signature_covers_the_run_the_round_the_node_and_both_keys(consortium):
    key = consortium.keys[1001]
    node = verify_certificate(
        consortium.certificates["node-1001"].encode(), consortium.ca_certificate
    )
    statement = {
        "run_id": 2**63 + 7,
        "group_id": "3",
        "node_id": 2**64 - 5,
        "pk1": b"a" * 32,
        "pk2": b"b" * 32,
    }
    signature = sign_keys(key, **statement)

    assert keys_signed_by(node, signature, **statement)
    for changed in (
        {"run_id": 8},
        {"group_id": "4"},
        {"node_id": 1002},
        {"pk1": b"c" * 32},
        {"pk2": b"c" * 32},
    ):
        assert not keys_signed_by(node, signature, **{**statement, **changed})
    other = verify_certificate(
        consortium.certificates["node-1002"].encode(), consortium.ca_certificate
    )
    assert not keys_signed_by(other, signature, **statement)


def tampered(certificate: str, **changes) -> bytes:
    fields = json.loads(certificate)
    fields.update(changes)
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"name": "node-1002"}, "not signed by the consortium's CA"),
        ({"ledger_public_key": base64.b64encode(b"x" * 32).decode()}, "not signed by the"),
        ({"certified_at": "2020-01-01T00:00:00Z"}, "not signed by the consortium's CA"),
        ({"ca_signature": "not base64!"}, "not signed by the consortium's CA"),
        ({"extra": "field"}, "fields must be exactly"),
        ({"format": "something-else/1"}, "not a fedtune-enrollment-certificate/1 document"),
        ({"name": 5}, "fields must be exactly"),
    ],
)
def test_a_changed_certificate_is_refused(consortium, change, problem):
    certificate = consortium.certificates["node-1001"]
    assert verify_certificate(certificate.encode(), consortium.ca_certificate).name == "node-1001"

    with pytest.raises(EnrollmentCertificateError, match=problem):
        verify_certificate(tampered(certificate, **change), consortium.ca_certificate)


def test_junk_is_refused_as_a_certificate(consortium):
    for junk in (b"", b"\xff\xfe", b"[]", b"{" * 20_000):
        with pytest.raises(EnrollmentCertificateError):
            verify_certificate(junk, consortium.ca_certificate)
