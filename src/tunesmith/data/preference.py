"""Preference data: chosen / rejected pairs (DPO, ORPO, SimPO) and KTO's labelled answers.

Records, one per line like SFT data:

    {"prompt": "...", "chosen": "...", "rejected": "..."}                       text
    {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}   chat (TRL's conversational form)
    {"chosen": [messages ... answer], "rejected": [messages ... answer]}       chat, prompt implicit (shared turns)
    {"prompt": ..., "completion": ..., "label": true | false}                   KTO (desirable or not)

A text prompt is one user turn. Each answer is rendered after its prompt with the chat template and
masked as SFT masks (data/tokenize.py): the loss is on the answer's tokens, its end-of-turn token
included, and on nothing else (earlier assistant turns of a chat prompt are context only). Every
record left out is a Problem with file, line and reason, counted as `data check` counts SFT data.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field

from ..config import DataConfig
from ..errors import UserError
from .formats import PAIRS, UNPAIRED, FormatError, blank, known_role, rename_columns
from .formats import _checked_text as text_of  # the SFT formats' check of one text field
from .prepare import Prepared, Split, length_policy, load_conversations
from .validate import unusable
from .sources import Problem, read_records
from .templates import use_template
from .tokenize import IGNORE, Encoded, TemplateError, encode_many
from .tools import joined_parts, refuse_null

ROLES = ("system", "user", "assistant")


@dataclass
class Sequences:
    """An example made of several token sequences that train together (a pair, or an answer with
    its KL sequence). `input_ids`, `labels` and `label_count` run over all of them: the batching
    and the memory plan look only at lengths and label counts."""

    reference: list[float] | None = field(default=None, kw_only=True)  # precomputed reference log-probs

    @property
    def sequences(self) -> list[Encoded]:
        raise NotImplementedError

    @property
    def input_ids(self) -> list[int]:
        return [t for s in self.sequences for t in s.input_ids]

    @property
    def labels(self) -> list[int]:
        return [t for s in self.sequences for t in s.labels]

    @property
    def label_count(self) -> int:
        return sum(s.label_count for s in self.sequences)


@dataclass
class Pair(Sequences):
    chosen: Encoded
    rejected: Encoded

    @property
    def sequences(self) -> list[Encoded]:
        return [self.chosen, self.rejected]


@dataclass
class Unpaired(Sequences):
    """KTO: an answer marked desirable or not, and `kl`: this prompt with another example's answer
    (the mismatched pair from which KTO estimates its KL term)."""

    completion: Encoded
    desirable: bool
    kl: Encoded | None = None

    @property
    def sequences(self) -> list[Encoded]:
        return [self.completion] + ([self.kl] if self.kl is not None else [])


def messages_of(value, where: str) -> list[dict]:
    """Chat messages (role / content), checked."""
    if not isinstance(value, list) or not value:
        raise FormatError("wrong type" if not isinstance(value, list) else "empty text",
                          f"{where} must be a non-empty list of messages")
    out = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise FormatError("wrong type", f"{where}[{index}] is not an object")
        role = known_role(message.get("role"), ROLES)
        if role not in ROLES:
            raise FormatError("unknown role", f"{role!r} in {where}[{index}]")
        content = joined_parts(message.get("content"), f"{where}[{index}].content")
        out.append({"role": role, "content": text_of(content, f"{where}[{index}].content")})
    return out


def prompt_of(value, where: str = "field 'prompt'", system_prompt: str | None = None) -> list[dict]:
    """A prompt as chat messages (text: one user turn), ending with a turn the model answers."""
    messages = [{"role": "user", "content": text_of(value, where)}] if not isinstance(value, list) \
        else messages_of(value, where)
    if messages[-1]["role"] == "assistant":
        raise FormatError("prompt ends with an answer", f"{where} ends with an assistant turn")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def answer_of(value, where: str) -> str:
    """An answer: text, or one assistant message (a list holding it, as TRL's conversational form has)."""
    if isinstance(value, list):
        messages = messages_of(value, where)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise FormatError("not one answer", f"{where} must hold exactly one assistant message")
        return messages[0]["content"]
    return text_of(value, where)


def present(record: dict, needed: tuple[str, ...], kind: str, texts: tuple[str, ...]) -> None:
    """Each needed field there, and no text given as JSON null (an empty text, not a missing field)."""
    for key in needed:
        if key not in record:
            # Name what the record holds: a chat record read for DPO is not "like a preference pair"
            raise FormatError("missing field", f"'{key}' ({kind} needs {', '.join(needed)}; the record has "
                              f"{', '.join(map(str, record)) or 'no fields'})")
    for key in texts:
        refuse_null(record, key, f"field '{key}'")


def parse_pair(record: dict, system_prompt: str | None = None) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen, rejected) of a pair record."""
    present(record, ("chosen", "rejected"), "a preference pair", ("prompt", "chosen", "rejected"))
    if "prompt" in record:
        prompt = prompt_of(record["prompt"], system_prompt=system_prompt)
        chosen, rejected = answer_of(record["chosen"], "field 'chosen'"), answer_of(record["rejected"], "field 'rejected'")
    else:  # implicit prompt: two whole conversations that share everything but their last answer
        full = {k: messages_of(record[k], f"field '{k}'") for k in ("chosen", "rejected")}
        for key, messages in full.items():
            if messages[-1]["role"] != "assistant" or len(messages) < 2:
                raise FormatError("not one answer", f"field '{key}' must end with an assistant answer after a prompt")
        if full["chosen"][:-1] != full["rejected"][:-1]:
            raise FormatError("prompts differ", "chosen and rejected differ before their last answer; "
                              "give the shared turns as 'prompt'")
        prompt = prompt_of(full["chosen"][:-1], "the shared turns", system_prompt)
        chosen, rejected = full["chosen"][-1]["content"], full["rejected"][-1]["content"]
    if chosen.strip() == rejected.strip():
        raise FormatError("chosen equals rejected", "nothing to prefer")
    return prompt, chosen, rejected


def parse_unpaired(record: dict, system_prompt: str | None = None) -> tuple[list[dict], str, bool]:
    """(prompt messages, completion, desirable) of a KTO record."""
    present(record, ("prompt", "completion", "label"), "KTO data", ("prompt", "completion"))
    return (prompt_of(record["prompt"], system_prompt=system_prompt), answer_of(record["completion"], "field 'completion'"),
            label_of(record["label"]))


LABELS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def label_of(value) -> bool:
    """A KTO label: true / false, or as a CSV cell or spreadsheet holds it: the text true / false,
    yes / no or 1 / 0 in any case, the number 1 / 0 (a parquet int column, pandas' 1.0)."""
    if isinstance(value, bool):
        return value
    if blank(value):
        raise FormatError("no label", "field 'label' is empty: a KTO record needs true (a desirable answer) or false")
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABELS:
        return LABELS[value.strip().lower()]
    raise FormatError("wrong type", f"field 'label' must be true or false (or yes / no, 1 / 0), got {value!r}")


def final_answer_only(encoded: Encoded) -> Encoded:
    """Labels on the last answer alone: a chat prompt's earlier assistant turns are context."""
    labels = list(encoded.labels)
    end = max(i for i, t in enumerate(labels) if t != IGNORE)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return Encoded(list(encoded.input_ids), [IGNORE] * start + labels[start:end + 1] + [IGNORE] * (len(labels) - end - 1))


def answer_start(encoded: Encoded) -> int:
    return next(i for i, t in enumerate(encoded.labels) if t != IGNORE)


def with_answer_of(prompt: Encoded, answer: Encoded, max_len: int) -> Encoded:
    """`prompt`'s prompt tokens followed by `answer`'s answer tokens (KTO's mismatched KL sequence)."""
    cut, start = answer_start(prompt), answer_start(answer)
    ids = list(prompt.input_ids[:cut]) + list(answer.input_ids[start:])
    labels = [IGNORE] * cut + list(answer.labels[start:])
    return Encoded(ids[:max_len], labels[:max_len])


@dataclass
class _Read:
    """Parsed records of one source: per record its prompt, answers, desirable flag and origin."""

    prompts: list[list[dict]] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)
    desirable: list[bool | None] = field(default_factory=list)
    origins: list[tuple[str, int]] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)


