"""fedtune: federated DP-LoRA fine-tuning with a signed epsilon ledger.

Nodes and coordinator need no outside network. Flower's telemetry and its update check are on
unless switched off in the environment, which Flower reads when it is first imported: both are
switched off here, before any Flower import, for fedtune's own processes and (inherited) for
every Flower process they start."""

import os as _os

FLOWER_OFFLINE = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
_os.environ.update(FLOWER_OFFLINE)
