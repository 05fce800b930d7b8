"""`tunesmith pairs`: preference pairs from your own scorer, ready for DPO (or ORPO, SimPO).

For every prompt (data/prompts.py: `prompt` with an optional `reference`, or SFT records whose last
answer is the reference) N answers are sampled from a model or run, each is scored with the
scorer (`module:function`, called as function(answer, reference); without one, the reference's own
metric: JSON fields right, else ROUGE-L), and the best and the worst answer become a pair, with
their scores. Prompts whose answers all score the same (within `min_margin`) give no pair.

`chosen="reference"` puts the prompt's reference answer in the chosen place wherever it scores above
the best sampled answer (the model's own answers are all rejected candidates, as in SPIN): the pairs
then teach what none of the samples found, at the price of an answer that is not the model's own.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .config import DataConfig
from .errors import UserError, counted
from .runs import RunFolder


def make_pairs(model: str, data: str, samples: int = 4, scorer: str | None = None, out: str | None = None,
               temperature: float = 1.0, max_new_tokens: int = 96, batch_size: int = 16, seed: int = 0,
               min_margin: float = 0.0, limit: int | None = None, device: str = "auto", chosen: str = "best",
               overwrite: bool = False) -> dict:
    """Write chosen/rejected pairs (JSONL, TRL's conversational form plus scores); returns a summary.
    An existing file at the target (`out`, else RUN/pairs.jsonl or ./pairs.jsonl) is replaced only with
    `overwrite`, as a finished run folder only with output.overwrite; the prompts file never is."""
    from .data.prompts import encode_prompts, read_prompts
    from .data.tokenize import TemplateError, stop_ids
    from .device import resolve
    from .objectives.rewards import Rewards
    from .objectives.rollout import sample, stream_seed
    from .progress import Progress
    from .runs import load_trained, system_prompt_of

    if samples < 2:
        raise UserError("pairs: --samples must be at least 2 (a pair needs two answers)")
    if chosen not in ("best", "reference"):
        raise UserError(f"pairs: --chosen must be 'best' or 'reference', not {chosen!r}")
    if not Path(data).exists():
        raise UserError(f"{data}: data file not found")
    target = Path(out) if out else (RunFolder(model).path / "pairs.jsonl" if RunFolder(model).is_run() else Path("pairs.jsonl"))
    if target.is_dir():  # said before any sampling
        raise UserError(f"--out {target}: a folder; name the pairs file (e.g. {target / 'pairs.jsonl'})")
    if target.exists() and os.path.samefile(target, data):  # the prompts were replaced by the pairs
        raise UserError(f"--out {target}: the prompts file itself (--data {data}); name another file for the pairs")
    if target.exists() and not overwrite:
        raise UserError(f"{target}: exists (earlier pairs or a file of yours); choose another --out, or pass "
                        "--overwrite to replace it")
    problems: list = []
    # A run is sampled as it was trained: with its system prompt (the pairs' prompts then carry it).
    prompts, references, origins, _ = read_prompts(data, DataConfig(train=data, system_prompt=system_prompt_of(model)),
                                                   problems)
    for problem in problems[:5]:
        print(f"  skipped {problem}", file=sys.stderr)
    prompts, references = prompts[:limit], references[:limit]
    if not prompts:
        raise UserError(f"{data}: no usable prompts ({counted(len(problems), 'problem')})")
    unscored = [i for i, reference in enumerate(references) if reference is None]
    if unscored and not scorer:  # said before the model loads and before the output is touched
        raise UserError(f"{origins[unscored[0]][0]}:{origins[unscored[0]][1]}: this prompt has no reference answer "
                        f"({len(unscored)} of {len(prompts)} have none), so only a scorer can grade its answers: "
                        "pass --scorer module:function")
    if unscored and chosen == "reference":
        print(f"pairs: --chosen reference: {len(unscored)} of {len(prompts)} prompts have no reference answer; "
              "their best sample is chosen", file=sys.stderr)
    rewards = Rewards([scorer] if scorer else [])
    loaded, tokenizer, _ = load_trained(model, device=resolve(device))
    ids = encode_prompts(tokenizer, prompts)
    refused = [i for i, encoded in enumerate(ids) if isinstance(encoded, TemplateError)]
    for i in refused[:5]:
        print(f"  skipped {origins[i][0]}:{origins[i][1]}: {ids[i].reason()}", file=sys.stderr)
    kept = [i for i, encoded in enumerate(ids) if not isinstance(encoded, TemplateError)]
    prompts, references, ids = ([v[i] for i in kept] for v in (prompts, references, ids))
    if not prompts:
        raise UserError(f"{data}: the chat template refuses every prompt (first: {origins[refused[0]][0]}:"
                        f"{origins[refused[0]][1]})")
    started = time.perf_counter()
    progress = Progress(len(prompts), "pairs", unit="prompt")
    written, ties, from_reference, empty, chosen_scores, rejected_scores, all_scores = 0, 0, 0, 0, [], [], []
    per_call = max(1, batch_size // samples)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")  # an earlier file stays whole until this one is
    partial.unlink(missing_ok=True)  # a link left there is removed, not written through
    try:  # a scorer's error or Ctrl-C leaves no .partial behind
        with open(partial, "w", encoding="utf-8") as handle:
            for start in range(0, len(prompts), per_call):
                chunk = range(start, min(start + per_call, len(prompts)))
                answers = sample(loaded, [ids[i] for i in chunk], samples, max_new_tokens, temperature,
                                 tokenizer.pad_token_id, stop_ids(tokenizer, loaded), stream_seed(seed, start), batch_size)
                texts = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
                scores, _ = rewards.score(texts, [references[i] for i in chunk for _ in range(samples)])
                all_scores += scores
                # --chosen reference: each reference scored against itself, once per chunk like the samples
                known = [references[i] for i in chunk if references[i] is not None] if chosen == "reference" else []
                own = dict(zip(known, rewards.score(known, known)[0]))
                for number, i in enumerate(chunk):
                    group = list(zip(scores[number * samples:(number + 1) * samples], texts[number * samples:(number + 1) * samples]))
                    empty += sum(not text for _, text in group)
                    group = [g for g in group if g[1]]  # an answer ended at once: no text training could read
                    if not group:
                        ties += 1
                        continue
                    best, worst = max(group, key=lambda g: g[0]), min(group, key=lambda g: g[0])
                    if references[i] in own and own[references[i]] > best[0]:
                        best = (own[references[i]], references[i])
                    if best[0] - worst[0] <= min_margin or best[1] == worst[1]:
                        ties += 1
                        continue
                    row = {"prompt": prompts[i], "chosen": [{"role": "assistant", "content": best[1]}],
                           "rejected": [{"role": "assistant", "content": worst[1]}],
                           "score_chosen": best[0], "score_rejected": worst[0]}
                    if references[i] is not None:
                        row["reference"] = references[i]
                    handle.write(json.dumps(row) + "\n")
                    written += 1
                    from_reference += best[1] == references[i] and chosen == "reference"
                    chosen_scores.append(best[0])
                    rejected_scores.append(worst[0])
                progress.update(chunk[-1] + 1)
        if not written:  # said, and an earlier file kept: an empty file would fail only when DPO reads it
            raise UserError(f"pairs: no pair from {len(prompts)} prompts: every prompt's answers scored alike (within "
                            f"--min-margin {min_margin:g}) or were empty; sample more (--samples), more diversely "
                            "(--temperature), or score finer (--scorer)")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
    return {"pairs": written, "prompts": len(prompts), "samples": samples, "ties_skipped": ties,
            "chosen_from_reference": from_reference,
            "skipped_records": len(problems) + len(refused), "empty_samples_left_out": empty, "scorer": scorer or "reference metric", "out": str(target),
            "mean_score": mean(all_scores), "mean_chosen_score": mean(chosen_scores),
            "mean_rejected_score": mean(rejected_scores), "seconds": round(time.perf_counter() - started, 1)}
