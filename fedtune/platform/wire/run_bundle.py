"""What a fedtune run's Flower app bundle (FAB) may hold: one pyproject.toml naming fedtune's
installed ServerApp and ClientApp, and no code.

Flower 1.41 installs a run's bundle and imports the ServerApp and ClientApp it names, with the
bundle's folder on ``sys.path``: whoever can submit a run runs code on the coordinator and, in
every node's SuperNode, inside the organisation. fedtune's own bundles hold only metadata
(``coordinator/superlink.py``, ``write_app``), so anything else is refused, in memory, before
any of it is installed or imported: by the coordinator's ServerApp process
(``platform/wire/pinned_apps.py``) and by each node's ClientApp worker
(``client_node/clientapp_worker.py``).
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from typing import Any

from fedtune.common.errors import FedtuneError

SERVER_APP = "fedtune.coordinator.deployed_app:app"
CLIENT_APP = "fedtune.client_node.deployed_app:app"
ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})  # CONTENT: Flower's manifest
MAX_PYPROJECT_BYTES = 1 << 20


class UntrustedBundleError(FedtuneError, ValueError):
    """A run's app bundle is not one of fedtune's; the text is the refusal the submitter sees."""


def check_bundle(content: bytes, *, run_id: int | None = None, fab_hash: str | None = None) -> None:
    """Raise :class:`UntrustedBundleError`, naming every problem, unless ``content`` (a FAB)
    names exactly fedtune's components, carries nothing but its pyproject.toml (and Flower's
    manifest) and, if given, hashes to ``fab_hash``."""
    problems = []
    if fab_hash is not None and hashlib.sha256(content).hexdigest() != fab_hash:
        problems.append(f"sends a bundle that does not match its hash {fab_hash[:12]}")
    problems += _bundle_problems(content)
    if problems:
        run = f"run {run_id}" if run_id is not None else "the run"
        raise UntrustedBundleError(
            f"refused: fedtune runs only its own ServerApp and ClientApp ({SERVER_APP}, "
            f"{CLIENT_APP}); {run} " + "; ".join(problems)
        )


def _bundle_problems(content: bytes) -> list[str]:
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as bundle:
            names = bundle.namelist()
            pyproject = bundle.getinfo("pyproject.toml")
            if pyproject.file_size > MAX_PYPROJECT_BYTES:
                return [f"sends a pyproject.toml of {pyproject.file_size} bytes"]
            project = tomllib.loads(bundle.read(pyproject).decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return [f"sends a bundle that cannot be read ({exc})"]
    problems = _component_problems(project)
    extra = sorted(set(names) - ALLOWED_FILES)
    if extra or len(names) != len(set(names)):
        shown = ", ".join(extra[:5]) or "a file twice"
        problems.append(f"carries code or other files ({shown})")
    return problems


def _component_problems(project: dict[str, Any]) -> list[str]:
    flwr = project.get("tool", {}).get("flwr", {})
    components = flwr.get("app", {}).get("components", {}) if isinstance(flwr, dict) else {}
    if not isinstance(components, dict):
        return ["names no components"]
    problems = []
    if components.get("clientapp") != CLIENT_APP:
        problems.append(f"names ClientApp {components.get('clientapp')!r}")
    if components.get("serverapp") != SERVER_APP:
        problems.append(f"names ServerApp {components.get('serverapp')!r}")
    if others := sorted(set(components) - {"clientapp", "serverapp"}):
        problems.append(f"names other components ({', '.join(others)})")
    return problems
