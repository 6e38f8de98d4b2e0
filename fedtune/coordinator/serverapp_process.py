"""A run's ServerApp process on the coordinator: Flower's ``flwr-serverapp``, reading its task
token from standard input and refusing any bundle but fedtune's.

Flower 1.41's ``flwr-serverapp`` takes the token on its command line (``--token``), where
``ps`` shows it to every local account, or from a file; its argument parser can also read it
from standard input (``include_token_stdin``), which only Flower's warm executors use. This
module turns that on; :mod:`fedtune.coordinator.superexec` starts it and writes the token to
its standard input.

Flower installs the run's bundle and imports the ServerApp it names; a local account that
submits a run of its own would run its code as the coordinator. The bundle is checked first
(:func:`fedtune.platform.run_bundle.check_bundle`): only fedtune's own ServerApp runs.

Run as ``python -m fedtune.coordinator.serverapp_process`` with ``flwr-serverapp``'s options
and ``--token-stdin``.
"""

from __future__ import annotations

import importlib
from functools import partial
from pathlib import Path
from typing import Any

from flwr.cli.install import install_from_fab
from flwr.common.args import add_args_flwr_app_common

from fedtune.platform.run_bundle import check_bundle


def _install_checked(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Path:
    check_bundle(fab_file if isinstance(fab_file, bytes) else fab_file.read_bytes())
    return install_from_fab(fab_file, *args, **kwargs)


def main() -> None:
    runtime = importlib.import_module("flwr.superlink.runtime.run_serverapp")
    runtime.install_from_fab = _install_checked  # type: ignore[attr-defined]
    # The module, not the function of the same name that flwr.superlink.cli exports.
    serverapp_cli = importlib.import_module("flwr.superlink.cli.flwr_serverapp")
    serverapp_cli.add_args_flwr_app_common = partial(  # type: ignore[attr-defined]
        add_args_flwr_app_common, include_token_stdin=True
    )
    serverapp_cli.flwr_serverapp()


if __name__ == "__main__":
    main()
