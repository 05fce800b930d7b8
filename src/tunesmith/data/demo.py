"""The built-in demo task: support-ticket triage.

A customer's free-text ticket must become a JSON object with its category, priority, product
and whether a human must take over. Tickets are assembled from many phrasings of each cue, in
shuffled order, with names, order numbers and filler, so the answer has to be read from the
text. Seeded: the same seed gives the same tickets.
"""
from __future__ import annotations

import json
import random

SYSTEM_PROMPT = (
    "Triage the support ticket. Reply with JSON only: category (billing|technical|account|shipping|refund), "
    "priority (low|medium|high|urgent), product, needs_human (true|false)."
)
FIELDS = ("category", "priority", "product", "needs_human")

PRODUCTS = [
    "CloudSync", "PixelPad", "NoteNest", "ShopTrack", "Beacon Router", "FitBand 3", "HomeHub",
    "PayFlow", "StreamBox", "Atlas CRM", "SnapPrint", "VoiceMate", "Orbit Drive", "TaskLine",
]

ISSUES = {
    "billing": [
        "I was charged twice for {p} this month",
        "my invoice for {p} shows the wrong amount",
        "the {p} subscription price went up without any notice",
        "my card was billed for {p} even though I'm on the free plan",
        "there is a charge from {p} on my statement that I don't recognise",
        "the {p} receipt lists a plan I never picked",
        "your system keeps billing me for two {p} licences but I only have one",
        "I was billed the yearly rate for {p} instead of the monthly one",
    ],
    "technical": [
        "{p} crashes every time I open it",
        "{p} stopped syncing since yesterday's update",
        "I get an error code 503 whenever {p} tries to upload",
        "{p} can't connect to the server anymore",
        "the {p} screen freezes after a few minutes",
        "{p} is extremely slow and keeps timing out",
        "after the update {p} shows a blank page",
        "the {p} firmware update fails halfway through",
    ],
    "account": [
        "I can't log in to my {p} account",
        "the password reset link for {p} never arrives",
        "I need to change the email address on my {p} account",
        "my {p} account got locked after too many attempts",
        "the two-factor code for {p} isn't being sent to my phone",
        "I want to add a second user to my {p} account",
        "{p} says my username doesn't exist",
        "I'd like to merge my two {p} accounts into one",
    ],
    "shipping": [
        "my {p} order still hasn't arrived",
        "the tracking number for my {p} doesn't work",
        "the {p} package was delivered to the wrong address",
        "my {p} has been stuck in transit for ten days",
        "the courier says the {p} parcel was delivered but nothing came",
        "I need to change the delivery address for my {p} order",
        "only half of my {p} order was in the box",
        "the {p} delivery date keeps getting pushed back",
    ],
    "refund": [
        "I want my money back for {p}",
        "please refund my {p} purchase",
        "I returned the {p} three weeks ago and still have no refund",
        "{p} isn't what was advertised, so I'd like a refund",
        "how do I get reimbursed for the {p} I sent back",
        "I cancelled {p} within the trial and want the payment returned",
        "I'm requesting a full refund for {p}",
        "the refund for my {p} return was for the wrong amount",
    ],
}

PRIORITY = {
    "urgent": [
        "Our whole team is blocked right now.",
        "This is an emergency, we are losing sales every minute.",
        "I need this fixed within the hour.",
        "Everything is down for us, please act immediately.",
        "URGENT: this is stopping our business completely.",
    ],
    "high": [
        "This is seriously affecting my work, please fix it today.",
        "I need a solution by the end of the day.",
        "Please treat this as a priority, it's causing real problems.",
        "This is really frustrating and needs to be sorted soon.",
        "I rely on this daily, so a quick fix today would help a lot.",
    ],
    "medium": [
        "Could you look into it sometime this week?",
        "It would be good to have this sorted in the next few days.",
        "Please get back to me when you can this week.",
        "It's annoying but I can work around it for a few days.",
        "A fix within the week would be fine.",
    ],
    "low": [
        "No rush at all, just wanted to let you know.",
        "Whenever you have time is fine.",
        "Not urgent, just a heads-up.",
        "It's a minor thing, no hurry.",
        "Low priority, take your time.",
    ],
}

HUMAN = [
    "I want to speak to a real person, not a bot.",
    "Please have a manager call me.",
    "If this isn't resolved I will contact my lawyer.",
    "This is the third time I'm writing, I need a human to handle it.",
    "Can someone from your staff phone me about this?",
    "I'm filing a formal complaint about this.",
]

OPENINGS = ["Hi,", "Hello,", "Hi team,", "Dear support,", "Hey there,", "Good morning,", "", "", "To whom it may concern,"]
FILLERS = [
    "I've been a customer for {n} years.",
    "My order number is #{o}.",
    "I already tried restarting everything.",
    "I'm writing from my phone, sorry for typos.",
    "I checked your help pages but found nothing.",
    "My account ID is {o}.",
    "I'm using the latest version as far as I know.",
    "",
    "",
]
CLOSINGS = ["Thanks,", "Regards,", "Thank you,", "Cheers,", "Best,", "", ""]
NAMES = ["Anna", "Ben", "Carla", "Dmitri", "Elif", "Farah", "Goran", "Hana", "Ivan", "Jo", "Kwame", "Lena", "Mateo", "Noor"]


def make_ticket(rng: random.Random) -> tuple[str, dict]:
    category = rng.choice(list(ISSUES))
    priority = rng.choice(list(PRIORITY))
    product = rng.choice(PRODUCTS)
    needs_human = rng.random() < 0.3
    issue = rng.choice(ISSUES[category]).format(p=product)
    issue = issue[0].upper() + issue[1:] + rng.choice([".", ".", "!", " and I don't know what to do."])
    middle = [issue, rng.choice(PRIORITY[priority])]
    filler = rng.choice(FILLERS).format(n=rng.randint(2, 9), o=rng.randint(10000, 99999))
    if filler:
        middle.insert(rng.randint(0, len(middle)), filler)
    if needs_human:
        middle.insert(rng.randint(1, len(middle)), rng.choice(HUMAN))
    opening, closing = rng.choice(OPENINGS), rng.choice(CLOSINGS)
    parts = ([opening] if opening else []) + middle + ([f"{closing} {rng.choice(NAMES)}"] if closing else [])
    label = {"category": category, "priority": priority, "product": product, "needs_human": needs_human}
    return " ".join(parts), label


def example(ticket: str, label: dict) -> dict:
    return {"messages": [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": ticket},
        {"role": "assistant", "content": json.dumps(label)},
    ]}


def make_splits(train_size: int, seed: int = 0, validation_size: int = 100, test_size: int = 200) -> dict[str, list[dict]]:
    """Disjoint train / validation / test splits of chat examples; no ticket text is in two splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits = {}
    for name, size in (("train", train_size), ("validation", validation_size), ("test", test_size)):
        rows = []
        while len(rows) < size:
            ticket, label = make_ticket(rng)
            if ticket in seen:
                continue
            seen.add(ticket)
            rows.append(example(ticket, label))
        splits[name] = rows
    return splits
