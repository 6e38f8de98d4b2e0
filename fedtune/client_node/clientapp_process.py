"""The ClientApp process of one message on a node: Flower's ``flwr-clientapp``, reading its task
token from standard input and refusing any run bundle but fedtune's. A run whose bundle names
another ClientApp or carries code is refused before anything of it is installed or imported;
the coordinator gets the refusal as the message's error reply
(:mod:`fedtune.platform.pinned_apps`).

Run as ``python -m fedtune.client_node.clientapp_process`` with ``flwr-clientapp``'s options
and ``--token-stdin``.
"""

from __future__ import annotations

from fedtune.platform.pinned_apps import run_app_process


def main() -> None:
    run_app_process(
        cli="flwr.supernode.cli.flwr_clientapp",
        runtime="flwr.supernode.runtime.run_clientapp",
        entry="flwr_clientapp",
    )


if __name__ == "__main__":
    main()
