"""A run's ServerApp process on the coordinator: Flower's ``flwr-serverapp``, reading its task
token from standard input and refusing any run bundle but fedtune's, so that only fedtune's
own ServerApp runs here (:mod:`fedtune.platform.wire.pinned_apps`).

Run as ``python -m fedtune.coordinator.serverapp_process`` with ``flwr-serverapp``'s options
and ``--token-stdin``.
"""

from __future__ import annotations

from flwr.superlink.grid import http_grid

from fedtune.platform.runtime.object_pulls import retry_pulls_sooner
from fedtune.platform.wire.pinned_apps import run_app_process


def main() -> None:
    retry_pulls_sooner(http_grid)  # the grid the ServerApp pulls node replies through
    run_app_process(
        cli="flwr.superlink.cli.flwr_serverapp",
        runtime="flwr.superlink.runtime.run_serverapp",
        entry="flwr_serverapp",
    )


if __name__ == "__main__":
    main()
