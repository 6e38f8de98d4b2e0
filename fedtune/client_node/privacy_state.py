"""What a node has spent on each data set, kept on disk across runs and restarts.

One JSON file per (base model, data set) pair under ``STATE_DIR/privacy/``. It holds every
round trained on that data set with the parameters the accountant needs, so epsilon is always
recomputed by replaying the whole history: it accumulates over the node's life and never
resets. Writes are atomic (temporary file, fsync, rename) under an exclusive file lock.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from fedtune.platform.accounting import HistoryEntry

_FORMAT = 1


@dataclass(frozen=True)
class RoundRecord:
    """One training round on a data set, as the accountant needs it (and a bit more)."""

    mode: Literal["dp", "non-private"]
    run: str
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float | None  # None when non-private
    max_grad_norm: float | None
    delta: float | None
    accountant: str | None
    epsilon_round: float | None
    epsilon_after: float | None
    finished_at: str  # UTC, ISO 8601


class PrivacyStateError(RuntimeError):
    """The stored privacy state is unreadable or belongs to something else."""


class PrivacyState:
    """The rounds trained on one data set with one base model, persisted in ``path``."""

    def __init__(self, state_dir: Path, *, base_model: str, data_set: str):
        key = f"{_short(base_model)}-{_short(data_set)}"
        self.path = state_dir / "privacy" / f"{key}.json"
        self.base_model = base_model
        self.data_set = data_set

    def rounds(self) -> list[RoundRecord]:
        if not self.path.exists():
            return []
        try:
            payload = json.loads(self.path.read_text(encoding="utf-8"))
            if payload.get("format") != _FORMAT:
                raise PrivacyStateError(f"{self.path}: unknown format {payload.get('format')!r}")
            if (payload["base_model"], payload["data_set"]) != (self.base_model, self.data_set):
                raise PrivacyStateError(f"{self.path}: belongs to another base model or data set")
            return [RoundRecord(**record) for record in payload["rounds"]]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PrivacyStateError(
                f"{self.path}: privacy state is unreadable ({exc}); it is not overwritten"
            ) from None

    def dp_history(self) -> list[HistoryEntry]:
        """The accountant history of the private rounds: ``(sigma, sample_rate, steps)``."""
        return [
            (r.noise_multiplier, r.sample_rate, r.steps)
            for r in self.rounds()
            if r.mode == "dp" and r.noise_multiplier is not None
        ]

    def append(self, record: RoundRecord) -> None:
        with self._locked():
            rounds = self.rounds()
            rounds.append(record)
            payload = {
                "format": _FORMAT,
                "base_model": self.base_model,
                "data_set": self.data_set,
                "rounds": [asdict(r) for r in rounds],
            }
            temporary = self.path.with_suffix(".tmp")
            with temporary.open("w", encoding="utf-8") as handle:
                json.dump(payload, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(self.path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with (self.path.parent / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _short(fingerprint: str) -> str:
    return fingerprint.removeprefix("sha256:")[:16]
