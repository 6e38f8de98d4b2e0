"""Flower's ``secaggplus_mod`` behind checks of what a coordinator could abuse.

Flower 1.41's node side of SecAgg+ takes the round's numbers and lists from the coordinator
unchecked. A malicious coordinator could list a node ``u`` as both surviving and dropped in
the unmask stage, and every neighbour would hand over both of ``u``'s secrets (the self-mask
seed and the key behind its pairwise masks): ``u``'s update in the clear. With a threshold of
at most half the shares it can split the neighbours instead, asking one half for each secret.
And a "secure" mean of two nodes shows each node the other's update.

The guard reads each SecAgg+ message and what Flower's mod keeps in the node's context
(``secaggplus_state``: this node's id, the numbers accepted at setup, the key list of the
share-keys stage, whose shares this node holds) and refuses, before Flower's mod runs:

- every stage: Flower's own stage-order and type checks, and masks from Flower's stock
  generator (:mod:`fedtune.platform.wire.secagg_masks` must be installed in this process);
- setup: fewer than ``min_peers`` nodes, a share number above the sampled nodes or below
  ``min_peers``, a threshold above the share number or not above half of it;
- share keys: this node missing, a node id twice, fewer than ``min_peers`` or more than the
  share number of nodes, fewer than the threshold;
- collect masked vectors (before training): key shares from this node itself, twice from one
  node, or from outside the key list; fewer than ``min_peers - 1`` or ``threshold - 1`` peers
  left to mask with;
- unmask: a node listed twice, or both as surviving and as dropped; this node listed as
  dropped or missing from the survivors; a node outside the key list, or whose shares this
  node does not hold; fewer survivors than the threshold.

With a :class:`NodeIdentity` (every deployed node has one) the node also signs its SecAgg+
public keys in its setup reply, and refuses a key list unless each key pair comes with an
enrollment certificate signed by the consortium's CA and that node's signature of the pair
for this run and round, every certificate names a different node, and this node's own entry
is its own (:mod:`fedtune.platform.security.enrollment_certificates`): a coordinator can then
neither substitute a key nor invent a peer.

Its masked update travels in the fewest bytes the round's modulus needs (uint32 for 2**32,
three bytes a value for 2**24; not Flower's int64: :mod:`fedtune.platform.wire.masked_upload`).

A refusal answers with an error message (``MOD_FAILED_PRECONDITION``; the reason, nothing
else) and drops the round's SecAgg+ state, secrets included, so that only a new setup
continues.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn, cast

from cryptography import x509
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    check_configs,
    check_stage,
    secaggplus_mod,
)
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)

from fedtune.common.errors import FedtuneError
from fedtune.platform.security.enrollment_certificates import (
    KEY_SIGNATURE_RECORD,
    PEERS_RECORD,
    EnrollmentCertificateError,
    keys_signed_by,
    sign_keys,
    verify_certificate,
)
from fedtune.platform.wire import secagg_masks
from fedtune.platform.wire.masked_upload import pack_masked_reply
from fedtune.privacy.signing import NodeKey

LOGGER = logging.getLogger(__name__)


class SecureAggregationRefused(FedtuneError, ValueError):
    """A SecAgg+ message this node will not answer; the message names the check."""


@dataclass(frozen=True)
class NodeIdentity:
    """Who this node is to its peers: its enrolled name, the Ed25519 key its enrollment
    certificate names (the ledger key), and the consortium's CA certificate."""

    name: str
    key: NodeKey
    ca_certificate: x509.Certificate


def make_guarded_secaggplus_mod(*, min_peers: int = 3, identity: NodeIdentity | None = None) -> Mod:
    """Flower's ``secaggplus_mod`` behind this module's checks, as a Flower client mod.

    ``min_peers``: the fewest distinct nodes, this one included, that a node masks its update
    among. 2 only knowingly: in a round of two, each node learns the other's update from the
    mean. ``identity``: sign this node's keys and accept only certified, signed peer keys
    (None: keys unsigned, as in a simulation, where every node runs in one process).
    """
    if isinstance(min_peers, bool) or not isinstance(min_peers, int) or min_peers < 2:
        raise ValueError(f"min_peers must be an integer of at least 2, not {min_peers!r}")

    def guarded_secaggplus_mod(
        message: Message, context: Context, call_next: ClientAppCallable
    ) -> Message:
        if (
            message.metadata.message_type != MessageType.TRAIN
            or RECORD_KEY_CONFIGS not in message.content.config_records
        ):
            return secaggplus_mod(message, context, call_next)
        try:
            stage = _check_message(message, context, min_peers=min_peers)
            if identity is not None and stage == Stage.SHARE_KEYS:
                _check_peers(message, context, identity)
        except SecureAggregationRefused as refusal:
            LOGGER.error("%s", refusal)
            context.state.config_records[RECORD_KEY_STATE] = ConfigRecord({})
            error = Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=str(refusal))
            return Message(error, reply_to=message)
        reply = secaggplus_mod(message, context, call_next)
        if identity is not None and stage == Stage.SETUP and not reply.has_error():
            _sign_keys(message, reply, identity)
        if stage == Stage.COLLECT_MASKED_VECTORS and not reply.has_error():
            _pack(reply, context)
        return reply

    return guarded_secaggplus_mod


