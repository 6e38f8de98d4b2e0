"""`fedtune --help` and every group's help answer without importing the heavy libraries
(torch, Flower, ...): each command group imports them only in the handler that needs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedtune.cli import GROUPS

HEAVY = ("torch", "flwr", "transformers", "peft", "opacus", "streamlit", "sqlalchemy", "scipy")
PROBE = """
import json, sys
from fedtune.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def groups() -> list[str]:
    return [group.__name__.rsplit(".", 1)[-1] for group in GROUPS]


# Commands whose own help is checked too (their handlers import Flower).
COMMANDS = [["audit", "egress", "--help"], ["audit", "canaries", "--help"]]


@pytest.mark.parametrize("args", [["--help"], *[[name, "--help"] for name in groups()], *COMMANDS])
def test_help_imports_no_heavy_library(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True
    )
    answer = json.loads(done.stdout.splitlines()[-1])

    assert answer["code"] == 0
    assert [name for name in HEAVY if name in answer["loaded"]] == []


def test_every_group_is_a_command_of_its_own_name() -> None:
    helped = subprocess.run(
        [sys.executable, "-m", "fedtune.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in groups():
        assert f"    {name} " in helped or f"    {name}\n" in helped, name
