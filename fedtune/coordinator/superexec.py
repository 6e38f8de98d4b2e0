"""The coordinator's SuperExec: Flower's own, which starts a ServerApp process for each run the
SuperLink hands it, except that each ServerApp gets its task token on standard input.

Flower 1.41's ``SubprocessExecutor`` starts ``flwr-serverapp ... --token <hex>``: the token,
which the SuperLink accepts for that run's Runtime API calls, shows in ``ps`` to every local
account. This executor starts :mod:`fedtune.coordinator.serverapp_process` (Flower's
``flwr-serverapp`` with its hidden ``--token-stdin`` turned on) and writes the token to it.

The SuperLink runs with ``--isolation process`` and a SuperExec secret: only a SuperExec that
holds the secret may acquire tasks (in Flower's default subprocess isolation the Runtime API's
``acquire-task`` needs no credentials and anyone who reaches the port can claim a run).

Run as ``python -m fedtune.coordinator.superexec`` with ``flower-superexec``'s options.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

from flwr.supercore.cli.flower_superexec import flower_superexec
from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TaskType
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec


class TokenOnStdinExecutor(SubprocessExecutor):
    """Flower's subprocess executor, handing the ServerApp's task token over a pipe."""

    def get_eligible_capacity(
        self,
        supported_task_types: set[TaskType],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[TaskType], set[str]]:
        """ServerApps only: fedtune runs no simulation or other app on the coordinator."""
        return supported_task_types & {TaskType.SERVER_APP}, set()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.SERVER_APP:
            return LaunchResult.failed(
                f"fedtune's SuperExec starts ServerApps only, not {spec.task_type}"
            )
        args = [
            sys.executable,
            "-m",
            "fedtune.coordinator.serverapp_process",
            TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
            spec.runtime_api_address,
            "--token-stdin",
        ]
        if spec.insecure:
            args.append("--insecure")
        elif spec.root_certificates_path is not None:
            args += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            args += ["--parent-pid", str(spec.parent_pid)]
        if spec.runtime_dependency_install:
            args.append("--allow-runtime-dependency-installation")
        output = subprocess.DEVNULL if spec.suppress_output else None
        process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=output, stderr=output)
        assert process.stdin is not None
        process.stdin.write(f"{spec.token}\n".encode("ascii"))
        process.stdin.close()
        return LaunchResult.accepted()


def main() -> None:
    superexec_loop = importlib.import_module("flwr.supercore.superexec.run_superexec")
    superexec_loop.get_executor = lambda *_args, **_kwargs: TokenOnStdinExecutor()  # type: ignore[attr-defined]
    flower_superexec()


if __name__ == "__main__":
    main()
