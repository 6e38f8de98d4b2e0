"""Synthetic demo data sets for two kinds of node: a hospital and a bank.

Each example is a chat between a member of the public and the organisation's assistant. Many
intents, each with several phrasings and slots, and answers whose content follows from the
slots (a triage level from the symptom, a fee from the card type), so that a model must learn
rules rather than a handful of strings. Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from fedtune.common.errors import AlreadyExistsError, FedtuneError

Example = dict[str, list[dict[str, str]]]
Intent = Callable[[random.Random], tuple[str, str]]

DOMAINS = ("hospital", "bank")


class DemoDataError(FedtuneError, ValueError):
    """The demo data cannot be written as asked (nothing was written)."""


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


# test -> working days until results
_LAB_TESTS = {
    "full blood count": 1, "cholesterol panel": 2, "thyroid function": 3, "urine culture": 3,
    "HbA1c": 2, "vitamin D": 5, "allergy panel": 10, "biopsy": 14,
}  # fmt: skip


def _lab_results(rng: random.Random) -> tuple[str, str]:
    test, day = rng.choice(list(_LAB_TESTS)), rng.choice(_DAYS)
    days = _LAB_TESTS[test]
    ask = rng.choice(
        [
            f"I had a {test} on {day}. When will I get the results?",
            f"How long do {test} results take?",
            f"Are my {test} results from {day} ready yet?",
        ]
    )
    if days >= 10:
        answer = (
            f"{test.capitalize()} results take about {days} working days. Your doctor will "
            "call you to discuss them; they are not shown in the portal first."
        )
    else:
        answer = (
            f"{test.capitalize()} results take about {days} working day{'s' if days > 1 else ''}"
            " and appear in the patient portal as soon as they are ready."
        )
    return ask, answer


_LANGUAGES = ["Arabic", "Polish", "Turkish", "Ukrainian", "Spanish", "Mandarin", "sign language"]


def _interpreter(rng: random.Random) -> tuple[str, str]:
    language, day = rng.choice(_LANGUAGES), rng.choice(_DAYS)
    notice = rng.choice([1, 2, 4, 7])
    ask = rng.choice(
        [
            f"I need a {language} interpreter for my appointment on {day}, {notice} days from now.",
            f"Can you arrange {language} interpretation? My appointment is in {notice} days.",
        ]
    )
    if notice >= 2:
        answer = (
            f"Yes: I have booked a {language} interpreter for your {day} appointment, "
            "free of charge."
        )
    else:
        answer = (
            f"We need 2 days' notice to book a {language} interpreter in person; for tomorrow "
            "we will connect one by video at the start of your appointment."
        )
    return ask, answer


# vaccine -> minimum age in years
_VACCINES = {"flu": 65, "shingles": 70, "pneumococcal": 65, "RSV": 75, "COVID-19 booster": 75}


def _vaccine(rng: random.Random) -> tuple[str, str]:
    vaccine, age = rng.choice(list(_VACCINES)), rng.choice([34, 52, 66, 71, 78, 83])
    ask = rng.choice(
        [
            f"I am {age}. Can I get the {vaccine} vaccine here?",
            f"Is a {age}-year-old eligible for the free {vaccine} vaccine?",
        ]
    )
    minimum = _VACCINES[vaccine]
    if age >= minimum:
        answer = (
            f"Yes: from {minimum} the {vaccine} vaccine is free. Book it at the vaccination "
            "desk in Building A."
        )
    else:
        answer = (
            f"The free {vaccine} vaccine starts at {minimum}. At {age} you can get it at a "
            "pharmacy, or free if your GP says you are at risk."
        )
    return ask, answer


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
    "a foreign ATM withdrawal": "2% of the amount, at least 3 EUR",
    "an instant transfer": "0.50 EUR per transfer",
    "a paper statement": "1.50 EUR per statement",
    "an overdraft": "9.9% yearly interest on the overdrawn amount",
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
            f"How much does {fee} cost?",
            f"What is your fee for {fee}?",
            f"Do you charge anything for {fee}?",
        ]
    )
    return ask, f"The fee for {fee} is {_FEES[fee]}."


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


# region -> (fee, working days)
_REGIONS = {
    "Germany": ("free", 1), "Spain": ("free", 1), "Poland": ("free", 1),
    "the United Kingdom": ("5 EUR", 2), "Switzerland": ("5 EUR", 2),
    "the United States": ("15 EUR", 3), "India": ("15 EUR", 4), "Brazil": ("15 EUR", 5),
}  # fmt: skip


def _foreign_transfer(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(list(_REGIONS))
    amount = rng.choice([150, 400, 900, 2500, 7000])
    fee, days = _REGIONS[country]
    ask = rng.choice(
        [
            f"How much does it cost to send {amount} EUR to {country}?",
            f"I want to transfer {amount} EUR to a friend in {country}. How long does it take?",
            f"What are the fees for a transfer of {amount} EUR to {country}?",
        ]
    )
    plural = "s" if days > 1 else ""
    answer = (
        f"A transfer of {amount} EUR to {country} costs {fee} and arrives in {days} "
        f"working day{plural}."
    )
    if amount > 5000:
        answer += " Above 5000 EUR we confirm it with you by phone first."
    return ask, answer


# (account, term in months) -> yearly rate
_SAVINGS = {"easy access": 1.5, "fixed 12 months": 2.8, "fixed 24 months": 3.1, "junior saver": 3.5}


def _savings(rng: random.Random) -> tuple[str, str]:
    account = rng.choice(list(_SAVINGS))
    deposit = rng.choice([500, 2000, 10000, 50000])
    ask = rng.choice(
        [
            f"What interest would I get on {deposit} EUR in a {account} account?",
            f"What is the rate for {account} savings?",
        ]
    )
    rate = _SAVINGS[account]
    yearly = deposit * rate / 100
    answer = (
        f"The {account} account pays {rate}% a year; on {deposit} EUR that is about "
        f"{yearly:.0f} EUR a year."
    )
    if account.startswith("fixed"):
        answer += " You cannot withdraw before the term ends."
    return ask, answer


def _travel(rng: random.Random) -> tuple[str, str]:
    country, weeks = rng.choice(list(_REGIONS)), rng.choice([1, 2, 3, 6])
    card = rng.choice(list(_CARDS))
    ask = rng.choice(
        [
            f"I'm going to {country} for {weeks} weeks. Will my {card} work there?",
            f"Do I need to tell you before using my {card} in {country}?",
        ]
    )
    fee, _ = _REGIONS[country]
    if fee == "free":
        answer = (
            f"Your {card} works in {country} like at home, with no extra fees and no notice needed."
        )
    else:
        answer = (
            f"Your {card} works in {country}; card payments there cost 1.5% extra. "
            "No notice is needed, but keep the app's notifications on."
        )
    return ask, answer


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


_ANSWER_OPENERS = [
    "",
    "",
    "",
    "Thanks for asking. ",
    "Of course. ",
    "Certainly. ",
    "Good question. ",
]


def _phrase(rng: random.Random, ask: str) -> str:
    """Vary how people open and close a message; the answer must not depend on it."""
    opener = rng.choice(_OPENERS)
    if opener:
        ask = (
            ask[0].lower() + ask[1:]
            if opener.endswith(", ") and not ask.startswith(("I ", "I'"))
            else ask
        )
    return opener + ask + rng.choice(_CLOSERS)


_INTENTS: dict[str, list[Intent]] = {
    "hospital": [
        _triage,
        _triage,
        _department,
        _visiting,
        _fasting,
        _refill,
        _reschedule,
        _lab_results,
        _interpreter,
        _vaccine,
    ],
    "bank": [
        _lost_card,
        _dispute,
        _dispute,
        _limit,
        _fee,
        _password,
        _open_account,
        _foreign_transfer,
        _savings,
        _travel,
    ],
}
_SYSTEMS = {"hospital": _HOSPITAL_SYSTEM, "bank": _BANK_SYSTEM}


def generate_examples(domain: str, count: int, *, seed: int = 0) -> list[Example]:
    """``count`` distinct chat examples for ``domain`` ("hospital" or "bank")."""
    if domain not in _INTENTS:
        raise DemoDataError(f"unknown demo domain {domain!r}; expected one of {DOMAINS}")
    rng = random.Random(f"{domain}-{seed}")
    seen: set[str] = set()
    examples: list[Example] = []
    attempts = 0
    while len(examples) < count:
        attempts += 1
        if attempts > count * 50:
            raise DemoDataError(f"cannot generate {count} distinct {domain} examples")
        ask, answer = rng.choice(_INTENTS[domain])(rng)
        ask = _phrase(rng, ask)
        answer = rng.choice(_ANSWER_OPENERS) + answer
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


def demo_data_paths(out_dir: Path, domain: str) -> tuple[Path, Path]:
    """Where :func:`write_demo_data` writes ``domain``'s train and held-out files."""
    return out_dir / domain / "train.jsonl", out_dir / domain / "held_out.jsonl"


