"""Node-level differential privacy of a deployed run (DP-FedAvg with fixed clipping, McMahan
et al. 2018), compatible with secure aggregation: each node clips its own update, the
coordinator noises only the unmasked mean, and Flower's RDP accountant (over Google's
``dp-accounting``) counts the rounds.

Every noised round is appended to the coordinator's own signed ledger
(``OUTPUT_DIR/node-level-ledger``, node ``coordinator``), which `fedtune audit` exports,
verifies and recomputes like a node's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import flwr
import numpy as np
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedtune.privacy.accounting import BudgetExhaustedError
from fedtune.privacy.ledger import Checkpoint, LedgerEntry
from fedtune.privacy.node_ledger import NodeLedger

LEDGER_NODE = "coordinator"


class NodeLevelSettings(Protocol):
    """What node-level DP needs of its settings (``aggregation.node_dp`` in a run config)."""

    @property
    def noise_multiplier(self) -> float: ...
    @property
    def clipping_norm(self) -> float: ...
    @property
    def delta(self) -> float: ...
    @property
    def max_epsilon(self) -> float | None: ...


class NodeLevelPrivacy:
    """Noise for each secure mean, and its accounting and ledger, for one run."""

    def __init__(
        self, settings: NodeLevelSettings, *, run_id: str, population: int, ledger: NodeLedger
    ):
        self.settings = settings
        self.run_id = run_id
        self.population = population
        self.ledger = ledger
        # The entry the latest noised round appended, with the signed head (the coordinator's
        # database keeps a copy of each: fedtune.coordinator.recorder).
        self.latest: tuple[LedgerEntry, Checkpoint] | None = None
        self.accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=settings.delta,
                population_size=population,
                # Every round counts in full, whoever was sampled: no amplification assumed.
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        for _ in ledger.entries(self.data_fingerprint):  # a resumed run's earlier rounds
            self.accountant.compose(self._event(population))

    @property
    def data_fingerprint(self) -> str:
        return f"run:{self.run_id}"

    def _event(self, contributors: int) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(
            noise_multiplier=self.settings.noise_multiplier,
            sample_size=max(1, min(contributors, self.population)),
            population_size=self.population,
        )

    def check_round(self) -> None:
        """Refuse a round that would pass ``max_epsilon`` before anything is sent."""
        limit = self.settings.max_epsilon
        if limit is None:
            return
        trial = RdpAccountant(self.accountant.config)
        trial.load_state_dict(self.accountant.state_dict())
        trial.compose(self._event(self.population))
        after = trial.get_epsilon(self.settings.delta)
        if after > limit:
            raise BudgetExhaustedError(
                f"node-level epsilon would reach {after:.3f}, past aggregation.node_dp."
                f"max_epsilon {limit:g}"
            )

    def noise(self, mean: Mapping[str, np.ndarray], *, contributors: int) -> dict[str, np.ndarray]:
        """The mean of ``contributors`` clipped updates with Gaussian noise of standard
        deviation noise_multiplier * clipping_norm / contributors."""
        noised = {key: np.array(value, dtype=np.float32, copy=True) for key, value in mean.items()}
        std = compute_stdv(
            self.settings.noise_multiplier, self.settings.clipping_norm, contributors
        )
        add_gaussian_noise_inplace(list(noised.values()), std)
        return noised

    def record(self, server_round: int, *, contributors: int) -> float:
        """Account the noised round and append it to the coordinator's ledger; the run's
        node-level epsilon so far."""
        before = (
            self.accountant.get_epsilon(self.settings.delta)
            if self.accountant.num_releases
            else 0.0
        )
        self.accountant.compose(self._event(contributors))
        after = self.accountant.get_epsilon(self.settings.delta)
        self.latest = self.ledger.append(
            {
                "run_id": self.run_id,
                "round": server_round,
                "base_model_fingerprint": "node-level",
                "data_fingerprint": self.data_fingerprint,
                "mode": "dp",
                "steps": 1,
                "sample_rate": 1.0,
                "noise_multiplier": self.settings.noise_multiplier,
                "max_grad_norm": self.settings.clipping_norm,
                "delta": self.settings.delta,
                "epsilon_round": after - before,
                "epsilon_after": after,
                "epsilon_cap": self.settings.max_epsilon,
                "accountant": "rdp",
                "accountant_version": f"flwr {flwr.__version__} RdpAccountant (dp-accounting)",
                "kind": "training_round",
                "method": "node-level-dp",
                "privacy_unit": "node",
            }
        )
        return after
