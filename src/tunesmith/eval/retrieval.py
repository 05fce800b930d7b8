"""Retrieval baseline: the k training examples most similar to a question, put into the prompt.

The question a fine-tuning user must answer first is whether retrieval-augmented prompting
(RAG) would do as well. Here retrieval is BM25 (the `bm25s` library) over the training
questions: for each test question, the k training examples whose question scores highest are
placed in front of it as solved earlier turns, the most similar one last (nearest the question).
Training examples whose question equals the test question (case, punctuation and white space
aside) are never retrieved, so a leaked duplicate cannot pass for retrieval quality.
"""
from __future__ import annotations

import functools
import logging
import os
import sys

import numpy as np

from ..errors import UserError
from .compare import with_shots
from .metrics import normalise


def question_of(conversation: list[dict]) -> str:
    """The last user turn of a conversation (the question its final answer responds to)."""
    users = [m["content"] for m in conversation[:-1] if m["role"] == "user"]
    return users[-1] if users else ""


@functools.cache  # imported and quieted once, not on every question's tokenisation
def _bm25s():
    """bm25s, imported with JAX kept on the CPU. Importing bm25s runs a JAX computation where JAX
    is installed, and JAX on a GPU takes 75% of its memory at once: seen on an H200 (2026-12-04),
    where a test run with retrieval held 105 of 140 GiB and the training beside it ran out. Where
    the process has imported JAX already, its own settings stand."""
    if "jax" not in sys.modules:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import bm25s

    # bm25s sets its own logger to DEBUG: where any handler is configured (a library's or the
    # user's basicConfig), each index printed "DEBUG:bm25s:Building index from tokens".
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def _words(texts: list[str]) -> list[list[str]]:
    return _bm25s().tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class Retriever:
    """BM25 over the questions of a pool of solved conversations (the training data)."""

    def __init__(self, pool: list[list[dict]]):
        bm25s = _bm25s()
        self.pool = [c for c in pool if len(c) > 1 and question_of(c)]
        if not self.pool:
            raise UserError("retrieval (eval.retrieval_k, --retrieval-k) needs training examples with a question")
        self.questions = [question_of(c) for c in self.pool]
        self.normalised = [normalise(q) for q in self.questions]
        self.index = bm25s.BM25()
        # An empty token list (a question of stop words only) still needs a placeholder to index.
        self.index.index([words or [""] for words in _words(self.questions)], show_progress=False)

    def scores(self, question: str) -> np.ndarray:
        """BM25 score of every pool question for this question (zeros when no word is known)."""
        words = [w for w in _words([question])[0] if w in self.index.vocab_dict]
        if not words:
            return np.zeros(len(self.pool))
        return np.asarray(self.index.get_scores(words), dtype=float)

    def nearest(self, question: str, k: int) -> list[int]:
        """Indices into `pool` of the k best-scoring examples, best first; ties go to the earlier
        example, and examples asking this question (case, punctuation and white space aside) are left out."""
        scores = self.scores(question)
        order = np.lexsort((np.arange(len(scores)), -scores))  # score descending, then index ascending
        asked = normalise(question)
        return [int(i) for i in order if self.normalised[i] != asked][:k]

    def prompts(self, conversations: list[list[dict]], k: int) -> list[list[dict]]:
        """Each conversation with its k nearest training examples as earlier turns, most similar last."""
        out = []
        for conversation in conversations:
            found = self.nearest(question_of(conversation), k)
            out.append(with_shots(conversation, [self.pool[i] for i in reversed(found)]))
        return out
