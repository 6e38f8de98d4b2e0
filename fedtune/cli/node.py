"""`fedtune node`: what runs at an organisation's node (train a round, keys, the SuperNode)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from fedtune.cli.options import config_option
from fedtune.common.errors import AlreadyExistsError
from fedtune.platform.config import (
    load_node_config,
)


def register(commands: Any) -> None:
    """Add this group's commands to ``commands`` (the top level's subparsers)."""
    node = commands.add_parser("node", help="what runs at an organisation's node").add_subparsers(
        title="node commands"
    )
    train = node.add_parser("train", help="train one DP-LoRA round on the node's local data")
    config_option(train, "node")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(handler=_node_train)
    key = node.add_parser(
        "key", help="print the node's public signing key (created on first use), to enroll it"
    )
    config_option(key, "node")
    key.set_defaults(handler=_node_key)
    keygen = node.add_parser(
        "keygen", help="create the node's keys (SuperNode authentication, ledger signing)"
    )
    keygen.add_argument(
        "--out", required=True, type=Path, help="the node's state folder (node.state_dir)"
    )
    keygen.add_argument(
        "--new-auth-key",
        action="store_true",
        help="rotate: replace the SuperNode key, keep the ledger key; enroll again",
    )
    keygen.set_defaults(handler=_node_keygen)
    node_start = node.add_parser(
        "start", help="join the coordinator: trainer + Flower SuperNode over TLS (foreground)"
    )
    config_option(node_start, "node")
    node_start.set_defaults(handler=_node_start)


def _node_train(args: argparse.Namespace) -> int:
    from fedtune.client_node.node_train import run_node_training

    config = load_node_config(args.config)
    metrics = run_node_training(config, progress=not args.no_progress)
    print(_summary(metrics))
    return 0


def _node_key(args: argparse.Namespace) -> int:
    from fedtune.privacy.node_ledger import KEY_FILE, node_key

    config = load_node_config(args.config)
    print(node_key(config.node.state_dir).public_key_text())
    print(f"(key file {config.node.state_dir / KEY_FILE}; keep it private)", file=sys.stderr)
    return 0


def _node_keygen(args: argparse.Namespace) -> int:
    from fedtune.common.keyfiles import KeyFileError
    from fedtune.coordinator.enrollment import ENROLLMENT_FILE, Enrollment, write_enrollment
    from fedtune.platform.security.node_auth import (
        AUTH_KEY_FILE,
        AUTH_PUBLIC_KEY_FILE,
        generate_node_auth_key,
    )
    from fedtune.privacy.signing import KEY_FILE, NodeKey

    ledger_key = args.out / KEY_FILE
    if args.new_auth_key:
        if not ledger_key.exists():
            raise KeyFileError(f"{ledger_key} is missing: run keygen without --new-auth-key")
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for name in (AUTH_KEY_FILE, AUTH_PUBLIC_KEY_FILE):
            old = args.out / name
            if old.exists():
                old.rename(old.with_name(f"{name}.replaced-{stamp}"))
    elif ledger_key.exists() or (args.out / ENROLLMENT_FILE).exists():
        raise AlreadyExistsError(
            f"{args.out} already holds a node's keys; they are not overwritten "
            "(--new-auth-key replaces the connection key and keeps the ledger key)"
        )
    auth = generate_node_auth_key(args.out)
    # The ledger key is never replaced: the node's whole ledger is signed with it.
    signing = NodeKey.load_or_create(ledger_key)
    write_enrollment(
        args.out / ENROLLMENT_FILE,
        Enrollment(
            auth_public_key=auth.public_key.read_text().strip(),
            ledger_public_key=signing.public_key_text(),
        ),
    )
    print(f"SuperNode authentication key (ECDSA P-384): {auth.private_key}")
    print(f"ledger signing key (Ed25519): {ledger_key}")
    print(
        f"give {args.out / ENROLLMENT_FILE} (public keys only) to the consortium's CA holder to "
        "certify (`fedtune certs certify-node`), then the certificate to the coordinator's admin"
    )
    print(f"in node.toml: node.state_dir = this folder, coordinator.auth_key = {auth.private_key}")
    return 0


def _node_start(args: argparse.Namespace) -> int:
    from fedtune.client_node.supernode import start_node

    return start_node(args.config)


def _summary(metrics: dict[str, Any]) -> str:
    from fedtune.client_node.local_round import NON_PRIVATE_LABEL

    privacy = metrics["privacy"]
    before, after = metrics["held_out"]["before"], metrics["held_out"]["after"]
    if privacy["mode"] == "dp":
        privacy_line = (
            f"epsilon {privacy['epsilon_after']:.3f} (this round {privacy['epsilon_round']:.3f}) "
            f"at delta {privacy['delta']:g}, {privacy['method']} ({privacy['accountant']} "
            f"accountant, {privacy['accountant_version']}); noise multiplier "
            f"{privacy['noise_multiplier']:.3f}, sample rate {privacy['sample_rate']:.4f}, "
            f"clip norm {privacy['max_grad_norm']:g}; privacy unit: one "
            f"{str(privacy['privacy_unit']).replace('_', ' ')}"
        )
        if "budget_group" in privacy:
            privacy_line += (
                f"; budget group (data.shares_budget_with) at epsilon "
                f"{privacy['budget_group']['epsilon_after']:.3f}"
            )
    else:
        privacy_line = NON_PRIVATE_LABEL
    return "\n".join(
        [
            f"node {metrics['node']}: {metrics['steps']} steps in "
            f"{metrics['training']['seconds']:.0f} s on {metrics['device']}",
            f"  held-out loss {before['loss']:.3f} -> {after['loss']:.3f}, "
            f"perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f}",
            *_grpo_lines(metrics),
            f"  privacy: {privacy_line}",
            f"  adapter: {metrics['adapter_dir']}",
        ]
    )


def _grpo_lines(metrics: dict[str, Any]) -> list[str]:
    """A GRPO round: the held-out reward, the round's sampled completions, and any reward
    that failed (by name and row)."""
    grpo = metrics.get("grpo")
    if grpo is None:
        return []
    before, after = metrics["held_out"]["before"], metrics["held_out"]["after"]
    sampled = (
        f"  sampled completions: mean reward {grpo['mean_reward']:.3f}, format share "
        f"{grpo['format_share']:.2f}, {grpo['completion_tokens']:.1f} tokens, KL {grpo['kl']:.4f}"
        if grpo["mean_reward"] is not None
        else "  sampled completions: none (every Poisson batch was empty)"
    )
    failures = grpo["reward_failures"]
    return [
        f"  held-out reward {before['mean_reward']:.3f} -> {after['mean_reward']:.3f} "
        f"(format share {before['format_share']:.2f} -> {after['format_share']:.2f})",
        sampled,
        *([f"  rewards failed {len(failures)} times, first: {failures[0]}"] if failures else []),
    ]