def check_demo_output(out_dir: Path, domains: Sequence[str], *, train: int, held_out: int) -> None:
    """Refuse, before anything is written, counts below 1, an ``out_dir`` that is a file, and
    data files that exist already: they may be someone's data and are never overwritten."""
    for name, count in (("train", train), ("held-out", held_out)):
        if count < 1:
            raise DemoDataError(f"the {name} example count must be at least 1, not {count}")
    if out_dir.exists() and not out_dir.is_dir():
        raise DemoDataError(f"{out_dir}: is a file, not a folder")
    for domain in domains:
        if domain not in DOMAINS:
            raise DemoDataError(f"unknown demo domain {domain!r}; expected one of {DOMAINS}")
        for path in demo_data_paths(out_dir, domain):
            if path.exists() or path.is_symlink():
                raise AlreadyExistsError(f"{path} already exists; data files are not overwritten")


def write_demo_data(
    out_dir: Path, *, domain: str, train: int = 800, held_out: int = 100, seed: int = 0
) -> tuple[Path, Path]:
    """Write ``OUT/DOMAIN/train.jsonl`` and ``held_out.jsonl``; returns both paths. Existing
    files are never overwritten (:func:`check_demo_output`)."""
    check_demo_output(out_dir, (domain,), train=train, held_out=held_out)
    examples = generate_examples(domain, train + held_out, seed=seed)
    paths = demo_data_paths(out_dir, domain)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path, part in zip(paths, (examples[:train], examples[train:]), strict=True):
        with path.open("x", encoding="utf-8") as handle:  # "x": never over a file made meanwhile
            handle.write("".join(json.dumps(example) + "\n" for example in part))
    return paths
