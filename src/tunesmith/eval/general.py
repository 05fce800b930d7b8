"""General ability kept? The base and the fine-tuned model on held-out general-ability probes.

Multiple choice (ARC-Easy, ARC-Challenge, HellaSwag, MMLU, TruthfulQA MC1) is scored as
lm-evaluation-harness scores it: the log-likelihood of each choice as a continuation of the
prompt (the same prompt templates as the harness's default tasks, zero-shot, no chat template);
`acc` picks the choice of highest log-likelihood, `acc_norm` the highest log-likelihood per
character of the choice. GSM8K is scored by the final number of a greedy generated answer.

The probe shipped with tunesmith (`eval/probes/`) is a seeded, subject-stratified sample of each
set (bench/build_general_probe.py writes it; sources and licences in eval/probes/README.md);
`eval.general_data` points at a folder of files with the same schema.
"""
from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..data.tokenize import stop_ids
from ..errors import UserError
from ..progress import Progress
from .compare import paired_interval, win_tie_loss
from .decoding import NEUTRAL
from .likelihood import loglikelihoods, text_start

MULTIPLE_CHOICE = ("arc_easy", "arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc1")
GENERATED = ("gsm8k",)
SETS = MULTIPLE_CHOICE + GENERATED
LETTERS = "ABCDEFGHIJ"
GSM8K_NEW_TOKENS = 192
GSM8K_STOPS = ("Question:", "\n\n\n")

# TruthfulQA's own QA primer, which lm-evaluation-harness puts in front of every MC1 question.
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def choice_prompt(set_name: str, item: dict) -> tuple[str, list[str]]:
    """(context, choices) of a multiple-choice item, as the harness's default task writes them;
    each choice is scored as the continuation ' ' + choice."""
    question = item["question"]
    if set_name in ("arc_easy", "arc_challenge"):
        return f"Question: {question}\nAnswer:", list(item["choices"])
    if set_name == "hellaswag":
        return harness_hellaswag(question), list(item["choices"])
    if set_name == "mmlu":
        subject = item.get("subject", "").replace("_", " ")
        options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item["choices"]))
        description = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        return f"{description}{question.strip()}{options}\nAnswer:", list(LETTERS[:len(item["choices"])])
    if set_name == "truthfulqa_mc1":
        return f"{TRUTHFULQA_PRIMER}\n\nQ: {question}\nA:", list(item["choices"])
    raise ValueError(f"{set_name}: not a multiple-choice probe set")


# HellaSwag's ctx_b: the lower-case start of a sentence that the endings finish, after the last sentence
# end of the context (or right after the activity label where ctx_a is empty), with no sentence end of its own.
CTX_B = re.compile(r"(?:^[^:]*:|[.!?])\s+([a-z][^.!?]*)$")


def harness_hellaswag(query: str) -> str:
    """The query as the harness writes it, activity_label + ': ' + ctx_a + ' ' + ctx_b.capitalize(): the
    data set (and the shipped probe, and the shared copy it was drawn from) keeps ctx_b in lower case
    ('... sitting on a roof. he'). WikiHow items, whose context ends a sentence, stay as they are."""
    found = CTX_B.search(query)
    return query[:found.start(1)] + found.group(1).capitalize() if found else query


def choice_scores(lls: list[float], choices: list[str], answer: int) -> dict[str, float]:
    """acc: the highest log-likelihood is the answer; acc_norm: the highest per character of the
    choice (lm-evaluation-harness's definitions)."""
    values = np.array(lls)
    lengths = np.array([float(len(c)) for c in choices])
    with np.errstate(divide="ignore"):  # an empty choice scores -inf per character, as in the harness
        per_character = values / lengths
    return {"acc": float(int(np.argmax(values)) == answer), "acc_norm": float(int(np.argmax(per_character)) == answer)}


def number_in(text: str) -> str | None:
    """The last number of a generated answer, without thousands separators, '$' or a final '.'."""
    found = re.findall(r"-?[$0-9.,]{2,}|-?[0-9]+", text)
    for raw in reversed(found):
        value = raw.replace(",", "").replace("$", "").rstrip(".")
        if re.fullmatch(r"-?\d+(\.\d+)?", value):
            return value
    return None


