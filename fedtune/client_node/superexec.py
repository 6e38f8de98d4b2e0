"""A node's SuperExec: Flower's own, starting the ClientApp of each message as
:mod:`fedtune.client_node.clientapp_process` with its task token on standard input
(:mod:`fedtune.platform.pinned_apps` says why). The SuperNode runs with ``--isolation process``
and this SuperExec's secret: nobody else on the node may acquire its tasks.

Run as ``python -m fedtune.client_node.superexec`` with ``flower-superexec``'s options.
"""

from __future__ import annotations

from flwr.supercore.constant import TaskType

from fedtune.platform.pinned_apps import run_superexec


def main() -> None:
    run_superexec({TaskType.CLIENT_APP: "fedtune.client_node.clientapp_process"})


if __name__ == "__main__":
    main()
