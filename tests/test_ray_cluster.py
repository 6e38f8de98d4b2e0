"""`fedtune simulate` on an existing Ray cluster (``simulation.ray_address``): a head started
by the test with ``ray start --head`` on 127.0.0.1 (its own temp folder, so no other Ray user
on this machine finds it), a two-node run on it, and the head stopped with everything it
started."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import tiny_run_toml
from fedtune.demo.data import write_demo_data
from fedtune.platform.config import load_run_config
from fedtune.simulation import _ray_init_args, simulate

pytestmark = pytest.mark.simulation


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def ray_head():
    """A one-node Ray cluster on 127.0.0.1: its address; stopped (its whole process group, and
    any process under its temp folder) afterwards."""
    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
        "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={folder}",
    ]  # fmt: skip
    head = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (Path(folder) / "ray_current_cluster").exists():
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not start in 120 s"
            time.sleep(0.5)
        _FOLDERS[head.pid] = folder
        yield f"127.0.0.1:{port}", head
    finally:
        with_folder = [
            p
            for p in psutil.process_iter(["cmdline"])
            if folder in " ".join(p.info["cmdline"] or [])
        ]
        group = [p for p in psutil.process_iter() if _group(p) == head.pid]
        os.killpg(head.pid, signal.SIGTERM) if head.poll() is None else None
        ours = {p.pid: p for p in [*with_folder, *group] if p.pid != os.getpid()}
        _, alive = psutil.wait_procs(list(ours.values()), timeout=20)
        for process in alive:
            process.kill()
        shutil.rmtree(folder, ignore_errors=True)


_FOLDERS: dict[int, str] = {}


def folder_of(head: subprocess.Popen[bytes]) -> str:
    return _FOLDERS[head.pid]


def _group(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_without_an_address_a_simulation_starts_its_own_ray_never_a_found_one(tmp_path):
    config = load_run_config(two_node_run(tmp_path, Path("model")))

    assert _ray_init_args(config, 2)["address"] == "local"


def two_node_run(folder: Path, model: Path, **simulation: str) -> Path:
    write_demo_data(folder / "data", domain="hospital", train=48, held_out=8)
    write_demo_data(folder / "data", domain="bank", train=48, held_out=8)
    nodes = [{"name": "hospital"}, {"name": "bank"}]
    text = tiny_run_toml(model, run={"name": "on-a-cluster", "rounds": 1}, nodes=nodes)
    if simulation:
        text += "\n[simulation]\n" + "".join(f'{k} = "{v}"\n' for k, v in simulation.items())
    (folder / "run.toml").write_text(text)
    return folder / "run.toml"


def test_a_simulation_runs_on_an_existing_ray_cluster(tmp_path, tiny_model_dir, ray_head):
    address, head = ray_head
    config = load_run_config(two_node_run(tmp_path, tiny_model_dir, ray_address=address))

    run_id = simulate(config, progress=lambda line: None)

    assert run_id
    assert head.poll() is None  # the cluster outlives the run: it is the operator's
    logs = Path(folder_of(head)) / "session_latest" / "logs"
    assert list(logs.glob(f"python-core-driver-*_{os.getpid()}.log"))  # this run joined it