def _read(spec: str, kind: str, cfg: DataConfig, problems: list[Problem], seen: dict) -> _Read:
    """A source's valid records; `seen`: (file, line) of each record read so far, by content (dedup)."""
    records = read_records(spec, cfg.hub_split)
    problems += records.problems
    out = _Read()
    for file, line, record in records.rows:
        record = rename_columns(record, cfg.columns)
        try:
            if kind == PAIRS:
                prompt, chosen, rejected = parse_pair(record, cfg.system_prompt)
                answers, desirable = [chosen, rejected], None
            else:
                prompt, completion, desirable = parse_unpaired(record, cfg.system_prompt)
                answers = [completion]
        except FormatError as err:
            problems.append(Problem(file, line, str(err), err.kind))
            continue
        key = json.dumps([prompt, answers, desirable])
        if cfg.dedup and key in seen:
            problems.append(Problem(file, line, f"duplicate (exact) of {seen[key][0]}:{seen[key][1]}", "duplicate (exact)"))
            continue
        seen[key] = (file, line)
        chat = isinstance(record.get("prompt", record.get("chosen")), list)
        out.formats[f"{'pairs' if kind == PAIRS else 'kto'} ({'chat' if chat else 'text'})"] += 1
        for name, value in (("prompts", prompt), ("answers", answers), ("desirable", desirable),
                            ("origins", (file, line))):
            getattr(out, name).append(value)
    return out


