"""The ClientApp of a deployed node (`fedtune node start`).

The node's ClientApp worker (:mod:`fedtune.client_node.clientapp_worker`) calls it for every
message, never a ClientApp named by a run's bundle. It stays light (it was once started in a
fresh process per message): it does not load the model, it forwards each message's content
to the node's long-lived trainer (:mod:`fedtune.client_node.trainer_service`). Train messages
of a secure-aggregation round go through Flower's ``secaggplus_mod`` behind fedtune's guard
(``secagg_guard``: it refuses what a coordinator could abuse) with fedtune's mask generator
(``platform/wire/secagg_masks``): only the masked update leaves the node, with the rest of the
reply (metrics, privacy report, signed ledger entry) beside it. The node signs its SecAgg+
keys with its ledger key and masks only with peers whose keys are signed and certified by the
consortium's CA (``ca.pem``, the node's ``coordinator.root_certificates``).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedtune.client_node.secagg_guard import NodeIdentity, make_guarded_secaggplus_mod
from fedtune.client_node.trainer_service import call_trainer
from fedtune.platform.config import NodeConfig, load_node_config
from fedtune.platform.security.enrollment_certificates import load_ca_certificate
from fedtune.platform.wire import secagg_masks
from fedtune.platform.wire.messages import (
    ABTEST_MESSAGE_TYPE,
    CONFIG,
    DESCRIBE_MESSAGE_TYPE,
    SECURE_AGGREGATION,
)
from fedtune.platform.wire.secure_messages import (
    secure_reply_from_train_reply,
    train_content_from_secure,
)
from fedtune.privacy.signing import KEY_FILE, NodeKey

NODE_CONFIG_KEY = "config"  # --node-config "config='PATH/node.toml'"

secagg_masks.install()  # masks from the whole secret, never Flower's 32-bit-folded seeds

_CONFIGS: dict[str, NodeConfig] = {}


def node_config(context: Context) -> NodeConfig:
    """The node's configuration, named by the SuperNode's ``--node-config``."""
    path = context.node_config.get(NODE_CONFIG_KEY)
    if not isinstance(path, str):
        raise ValueError(f"start the node with --node-config \"{NODE_CONFIG_KEY}='PATH'\"")
    if path not in _CONFIGS:
        _CONFIGS[path] = load_node_config(Path(path))
    return _CONFIGS[path]


@cache
def _identity(name: str, key_file: Path, ca_certificate: Path) -> NodeIdentity:
    return NodeIdentity(name, NodeKey.load(key_file), load_ca_certificate(ca_certificate))


def _forward(kind: str, message: Message, context: Context) -> Message:
    state_dir = node_config(context).node.state_dir
    return Message(call_trainer(state_dir, kind, message.content), reply_to=message)


def _secure_train(message: Message, context: Context) -> Message:
    """Called by ``secaggplus_mod`` once the keys are shared: train, then hand back the update
    for masking."""
    request = train_content_from_secure(message.content)
    secagg_masks.require_generator(request.mask_generator)  # else the masks cannot cancel
    request.content.config_records[CONFIG][SECURE_AGGREGATION] = True
    reply = call_trainer(node_config(context).node.state_dir, "train", request.content)
    return Message(secure_reply_from_train_reply(reply, request), reply_to=message)


app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    if RECORD_KEY_CONFIGS in message.content.config_records:
        config = node_config(context)
        connection = config.coordinator
        if connection is None:
            raise ValueError("a deployed node's configuration needs a [coordinator] section")
        identity = _identity(
            config.node.name, config.node.state_dir / KEY_FILE, connection.root_certificates
        )
        guarded = make_guarded_secaggplus_mod(
            min_peers=connection.min_secure_peers, identity=identity
        )
        return guarded(message, context, _secure_train)
    return _forward("train", message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return _forward("evaluate", message, context)


@app.evaluate("abtest")
def abtest(message: Message, context: Context) -> Message:
    return _forward(ABTEST_MESSAGE_TYPE, message, context)


@app.query("describe")
def describe(message: Message, context: Context) -> Message:
    return _forward(DESCRIBE_MESSAGE_TYPE, message, context)
