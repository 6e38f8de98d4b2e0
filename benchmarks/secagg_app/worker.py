"""The benchmark's long-lived ClientApp worker: fedtune's node-side worker
(``fedtune.client_node.clientapp_worker``) serving the benchmark's own ClientApp, as a fedtune
node serves fedtune's. The run's bundle is the benchmark's, which fedtune's worker would refuse
(it serves only fedtune's pinned app), so this one skips that check: it runs only the app
imported from this folder, never code from the bundle.

    python benchmarks/secagg_app/worker.py 127.0.0.1:PORT SECRET_FILE POLL_S
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from flwr.app import Context, Message
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run

sys.path.insert(0, str(Path(__file__).parent))
os.environ["SECAGG_BENCH_LONG_LIVED"] = "1"  # the node log: no process start per message

from secagg_bench.apps import client_app

from fedtune.client_node.clientapp_worker import ClientAppWorker, error_reply


class BenchmarkWorker(ClientAppWorker):
    def _reply(self, message: Message, context: Context, run: Run, fab: Fab) -> tuple[Message, str]:
        try:
            return self.app(message, context), ""
        except Exception as exc:
            return error_reply(message, exc)


def main() -> None:
    address, secret_file, poll_s = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker = BenchmarkWorker(
        address, secret_file.read_bytes(), app=client_app, poll_s=poll_s, say=print
    )
    worker.serve(stop)


if __name__ == "__main__":
    main()
