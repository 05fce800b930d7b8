"""Is fine-tuning worth it over prompting or retrieval? The baselines beside the fine-tuned model.

Rows, all scored on the same test examples with the same metrics:

    base                       the base model, zero-shot
    base k-shot                k seeded random training examples in the prompt (eval.kshot)
    base + retrieval           the k training examples most similar to the question (eval.retrieval_k, BM25)
    fine-tuned + retrieval     the fine-tuned model with the same retrieved examples
    fine-tuned                 the candidate: every other row is compared against it

Each row gets the paired bootstrap difference to the fine-tuned model with its 95% interval and
wins / ties / losses (compare.py), and the table a one-line verdict on the primary metric.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..data.collate import PADDED
from ..data.formats import is_raw_text, with_system_prompt
from ..data.prepare import load_conversations
from ..data.validate import problems_before, skipped_lines, unusable
from ..errors import UserError
from ..progress import say
from ..runs import RunFolder, system_prompt_of
from .compare import (FEW_EXAMPLES, LOSS, LOWER_IS_BETTER, TEXT_ROW, Scored, Scorer, Settings, compare_scored,
                      few_examples_note, pick_shots, score_model, score_prompts, shown_interval,
                      training_conversations, with_shots)
from .decoding import LoopGuard

PROMPTED = ("-shot", "+ retrieval")  # row names of the prompting baselines end so


def prompt_sets(name: str, conversations: list[list[dict]], pool: list[list[dict]] | None, kshot: int,
                retrieval_k: int, seed: int, zero_shot: bool = True) -> dict[str, list[list[dict]]]:
    """Row name -> the prompts that row answers: as asked, with k random shots, with k retrieved examples."""
    sets = {name: conversations} if zero_shot else {}
    if (kshot or retrieval_k) and is_raw_text(conversations):
        say(f"{name}: raw text has no prompt to put examples in: no k-shot or retrieval rows")
        return sets
    if kshot:
        shots = pick_shots(pool or [], kshot, seed, conversations)
        sets[f"{name} {kshot}-shot"] = [with_shots(c, shots) for c in conversations]
    if retrieval_k:
        from .retrieval import Retriever

        sets[f"{name} + retrieval"] = Retriever(pool or []).prompts(conversations, retrieval_k)
    return sets


def primary_metric(means: dict, scorer_name: str = "custom") -> str:
    """The metric the verdict is about: every JSON field right, the user's own metric, ROUGE-L, or the answer loss."""
    for metric in ("all_fields", scorer_name, "rouge_l"):
        if metric in means:
            return metric
    return LOSS


def baseline_table(scored: list[Scored], samples: int = 2000, seed: int = 0, scorer_name: str = "custom",
                   guard: LoopGuard = LoopGuard()) -> dict:
    """Every row against the last one (the candidate): means, differences with intervals, verdict,
    a warning where the candidate's answers loop, and a note where the examples are too few for the
    intervals (one example: no verdict)."""
    candidate = scored[-1]
    differences = [row for baseline in scored[:-1] for row in compare_scored(baseline, candidate, samples, seed)]
    primary = primary_metric(candidate.means(), scorer_name)
    notes = [looping_warning(scored, guard), few_examples_note(len(candidate.rows))]
    return {"models": {s.name: s.means() for s in scored}, "differences": differences, "primary_metric": primary,
            "verdict": verdict(differences, primary, candidate.name), "warnings": [n for n in notes if n]}


