"""What a fedtune run's Flower app bundle (FAB) may hold: one pyproject.toml naming fedtune's
installed ServerApp and ClientApp, and no code.

Flower 1.41 installs a run's bundle and imports the ServerApp and ClientApp it names, with the
bundle's folder on ``sys.path``: whoever can submit a run runs code on the coordinator and, in
every node's SuperNode, inside the organisation. fedtune's own bundles hold only metadata
(``coordinator/superlink.py``, ``write_app``), so anything else is refused before any of it is
installed or imported.
"""

from __future__ import annotations

import io
import tomllib
import zipfile

SERVER_APP = "fedtune.coordinator.deployed_app:app"
CLIENT_APP = "fedtune.client_node.deployed_app:app"
ALLOWED_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})  # CONTENT: Flower's manifest


class UntrustedBundleError(ValueError):
    """A run's app bundle is not one of fedtune's."""


def check_bundle(content: bytes) -> None:
    """Raise :class:`UntrustedBundleError`, saying why, unless ``content`` (a FAB) names
    exactly fedtune's components and carries nothing but its pyproject.toml."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as bundle:
            names = bundle.namelist()
            extra = sorted(set(names) - ALLOWED_FILES)
            if extra:
                raise UntrustedBundleError(
                    "refused: the run's app bundle carries files besides its pyproject.toml "
                    f"({', '.join(extra[:5])}); fedtune runs only its installed code"
                )
            project = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UntrustedBundleError(f"refused: the run's app bundle is unreadable ({exc})") from None
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if components != {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}:
        raise UntrustedBundleError(
            f"refused: the run names serverapp {components.get('serverapp')!r} and clientapp "
            f"{components.get('clientapp')!r}; fedtune runs only its own ({SERVER_APP}, "
            f"{CLIENT_APP})"
        )
