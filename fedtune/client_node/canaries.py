"""Canaries for the empirical privacy audit: random secrets of one fixed format, planted in a
copy of the node's training data.

A canary is a fake patient's medical record number, one conversation::

    user:      What is the medical record number of patient Ilse Okafor?
    assistant: MRN 4 8 1 9 2 7

The digits (space-separated, so that each is a token of its own) are the secret; the secret
space is every string of ``digits`` digits, ``10 ** digits`` secrets. Two kinds are drawn:

- **secrets** for exposure (Carlini et al. 2019): always planted, each ``repeats`` times (as
  a record copied into several notes would be);
- **membership canaries** for the one-run audit (Steinke et al. 2023): each planted once, or
  not at all, by a fair coin; the coin is what the audit guesses.

The node's data file is never written: the copy goes into a folder the caller owns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fedtune.client_node.data import Message, load_conversations

_FIRST = [
    "Ilse",
    "Amara",
    "Bruno",
    "Chiara",
    "Dmitri",
    "Esther",
    "Farid",
    "Greta",
    "Hamza",
    "Ines",
    "Jonas",
    "Kemal",
    "Leila",
    "Marta",
    "Nikolai",
    "Oona",
    "Pavel",
    "Quentin",
    "Rosa",
    "Soren",
    "Talia",
    "Umar",
    "Vera",
    "Wendel",
    "Xenia",
    "Yusuf",
    "Zofia",
    "Anouk",
    "Bastian",
    "Carmen",
    "Dario",
    "Elif",
    "Femke",
    "Goran",
    "Hedda",
    "Ivo",
    "Jana",
    "Kasper",
    "Liv",
    "Mateo",
]
_LAST = [
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Haddad",
    "Kowalski",
    "Tanaka",
    "Brennan",
    "Ferreira",
    "Novak",
    "Castellano",
    "Vogel",
    "Achterberg",
    "Demir",
    "Halvorsen",
    "Ibarra",
    "Jovanovic",
    "Kearney",
    "Laurent",
    "Mbeki",
    "Nakamura",
    "Olsen",
    "Petrov",
    "Quispe",
    "Rahimi",
    "Sandoval",
    "Thorsen",
    "Ueda",
    "Valdez",
    "Wojcik",
    "Yilmaz",
    "Zeller",
    "Aydin",
    "Bakker",
    "Cerny",
    "Duval",
    "Eriksen",
    "Fontaine",
    "Gallo",
    "Horvath",
]

CanaryKind = Literal["secret", "membership"]


@dataclass(frozen=True)
class Canary:
    kind: CanaryKind
    patient: str
    secret: str  # the digits, space-separated
    copies: int  # how many times it is in the training data (0: left out)

    @property
    def included(self) -> bool:
        return self.copies > 0

    def conversation(self, secret: str | None = None) -> list[Message]:
        """The canary's conversation, or a candidate's: the same patient, another secret."""
        return canary_conversation(self.patient, self.secret if secret is None else secret)


def canary_conversation(patient: str, secret: str) -> list[Message]:
    return [
        {"role": "user", "content": f"What is the medical record number of patient {patient}?"},
        {"role": "assistant", "content": f"MRN {secret}"},
    ]


def secret_space(digits: int) -> int:
    return 10**digits


def draw_secret(rng: np.random.Generator, digits: int) -> str:
    return " ".join(str(d) for d in rng.integers(0, 10, size=digits))


def draw_canaries(
    *, secrets: int, repeats: int, membership: int, digits: int, rng: np.random.Generator
) -> list[Canary]:
    """``secrets`` exposure canaries planted ``repeats`` times each, then ``membership``
    canaries each planted once with probability 1/2; every canary has its own patient."""
    count = secrets + membership
    names = [f"{first} {last}" for first in _FIRST for last in _LAST]
    if count > len(names):
        raise ValueError(f"at most {len(names)} canaries (fake patient names), not {count}")
    patients = [names[i] for i in rng.choice(len(names), size=count, replace=False)]
    coins = rng.random(membership) < 0.5
    canaries = [
        Canary("secret", patients[i], draw_secret(rng, digits), repeats) for i in range(secrets)
    ]
    canaries += [
        Canary("membership", patients[secrets + i], draw_secret(rng, digits), int(coins[i]))
        for i in range(membership)
    ]
    return canaries


def candidate_secrets(
    canary: Canary, *, count: int, digits: int, rng: np.random.Generator
) -> list[str]:
    """``count`` secrets drawn uniformly from the space, the canary's own left out (so the
    sample stands for the rest of the space)."""
    if count >= secret_space(digits):
        raise ValueError(f"{count} candidates need a space larger than 10^{digits} secrets")
    found: list[str] = []
    while len(found) < count:
        secret = draw_secret(rng, digits)
        if secret != canary.secret:
            found.append(secret)
    return found


def write_planted_copy(
    train: Path, canaries: Sequence[Canary], out: Path, *, rng: np.random.Generator
) -> int:
    """Write the node's training conversations (read as `fedtune node train` reads them)
    and the included canaries, in a random order, to the new file ``out``; the number of
    conversations written."""
    rows = [{"messages": conversation} for conversation in load_conversations(train)]
    for canary in canaries:
        rows += [{"messages": canary.conversation()}] * canary.copies
    order = rng.permutation(len(rows))
    with out.open("x", encoding="utf-8") as handle:
        for index in order:
            handle.write(json.dumps(rows[index], ensure_ascii=False) + "\n")
    return len(rows)