def verdict(differences: list[dict], metric: str, candidate: str) -> str:
    """One line: does the candidate beat the strongest prompting baseline on `metric`, with its interval?"""
    rows = [d for d in differences if d["metric"] == metric]
    if not rows:
        return ""
    lower = metric in LOWER_IS_BETTER
    own = [d for d in rows if d["baseline"].startswith(f"{candidate} ")]  # the candidate with retrieval
    others = [d for d in rows if d not in own]
    prompting = [d for d in others if d["baseline"].endswith(PROMPTED)] or others
    if not prompting:
        return ""
    pick = min if lower else max
    strongest = pick(prompting, key=lambda d: d["baseline_value"])
    examples = strongest.get("examples", FEW_EXAMPLES)  # a row made by hand may not say
    if examples < 2:  # no interval to judge by (few_examples_note says so)
        return ""
    gain = -1 if lower else 1  # the sign of a difference that favours the candidate
    low, high = sorted((gain * strongest["low"], gain * strongest["high"]))
    # The lead in the direction that is better: "+0.5 lower answer_loss", never "+0.5 answer_loss" for a loss that fell.
    change = f"{gain * strongest['difference']:+.3f} [{low:+.3f}, {high:+.3f}] {'lower ' if lower else ''}{metric}"
    baseline = strongest["baseline"]
    if low > 0:
        line = f"fine-tuning beats {baseline} by {change}"
    elif high < 0:
        line = f"{baseline} beats fine-tuning by {_flip(change)}: consider it instead"
    else:
        line = f"{baseline} is as good ({change}, the interval includes 0): consider it"
    for d in own:
        if max(gain * d["low"], gain * d["high"]) < 0:
            line += f"; retrieval on top of the fine-tuned model helps further ({-gain * d['difference']:+.3f})"
    if examples < FEW_EXAMPLES:
        line += f" (over {examples} examples only: see the note)"
    return line


def _flip(change: str) -> str:
    """'-0.120 [-0.200, -0.050] m' -> '+0.120 [+0.050, +0.200] m'."""
    numbers = [float(x) for x in re.findall(r"[+-]\d+\.\d+", change)]
    metric = change.partition("] ")[2]
    return f"{-numbers[0]:+.3f} [{-numbers[2]:+.3f}, {-numbers[1]:+.3f}] {metric}"


def score_rows(model, tokenizer, sets: dict[str, list[list[dict]]], settings: Settings, layout: str = PADDED,
               folder: Path | None = None) -> list[Scored]:
    """Score the loaded model on each prompt set; with `folder`, each row's answers go to
    predictions_<row>.jsonl (the fine-tuned model's to predictions.jsonl)."""
    scored = []
    for name, prompts in sets.items():
        row = score_prompts(model, tokenizer, name, prompts, settings, layout)
        if folder is not None and not is_raw_text(prompts):  # raw text: nothing generated
            write_predictions(folder / predictions_name(name), prompts, row.answers)
        scored.append(row)
    return scored


def predictions_name(row: str) -> str:
    if row == "fine-tuned":
        return "predictions.jsonl"
    return f"predictions_{re.sub(r'[^a-z0-9-]+', '_', row.lower()).strip('_')}.jsonl"