def good_answers(spec: str, kind: str, cfg: DataConfig, problems: list[Problem]) -> tuple[list, list]:
    """(prompts, each one's good answer or None) of a source's valid records: a pair's chosen answer,
    a KTO answer where marked desirable."""
    read = _read(spec, kind, cfg, problems, {})
    return read.prompts, [None if desirable is False else answers[0]
                          for answers, desirable in zip(read.answers, read.desirable)]


def _encode(read: _Read, kind: str, tokenizer, cfg: DataConfig, prepared: Prepared, name: str) -> Split:
    sides = len(read.answers[0]) if read.answers else 1
    conversations = [p + [{"role": "assistant", "content": a}] for p, answers in zip(read.prompts, read.answers)
                     for a in answers]
    # One example per answer where a template renders history its own way: the last one ends at this answer.
    encoded = [r if isinstance(r, TemplateError) else r[-1]
               for r in encode_many(tokenizer, conversations, reasoning=cfg.reasoning)]
    split = Split(name)
    for index, origin in enumerate(read.origins):
        parts = encoded[index * sides:(index + 1) * sides]
        refused = next((p for p in parts if isinstance(p, TemplateError)), None)
        if refused is not None:
            prepared.problems.append(Problem(*origin, refused.reason(), refused.kind))
            continue
        kept = []
        for part in parts:  # the first side that is too long (or has no answer left) is the record's one problem
            part = length_policy(final_answer_only(part) if part.label_count else part, cfg, *origin, prepared)
            if part is None:
                break
            kept.append(part)
        if len(kept) < len(parts):
            continue
        parts = kept
        example = Pair(*parts) if kind == PAIRS else Unpaired(parts[0], bool(read.desirable[index]))
        split.encoded.append(example)
        split.conversations.append(conversations[index * sides])
        split.origins.append(origin)
    if kind == UNPAIRED:  # each answer's KL partner: the previous example's answer to this prompt
        for index, example in enumerate(split.encoded):
            example.kl = with_answer_of(example.completion, split.encoded[index - 1].completion, cfg.max_seq_len)
    return split


def prepare_preference(cfg: DataConfig, tokenizer, kind: str) -> Prepared:
    """Train and validation splits of preference examples (validation held out of train when no
    file is given), and the test split's conversations (SFT data, scored by generation)."""
    if cfg.train == "demo":
        raise UserError("data.train: the demo task has no preference data; make pairs from a model with "
                        "`tunesmith pairs RUN --data prompts.jsonl --scorer module:function`")
    prepared = Prepared({}, [], Counter(), template=use_template(tokenizer, cfg.chat_template, cfg.template_variables))
    seen: dict = {}
    sources = {"train": _read(cfg.train, kind, cfg, prepared.problems, seen)}
    prepared.records = len(sources["train"].origins) + len(prepared.problems)
    for spec in cfg.mix:  # mixed sources count as training data (weights apply to SFT data only)
        extra = _read(spec, kind, cfg, prepared.problems, seen)
        for name in ("prompts", "answers", "desirable", "origins"):
            getattr(sources["train"], name).extend(getattr(extra, name))
    if cfg.validation:
        sources["validation"] = _read(cfg.validation, kind, cfg, prepared.problems, {})
    for read in sources.values():
        prepared.formats += read.formats
    for name, read in sources.items():
        prepared.splits[name] = _encode(read, kind, tokenizer, cfg, prepared, name)
    if not prepared.splits["train"]:
        raise UserError(f"{cfg.train}: no usable {kind} examples {unusable(prepared.problems)}")
    if "validation" not in prepared.splits:
        prepared.splits["train"], prepared.splits["validation"] = hold_out(prepared.splits["train"], cfg)
    add_test_split(prepared, cfg, tokenizer)
    prepared.dropped = Counter(p.kind for p in prepared.problems)
    return prepared


def hold_out(split: Split, cfg: DataConfig, name: str = "validation") -> tuple[Split, Split]:
    """A seeded share of the examples as validation, the rest as train (at least one each)."""
    if len(split) < 2:
        return split, Split(name)
    order = list(range(len(split)))
    random.Random(cfg.seed).shuffle(order)
    cut = max(1, int(len(order) * cfg.validation_share))
    return split.select(sorted(order[cut:])), split.select(sorted(order[:cut]), name)


def add_test_split(prepared: Prepared, cfg: DataConfig, tokenizer) -> None:
    """data.test as SFT data (prompt and reference answer): scored by generation after training."""
    if not cfg.test:
        return
    conversations, origins, problems = load_conversations(cfg.test, cfg.system_prompt, cfg.format, cfg.columns,
                                                          cfg.hub_split, origins=True)
    prepared.problems += problems
    split = prepared.splits["test"] = Split("test")
    for messages, origin, encoded in zip(conversations, origins, encode_many(tokenizer, conversations)):
        if isinstance(encoded, TemplateError):
            prepared.problems.append(Problem(*origin, encoded.reason(), encoded.kind))
            continue
        split.conversations.append(messages)
        split.encoded.append(encoded[-1])  # the example ending at the reference answer
        split.origins.append(origin)