guarded_secaggplus_mod = make_guarded_secaggplus_mod()


def _check_message(message: Message, context: Context, *, min_peers: int) -> str:
    """The message's SecAgg+ stage; :class:`SecureAggregationRefused` when Flower's mod should
    not answer ``message`` (a train message carrying SecAgg+ configs)."""
    configs = message.content.config_records[RECORD_KEY_CONFIGS]
    saved = context.state.config_records.get(RECORD_KEY_STATE) or ConfigRecord({})
    state = SecAggPlusState(**dict(saved))
    try:
        secagg_masks.check_installed()
        check_stage(state.current_stage, configs)
        stage = cast(str, configs[Key.STAGE])
        check_configs(stage, ConfigRecord({k: v for k, v in configs.items() if k != Key.STAGE}))
    except (KeyError, TypeError, ValueError, RuntimeError) as problem:
        _refuse(str(problem.args[0]) if problem.args else type(problem).__name__)
    if stage == Stage.SETUP:
        _check_setup(configs, min_peers=min_peers)
    elif stage == Stage.SHARE_KEYS:
        _check_share_keys(state, configs, min_peers=min_peers)
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        _check_collect(state, configs, min_peers=min_peers)
    elif stage == Stage.UNMASK:
        _check_unmask(state, configs)
    return stage


def _refuse(reason: str) -> NoReturn:
    raise SecureAggregationRefused(f"secure aggregation refused: {reason}")


def _check_setup(configs: ConfigRecord, *, min_peers: int) -> None:
    nodes = cast(int, configs[Key.SAMPLE_NUMBER])
    shares = cast(int, configs[Key.SHARE_NUMBER])
    threshold = cast(int, configs[Key.THRESHOLD])
    if nodes < min_peers:
        _refuse(f"{nodes} nodes in the round, fewer than min_peers={min_peers}")
    if shares > nodes:
        _refuse(f"share number {shares} exceeds the {nodes} nodes in the round")
    if shares < min_peers:
        _refuse(f"share number {shares} is below min_peers={min_peers}")
    _check_threshold(threshold, shares)


def _check_threshold(threshold: int, shares: int) -> None:
    if threshold > shares:
        _refuse(f"threshold {threshold} exceeds the share number {shares}")
    if 2 * threshold <= shares:
        _refuse(
            f"threshold {threshold} is not more than half of {shares} shares: a coordinator "
            "could collect both secrets of one node"
        )


def _check_share_keys(state: SecAggPlusState, configs: ConfigRecord, *, min_peers: int) -> None:
    _check_threshold(state.threshold, state.share_num)
    names = [name for name in configs if name != Key.STAGE]
    if not all(name.isdigit() and name.isascii() for name in names):
        _refuse("the key list names something that is not a node id")
    nodes = [int(name) for name in names]
    _check_distinct(nodes, "in the key list")
    if state.nid not in nodes:
        _refuse(f"this node ({state.nid}) is missing from the key list")
    if len(nodes) < min_peers:
        _refuse(f"keys of {len(nodes)} nodes (this one included), fewer than min_peers={min_peers}")
    if len(nodes) > state.share_num:
        _refuse(f"keys of {len(nodes)} nodes, more than the share number {state.share_num}")
    if len(nodes) < state.threshold:
        _refuse(f"keys of {len(nodes)} nodes, fewer than the threshold {state.threshold}")


def _check_collect(state: SecAggPlusState, configs: ConfigRecord, *, min_peers: int) -> None:
    _check_threshold(state.threshold, state.share_num)
    sources = cast(list[int], configs[Key.SOURCE_LIST])
    if len(sources) != len(cast(list[bytes], configs[Key.CIPHERTEXT_LIST])):
        _refuse("the key shares and their sources differ in number")
    _check_distinct(sources, "as a source of key shares")
    for node in sources:
        if node == state.nid:
            _refuse(f"key shares of this node ({node}) were forwarded back to it")
        if node not in state.public_keys_dict:
            _refuse(f"key shares from node {node}, which is not in this round's key list")
    peers = len(sources) + 1
    if peers < min_peers:
        _refuse(f"{peers} nodes (this one included) to mask with, fewer than min_peers={min_peers}")
    if peers < state.threshold:
        _refuse(
            f"{peers} nodes (this one included) to mask with, "
            f"fewer than the threshold {state.threshold}"
        )


