"""Ending a process together with everything it started (Flower's commands start more)."""

from __future__ import annotations

import contextlib
import signal

import psutil


def end_process_tree(pid: int, *, first: int = signal.SIGTERM, grace_s: float = 15.0) -> None:
    """Send ``first`` to process ``pid`` and all its descendants; SIGKILL what is left after
    ``grace_s`` seconds."""
    try:
        parent = psutil.Process(pid)
        targets = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for target in targets:
        with contextlib.suppress(psutil.Error):
            target.send_signal(first)
    _, alive = psutil.wait_procs(targets, timeout=grace_s)
    for target in alive:
        with contextlib.suppress(psutil.Error):
            target.kill()
