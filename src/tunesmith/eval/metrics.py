"""Scoring generated answers against references, one score row per example.

Per-example rows (not only means) let `compare` resample examples for bootstrap intervals and
count wins, ties and losses.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import re
import string
import sys
import traceback
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ..data.tools import call_problem
from ..errors import UserError


def parse_json_object(text: str) -> dict | None:
    """The first JSON object in the text (models sometimes wrap it in prose or code fences)."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start >= 0:
        try:  # the decoder, not brace counting: a string value may hold a brace
            return decoder.raw_decode(text, start)[0]
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def same_value(got, expected) -> bool:
    """JSON equality: true is not 1 (Python's == says it is), 1 is 1.0; lists and objects compared within."""
    if isinstance(got, bool) or isinstance(expected, bool):
        return got is expected
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(same_value(got[k], expected[k]) for k in got)
    if isinstance(got, list) and isinstance(expected, list):
        return len(got) == len(expected) and all(map(same_value, got, expected))
    return got == expected


def json_example_scores(prediction: str, reference: str, fields: list[str] | None = None) -> dict[str, float]:
    """JSON validity, each field right or not, and all fields right, for one answer.

    The reference is read as example_scores detected it, with parse_json_object (a reference like
    'Answer: {...}' holds its object after prose), never with a stricter parser."""
    expected = parse_json_object(reference)
    if expected is None:
        raise ValueError(f"reference holds no JSON object: {reference[:80]!r}")
    keys = fields or list(expected)
    got = parse_json_object(prediction)
    right = {k: float(got is not None and k in got and same_value(got[k], expected.get(k))) for k in keys}
    return {"json_valid": float(got is not None), "all_fields": float(got is not None and all(right.values())),
            **{f"field/{k}": v for k, v in right.items()}}


def json_field_scores(predictions: list[str], references: list[str], fields: list[str] | None = None) -> dict:
    """JSON validity, accuracy of each field, and the share with every field right."""
    return mean_scores([json_example_scores(p, r, fields) for p, r in zip(predictions, references)])


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, runs of white space to one space."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(1, len(references))


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalise(text: str) -> str:
    """The normalisation of the official SQuAD evaluation script (v1.1), which token F1 and
    normalised exact match are defined with: lower case, punctuation removed, the articles a / an /
    the removed, white space collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


_PUNCTUATION = frozenset(string.punctuation)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: the overlap of the normalised words, counted with multiplicity."""
    got, want = squad_normalise(prediction).split(), squad_normalise(reference).split()
    if not got or not want:
        return float(got == want)
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


