"""Model A against model B on the same examples: answer loss and generation metrics, each with the
difference B - A and its paired 95% interval (Newcombe's for right/wrong scores, else a bootstrap),
wins / ties / losses per example, and the answers side by side. Prompting baselines (A with k random
training examples in its prompt, A and B with the k most similar ones retrieved, see baselines.py)
show whether fine-tuning beat simply prompting well.
"""
from __future__ import annotations

import gc
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.collate import PADDED, micro_batch
from ..data.prepare import load_conversations
from ..data.formats import is_raw_text
from ..data.tokenize import IGNORE, document_rows, encode, prompt_ids
from ..device import to_device
from ..errors import UserError
from ..progress import Progress
from ..runs import RunFolder, write_text
from ..training.loss import label_token_losses
from .decoding import LoopGuard
from .generate import answer_and_score, generate_answers, length_batches, merged_for_good
from .metrics import Scorer, mean_scores, normalise
from .scoring import conversation_scores

LOSS = "answer_loss"
PER_CHAR = "answer_loss_per_char"  # nats per character of the reference (choose.py: comparable across tokenizers)
LOWER_IS_BETTER = {LOSS, PER_CHAR, "repetition"}
# Fewer examples than this: the intervals' coverage is unknown (docs/evaluation.md simulated it from 20 on), and
# one example moves a mean by a twentieth or more; the general-ability probe notes sets under 20 items likewise
FEW_EXAMPLES = 20


@dataclass
class Scored:
    """One model's answers and per-example scores on the comparison set."""

    name: str
    answers: list[str]
    rows: list[dict[str, float]]  # per example: generation metrics and answer_loss
    tokens: list[int] = field(default_factory=list)  # answer tokens per example (weights of answer_loss)
    generated_tokens_per_second: float | None = None
    references: list[str] = field(default_factory=list)

    def means(self) -> dict[str, float]:
        scores = mean_scores([{k: v for k, v in r.items() if k != LOSS} for r in self.rows])
        if self.tokens:  # loss per answer token over the whole set, as eval loss is
            scores = {LOSS: weighted_mean(self.values(LOSS), np.array(self.tokens, dtype=float)), **scores}
        return scores

    def values(self, metric: str) -> np.ndarray:
        """Per example, NaN where an example has no such score (a JSON field its reference lacks, a
        tool-call score of a plain answer, a key a scorer returned for some answers only)."""
        return np.array([r.get(metric, np.nan) for r in self.rows], dtype=float)

    def interval(self, metric: str, samples: int = 2000, seed: int = 0) -> dict[str, float]:
        """The mean as `means` gives it (per token for the answer loss) with its 95% interval (mean_interval)."""
        values = self.values(metric)
        present = ~np.isnan(values)
        weights = np.array(self.tokens, float)[present] if metric == LOSS else None
        return mean_interval(values[present], weights, samples, seed)


