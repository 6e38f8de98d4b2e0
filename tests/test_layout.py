"""The import rules of the layout (DEVELOPERS.md, "Layout and rules"), read from the source
with ``ast`` (imports inside functions and under ``TYPE_CHECKING`` count too):

- ``fedtune.common`` imports nothing of fedtune;
- ``fedtune.privacy`` imports ``common`` only: the privacy core is the ground floor that
  ``platform`` builds on, never the other way round;
- ``fedtune.privacy.audit`` (what an auditor runs) imports the privacy core alone, and
  neither Flower nor SQLAlchemy;
- ``fedtune.platform`` imports ``common`` and ``privacy``, no role;
- ``client_node``, ``coordinator`` and ``dashboard`` never import each other, nor the demos,
  the CLI or the simulation;
- no import cycle between fedtune's packages.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fedtune"
ROLES = ("client_node", "coordinator", "dashboard")
ENTRY_POINTS = ("demo", "cli", "simulation")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # the imported module, dotted
    where: str  # file:line


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path) -> list[Import]:
    """Every import of a ``fedtune`` module (or of a third-party one) in the tree at ``root``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        source = module_name(root, path)
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(root.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                found += [Import(source, alias.name, where) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolved against the importing package
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                found.append(Import(source, target, where))
                # ``from fedtune.platform import wire`` imports the module fedtune.platform.wire
                found += [
                    Import(source, f"{target}.{alias.name}", where)
                    for alias in node.names
                    if (root.parent / f"{target}.{alias.name}".replace(".", "/")).exists()
                    or (root.parent / (f"{target}.{alias.name}".replace(".", "/") + ".py")).exists()
                ]
    return found


def part(module: str) -> str:
    """The part of the layout a dotted module belongs to: ``privacy.audit``, ``privacy``,
    ``platform``, a role, ... (the first level under fedtune; audit apart)."""
    pieces = module.split(".")
    if pieces[0] != "fedtune" or len(pieces) == 1:
        return pieces[0] if pieces[0] != "fedtune" else "fedtune"
    if pieces[1:3] == ["privacy", "audit"]:
        return "privacy.audit"
    return pieces[1]


ALLOWED = {
    "common": {"common"},
    "privacy": {"common", "privacy"},
    "privacy.audit": {"common", "privacy", "privacy.audit"},
    "platform": {"common", "privacy", "platform"},
}
THIRD_PARTY_REFUSED = {"privacy.audit": ("flwr", "sqlalchemy")}


def violations(root: Path) -> list[str]:
    """Every broken rule in the tree at ``root`` (a ``fedtune`` package folder)."""
    found = []
    edges: dict[str, set[str]] = {}
    for item in imports_of(root):
        mine = part(item.source)
        if not item.target.startswith("fedtune"):
            refused = THIRD_PARTY_REFUSED.get(mine, ())
            if item.target.split(".")[0] in refused:
                found.append(f"{item.where}: {mine} imports {item.target} (the auditor's code)")
            continue
        theirs = part(item.target)
        if theirs == "fedtune":
            continue
        if mine.split(".")[0] != theirs.split(".")[0]:
            edges.setdefault(mine.split(".")[0], set()).add(theirs.split(".")[0])
        if mine in ALLOWED and theirs not in ALLOWED[mine]:
            found.append(f"{item.where}: {mine} imports {item.target}")
        if mine in ROLES and theirs != mine and theirs in (*ROLES, *ENTRY_POINTS):
            found.append(f"{item.where}: {mine} imports {item.target} (another role)")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(edges)]
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each package that is on one, as a path back to where it started."""
    found: list[list[str]] = []
    for start in sorted(edges):
        stack = [(start, [start])]
        seen = set()
        while stack:
            here, path = stack.pop()
            for there in sorted(edges.get(here, ())):
                if there == start:
                    if min(path) == start:  # each cycle once, from its smallest member
                        found.append([*path, start])
                    stack.clear()
                    break
                if there not in seen:
                    seen.add(there)
                    stack.append((there, [*path, there]))
    return found


def test_fedtune_follows_its_import_rules() -> None:
    assert violations(PACKAGE) == []


def write(root: Path, module: str, text: str) -> None:
    path = root.parent / f"{module.replace('.', '/')}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    for folder in [path.parent, *path.parent.parents]:
        if folder == root.parent:
            break
        (folder / "__init__.py").touch()
    path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    ("module", "text", "broken"),
    [
        ("fedtune.privacy.ledger", "from fedtune.platform.config import X\n", "privacy imports"),
        (
            "fedtune.privacy.ledger",
            "def f():\n    from ..coordinator import strategy\n",
            "privacy imports fedtune.coordinator",
        ),
        ("fedtune.common.errors", "import fedtune.privacy.ledger\n", "common imports"),
        (
            "fedtune.platform.wire.messages",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from fedtune.client_node import trainer\n",
            "platform imports fedtune.client_node",
        ),
        ("fedtune.coordinator.x", "from fedtune.dashboard import queries\n", "another role"),
        ("fedtune.dashboard.x", "from fedtune.demo.run import run_demo\n", "another role"),
        ("fedtune.privacy.audit.verify", "import flwr\n", "the auditor's code"),
        ("fedtune.privacy.audit.report", "from sqlalchemy import select\n", "the auditor's code"),
        ("fedtune.demo.x", "from fedtune.cli import main\n", "import cycle"),
    ],
)
def test_the_checker_catches_a_forbidden_import(
    tmp_path: Path, module: str, text: str, broken: str
) -> None:
    root = tmp_path / "fedtune"
    write(root, "fedtune.cli", "from fedtune.demo import run\n")
    write(root, "fedtune.demo.run", "from fedtune.privacy import ledger\n")
    write(root, "fedtune.privacy.ledger", "from fedtune.common.errors import FedtuneError\n")
    write(root, "fedtune.common.errors", "class FedtuneError(Exception): ...\n")
    assert violations(root) == []  # the clean tree passes

    write(root, module, text)

    found = violations(root)
    assert any(broken in line for line in found), found
    if broken != "import cycle":
        assert any(f"{module.replace('.', '/')}.py:" in line for line in found), found