def _check_unmask(state: SecAggPlusState, configs: ConfigRecord) -> None:
    _check_threshold(state.threshold, state.share_num)
    surviving = cast(list[int], configs[Key.ACTIVE_NODE_ID_LIST])
    dropped = cast(list[int], configs[Key.DEAD_NODE_ID_LIST])
    _check_distinct(surviving, "as surviving")
    _check_distinct(dropped, "as dropped")
    both = sorted(set(surviving) & set(dropped))
    if both:
        _refuse(f"node {both[0]} listed both as surviving and as dropped")
    if state.nid in dropped:
        _refuse(f"this node ({state.nid}) listed as dropped, though it sent its masked update")
    if state.nid not in surviving:
        _refuse(f"this node ({state.nid}) is missing from the surviving nodes")
    for listed, held, role in (
        (surviving, state.rd_seed_share_dict, "surviving"),
        (dropped, state.sk1_share_dict, "dropped"),
    ):
        for node in listed:
            if node not in state.public_keys_dict:
                _refuse(f"node {node} listed as {role} is not in this round's key list")
            if node not in held:
                _refuse(f"node {node} listed as {role}, but its key shares never reached this node")
    if len(surviving) < state.threshold:
        _refuse(f"{len(surviving)} surviving nodes, fewer than the threshold {state.threshold}")


def _pack(reply: Message, context: Context) -> None:
    """The masked vectors in the fewest bytes the round's modulus needs (half of Flower's
    int64 for 2**32, three eighths for 2**24; :mod:`fedtune.platform.wire.masked_upload`)."""
    state = SecAggPlusState(**dict(context.state.config_records[RECORD_KEY_STATE]))
    pack_masked_reply(reply.content.config_records[RECORD_KEY_CONFIGS], state.mod_range)


def _sign_keys(message: Message, reply: Message, identity: NodeIdentity) -> None:
    keys = reply.content.config_records[RECORD_KEY_CONFIGS]
    signature = sign_keys(
        identity.key,
        run_id=message.metadata.run_id,
        group_id=message.metadata.group_id,
        node_id=message.metadata.dst_node_id,
        pk1=cast(bytes, keys[Key.PUBLIC_KEY_1]),
        pk2=cast(bytes, keys[Key.PUBLIC_KEY_2]),
    )
    reply.content.config_records[KEY_SIGNATURE_RECORD] = ConfigRecord({"signature": signature})


def _check_peers(message: Message, context: Context, identity: NodeIdentity) -> None:
    """Every key pair in the key list certified and signed by a distinct enrolled node."""
    configs = message.content.config_records[RECORD_KEY_CONFIGS]
    peers = message.content.config_records.get(PEERS_RECORD)
    if peers is None:
        _refuse("the peers' keys come without enrollment certificates and signatures")
    names: dict[str, int] = {}
    own = message.metadata.dst_node_id
    for entry in (name for name in configs if name != Key.STAGE):
        node_id = int(entry)
        proof = peers.get(entry)
        if not (
            isinstance(proof, list) and len(proof) == 2 and all(isinstance(p, bytes) for p in proof)
        ):
            _refuse(f"node {node_id}'s keys come without its certificate and signature")
        certificate, signature = cast(list[bytes], proof)
        try:
            node = verify_certificate(certificate, identity.ca_certificate)
        except EnrollmentCertificateError as problem:
            _refuse(f"node {node_id}: {problem}")
        pk1, pk2 = cast(list[bytes], configs[entry])
        if not keys_signed_by(
            node,
            signature.decode("ascii", errors="replace"),
            run_id=message.metadata.run_id,
            group_id=message.metadata.group_id,
            node_id=node_id,
            pk1=pk1,
            pk2=pk2,
        ):
            _refuse(
                f"node {node_id}'s SecAgg+ keys are not signed by {node.name!r}, whose "
                "certificate came with them: keys substituted on the way"
            )
        if node.name in names:
            _refuse(f"{node.name!r} is certified for two nodes, {names[node.name]} and {node_id}")
        names[node.name] = node_id
        if node_id == own and (
            node.name != identity.name or node.ledger_public_key != identity.key.public_key_text()
        ):
            _refuse(f"this node's ({own}) entry is certified for {node.name!r}, not this node")
        if node_id != own and node.name == identity.name:
            _refuse(f"node {node_id} is certified as this node ({identity.name!r})")


def _check_distinct(nodes: Iterable[int], where: str) -> None:
    repeated = sorted(node for node, count in Counter(nodes).items() if count > 1)
    if repeated:
        _refuse(f"node {repeated[0]} listed twice {where}")