def weighted_mean(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    return float(values.mean() if weights is None else (values * weights).sum() / weights.sum())


def paired_bootstrap(a: np.ndarray, b: np.ndarray, weights_a: np.ndarray | None = None,
                     weights_b: np.ndarray | None = None, samples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict[str, float]:
    """Difference of (weighted) means B - A with a percentile bootstrap interval.

    Examples are resampled in pairs: both models are scored on the same resampled set, so the
    interval reflects the per-example difference, not the spread of the examples' difficulty."""
    n = len(a)
    if n == 0 or len(b) != n:
        raise ValueError("paired bootstrap needs two score lists of the same, non-zero length")
    wa = np.ones(n) if weights_a is None else np.asarray(weights_a, dtype=float)
    wb = np.ones(n) if weights_b is None else np.asarray(weights_b, dtype=float)
    picks = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    mean_a = (a[picks] * wa[picks]).sum(1) / wa[picks].sum(1)
    mean_b = (b[picks] * wb[picks]).sum(1) / wb[picks].sum(1)
    low, high = np.quantile(mean_b - mean_a, [(1 - confidence) / 2, (1 + confidence) / 2])
    diff = weighted_mean(b, wb) - weighted_mean(a, wa)
    return {"difference": diff, "low": float(low), "high": float(high)}


Z95 = 1.959963984540054  # the normal distribution's 97.5% point


def right_or_wrong(*scores: np.ndarray) -> bool:
    """Every score 0 or 1: an exact match, every field right, a probe item."""
    return all(np.isin(np.asarray(x, float), (0.0, 1.0)).all() for x in scores)


def paired_interval(a: np.ndarray, b: np.ndarray, weights_a: np.ndarray | None = None,
                    weights_b: np.ndarray | None = None, samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """B - A with its 95% interval over the same examples: Newcombe's for right/wrong scores, else the
    paired bootstrap. On right/wrong pairs the percentile bootstrap sees only the examples that changed:
    [0, 0] where none did, and at 30 pairs of which a few change it covered the true difference 43-75%
    of the time in simulation; Newcombe's covered 95% or more (docs/evaluation.md)."""
    if weights_a is None and weights_b is None and len(a) and right_or_wrong(a, b):
        return newcombe_paired(np.asarray(a, float), np.asarray(b, float))
    return paired_bootstrap(a, b, weights_a, weights_b, samples=samples, seed=seed)


def wilson(right: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a share right."""
    share, c = right / n, z * z / n
    centre, half = (share + c / 2) / (1 + c), z * np.sqrt(share * (1 - share) / n + c / (4 * n)) / (1 + c)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def newcombe_paired(a: np.ndarray, b: np.ndarray, z: float = Z95) -> dict[str, float]:
    """mean(b) - mean(a) of paired right/wrong scores with Newcombe's interval (1998, method 10: each
    share's Wilson interval, combined through the pairs' correlation with his continuity correction)."""
    n = len(a)
    both, b_only = int(((a == 1) & (b == 1)).sum()), int(((a == 0) & (b == 1)).sum())
    a_only = int(((a == 1) & (b == 0)).sum())
    neither = n - both - b_only - a_only
    share_b, share_a = (both + b_only) / n, (both + a_only) / n
    (low_b, high_b), (low_a, high_a) = wilson(both + b_only, n, z), wilson(both + a_only, n, z)
    margins = (both + b_only) * (a_only + neither) * (both + a_only) * (b_only + neither)
    cross = both * neither - b_only * a_only
    phi = (cross - n / 2 if cross > n / 2 else min(cross, 0)) / np.sqrt(margins) if margins else 0.0
    below, above = share_b - low_b, high_a - share_a
    low = share_b - share_a - np.sqrt(below ** 2 + above ** 2 - 2 * phi * below * above)
    below, above = share_a - low_a, high_b - share_b
    high = share_b - share_a + np.sqrt(below ** 2 + above ** 2 - 2 * phi * below * above)
    return {"difference": share_b - share_a, "low": float(low), "high": float(high)}


def mean_interval(values: np.ndarray, weights: np.ndarray | None = None, samples: int = 2000, seed: int = 0
                  ) -> dict[str, float]:
    """A (weighted) mean with its 95% interval: Wilson's for right/wrong scores, else the percentile
    bootstrap (the paired bootstrap against zeros)."""
    values = np.asarray(values, float)
    if weights is None and len(values) and right_or_wrong(values):
        low, high = wilson(int(values.sum()), len(values))
        return {"mean": float(values.mean()), "low": low, "high": high}
    found = paired_bootstrap(np.zeros(len(values)), values, weights, weights, samples, seed)
    return {"mean": found["difference"], "low": found["low"], "high": found["high"]}


def win_tie_loss(a: np.ndarray, b: np.ndarray, lower_is_better: bool, tolerance: float = 1e-9) -> dict[str, int]:
    """Per example: does B beat A, tie with it, or lose to it."""
    gain = (a - b) if lower_is_better else (b - a)
    return {"win": int((gain > tolerance).sum()), "tie": int((abs(gain) <= tolerance).sum()),
            "loss": int((gain < -tolerance).sum())}


def compare_scored(baseline: Scored, candidate: Scored, samples: int = 2000, seed: int = 0) -> list[dict]:
    """One row per metric both have: means, difference with interval, wins / ties / losses, over the
    examples that both have it for (`examples` says how many)."""
    rows = []
    for metric in candidate.means():
        if metric not in baseline.means():
            continue
        a, b = baseline.values(metric), candidate.values(metric)
        both = ~(np.isnan(a) | np.isnan(b))
        if not both.any():
            continue
        a, b = a[both], b[both]
        weights = ((np.array(baseline.tokens, float)[both], np.array(candidate.tokens, float)[both]) if metric == LOSS
                   else (None, None))
        interval = paired_interval(a, b, *weights, samples=samples, seed=seed)
        rows.append({"metric": metric, "baseline": baseline.name, "candidate": candidate.name,
                     "baseline_value": weighted_mean(a, weights[0]), "candidate_value": weighted_mean(b, weights[1]),
                     **interval, **win_tie_loss(a, b, metric in LOWER_IS_BETTER), "examples": int(both.sum())})
    return rows


def few_examples_note(examples: int) -> str | None:
    """The note a comparison over fewer than FEW_EXAMPLES examples carries; None from there on."""
    if examples >= FEW_EXAMPLES:
        return None
    if examples < 2:
        return (f"note: {examples} example: no interval and no verdict (a difference over one example says nothing "
                f"of the next, and a bootstrap over it has no width); compare on {FEW_EXAMPLES} or more")
    return (f"note: only {examples} examples: intervals over fewer than {FEW_EXAMPLES} are unreliable (their coverage "
            f"was checked from {FEW_EXAMPLES} on) and one example moves a mean by 1/{examples} of its range; read the "
            f"verdict as a hint and compare on {FEW_EXAMPLES} or more")


def shown_interval(row: dict, digits: int = 4) -> str:
    """A difference row's '[low, high]', or why it has none (one example)."""
    if row.get("examples", FEW_EXAMPLES) < 2:
        return "[no interval: 1 example]"
    return f"[{row['low']:+.{digits}f}, {row['high']:+.{digits}f}]"


def with_shots(conversation: list[dict], shots: list[list[dict]]) -> list[dict]:
    """The conversation with k solved examples as earlier turns, after its system message."""
    lead = next((i for i, m in enumerate(conversation) if m["role"] not in ("tools", "system")), len(conversation))
    head = conversation[:lead]  # declared tools and the system message stay first
    turns = [m for shot in shots for m in shot if m["role"] not in ("tools", "system")]
    return head + turns + conversation[len(head):]


def answer_losses(model, tokenizer, conversations: list[list[dict]], layout: str = PADDED, batch_size: int = 16
                  ) -> tuple[list[float], list[int]]:
    """Per example: mean loss per token of the last answer (earlier turns, such as k-shot examples,
    carry no label), and its token count. `layout` is the batch layout the model's attention takes
    (padding-free where training's fast paths are installed); examples of similar length share a batch."""
    encoded = []
    for messages in conversations:
        example = encode(tokenizer, messages)
        prompt_length = len(prompt_ids(tokenizer, messages))
        example.labels[:prompt_length] = [IGNORE] * min(prompt_length, len(example.labels))
        encoded.append(example)
    sums, counts = label_loss_sums(model, encoded, tokenizer.pad_token_id, layout, batch_size)
    return [total / max(1, count) for total, count in zip(sums, counts)], counts


TEXT_ROW = 512  # tokens per row where held-out raw text is scored (data.max_seq_len's default)


def text_losses(model, tokenizer, conversations: list[list[dict]], layout: str = PADDED, batch_size: int = 16,
                row_tokens: int = TEXT_ROW, label: str = "text loss") -> tuple[list[float], list[int]]:
    """Per raw-text document: mean loss per token of its text, read in rows of `row_tokens` as
    continued pre-training reads it, and its token count."""
    rows = document_rows(tokenizer, [c[0]["content"] for c in conversations], row_tokens)
    sums, counts = label_loss_sums(model, [row for _, row in rows], tokenizer.pad_token_id, layout, batch_size, label)
    total, tokens = [0.0] * len(conversations), [0] * len(conversations)
    for (document, _), row_sum, row_count in zip(rows, sums, counts):
        total[document] += row_sum
        tokens[document] += row_count
    return [t / max(1, n) for t, n in zip(total, tokens)], tokens


@torch.no_grad()
def label_loss_sums(model, encoded: list, pad_id: int, layout: str = PADDED, batch_size: int = 16, label: str = ""
                    ) -> tuple[list[float], list[int]]:
    """Per encoded example: the summed loss of its labelled tokens, and how many there are; with
    `label`, progress is shown under it."""
    was_training = model.training
    model.eval()
    # A batch's label tokens come out example by example; an example's first token is never a target.
    counts = [sum(t != IGNORE for t in e.labels[1:]) for e in encoded]
    sums = [0.0] * len(encoded)
    device = next(model.parameters()).device
    batches = length_batches([len(e.input_ids) for e in encoded], batch_size)
    progress = Progress(len(batches), label, unit="batch", quiet=not label or len(batches) < 4,
                        work=[sum(len(encoded[i].input_ids) for i in chunk) for chunk in batches])
    for done, chunk in enumerate(batches, 1):
        if any(counts[i] for i in chunk):
            batch = to_device(micro_batch([encoded[i] for i in chunk], layout, pad_id), device)
            token_losses = label_token_losses(model, batch).double().cpu()
            for i, part in zip(chunk, token_losses.split([counts[i] for i in chunk])):
                sums[i] = float(part.sum())
        if done % max(1, len(batches) // 10) == 0 or done == len(batches):
            progress.update(done)
    model.train(was_training)
    return sums, counts


@dataclass
class Settings:
    """How answers are generated and scored (the same for every model of a comparison)."""

    max_new_tokens: int = 96
    batch_size: int = 16
    temperature: float = 0.0
    seed: int = 0
    scorer: Scorer | None = None
    scorer_name: str = "custom"
    guard: LoopGuard = LoopGuard()
    text_row: int = TEXT_ROW  # tokens per row where raw text is scored

    @classmethod
    def of(cls, eval_cfg, text_row: int = TEXT_ROW) -> "Settings":
        """From a run's eval section (and its data.max_seq_len, the rows raw text trained in)."""
        from .metrics import load_scorer
        from .scoring import scorer_name

        return cls(eval_cfg.max_new_tokens, eval_cfg.batch_size, eval_cfg.temperature, eval_cfg.seed,
                   load_scorer(eval_cfg.scorer) if eval_cfg.scorer else None, scorer_name(eval_cfg.scorer),
                   LoopGuard.of(eval_cfg), text_row)


def score_prompts(model, tokenizer, name: str, prompts: list[list[dict]], settings: Settings,
                  layout: str = PADDED) -> Scored:
    """A loaded model's answers to the prompts (each ending in its reference answer), their scores
    and the reference answers' loss, per example; of raw text, only the loss on its text."""
    if is_raw_text(prompts):
        losses, counts = text_losses(model, tokenizer, prompts, layout, settings.batch_size, settings.text_row,
                                     label=f"text loss ({name})")
        return Scored(name, [""] * len(prompts), [{LOSS: loss} for loss in losses], counts,
                      references=[c[0]["content"] for c in prompts])
    references = [c[-1]["content"] for c in prompts]
    options = {"label": f"generate ({name})", "temperature": settings.temperature, "seed": settings.seed,
               "guard": settings.guard}
    together = answer_and_score(model, tokenizer, prompts, settings.max_new_tokens, settings.batch_size, **options)
    if together is not None:  # one pass over each prompt for both
        answers, losses, counts, speed = together
    else:
        losses, counts = answer_losses(model, tokenizer, prompts, layout, settings.batch_size)
        answers, speed = generate_answers(model, tokenizer, prompts, settings.max_new_tokens, settings.batch_size,
                                          **options)
    rows = conversation_scores(answers, prompts, settings.scorer, settings.scorer_name)
    for row, loss in zip(rows, losses):
        row[LOSS] = loss
    return Scored(name, answers, rows, counts, speed.get("tokens_per_second"), references)


def score_model(spec: str, prompt_sets: dict[str, list[list[dict]]], settings: Settings,
                tokenizer_from: str | None = None) -> list[Scored]:
    """Load a model or run once, score it on each named prompt set (with the tokenizer and chat template
    of `tokenizer_from` where given); the model is freed afterwards."""
    from ..models import load_tokenizer
    from ..runs import load_trained

    model, tokenizer, _ = load_trained(spec)
    tokenizer = load_tokenizer(tokenizer_from) if tokenizer_from else tokenizer
    model = merged_for_good(model)  # one model, several prompt sets: folded in once
    scored = [score_prompts(model, tokenizer, name, prompts, settings) for name, prompts in prompt_sets.items()]
    del model
    gc.collect()
    return scored


def training_conversations(spec: str) -> list[list[dict]]:
    """A run folder's training conversations, read as training read them; [] for a model."""
    run = RunFolder(spec)
    return run.conversations("train") if run.is_run() else []


def pick_shots(source: str | list[list[dict]], k: int, seed: int, exclude: list[list[dict]]) -> list[list[dict]]:
    """k seeded examples from the training data (a file, or conversations), none of whose prompts
    is in the evaluation set (case, punctuation and white space aside)."""
    conversations = load_conversations(source, None)[0] if isinstance(source, str) else source
    asked = {normalise(c[-2]["content"]) for c in exclude if len(c) > 1}
    pool = [c for c in conversations if len(c) > 1 and normalise(c[-2]["content"]) not in asked]
    if len(pool) < k:
        where = source if isinstance(source, str) else "the training data"
        raise UserError(f"{where}: {len(pool)} usable training examples, fewer than the {k} shots asked for")
    return random.Random(seed).sample(pool, k)


def format_table(result: dict) -> str:
    """The metrics table: each model's value, then each difference with its 95% interval and wins."""
    names = list(result["models"])
    metrics = list(dict.fromkeys(m for scores in result["models"].values() for m in scores))
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"{'metric':<24}" + "".join(f"{n:>{width}}" for n in names)]
    for metric in metrics:
        cells = [result["models"][n].get(metric) for n in names]
        lines.append(f"{metric:<24}" + "".join(f"{'-' if v is None else f'{v:.4f}':>{width}}" for v in cells))
    for row in result["differences"]:
        lines.append(f"{row['candidate']} - {row['baseline']}  {row['metric']:<22} {row['difference']:+.4f} "
                     f"{shown_interval(row)}  win/tie/loss {row['win']}/{row['tie']}/{row['loss']}")
    if result.get("verdict"):
        lines.append(f"verdict: {result['verdict']}")
    return "\n".join(lines + result.get("warnings", []))


def write_comparison(result: dict, folder: Path) -> Path:
    """comparison.json (table and intervals) and comparison.jsonl (answers side by side)."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "examples"}
    run = RunFolder(folder)
    write_text(run.comparison, json.dumps(summary, indent=2))
    write_text(run.comparison_rows, "".join(json.dumps(e) + "\n" for e in result["examples"]))
    return run.comparison
