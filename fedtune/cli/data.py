"""`fedtune data`: data sets (the synthetic demo data)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedtune.demo.data import DOMAINS, check_demo_output, write_demo_data
from fedtune.demo.preferences import check_preference_output, write_demo_preferences
from fedtune.demo.verifiable import check_prompt_output, write_demo_prompts


def register(commands: Any) -> None:
    """Add this group's commands to ``commands`` (the top level's subparsers)."""
    data = commands.add_parser("data", help="data sets").add_subparsers(title="data commands")
    demo_data = data.add_parser("demo", help="write the synthetic hospital and bank data sets")
    demo_data.add_argument("--out", required=True, type=Path)
    demo_data.add_argument("--domain", choices=[*DOMAINS, "all"], default="all")
    demo_data.add_argument("--train", type=int, default=800, help="training examples")
    demo_data.add_argument("--held-out", type=int, default=100, help="held-out examples")
    demo_data.add_argument("--seed", type=int, default=0)
    demo_data.add_argument(
        "--preferences",
        action="store_true",
        help="also write preference pairs for DPO (preferences_train.jsonl and "
        "preferences_held_out.jsonl, from the same records)",
    )
    demo_data.add_argument(
        "--grpo",
        action="store_true",
        help="also write prompts with checkable answers for GRPO (grpo_train.jsonl and "
        "grpo_held_out.jsonl: triage levels at the hospital, fees at the bank)",
    )
    demo_data.set_defaults(handler=_data_demo)


def _data_demo(args: argparse.Namespace) -> int:
    domains = DOMAINS if args.domain == "all" else (args.domain,)
    # Every domain is checked before any is written: all or nothing.
    check_demo_output(args.out, domains, train=args.train, held_out=args.held_out)
    if args.preferences:
        check_preference_output(args.out, domains, train=args.train, held_out=args.held_out)
    if args.grpo:
        check_prompt_output(args.out, domains)
    for domain in domains:
        train, held_out = write_demo_data(
            args.out, domain=domain, train=args.train, held_out=args.held_out, seed=args.seed
        )
        print(f"{domain}: {train} ({args.train} examples), {held_out} ({args.held_out})")
        if args.preferences:
            train, held_out = write_demo_preferences(
                args.out, domain=domain, train=args.train, held_out=args.held_out, seed=args.seed
            )
            print(f"{domain}: {train} ({args.train} pairs), {held_out} ({args.held_out})")
        if args.grpo:
            train, held_out = write_demo_prompts(
                args.out, domain=domain, train=args.train, held_out=args.held_out, seed=args.seed
            )
            print(f"{domain}: {train} ({args.train} prompts), {held_out} ({args.held_out})")
    return 0