class Words:
    """rouge-score's tokeniser for every script: its default keeps a-z and 0-9 only, so any two
    Russian, Greek or Chinese texts, the same or not, scored 0. A word is a run of letters, digits and
    combining marks (Devanagari's and Thai's vowel signs belong to their word), except that each
    Chinese character or kana is a word of its own (those scripts put no spaces between words). On
    ASCII text the words are the default's."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        words, word = [], []
        for char in text.lower():
            kind = unicodedata.category(char)[0]
            if kind in "LNM" and _one_per_character(char):
                words += ["".join(word)] if word else []
                words.append(char)
                word = []
            elif kind in "LNM" and (word or kind != "M"):
                word.append(char)
            elif word:
                words.append("".join(word))
                word = []
        return words + (["".join(word)] if word else [])


def _one_per_character(char: str) -> bool:
    """Chinese characters (and their compatibility forms) and kana: a word each."""
    code = ord(char)
    return 0x3040 <= code <= 0x30FF or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF


@functools.lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=Words())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 as the `rouge-score` package computes it (Google's reimplementation of
    ROUGE-1.5.5, the one most papers and `evaluate` report), with its default's words on ASCII text
    (lower case, runs of a-z and 0-9) and `Words` on others, no stemming, the longest common
    subsequence over the whole text (rougeL, not rougeLsum)."""
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def repetition(text: str, n: int = 4) -> float:
    """The share of the text's word n-grams (split at white space, lower case) that repeat an
    earlier one: 0 for text that never restates itself, towards 1 for a loop, greedy decoding's
    common failure on small fine-tuned models. Punctuation counts as words, so '- - - -' loops too."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def text_example_scores(prediction: str, reference: str) -> dict[str, float]:
    return {"exact_match": float(prediction.strip() == reference.strip()),
            "normalised_exact_match": float(squad_normalise(prediction) == squad_normalise(reference)),
            "token_f1": token_f1(prediction, reference),
            "rouge_l": rouge_l(prediction, reference),
            "repetition": repetition(prediction)}


def parse_tool_calls(text: str) -> list[dict]:
    """The tool calls in a generated answer, as {"name", "arguments"}: every JSON object with a "name" and
    "arguments" (or Llama 3.1's "parameters"), in the families' wrappings (Qwen's <tool_call> tags, Mistral's
    [TOOL_CALLS] list, Llama's bare object). Arguments given as a JSON string are parsed."""
    calls, start = [], text.find("{")
    decoder = json.JSONDecoder()
    while start >= 0:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            arguments = value.get("arguments", value.get("parameters"))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    pass
            calls.append({"name": value["name"], "arguments": arguments})
        start = text.find("{", end)
    return calls


def tool_call_scores(prediction: str, expected: list[dict], tools: list[dict] | None) -> dict[str, float]:
    """For an answer that should call tools: its calls are valid (known functions, arguments a JSON
    object that fits the function's schema: required ones present, types and enums), the function names
    are right, and the arguments match exactly."""
    got = parse_tool_calls(prediction)
    want = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in expected]
    valid = [call_problem(call["name"], call["arguments"], tools) is None for call in got]
    return {"tool_call_valid": float(bool(got) and all(valid)),
            "tool_name_accuracy": float([c["name"] for c in got] == [c["name"] for c in want]),
            "tool_arguments_exact": float(same_value(got, want))}


Scorer = Callable[[str, str], "float | dict[str, float]"]


def example_scores(predictions: list[str], references: list[str], scorer: Scorer | None = None,
                   scorer_name: str = "custom", expected_calls: list | None = None,
                   tools: list | None = None) -> list[dict[str, float]]:
    """One row of scores per example. JSON references get field-level scores, free text gets exact
    match, normalised exact match, token F1 and ROUGE-L, an expected tool call (expected_calls[i], with
    the example's declared tools[i]) tool-call validity, function-name accuracy and argument exact
    match; a user scorer adds its own."""
    expected_calls = expected_calls or [None] * len(references)
    tools = tools or [None] * len(references)
    plain = [r for r, calls in zip(references, expected_calls) if not calls]
    as_json = bool(plain) and all(parse_json_object(r) is not None for r in plain)
    rows = []
    for prediction, reference, calls, declared in zip(predictions, references, expected_calls, tools):
        if calls:
            row = tool_call_scores(prediction, calls, declared)
        else:
            row = json_example_scores(prediction, reference) if as_json else text_example_scores(prediction, reference)
        if scorer is not None:
            row.update(_scorer_row(scorer, scorer_name, prediction, reference))
        rows.append(row)
    return rows


def mean_scores(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each score over the rows that have it."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: sum(row[k] for row in rows if k in row) / max(1, sum(k in row for row in rows)) for k in keys}


# tunesmith's own figures: a scorer's key of one of these names replaced it (an eval_loss of 0.0, a
# compare verdict on the user's rouge_l), so it is refused
OWN_FIGURES = frozenset({"exact_match", "normalised_exact_match", "token_f1", "rouge_l", "repetition", "json_valid",
                         "all_fields", "tool_call_valid", "tool_name_accuracy", "tool_arguments_exact", "answer_loss",
                         "answer_loss_per_char", "eval_loss", "perplexity", "test_examples",
                         "generated_tokens_per_second"})


def _scorer_row(scorer: Scorer, name: str, prediction: str, reference: str) -> dict[str, float]:
    value = scorer(prediction, reference)
    if isinstance(value, dict):
        items = value.items()
    else:
        items = [(name, value)]
    row = {}
    for key, number in items:
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise UserError(f"scorer {name}: returned {number!r} for '{key}'; expected a finite number")
        if str(key) in OWN_FIGURES or str(key).startswith("field/"):
            raise UserError(f"scorer {name}: returned '{key}', the name of one of tunesmith's own figures, which it "
                            "would replace; give it another name")
        row[str(key)] = float(number)
    return row


def find_scorer(spec: str) -> tuple[str, str]:
    """(module, function) of a 'module:function' spec whose module is there, found without running any
    of its code (`config --check` validates a config; only a run imports what it names)."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise UserError(f"scorer '{spec}': expected 'module:function' (e.g. my_metrics:score)")
    if module_name.endswith(".py"):
        if not Path(module_name).exists():
            raise UserError(f"scorer '{spec}': file {module_name} not found")
    else:
        if "" not in sys.path:  # modules next to the user's data; last, so they shadow no installed one
            sys.path.append("")
        try:  # the top-level name alone: finding a submodule would run its package's __init__
            found = importlib.util.find_spec(module_name.partition(".")[0])
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise UserError(f"scorer '{spec}': no module '{module_name}' on the path")
    return module_name, function_name


def load_scorer(spec: str) -> Scorer:
    """A user's metric given as 'module:function' (a module on the path or a .py file)."""
    module_name, function_name = find_scorer(spec)
    try:
        if module_name.endswith(".py"):
            loader_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"scorer '{spec}': cannot import module '{module_name}' ({err})") from None
    except Exception as err:  # noqa: BLE001 (a syntax error in the user's module, or its code failing as it loads)
        frames = traceback.extract_tb(err.__traceback__)
        where = frames[-1] if frames else None
        line = getattr(err, "lineno", None) if isinstance(err, SyntaxError) else (where.lineno if where else None)
        place = f"{getattr(err, 'filename', None) or (where.filename if where else module_name)}:{line}"
        raise UserError(f"scorer '{spec}': module '{module_name}' failed as it was imported: {type(err).__name__}: "
                        f"{getattr(err, 'msg', None) or err} ({Path(place).name})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"scorer '{spec}': module '{module_name}' has no function '{function_name}'")

    source = getattr(getattr(function, "__code__", None), "co_filename", None)

    @functools.wraps(function)
    def guarded(prediction: str, reference: str):
        try:
            return function(prediction, reference)
        except Exception as err:  # noqa: BLE001 (the user's code: one line with where it failed and on what)
            from ..training.memory import is_out_of_memory

            if isinstance(err, MemoryError) or is_out_of_memory(err):  # a reward model's: the step retries smaller
                raise
            raise UserError(_failed(spec, err, source, prediction, reference)) from err

    return guarded


def _failed(spec: str, err: Exception, source: str | None, prediction, reference) -> str:
    """A scorer's error in one line, at the last line of the scorer's own file it passed through
    (not inside json or another library it called)."""
    frames = traceback.extract_tb(err.__traceback__)
    where = next((f for f in reversed(frames) if f.filename == source), frames[-1])
    return (f"scorer '{spec}' failed: {type(err).__name__}: {err} ({Path(where.filename).name}:{where.lineno} in "
            f"{where.name}) on the answer {_clip(prediction)!r} with the reference {_clip(reference)!r}")


def _clip(text, width: int = 60):
    return text[:width] + "..." if isinstance(text, str) and len(text) > width else text
