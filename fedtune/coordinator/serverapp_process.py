"""A run's ServerApp process on the coordinator: Flower's ``flwr-serverapp``, reading its task
token from standard input.

Flower 1.41's ``flwr-serverapp`` takes the token on its command line (``--token``), where
``ps`` shows it to every local account, or from a file; its argument parser can also read it
from standard input (``include_token_stdin``), which only Flower's warm executors use. This
module turns that on; :mod:`fedtune.coordinator.superexec` starts it and writes the token to
its standard input.

Run as ``python -m fedtune.coordinator.serverapp_process`` with ``flwr-serverapp``'s options
and ``--token-stdin``.
"""

from __future__ import annotations

import importlib
from functools import partial

from flwr.common.args import add_args_flwr_app_common


def main() -> None:
    # The module, not the function of the same name that flwr.superlink.cli exports.
    serverapp_cli = importlib.import_module("flwr.superlink.cli.flwr_serverapp")
    serverapp_cli.add_args_flwr_app_common = partial(  # type: ignore[attr-defined]
        add_args_flwr_app_common, include_token_stdin=True
    )
    serverapp_cli.flwr_serverapp()


if __name__ == "__main__":
    main()
