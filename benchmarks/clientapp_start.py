"""What each deployed message costs a node before any work: a model loaded per message
against the warm trainer that `fedtune node start` keeps.

Flower's SuperNode starts a fresh ClientApp process for every message (isolation
``subprocess``). A secure-aggregation round sends each node five messages (SecAgg+ setup,
key sharing, masked training, unmasking, then evaluation), of which two need the model. We
time, in fresh Python processes, what one message costs:

- ``per_message_load``: import fedtune's in-process ClientApp (torch, transformers, PEFT,
  Opacus) and load the base model, as a ClientApp that loaded the model itself would on
  every message that needs it (and the imports on every message);
- ``warm_trainer``: import the deployed ClientApp (Flower and fedtune's message code only)
  and forward one small message to a running trainer service over loopback.

The per-round figures multiply these by the messages of a round. Results go to
``benchmarks/results/clientapp_start.json``::

    .venv/bin/python benchmarks/clientapp_start.py --model smollm2-135m --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import flwr
import torch

HEAVY = """
import time, sys
started = time.perf_counter()
from fedtune.client_node.client_app import build_client_app
from fedtune.platform.model.base_model import load_base_model
from fedtune.platform.config import ModelConfig
load_base_model(ModelConfig(spec=sys.argv[1], device="cpu"))
print(time.perf_counter() - started)
"""

LIGHT = """
import time, sys
from pathlib import Path
started = time.perf_counter()
from flwr.app import ConfigRecord, RecordDict
import fedtune.client_node.deployed_app
from fedtune.client_node.trainer_service import call_trainer
call_trainer(Path(sys.argv[1]), "query.describe", RecordDict({"c": ConfigRecord({"x": 1})}))
print(time.perf_counter() - started)
"""


def _time(code: str, argument: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", code, argument], capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from flwr.app import ConfigRecord, RecordDict

    from fedtune.client_node.trainer_service import TrainerService
    from fedtune.platform.config import DataConfig, NodeConfig, NodeSettings

    with tempfile.TemporaryDirectory() as folder:
        config = NodeConfig(
            node=NodeSettings(name="bench", state_dir=Path(folder)),
            data=DataConfig(train=Path(folder) / "t.jsonl", eval=Path(folder) / "e.jsonl"),
        )
        service = TrainerService(
            config, {"query.describe": lambda _c, _m: RecordDict({"n": ConfigRecord({"ok": 1})})}
        )
        service.start()
        try:
            light = [_time(LIGHT, folder) for _ in range(args.repeats)]
        finally:
            service.stop()
    heavy = [_time(HEAVY, args.model) for _ in range(args.repeats)]
    per_message_load, warm = statistics.median(heavy), statistics.median(light)
    result = {
        "what": "seconds a deployed ClientApp process spends before its work, per message",
        "model": args.model,
        "per_message_load_s": heavy,
        "warm_trainer_s": light,
        "median_per_message_load_s": round(per_message_load, 2),
        "median_warm_trainer_s": round(warm, 2),
        "secure_round_messages": 5,
        "messages_needing_the_model": 2,
        "round_start_cost_s": {
            # with a per-message load: 2 loads + 3 light starts; warm: 5 light starts
            "per_message_load": round(2 * per_message_load + 3 * warm, 1),
            "warm_trainer": round(5 * warm, 1),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "flwr": flwr.__version__,
            "note": "2-core CPU machine; other work ran at the same time",
        },
        "command": " ".join(sys.argv),
    }
    out = Path(__file__).parent / "results" / "clientapp_start.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