def write_predictions(path: Path, prompts: list[list[dict]], answers: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for conversation, answer in zip(prompts, answers):
            handle.write(json.dumps({"prompt": conversation[-2]["content"] if len(conversation) > 1 else "",
                                     "reference": conversation[-1]["content"], "answer": answer}) + "\n")


def summary(row: Scored) -> dict:
    """A row's means as results.json keeps them: scores, test examples, generation speed."""
    speed = row.generated_tokens_per_second
    return {**row.means(), "test_examples": len(row.rows),
            **({"generated_tokens_per_second": round(speed, 1)} if speed is not None else {})}


def format_baselines(table: dict) -> str:
    """Each row's value of the primary metric and the answer loss, the fine-tuned model's difference
    to it with the 95% interval and the fine-tuned model's wins / ties / losses, then the verdict."""
    metrics = [m for m in dict.fromkeys([table["primary_metric"], LOSS]) if any(m in v for v in table["models"].values())]
    names = list(table["models"])
    candidate = names[-1]
    width = max(len(n) for n in names) + 2
    header = f"{candidate} - row [95% interval]"
    lines = [f"{'':<{width}}" + "".join(f"{m:>14}{header:>{len(header) + 4}}{'w/t/l':>12}" for m in metrics)]
    by_pair = {(d["baseline"], d["metric"]): d for d in table["differences"]}
    for name in names:
        cells = []
        for metric in metrics:
            value = table["models"][name].get(metric)
            d = by_pair.get((name, metric))
            versus = f"{d['difference']:+.3f} {shown_interval(d, 3)}" if d else ""
            wtl = f"{d['win']}/{d['tie']}/{d['loss']}" if d else ""
            cells.append(f"{'-' if value is None else f'{value:.3f}':>14}{versus:>{len(header) + 4}}{wtl:>12}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    if table.get("verdict"):
        lines.append(f"verdict: {table['verdict']}")
    return "\n".join(lines + table.get("warnings", []))


def asked_as_trained(conversations: list[list[dict]], a: str, b: str) -> tuple[list, list]:
    """The conversations as A and as B are asked them: a run with the system prompt it trained with, a plain
    model with the other's (both are then asked alike, as in training's own comparison with the base)."""
    system_a, system_b = system_prompt_of(a), system_prompt_of(b)
    system_a, system_b = system_a or system_b, system_b or system_a
    if system_a and system_a == system_b:
        say(f"compare: both are asked with the system prompt the run trained with: {system_a!r}")
    else:
        for name, system in ((a, system_a), (b, system_b)):
            if system:
                say(f"compare: {name} is asked with the system prompt it trained with: {system!r}")
    return ([with_system_prompt(c, system_a) for c in conversations],
            [with_system_prompt(c, system_b) for c in conversations])


def template_of_run_based_on(run: str, model: str) -> str | None:
    """The trained folder of `run` where `model` is the run's own base: its tokenizer carries the chat
    template as training applied it (data.chat_template, data.template_variables such as Qwen3's
    enable_thinking=false), which training's own comparison asked the base with too."""
    folder = RunFolder(run)
    if not folder.is_run() or not model:
        return None
    base = folder.read_config().model.name
    same = base == model or (Path(base).expanduser().exists() and Path(model).expanduser().exists()
                             and Path(base).expanduser().resolve() == Path(model).expanduser().resolve())
    if not same:
        return None
    say(f"compare: {model} is the run's base: it is asked with the run's chat template, as in training's comparison")
    return str(folder.trained())


def compare_models(a: str, b: str, data: str, kshot: int = 0, kshot_data: str | None = None,
                   max_new_tokens: int = 96, batch_size: int = 16, limit: int | None = None,
                   temperature: float = 0.0, seed: int = 0, scorer: Scorer | None = None,
                   scorer_name: str = "custom", samples: int = 2000, names: tuple[str, str] | None = None,
                   retrieval_k: int = 0, guard: LoopGuard = LoopGuard()) -> dict:
    """Score A (and A k-shot, A with retrieval), B with retrieval and B on the data file; each row
    against B. Returns the table data, a one-line verdict and the per-example outputs."""
    conversations, origins, problems = load_conversations(data, None, origins=True)
    if not conversations:
        raise UserError(f"{data}: no usable examples to compare on" + (f" {unusable(problems)}" if problems else ""))
    for line in skipped_lines(problems_before(problems, origins, limit)):
        say(line)
    conversations = conversations[:limit] if limit else conversations
    if (kshot or retrieval_k) and is_raw_text(conversations):
        raise UserError(f"{data}: raw text has no prompts to put examples in: --kshot and --retrieval-k do not "
                        "apply (A and B are compared by the loss on the text)")
    name_a, name_b = names or ("A", "B")
    settings = Settings(max_new_tokens, batch_size, temperature, seed, scorer, scorer_name, guard)
    pool = None
    if kshot or retrieval_k:
        pool = load_conversations(kshot_data, None)[0] if kshot_data else training_conversations(b) or \
            training_conversations(a)
        if not pool and not kshot_data:
            raise UserError("--kshot and --retrieval-k need training examples: give --kshot-data FILE, "
                            "or a run folder (whose training data is still in place) as A or B")
    asked_a, asked_b = asked_as_trained(conversations, a, b)
    scored = score_model(a, prompt_sets(name_a, asked_a, pool, kshot, retrieval_k, seed, zero_shot=True), settings,
                         template_of_run_based_on(b, a))
    scored += score_model(b, prompt_sets(name_b, asked_b, pool, 0, retrieval_k, seed, zero_shot=True),
                          settings, template_of_run_based_on(a, b))[::-1]  # B with retrieval, then B itself last
    table = baseline_table(scored, samples, seed, scorer_name, guard)
    examples = [{"prompt": c[-2]["content"] if len(c) > 1 else "", "reference": c[-1]["content"],
                 **{s.name: {"answer": s.answers[i], "scores": s.rows[i]} for s in scored}}
                for i, c in enumerate(conversations)]
    return {"a": a, "b": b, "data": data, "examples_scored": len(conversations), "kshot": kshot,
            "retrieval_k": retrieval_k, **table, "examples": examples,
            "settings": {k: v for k, v in vars(settings).items() if k not in ("scorer", "guard")}
            | vars(guard) | {"bootstrap_samples": samples}}


def test_prompts(test: list[list[dict]], eval_cfg) -> list[list[dict]]:
    return test[: eval_cfg.test_limit] if eval_cfg.test_limit else test


def cut_answers_warning(answer_tokens: list[int], eval_cfg) -> str | None:
    """A warning where at least a tenth of the scored test answers are longer than the answers
    generated for them may be: their text scores then compare a cut answer with a whole one
    (answer_loss, computed on the whole reference, is not affected)."""
    scored = test_prompts(answer_tokens, eval_cfg)
    longer = sorted(n for n in scored if n > eval_cfg.max_new_tokens)
    if not scored or len(longer) < 0.1 * len(scored):
        return None
    return (f"warning: {len(longer)} of {len(scored)} test answers are longer than eval.max_new_tokens="
            f"{eval_cfg.max_new_tokens} (the median of those {longer[len(longer) // 2]} tokens): generation stops "
            "before their end, so their text scores (rouge_l, token_f1) judge cut answers; raise "
            "eval.max_new_tokens to score whole ones")


LOOP = 0.5  # an answer half or more of whose word 4-grams repeat earlier ones restates itself: a loop


def looping_warning(scored: list[Scored], guard: LoopGuard = LoopGuard()) -> str | None:
    """A warning where a tenth or more of the candidate's (the last row's) answers loop, with how
    many of each other row's do: their text scores then judge loops, not what the model knows."""
    def loops(row: Scored) -> int:
        return sum(r.get("repetition", 0.0) >= LOOP for r in row.rows)

    candidate = scored[-1]
    count = loops(candidate)
    if not candidate.rows or count < max(1, 0.1 * len(candidate.rows)):
        return None
    others = ", ".join(f"{row.name} {loops(row)}" for row in scored[:-1])
    advice = (f"they loop with {guard} too" if guard.options() else "eval.no_repeat_ngram_size: 4 "
              "(--no-repeat-ngram-size 4 in eval and compare) decodes without them")
    return (f"warning: {count} of {len(candidate.rows)} {candidate.name} answers loop (half or more of their word "
            f"4-grams repeat{'; ' + others if others else ''}): their text scores (rouge_l, token_f1) judge the "
            f"loops; {advice}")


def score_base_rows(model, tokenizer, test: list[list[dict]], train: list[list[dict]], eval_cfg, folder: Path,
                    layout: str = PADDED, text_row: int = TEXT_ROW) -> list[Scored]:
    """Before training (the method's new weights are still the identity): the base model as asked
    (with eval.compare_base), with k random shots and with k retrieved examples."""
    sets = prompt_sets("base", test_prompts(test, eval_cfg), train, eval_cfg.kshot, eval_cfg.retrieval_k,
                       eval_cfg.seed, zero_shot=eval_cfg.compare_base)
    return score_rows(model, tokenizer, sets, Settings.of(eval_cfg, text_row), layout, folder)


def score_tuned_rows(model, tokenizer, test: list[list[dict]], train: list[list[dict]], eval_cfg, folder: Path,
                     layout: str = PADDED, text_row: int = TEXT_ROW) -> list[Scored]:
    """After training: the fine-tuned model with retrieved examples (eval.retrieval_k, unless
    eval.retrieval_tuned is off), then alone (last)."""
    retrieval_k = eval_cfg.retrieval_k if eval_cfg.retrieval_tuned else 0
    sets = prompt_sets("fine-tuned", test_prompts(test, eval_cfg), train, 0, retrieval_k, eval_cfg.seed)
    return score_rows(model, tokenizer, dict(reversed(sets.items())), Settings.of(eval_cfg, text_row), layout, folder)
