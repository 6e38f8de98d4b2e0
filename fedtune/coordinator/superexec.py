"""The coordinator's SuperExec: Flower's own, starting each run's ServerApp as
:mod:`fedtune.coordinator.serverapp_process` with its task token on standard input, never on a
command line (:mod:`fedtune.platform.wire.pinned_apps` says why). The SuperLink runs with
``--isolation process`` and this SuperExec's secret: nobody else may acquire its tasks.

Run as ``python -m fedtune.coordinator.superexec`` with ``flower-superexec``'s options.
"""

from __future__ import annotations

from flwr.supercore.constant import TaskType

from fedtune.platform.wire.pinned_apps import run_superexec


def main() -> None:
    run_superexec({TaskType.SERVER_APP: "fedtune.coordinator.serverapp_process"})


if __name__ == "__main__":
    main()
