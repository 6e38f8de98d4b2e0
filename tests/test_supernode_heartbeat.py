"""Nodes announce Flower's shortest heartbeat (10 s), so a dead node is noticed in ~20 s
rather than 60-110 s; and this fails when Flower moves what the entry point sets."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from flwr.common.constant import HEARTBEAT_MIN_INTERVAL, HEARTBEAT_PATIENCE
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.supernode import fleet_http_connection

from fedtune.client_node.supernode import supernode_command
from fedtune.platform.config import load_node_config
from fedtune.platform.runtime.object_pulls import retry_pulls_sooner
from fedtune.platform.runtime.supernode_entry import (
    FLOWER_IDLE_S,
    FLOWER_REPLY_WAIT_S,
    HEARTBEAT_INTERVAL_S,
    IDLE_POLL_S,
)


def test_flower_still_reads_the_interval_where_the_entry_point_sets_it():
    # The node announces it in ActivateNode and every heartbeat ...
    source = inspect.getsource(fleet_http_connection)
    assert source.count("heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL") == 2
    # ... and sends its heartbeats at a cadence derived from it.
    assert "HEARTBEAT_DEFAULT_INTERVAL" in inspect.getsource(HeartbeatSender._run)
    # The SuperLink accepts it and takes a node for dead after PATIENCE intervals.
    assert HEARTBEAT_INTERVAL_S == HEARTBEAT_MIN_INTERVAL == 10
    assert HEARTBEAT_PATIENCE * HEARTBEAT_INTERVAL_S == 20


def test_the_entry_point_runs_flowers_supernode_with_the_short_interval():
    probe = (
        "from fedtune.platform.runtime.supernode_entry import use_short_heartbeat\n"
        "use_short_heartbeat()\n"
        "from flwr.supernode import fleet_http_connection as f\n"
        "from flwr.supercore import heartbeat as h\n"
        "print(f.HEARTBEAT_DEFAULT_INTERVAL, h.HEARTBEAT_DEFAULT_INTERVAL)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["10.0", "10.0"]

    usage = subprocess.run(
        [sys.executable, "-m", "fedtune.platform.runtime.supernode_entry", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert usage.returncode == 0 and "--superlink" in usage.stdout  # Flower's own CLI


def test_a_node_starts_its_supernode_through_the_entry_point(tmp_path: Path):
    for name in ("ca.pem", "auth_key"):
        (tmp_path / name).write_text("x")
    config = tmp_path / "node.toml"
    config.write_text(
        '[node]\nname = "hospital"\nstate_dir = "state"\n'
        '[data]\ntrain = "train.jsonl"\neval = "held.jsonl"\n'
        '[coordinator]\naddress = "127.0.0.1:9095"\nroot_certificates = "ca.pem"\n'
        'auth_key = "auth_key"\n'
    )

    command = supernode_command(load_node_config(config), config, port=9200)

    assert command[:3] == [sys.executable, "-m", "fedtune.platform.runtime.supernode_entry"]
    assert command[command.index("--superlink") + 1] == "127.0.0.1:9095"


def test_flower_still_waits_where_the_entry_point_shortens_it():
    """The SuperNode's only uses of ``time`` are the waits ``use_short_waits`` replaces."""
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal)
    assert "\nimport time\n" in source
    uses = sorted(set(re.findall(r"\btime\.\w+\(([^)]*)\)", source)))
    assert uses == ["0.5", "3"]
    assert [FLOWER_REPLY_WAIT_S, FLOWER_IDLE_S] == [0.5, 3]
    # The loop pushes replies through the module's _push_messages, looked up at each call.
    loop = inspect.getsource(start_client_internal.start_client_internal)
    assert "_push_messages(" in loop
    # It pulls a message's objects through the module's pull_objects, without its own
    # back-off (so the entry point's default applies), and Flower's back-off is still 1 s.
    receive = inspect.getsource(start_client_internal._pull_and_store_message)
    assert "pull_objects(" in receive and "initial_backoff" not in receive
    assert inspect.signature(pull_objects).parameters["initial_backoff"].default == 1


# How long ``module.pull_objects`` waits before it asks again for an object the sender has not
# pushed yet (the first request finds it missing, the second gets it): ``retry``, in seconds.
RETRY_PROBE = (
    "import time\n"
    "from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError\n"
    "calls = []\n"
    "def missing_once(object_id):\n"
    "    calls.append(time.monotonic())\n"
    "    if len(calls) == 1:\n"
    "        raise ObjectUnavailableError(object_id)\n"
    "    return b'x'\n"
    "assert {module}.pull_objects(['a'], pull_object_fn=missing_once) == {{'a': b'x'}}\n"
    "retry = calls[1] - calls[0]\n"
)


def test_the_entry_point_gives_the_supernode_loop_short_waits():
    probe = (
        "import time\n"
        "from fedtune.platform.runtime.supernode_entry import use_short_waits\n"
        "use_short_waits()\n"
        "from flwr.supernode import start_client_internal as s\n"
        "t = time.monotonic(); s.time.sleep(3); idle = time.monotonic() - t\n"
        "assert s._push_messages.__wrapped__ is not None\n"
        + RETRY_PROBE.format(module="s")
        + "import fedtune.platform.runtime.supernode_entry as e\n"
        "e._noting_replies(lambda: None)()\n"  # as the wrapped _push_messages notes a reply
        "t = time.monotonic(); s.time.sleep(3); busy = time.monotonic() - t\n"
        "t = time.monotonic(); s.time.sleep(0.5); reply = time.monotonic() - t\n"
        "t = time.monotonic(); s.time.sleep(0.2); other = time.monotonic() - t\n"
        "print(round(idle, 1), busy < 0.3, round(reply, 2) <= 0.1, round(other, 1), retry < 0.5)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == [str(IDLE_POLL_S), "True", "True", "0.2", "True"]


def test_the_serverapp_process_retries_its_reply_pulls_sooner():
    """fedtune's ServerApp process pulls node replies through Flower's grid, whose
    ``pull_objects`` it wraps before Flower's app starts (the app itself is left out here);
    Flower's own grid waits its 1 s."""
    from flwr.superlink.grid import http_grid

    source = inspect.getsource(http_grid)
    assert "pull_objects(" in source and "initial_backoff" not in source
    probe = (
        "import fedtune.coordinator.serverapp_process as p\n"
        "p.run_app_process = lambda **options: None\n"
        "p.main()\n"
        "from flwr.superlink.grid import http_grid as g\n"
        + RETRY_PROBE.format(module="g")
        + "print(retry < 0.5)\n"
    )
    stock = "from flwr.superlink.grid import http_grid as g\n" + RETRY_PROBE.format(module="g")
    stock += "print(retry > 0.7)\n"
    for script in (probe, stock):
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
        )
        assert out.stdout.split() == ["True"]


def test_a_flower_that_moved_pull_objects_is_an_error_not_a_silent_no_op():
    with pytest.raises(RuntimeError, match="no longer pulls with pull_objects"):
        retry_pulls_sooner(types.ModuleType("flwr.moved"))
