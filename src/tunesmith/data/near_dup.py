"""Near-duplicates: examples that say almost the same thing in slightly different words.

Each example's text (its non-system turns, normalised as for exact duplicates) becomes the set of
its word 3-grams; MinHash signatures of those sets (the `datasketch` library, 128 permutations)
estimate their Jaccard similarity, and LSH finds the candidate pairs without comparing every pair.
A pair whose estimated similarity reaches the threshold is a near-duplicate. Within train the
first example stays and later ones count as its near-duplicates; between train and a validation
or test split, every eval example close to a training example counts as leakage.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .sources import Problem

NUM_PERM = 128
SHINGLE_WORDS = 3
KIND = "duplicate (near)"
_SEPARATORS = re.compile(r"[\W_]+")  # as for normalised-text duplicates: case and punctuation do not count


def text_of(conversation: list[dict]) -> str:
    return "\n".join(m["content"] for m in conversation if m["role"] != "system")


def shingles(text: str) -> set[bytes]:
    """Word 3-grams of the normalised text (the words themselves when there are fewer than three)."""
    words = _SEPARATORS.sub(" ", text.lower()).split()
    if len(words) < SHINGLE_WORDS:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i:i + SHINGLE_WORDS]).encode() for i in range(len(words) - SHINGLE_WORDS + 1)}


def signatures(conversations: list[list[dict]]) -> list:
    """A MinHash per example (None for an example without words)."""
    from datasketch import MinHash

    sets = [shingles(text_of(c)) for c in conversations]
    found = iter(MinHash.bulk([sorted(s) for s in sets if s], num_perm=NUM_PERM, seed=1))
    return [next(found) if s else None for s in sets]


@dataclass
class Match:
    index: int  # the near-duplicate
    first: int  # the example it resembles (earlier in train, or in train for another split)
    similarity: float


def _close(signature, index, pool: list, threshold: float) -> list[Match]:
    """Every example of `pool` (in `index`) at the threshold or above: LSH's candidates, checked."""
    found = [Match(-1, j, pool[j].jaccard(signature)) for j in index.query(signature)]
    return [m for m in found if m.similarity >= threshold]


def _closest(matches: list[Match]) -> Match | None:
    """The closest of `_close`'s matches (the earliest of equals)."""
    return max(matches, key=lambda m: (m.similarity, -m.first), default=None)


def within(train: list, threshold: float) -> list[Match]:
    """Later training examples that near-duplicate an earlier kept one (kept ones only: a removed
    example is not the first of another)."""
    from datasketch import MinHashLSH

    index = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    found = []
    for i, signature in enumerate(train):
        if signature is None:
            continue
        match = _closest(_close(signature, index, train, threshold))
        if match:
            match.index = i
            found.append(match)
        else:
            index.insert(i, signature)
    return found


def across(train: list, other: list, threshold: float, every: bool = False) -> list[Match]:
    """Examples of `other` that near-duplicate a training example (leakage): each with its closest
    training example, or (`every`) with each training example it is close to."""
    from datasketch import MinHashLSH

    index = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    for i, signature in enumerate(train):
        if signature is not None:
            index.insert(i, signature)
    found = []
    for i, signature in enumerate(other):
        if signature is None:
            continue
        matches = _close(signature, index, train, threshold)
        if not every:
            matches = [_closest(matches)] if matches else []
        for match in matches:
            match.index = i
        found += matches
    return found


def find(train: list[list[dict]], others: dict[str, list[list[dict]]], threshold: float
         ) -> tuple[list[Match], dict[str, list[Match]]]:
    """Near-duplicates within train, and of each other split's examples in train."""
    signed = signatures(train)
    return within(signed, threshold), {name: across(signed, signatures(c), threshold) for name, c in others.items()}


def remove(train: tuple[list, list], others: dict[str, tuple[list, list]], threshold: float
           ) -> tuple[list[int], list[Problem]]:
    """data.dedup: near. Indices of the training examples to keep, and a Problem for each removed
    one: a near-duplicate of an earlier training example, or of a validation / test example."""
    conversations, origins = train
    signed = signatures(conversations)
    inside = within(signed, threshold)
    # Every training example close to an eval example goes (its closest may be a near-duplicate removed above).
    leaks = {name: across(signed, signatures(c), threshold, every=True) for name, (c, _) in others.items()}
    problems = {}
    for m in inside:
        file, line = origins[m.first]
        problems[m.index] = Problem(*origins[m.index], f"near-duplicate (similarity {m.similarity:.2f}) of "
                                                       f"{file}:{line}", KIND)
    for name, matches in leaks.items():
        for m in matches:
            if m.first not in problems:
                file, line = others[name][1][m.index]
                problems[m.first] = Problem(*origins[m.first], f"near-duplicate (similarity {m.similarity:.2f}) "
                                                               f"of {name} example {file}:{line}", f"{KIND}, of {name}")
    keep = [i for i in range(len(conversations)) if i not in problems]
    return keep, [problems[i] for i in sorted(problems)]


def report(train: list[list[dict]], train_origins: list, others: dict[str, tuple[list, list]], threshold: float,
           first: int = 3) -> dict:
    """For `data check`: counts with the first locations, within train and between train and each split."""
    inside, leaks = find(train, {name: c for name, (c, _) in others.items()}, threshold)
    # The examples one conversation makes, one per answer with its history (data/tokenize.py turn_examples),
    # share that history: not near-duplicates. Rows of one raw-text document are, and are named so.
    inside = [m for m in inside if train_origins[m.index] != train_origins[m.first] or train[m.index][0]["role"] == "text"]

    def pair(origins, m, within):
        one, other = (f"{file}:{line}" for file, line in (origins[m.index], train_origins[m.first]))
        if one != other:
            return f"{one} ~ {other}"
        # the same place in another split: one file given as train and as test
        return f"{one} (two rows of one raw-text document)" if within else f"{one} (the same record: one file in both)"

    def firsts(origins, matches, within=False):  # distinct locations: a document's rows may repeat one
        return list(dict.fromkeys(pair(origins, m, within) for m in matches))[:first]

    out = {"threshold": threshold, "within_train": {"count": len(inside), "first": firsts(train_origins, inside, True)}}
    for name, matches in leaks.items():
        out[f"{name}_in_train"] = {"count": len(matches), "first": firsts(others[name][1], matches)}
    return out
