"""`fedtune dashboard`: start the Streamlit app on the coordinator's database and wait.

The app runs as a child process (``streamlit run app.py ... -- --db URL``); Ctrl-C stops it,
and so does any way this process ends.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from fedtune.common.database import database_url
from fedtune.dashboard.database import DashboardError, check_database

APP = Path(__file__).with_name("app.py")
STOP_SECONDS = 10

__all__ = ["APP", "DashboardError", "check_database", "run_dashboard", "streamlit_command"]


def streamlit_command(db_url: str, *, host: str = "127.0.0.1", port: int = 8501) -> list[str]:
    """The command line that serves the dashboard of ``db_url`` on ``host:port``."""
    if not 0 < port < 65536:
        raise DashboardError(f"port must be between 1 and 65535, got {port}")
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "minimal",
        "--",
        "--db",
        database_url(db_url),
    ]


def run_dashboard(db_url: str, *, host: str = "127.0.0.1", port: int = 8501) -> int:
    """Serve the dashboard of ``db_url`` (read-only) until Ctrl-C; returns the exit code.

    Raises :class:`DashboardError` when ``db_url`` is not a readable fedtune database.
    """
    check_database(db_url)
    command = streamlit_command(db_url, host=host, port=port)
    print(f"fedtune dashboard: http://{host}:{port} (Ctrl-C stops it)", flush=True)
    process = subprocess.Popen(command)
    # SIGTERM (kill, docker stop, systemd) stops it as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return process.wait()
    except KeyboardInterrupt:
        stop(process)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            stop(process)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop(process: subprocess.Popen[bytes]) -> None:
    """Ask the server to stop (SIGINT, as Ctrl-C does), then make sure it has."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
