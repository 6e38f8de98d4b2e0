"""What protected a run, recorded with the run when it starts (``Run.protections``): the
dashboard shows a run's protections from this record and from what the run stored (ledger
copies, receipts, the replies), never from today's configuration, which may have changed since.

A deployed run's transport facts come from the commands the coordinator runs its SuperLink
with (:func:`deployment_facts`, put in the job by `fedtune run start`); a simulated run has no
network. Each protection is ``{"state": ..., "detail": ...}``; the state is ``on``, ``off``,
``per node`` (each node's own settings decide: its signed ledger entries say what it did) or
``not applicable``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from fedtune.platform.config import CoordinatorConfig, RunConfig

ON, OFF, PER_NODE, NOT_APPLICABLE = "on", "off", "per node", "not applicable"
NOT_RECORDED = "not recorded"


def deployment_facts(coordinator: CoordinatorConfig, command: list[str]) -> dict[str, Any]:
    """What the coordinator enforces for every run, read from its SuperLink's ``command``
    (:func:`fedtune.coordinator.superlink.superlink_command`) and its TLS files."""
    ca = coordinator.tls.ca_certificate
    try:
        ca_sha256: str | None = hashlib.sha256(ca.read_bytes()).hexdigest()
    except OSError:
        ca_sha256 = None
    host = command[command.index("--host") + 1] if "--host" in command else None
    return {
        "tls": "--ssl-certfile" in command and "--ssl-keyfile" in command,
        "ca_certificate_sha256": ca_sha256,
        "node_authentication": "--enable-supernode-auth" in command,
        "superlink_host": host,
        "gateway": coordinator.public_address,
        "pinned_apps": "--superexec-auth-secret-file" in command,
    }


def _item(state: str, detail: str) -> dict[str, str]:
    return {"state": state, "detail": detail}


def _fact(facts: dict[str, Any], name: str, *, on: bool | None = None) -> str:
    """``on``/``off`` for a deployment fact (a job from before facts were recorded: not
    recorded)."""
    if name not in facts:
        return NOT_RECORDED
    return ON if (facts[name] if on is None else on) else OFF


def run_protections(config: RunConfig, *, deployment: dict[str, Any] | None) -> dict[str, Any]:
    """The protections of a run of ``config``: deployed with the coordinator's
    ``deployment`` facts, or simulated (``None``)."""
    privacy = config.privacy
    aggregation = config.aggregation
    out: dict[str, Any] = {"mode": "deployment" if deployment is not None else "simulation"}
    if deployment is None:
        absent = "a simulation: nodes and coordinator in one process, no network"
        out["tls"] = _item(NOT_APPLICABLE, absent)
        out["node_authentication"] = _item(
            NOT_APPLICABLE, absent + "; each node signs its ledger with its configured key"
        )
        out["secure_aggregation"] = _item(OFF, "a simulation averages the updates in the clear")
        out["node_level_dp"] = _item(OFF, "a simulation has no node-level DP")
    else:
        ca = deployment.get("ca_certificate_sha256")
        out["tls"] = _item(
            _fact(deployment, "tls"),
            "TLS to the coordinator's gateway "
            f"{deployment.get('gateway')}" + (f", CA certificate sha256:{ca[:16]}…" if ca else ""),
        )
        out["node_authentication"] = _item(
            _fact(deployment, "node_authentication"),
            "only SuperNodes with enrolled ECDSA keys connect; replies are attributed to "
            "enrolled names, ledger entries checked against enrolled Ed25519 keys",
        )
        out["secure_aggregation"] = _item(
            ON if aggregation.secure else OFF,
            f"SecAgg+ (reconstruction threshold {aggregation.reconstruction_threshold:g}, "
            f"clipping range ±{aggregation.clipping_range:g}): the coordinator sees only the "
            "mean"
            if aggregation.secure
            else "updates sent in the clear (aggregation.secure = false)",
        )
        node_dp = aggregation.node_dp
        out["node_level_dp"] = (
            _item(
                ON,
                f"clipping norm {node_dp.clipping_norm:g}, noise multiplier "
                f"{node_dp.noise_multiplier:g}, delta {node_dp.delta:g}"
                + (f", max epsilon {node_dp.max_epsilon:g}" if node_dp.max_epsilon else "")
                + "; accounted in the coordinator's signed ledger",
            )
            if node_dp is not None
            else _item(OFF, "aggregation.node_dp not set")
        )
        out["gateway"] = _item(
            _fact(deployment, "superlink_host", on=deployment.get("superlink_host") == "127.0.0.1"),
            "the SuperLink listens on 127.0.0.1; the gateway forwards the Fleet API only",
        )
        out["pinned_apps"] = _item(
            _fact(deployment, "pinned_apps"),
            "only fedtune's own ServerApp and ClientApp run",
        )
    if deployment is None:
        mode = "DP-SGD" if privacy.mode == "dp" else "NON-PRIVATE (no DP)"
        out["example_level_dp"] = _item(
            ON if privacy.mode == "dp" else OFF,
            f"{mode}: target epsilon {privacy.target_epsilon:g}, cap {privacy.cap:g}, delta "
            f"{privacy.delta:g}, clip {privacy.max_grad_norm:g}, accountant {privacy.accountant}"
            + "".join(
                f"; {n.name}: target {n.target_epsilon:g}"
                + (f", cap {n.epsilon_cap:g}" if n.epsilon_cap else "")
                for n in config.nodes
                if n.target_epsilon is not None
            ),
        )
        out["metric_release"] = _item(
            PER_NODE,
            ", ".join(
                f"{n.name}: {n.release_metrics or privacy.release_metrics}" for n in config.nodes
            ),
        )
    else:
        out["example_level_dp"] = _item(
            PER_NODE, "each node's privacy settings (node.toml); its signed ledger entries say"
        )
        out["metric_release"] = _item(PER_NODE, "each node's privacy.release_metrics")
    out["witness_receipts"] = _item(
        ON, "the coordinator countersigns every ledger head it stores (witness key)"
    )
    out["checkpoint_encryption"] = (
        _item(ON, "global adapters encrypted at rest (AES-256-GCM)")
        if config.output.encryption_key_file is not None
        else _item(OFF, "global adapters stored unencrypted")
    )
    return out
