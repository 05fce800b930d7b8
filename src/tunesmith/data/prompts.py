"""Prompts to sample answers for (GRPO training, `tunesmith pairs`), each with an optional reference.

Records: `{"prompt": text or chat messages, "reference": "..."}` (reference optional), or any SFT
record (data/formats.py): its last assistant answer becomes the reference and the turns before it
the prompt. The reference is what scorers receive as their second argument, as in `eval.scorer`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..config import DataConfig
from ..errors import UserError
from .formats import PROMPTS, FormatError, record_kind, rename_columns, to_example
from .preference import add_test_split, hold_out, prompt_of, text_of
from .prepare import Prepared, Split
from .sources import Problem, read_records
from .templates import use_template
from .tokenize import IGNORE, TemplateError, render_many, token_ids
from .validate import unusable


@dataclass
class Prompt:
    """A prompt's token ids (rendered with the generation prompt, as evaluation renders them) and its reference."""

    input_ids: list[int]
    reference: str | None = None

    @property
    def labels(self) -> list[int]:
        return [IGNORE] * len(self.input_ids)

    label_count = 0


def parse_prompt(record: dict, system_prompt: str | None = None) -> tuple[list[dict], str | None, str]:
    """(prompt messages, reference or None, format) of a prompt record or an SFT record."""
    if record_kind(record) == PROMPTS:
        reference = record.get("reference")
        if reference is not None:
            reference = text_of(reference, "field 'reference'")
        chat = isinstance(record["prompt"], list)
        return prompt_of(record["prompt"], system_prompt=system_prompt), reference, f"prompts ({'chat' if chat else 'text'})"
    kind, messages = to_example(record, "auto", system_prompt)
    if kind == "text":
        raise FormatError("wrong type", "raw text has no prompt to answer")
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last == 0:
        raise FormatError("no prompt", "the answer has no prompt before it")
    return messages[:last], messages[last]["content"], kind


def read_prompts(spec: str, cfg: DataConfig, problems: list[Problem]) -> tuple[list[list[dict]], list, list, Counter]:
    """(prompts, references, origins, formats) of a source's valid records; a Problem for each other."""
    records = read_records(spec, cfg.hub_split)
    problems += records.problems
    prompts, references, origins, formats = [], [], [], Counter()
    for file, line, record in records.rows:
        try:
            messages, reference, kind = parse_prompt(rename_columns(record, cfg.columns), cfg.system_prompt)
        except FormatError as err:
            problems.append(Problem(file, line, str(err), err.kind))
            continue
        prompts.append(messages)
        references.append(reference)
        origins.append((file, line))
        formats[kind] += 1
    return prompts, references, origins, formats


def encode_prompts(tokenizer, prompts: list[list[dict]]) -> list[list[int] | TemplateError]:
    """Token ids of each prompt with the generation prompt (what generation at evaluation feeds the model)."""
    rendered = render_many(tokenizer, prompts, add_generation_prompt=True)
    texts = [r for r in rendered if not isinstance(r, TemplateError)]
    ids = iter(token_ids(tokenizer, texts))
    return [r if isinstance(r, TemplateError) else next(ids) for r in rendered]


def prompt_split(name: str, prompts, references, origins, tokenizer, longest: int, problems: list[Problem]) -> Split:
    split = Split(name)
    for messages, reference, origin, ids in zip(prompts, references, origins, encode_prompts(tokenizer, prompts)):
        if isinstance(ids, TemplateError):
            problems.append(Problem(*origin, ids.reason(), ids.kind))
        elif len(ids) > longest:
            problems.append(Problem(*origin, f"prompt too long ({len(ids)} tokens; at most {longest} leave room "
                                             "for the answer within data.max_seq_len)", "longer than max_seq_len"))
        else:
            split.conversations.append(messages + ([{"role": "assistant", "content": reference}] if reference else []))
            split.encoded.append(Prompt(ids, reference))
            split.origins.append(origin)
    return split


def prepare_prompts(cfg: DataConfig, tokenizer, answer_tokens: int = 0) -> Prepared:
    """Train (and validation: a file, or held out of train) splits of prompts; the test split as SFT data.

    Prompts longer than max_seq_len - answer_tokens are dropped: the sampled answer must fit."""
    prepared = Prepared({}, [], Counter(), template=use_template(tokenizer, cfg.chat_template, cfg.template_variables))
    longest = cfg.max_seq_len - answer_tokens
    if cfg.train == "demo":  # the built-in task: its tickets as prompts, their JSON labels as references
        from .demo import make_splits

        for name, rows in make_splits(cfg.demo_size, cfg.seed).items():
            conversations = [r["messages"] for r in rows]
            origins = [(f"demo:{name}", i) for i in range(1, len(rows) + 1)]
            prepared.splits[name] = prompt_split(name, [c[:-1] for c in conversations],
                                                 [c[-1]["content"] for c in conversations], origins, tokenizer,
                                                 longest, prepared.problems)
        prepared.formats["messages"] = len(prepared.splits["train"])
        prepared.records = len(prepared.splits["train"])
    else:
        for name in ("train", "validation"):
            spec = getattr(cfg, name)
            if spec:
                prompts, references, origins, formats = read_prompts(spec, cfg, prepared.problems)
                for extra in cfg.mix if name == "train" else []:  # mixed sources are training prompts too
                    more = read_prompts(extra, cfg, prepared.problems)
                    prompts, references, origins, formats = (a + b for a, b in zip((prompts, references, origins, formats), more))
                prepared.formats += formats
                prepared.splits[name] = prompt_split(name, prompts, references, origins, tokenizer, longest,
                                                     prepared.problems)
                if name == "train":  # every training record read, usable or not
                    prepared.records = len(prepared.splits["train"]) + len(prepared.problems)
        if "validation" not in prepared.splits:
            prepared.splits["train"], prepared.splits["validation"] = hold_out(prepared.splits["train"], cfg)
        add_test_split(prepared, cfg, tokenizer)
    if not prepared.splits["train"]:
        raise UserError(f"{cfg.train}: no usable prompts {unusable(prepared.problems)}")
    prepared.dropped = Counter(p.kind for p in prepared.problems)
    return prepared
