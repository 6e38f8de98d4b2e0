"""Flower's SuperExec and app processes, pinned to fedtune's own code: the coordinator's
ServerApps (a node serves its ClientApp tasks with its own worker,
``client_node/clientapp_worker.py``, which shares the secret and the bundle check).

Flower 1.41 has three gaps here, closed in this one module:

- Its ``SubprocessExecutor`` starts ``flwr-serverapp``/``flwr-clientapp ... --token <hex>``:
  the task token, which the Runtime API accepts for that task, shows in ``ps`` to every local
  account. Their argument parsers can read it from standard input (``include_token_stdin``,
  used only by Flower's warm executors): :class:`PinnedExecutor` starts fedtune's app module
  instead, with the token on a pipe.
- Each app process installs the run's bundle (FAB) and imports the components it names, with
  the bundle on ``sys.path``: whoever submits a run (a malicious coordinator, or a local
  account on the coordinator host) would run code there. :func:`run_app_process` checks the
  bundle first (:func:`fedtune.platform.wire.run_bundle.check_bundle`): only fedtune's installed
  ServerApp and ClientApp run; a refusal is Flower's error reply to the run.
- In the default ``subprocess`` isolation anyone who reaches the Runtime API may acquire a
  task; with ``--isolation process`` and a SuperExec secret (:func:`ensure_secret`), only a
  SuperExec holding it may.
"""

from __future__ import annotations

import atexit
import importlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from flwr.cli.install import install_from_fab
from flwr.common.args import add_args_flwr_app_common
from flwr.supercore.cli.flower_superexec import flower_superexec
from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TaskType
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec

from fedtune.platform.wire.run_bundle import check_bundle

SECRET_FILE = "superexec.secret"


def ensure_secret(path: Path) -> Path:
    """The SuperExec secret at ``path``: 32 random bytes, mode 0600, made once."""
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(secrets.token_bytes(32))
    return path


class PinnedExecutor(SubprocessExecutor):
    """Flower's subprocess executor, starting fedtune's module for each task type it serves and
    handing it the task token over a pipe."""

    def __init__(self, modules: Mapping[TaskType, str]):
        self.modules = dict(modules)

    def get_eligible_capacity(
        self,
        supported_task_types: set[TaskType],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[TaskType], set[str]]:
        """Only the task types fedtune runs here: no simulation, agent or other app."""
        return supported_task_types & set(self.modules), set()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        module = self.modules.get(spec.task_type)
        if module is None:
            return LaunchResult.failed(f"fedtune runs no {spec.task_type} here")
        args = [
            sys.executable,
            "-m",
            module,
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


def run_superexec(modules: Mapping[TaskType, str]) -> None:
    """Flower's ``flower-superexec`` (its command line options) with :class:`PinnedExecutor`."""
    loop = importlib.import_module("flwr.supercore.superexec.run_superexec")
    loop.get_executor = lambda *_args, **_kwargs: PinnedExecutor(modules)  # type: ignore[attr-defined]
    flower_superexec()


def _install_checked(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Path:
    check_bundle(fab_file if isinstance(fab_file, bytes) else fab_file.read_bytes())  # raises
    return install_from_fab(fab_file, *args, **kwargs)


def run_app_process(*, cli: str, runtime: str, entry: str) -> None:
    """Flower's app command ``cli.entry`` reading its token from standard input, its runtime
    module ``runtime`` installing only fedtune's own bundles, into a Flower home of its own
    that is removed when it exits (Flower would keep every run's bundle). Modules are looked
    up through ``importlib``: the packages re-export functions under the modules' names."""
    home = tempfile.mkdtemp(prefix="fedtune-app-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ["FLWR_HOME"] = home
    runtime_module = importlib.import_module(runtime)
    runtime_module.install_from_fab = _install_checked  # type: ignore[attr-defined]
    cli_module = importlib.import_module(cli)
    cli_module.add_args_flwr_app_common = partial(  # type: ignore[attr-defined]
        add_args_flwr_app_common, include_token_stdin=True
    )
    getattr(cli_module, entry)()