def same_number(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return float(a) == float(b.replace(",", ""))
    except ValueError:
        return False


@torch.no_grad()
def gsm8k_rows(model, tokenizer, items: list[dict], batch_size: int = 16) -> list[dict[str, float]]:
    """Greedy answers to 'Question: ...\\nAnswer:' (no chat template), cut at the next question;
    right when their last number equals the reference's final number."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = text_start(tokenizer)
    prompts = [start + tokenizer(f"Question: {item['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
               for item in items]
    order = sorted(range(len(items)), key=lambda i: len(prompts[i]))
    rows: list[dict[str, float]] = [{} for _ in items]
    progress = Progress(len(items), "probe gsm8k", unit="answer", quiet=len(items) < 20)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **NEUTRAL, do_sample=False,
                             max_new_tokens=GSM8K_NEW_TOKENS, pad_token_id=pad, eos_token_id=stop_ids(tokenizer, model))
        for r, i in enumerate(chunk):
            text = tokenizer.decode(out[r, width:], skip_special_tokens=True)
            for stop in GSM8K_STOPS:
                text = text.split(stop)[0]
            rows[i] = {"exact_match": float(same_number(number_in(text), items[i]["final"]))}
        progress.update(min(start + batch_size, len(order)))
    model.train(was_training)
    return rows


def probe_folder(folder: str | None):
    return Path(folder) if folder else resources.files("tunesmith") / "eval" / "probes"


def load_probe(folder: str | None = None, sets: list[str] | None = None, limit: int | None = None) -> dict[str, list[dict]]:
    """{set: items} of the probe files found (<set>.jsonl), the first `limit` of each."""
    base = probe_folder(folder)
    unknown = [s for s in sets or [] if s not in SETS]
    if unknown:
        raise UserError(f"eval.general_sets: unknown probe set(s) {unknown}; known: {', '.join(SETS)}")
    found = {}
    for name in sets or SETS:
        path = base / f"{name}.jsonl"
        if not path.is_file():
            if sets:
                raise UserError(f"{path}: probe file not found")
            continue
        items = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                items += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not a JSON line ({err.msg})") from None
        if items:  # an empty file is no probe set (its means would be of nothing)
            found[name] = items[:limit] if limit else items
        elif sets:
            raise UserError(f"{path}: the probe file holds no items")
    if not found:
        raise UserError(f"{base}: no probe files (expected some of {', '.join(f'{s}.jsonl' for s in SETS)})")
    return found


def score_probe(model, tokenizer, probe: dict[str, list[dict]], label: str = "model") -> dict[str, list[dict]]:
    """{set: per-item scores}: acc and acc_norm for multiple choice, exact_match for GSM8K."""
    scores = {}
    for name, items in probe.items():
        if name in GENERATED:
            scores[name] = gsm8k_rows(model, tokenizer, items)
            continue
        prompts = [choice_prompt(name, item) for item in items]
        lls = loglikelihoods(model, tokenizer, prompts, label=f"probe {name} ({label})")
        scores[name] = [choice_scores(ll, choices, item["answer"])
                        for ll, (_, choices), item in zip(lls, prompts, items)]
    return scores


def main_metric(name: str) -> str:
    """The figure reported per set: acc_norm where the harness reports it, else acc (MMLU,
    TruthfulQA MC1) or exact match (GSM8K)."""
    return "exact_match" if name in GENERATED else "acc" if name in ("mmlu", "truthfulqa_mc1") else "acc_norm"


def compare_probe(base: dict[str, list[dict]], tuned: dict[str, list[dict]], samples: int = 2000, seed: int = 0,
                  margin: float | None = None) -> list[dict]:
    """Per set and metric, in points of 100: base, fine-tuned, difference with its paired 95%
    interval, wins / ties / losses; `lost` marks a main metric down by more than `margin` points.
    With several sets, a last row 'all' pools every item, each scored by its set's main metric."""
    rows = []
    for name in base:
        for metric in base[name][0]:
            a, b = ([r[metric] for r in scores[name]] for scores in (base, tuned))
            rows.append(_row(name, metric, a, b, metric == main_metric(name), samples, seed, margin))
    if len(base) > 1:
        a, b = ([r[main_metric(name)] for name in scores for r in scores[name]] for scores in (base, tuned))
        rows.append(_row("all", "main", a, b, True, samples, seed, margin))
    return rows


def _row(name: str, metric: str, a: list[float], b: list[float], main: bool, samples: int, seed: int,
         margin: float | None) -> dict:
    # right/wrong per item: Newcombe's paired interval (a bootstrap is [0, 0] where no item changed)
    interval = {k: 100 * v for k, v in paired_interval(np.array(a, float), np.array(b, float), samples=samples,
                                                       seed=seed).items()}
    a, b = np.array(a) * 100, np.array(b) * 100
    return {"set": name, "metric": metric, "items": len(a), "base": float(a.mean()), "fine_tuned": float(b.mean()),
            **interval, **win_tie_loss(a, b, lower_is_better=False), "main": main,
            "lost": bool(margin is not None and main and interval["difference"] < -margin)}


def means(scores: dict[str, list[dict]]) -> dict[str, float]:
    """{'set/metric': points of 100} for one model."""
    return {f"{name}/{metric}": 100 * float(np.mean([r[metric] for r in rows]))
            for name, rows in scores.items() for metric in rows[0]}


def format_probe(rows: list[dict]) -> str:
    lines = [f"{'general ability (points)':<28}{'items':>6}{'base':>8}{'tuned':>8}{'tuned - base [95% interval]':>32}{'w/t/l':>12}"]
    for r in rows:
        if not r["main"]:
            continue
        change = f"{r['difference']:+.1f} [{r['low']:+.1f}, {r['high']:+.1f}]"
        lines.append(f"{r['set'] + ' ' + r['metric']:<28}{r['items']:>6}{r['base']:>8.1f}{r['fine_tuned']:>8.1f}"
                     f"{change:>32}{str(r['win']) + '/' + str(r['tie']) + '/' + str(r['loss']):>12}")
    return "\n".join(lines)


SMALL_SET = 20  # fewer items than this: one item moves the set by more than 5 points (the demo has 20)


def warnings(rows: list[dict], margin: float) -> list[str]:
    lines = [f"warning: the fine-tuned model lost {-r['difference']:.1f} points of {r['set']} {r['metric']} "
             f"(more than eval.general_margin={margin:g}; 95% interval {r['low']:+.1f} to {r['high']:+.1f}"
             + (", which includes 0: it may be noise, more items would tell)" if r["high"] >= 0 else ")")
             for r in rows if r["lost"]]
    # On a set of few items one item moves the score by many points, and the interval is wide: said beside it
    small = [r for r in rows if r["main"] and r["set"] != "all" and r["items"] < SMALL_SET]
    if small:
        lines.append("note: " + ", ".join(f"{r['set']} has {r['items']} items" for r in small)
                     + f"; one item is {100 / min(r['items'] for r in small):.0f} points or more there, and an interval "
                     "over so few items speaks of those items only (raise eval.general_limit or --general-limit)")
    return lines


class GeneralAbility:
    """The probe of a run (eval.general): the base scored before training, the fine-tuned model
    after it, each set's difference with its paired interval, and warnings past the margin."""

    def __init__(self, eval_cfg):
        self.cfg = eval_cfg
        self.probe = load_probe(eval_cfg.general_data, eval_cfg.general_sets, eval_cfg.general_limit)
        self.scores: dict[str, dict[str, list[dict]]] = {}

    def score(self, model, tokenizer, which: str) -> None:
        self.scores[which] = score_probe(model, tokenizer, self.probe, which)

    def rows(self) -> list[dict]:
        return compare_probe(self.scores["base"], self.scores["fine-tuned"], seed=self.cfg.seed,
                             margin=self.cfg.general_margin)

    def results(self) -> dict:
        return {"items": {name: len(items) for name, items in self.probe.items()},
                "base": means(self.scores["base"]), "fine_tuned": means(self.scores["fine-tuned"]),
                "differences": self.rows(), "margin": self.cfg.general_margin,
                "warnings": self.warnings()}

    def table(self) -> str:
        return format_probe(self.rows())

    def warnings(self) -> list[str]:
        return warnings(self.rows(), self.cfg.general_margin)
