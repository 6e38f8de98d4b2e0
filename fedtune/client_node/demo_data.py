"""Synthetic demo data sets for two kinds of node: a hospital and a bank.

Each example is a chat between a member of the public and the organisation's assistant. Many
intents, each with several phrasings and slots, and answers whose content follows from the
slots (a triage level from the symptom, a fee from the card type), so that a model must learn
rules rather than a handful of strings. Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

Example = dict[str, list[dict[str, str]]]
Intent = Callable[[random.Random], tuple[str, str]]

DOMAINS = ("hospital", "bank")

# Short on purpose: every token of every example costs training time on a CPU.
_HOSPITAL_SYSTEM = "Riverside General Hospital help line. Triage and direct; never diagnose."
_BANK_SYSTEM = "Northgate Bank support. Never ask for card numbers, PINs or passwords."

# symptom -> (triage level, where to go)
_SYMPTOMS = {
    "crushing chest pain spreading to my left arm": ("emergency", "call 112 now"),
    "sudden weakness on one side of my face": ("emergency", "call 112 now"),
    "trouble breathing and blue lips": ("emergency", "call 112 now"),
    "a high fever of 39.5 and a stiff neck": ("urgent", "come to the emergency department today"),
    "a deep cut on my hand that keeps bleeding": (
        "urgent",
        "come to the emergency department today",
    ),
    "severe abdominal pain on the lower right side": (
        "urgent",
        "come to the emergency department today",
    ),
    "a sprained ankle that is swollen": ("same week", "book a slot at the minor injuries clinic"),
    "a cough that has lasted ten days": ("same week", "book an appointment with your GP"),
    "burning when I urinate": ("same week", "book an appointment with your GP"),
    "a mild rash on my forearm": ("routine", "book a routine appointment"),
    "occasional heartburn after meals": ("routine", "book a routine appointment"),
    "dry eyes in the evening": ("routine", "book a routine appointment"),
}
_WHO = ["I have", "My father has", "My daughter has", "My wife has", "My neighbour has", "I've got"]
_SINCE = [
    "since this morning",
    "since yesterday",
    "for two days",
    "for a few hours",
    "since last night",
]
_DEPARTMENTS = {
    "cardiology": ("Building B, floor 2", "Monday to Friday, 8:00 to 16:00"),
    "radiology": ("Building A, basement", "every day, 7:00 to 21:00"),
    "maternity": ("Building C, floor 1", "every day, around the clock"),
    "physiotherapy": ("Building D, ground floor", "Monday to Friday, 9:00 to 17:00"),
    "oncology": ("Building B, floor 4", "Monday to Friday, 8:30 to 17:30"),
    "paediatrics": ("Building C, floor 3", "every day, 8:00 to 20:00"),
}
_VISIT_WARDS = {
    "intensive care": "two visitors at a time, 14:00 to 20:00, after calling the ward",
    "the children's ward": "parents at any time, other visitors 15:00 to 19:00",
    "the surgical ward": "two visitors at a time, 15:00 to 20:00",
    "the maternity ward": "partners at any time, other visitors 16:00 to 19:00",
}
_PROCEDURES = {
    "a colonoscopy": "a clear-fluid diet the day before and nothing to eat 6 hours before",
    "a gastroscopy": "nothing to eat for 6 hours and no drinks for 2 hours before",
    "knee surgery": "nothing to eat after midnight and clear water until 6:00",
    "an MRI scan": "no fasting, but remove all metal and tell us about any implants",
    "a blood glucose test": "nothing to eat or drink except water for 8 hours before",
}
_MEDICINES = [
    "metformin",
    "lisinopril",
    "atorvastatin",
    "levothyroxine",
    "salbutamol",
    "omeprazole",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
_TIMES = ["8:30", "9:15", "10:00", "11:45", "13:30", "14:15", "15:40"]


def _triage(rng: random.Random) -> tuple[str, str]:
    symptom = rng.choice(list(_SYMPTOMS))
    level, action = _SYMPTOMS[symptom]
    who, since = rng.choice(_WHO), rng.choice(_SINCE)
    ask = rng.choice(
        [
            f"{who} {symptom} {since}. What should we do?",
            f"{who} {symptom} {since}. Is it serious?",
            f"Hello, {who.lower()} {symptom} {since}. Should we come in?",
            f"Quick question: {who.lower()} {symptom}, {since}.",
        ]
    )
    answer = f"Triage level: {level}. Please {action}."
    if level == "emergency":
        answer += " Do not drive yourself."
    elif level == "urgent":
        answer += " Bring a list of current medicines."
    else:
        answer += " If it gets worse, call us again."
    return ask, answer


def _department(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(list(_DEPARTMENTS))
    place, hours = _DEPARTMENTS[name]
    ask = rng.choice(
        [
            f"Where is {name}?",
            f"How do I find the {name} department?",
            f"When is {name} open?",
            f"I have an appointment in {name}. Where do I go and when are you open?",
        ]
    )
    return ask, f"{name.capitalize()} is in {place}. Opening hours: {hours}."


def _visiting(rng: random.Random) -> tuple[str, str]:
    ward = rng.choice(list(_VISIT_WARDS))
    ask = rng.choice(
        [
            f"What are the visiting hours for {ward}?",
            f"Can I visit someone in {ward} today?",
            f"My mother is in {ward}. When can we visit?",
        ]
    )
    return ask, f"Visiting in {ward}: {_VISIT_WARDS[ward]}."


def _fasting(rng: random.Random) -> tuple[str, str]:
    procedure = rng.choice(list(_PROCEDURES))
    day = rng.choice(_DAYS)
    ask = rng.choice(
        [
            f"I'm having {procedure} on {day}. Do I need to fast?",
            f"How should I prepare for {procedure}?",
            f"What can I eat before {procedure} on {day}?",
        ]
    )
    return ask, f"For {procedure}: {_PROCEDURES[procedure]}. Bring your referral letter."


def _refill(rng: random.Random) -> tuple[str, str]:
    medicine = rng.choice(_MEDICINES)
    days = rng.choice([2, 3, 5, 7])
    ask = rng.choice(
        [
            f"I have {days} days of {medicine} left. How do I get a refill?",
            f"Can I renew my {medicine} prescription? Only {days} days left.",
            f"Running out of {medicine} in {days} days, what do I do?",
        ]
    )
    if days <= 3:
        answer = (
            f"With {days} days left, ask your pharmacy for an emergency supply of {medicine} "
            "today, then request a renewal through the patient portal."
        )
    else:
        answer = (
            f"{days} days is enough: request a renewal of {medicine} through the patient "
            "portal; it takes 2 working days."
        )
    return ask, answer


def _reschedule(rng: random.Random) -> tuple[str, str]:
    old_day, new_day = rng.sample(_DAYS, 2)
    time = rng.choice(_TIMES)
    ask = rng.choice(
        [
            f"Can I move my {old_day} {time} appointment to {new_day}?",
            f"I can't make it on {old_day} at {time}. Is {new_day} possible?",
            f"Please reschedule my appointment from {old_day} to {new_day}.",
        ]
    )
    return ask, (
        f"I have asked the clinic to move your {old_day} {time} appointment to {new_day} "
        "at the same time. "
        "You will get a confirmation text within one working day."
    )


# card type -> (replacement fee, delivery days)
_CARDS = {
    "debit card": ("free", 5),
    "credit card": ("free", 7),
    "premium credit card": ("free", 2),
    "business card": ("15 EUR", 5),
}
_LIMITS = {"standard": 2000, "plus": 5000, "premium": 15000, "business": 50000}
_MERCHANTS = [
    "an online shop",
    "a petrol station",
    "a hotel in Lisbon",
    "a streaming service",
    "a supermarket",
    "an airline",
    "a car rental company",
    "a restaurant in Berlin",
]
_FEES = {
    "foreign ATM withdrawal": "2% of the amount, at least 3 EUR",
    "instant transfer": "0.50 EUR per transfer",
    "paper statement": "1.50 EUR per statement",
    "overdraft": "9.9% yearly interest on the overdrawn amount",
}


def _lost_card(rng: random.Random) -> tuple[str, str]:
    card = rng.choice(list(_CARDS))
    fee, days = _CARDS[card]
    ask = rng.choice(
        [
            f"I lost my {card}. What do I do?",
            f"My {card} was stolen last night!",
            f"I can't find my {card} anywhere, please help.",
            f"Someone took my wallet with my {card} in it.",
        ]
    )
    return ask, (
        f"I have blocked your {card}. A new one is on its way ({fee}) and arrives within "
        f"{days} working days. Check your recent transactions and tell us about any you do "
        "not recognise."
    )


def _dispute(rng: random.Random) -> tuple[str, str]:
    merchant = rng.choice(_MERCHANTS)
    amount = round(rng.choice([rng.uniform(5, 499), rng.uniform(500, 3000)]), 2)
    ask = rng.choice(
        [
            f"There is a payment of {amount:.2f} EUR to {merchant} that I never made.",
            f"I don't recognise a {amount:.2f} EUR charge from {merchant}.",
            f"Why was I charged {amount:.2f} EUR by {merchant}? It wasn't me.",
        ]
    )
    if amount >= 500:
        answer = (
            f"I have opened a fraud case for {amount:.2f} EUR to {merchant} and blocked the card. "
            "A specialist will call you within 24 hours."
        )
    else:
        answer = (
            f"I have opened a dispute for {amount:.2f} EUR to {merchant}. "
            "You will hear from us within 10 working days."
        )
    return ask, answer


def _limit(rng: random.Random) -> tuple[str, str]:
    account = rng.choice(list(_LIMITS))
    ask = rng.choice(
        [
            f"What is the daily transfer limit on a {account} account?",
            f"How much can I transfer per day with my {account} account?",
            f"Is there a maximum daily transfer on {account} accounts?",
        ]
    )
    return ask, (
        f"On a {account} account you can transfer up to {_LIMITS[account]} EUR per day. "
        "You can raise it temporarily in the app under Settings > Limits."
    )


def _fee(rng: random.Random) -> tuple[str, str]:
    fee = rng.choice(list(_FEES))
    ask = rng.choice(
        [
            f"How much does a {fee} cost?",
            f"What is your fee for a {fee}?",
            f"Do you charge anything for a {fee}?",
        ]
    )
    return ask, f"The fee for a {fee} is {_FEES[fee]}."


def _password(rng: random.Random) -> tuple[str, str]:
    channel = rng.choice(["the app", "online banking", "the website"])
    ask = rng.choice(
        [
            f"I forgot my password for {channel}.",
            f"I'm locked out of {channel}.",
            f"How do I reset my login for {channel}?",
        ]
    )
    return ask, (
        f"Choose 'Forgot password' on the login page of {channel} and confirm with your "
        "card reader. Never share your password or PIN with anyone, including us."
    )


def _open_account(rng: random.Random) -> tuple[str, str]:
    who = rng.choice(["myself", "my son who is 16", "my small business", "my partner and me"])
    ask = rng.choice(
        [
            f"How can I open an account for {who}?",
            f"I want a new account for {who}. What do you need?",
        ]
    )
    needs = {
        "myself": "an ID card or passport and proof of address",
        "my son who is 16": "his ID, your ID as parent, and both signatures",
        "my small business": (
            "the company registration, the director's ID and the articles of association"
        ),
        "my partner and me": "both IDs and proof of a shared address",
    }[who]
    return (
        ask,
        f"To open an account for {who} we need {needs}. You can start in the app or at any branch.",
    )


_OPENERS = [
    "",
    "",
    "Hi. ",
    "Hello, ",
    "Good morning. ",
    "Hi there, ",
    "Sorry to bother you. ",
    "Hey, ",
]
_CLOSERS = [
    "",
    "",
    " Thanks.",
    " Thank you!",
    " Please help.",
    " Thanks in advance.",
    " Any advice?",
]


def _phrase(rng: random.Random, ask: str) -> str:
    """Vary how people open and close a message; the answer must not depend on it."""
    opener = rng.choice(_OPENERS)
    if opener:
        ask = ask[0].lower() + ask[1:] if opener.endswith(", ") and not ask.startswith("I") else ask
    return opener + ask + rng.choice(_CLOSERS)


_INTENTS: dict[str, list[Intent]] = {
    "hospital": [_triage, _triage, _department, _visiting, _fasting, _refill, _reschedule],
    "bank": [_lost_card, _dispute, _dispute, _limit, _fee, _password, _open_account],
}
_SYSTEMS = {"hospital": _HOSPITAL_SYSTEM, "bank": _BANK_SYSTEM}


def generate_examples(domain: str, count: int, *, seed: int = 0) -> list[Example]:
    """``count`` distinct chat examples for ``domain`` ("hospital" or "bank")."""
    if domain not in _INTENTS:
        raise ValueError(f"unknown demo domain {domain!r}; expected one of {DOMAINS}")
    rng = random.Random(f"{domain}-{seed}")
    seen: set[str] = set()
    examples: list[Example] = []
    attempts = 0
    while len(examples) < count:
        attempts += 1
        if attempts > count * 50:
            raise ValueError(f"cannot generate {count} distinct {domain} examples")
        ask, answer = rng.choice(_INTENTS[domain])(rng)
        ask = _phrase(rng, ask)
        if ask in seen:
            continue
        seen.add(ask)
        examples.append(
            {
                "messages": [
                    {"role": "system", "content": _SYSTEMS[domain]},
                    {"role": "user", "content": ask},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return examples


def write_demo_data(
    out_dir: Path, *, domain: str, train: int = 800, held_out: int = 100, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``OUT/DOMAIN/train.jsonl`` and ``held_out.jsonl``; returns both paths."""
    examples = generate_examples(domain, train + held_out, seed=seed)
    folder = out_dir / domain
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "train.jsonl", folder / "held_out.jsonl")
    for path, part in zip(paths, (examples[:train], examples[train:]), strict=True):
        path.write_text("".join(json.dumps(example) + "\n" for example in part), encoding="utf-8")
    return paths
