"""The measuring commands as plain functions: eval (loss and generation scores on a file), eval
--general (the general-ability probe, base against fine-tuned) and compare (A against B)."""
from __future__ import annotations

from pathlib import Path

from .data.formats import is_raw_text
from .data.prepare import eval_file
from .device import resolve
from .errors import UserError
from .eval.compare import text_losses
from .eval.decoding import LoopGuard
from .eval.generate import merged_adapter, merged_for_good
from .eval.loss import eval_loss
from .eval.scoring import score_generation
from .progress import say
from .runs import RunFolder


def evaluate(model_or_run: str, data: str | None, max_new_tokens: int | None = None, batch_size: int | None = None,
             limit: int | None = None, scorer: str | None = None, temperature: float | None = None,
             seed: int | None = None, device: str = "auto", guard: LoopGuard | None = None) -> dict:
    """Eval loss and generation scores of a model or run on a data file (None: the run's own test data).
    Decoding options left None are the run's own (`scored_as`), else eval's defaults."""
    from .config import DataConfig
    from .data.sources import check_source
    from .runs import load_trained, own_test_data, system_prompt_of

    own = data is None
    data = data or own_test_data(model_or_run)
    eval_cfg, limit = scored_as(model_or_run, own, limit, "eval", guard, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, temperature=temperature, seed=seed, scorer=scorer)
    check_source(data, "--data")  # before the model loads
    if scorer:  # a mistyped --scorer cost a whole pass of generation before it was said
        from .eval.metrics import load_scorer

        load_scorer(scorer)
    model, tokenizer, _ = load_trained(model_or_run, device=resolve(device))
    model = merged_for_good(model)  # its loss and its answers: LoRA folded in once, a third faster on a CPU
    system = system_prompt_of(model_or_run)
    if system:
        say(f"eval: the examples are asked with the system prompt the run trained with: {system!r}")
    # The first `limit` examples of the file; the eval loss on those within max_seq_len, as in
    # training; generation scores on every one. A run's file is read as the run read its data (its
    # format, columns, max_seq_len, reasoning, template settings).
    run = RunFolder(model_or_run)
    # (its chat template and template variables are those the trained tokenizer carries, as saved)
    data_cfg = (run.read_config().data.model_copy(update={"train": data, "validation": None, "test": None, "mix": {},
                                                          "system_prompt": system, "chat_template": None,
                                                          "template_variables": {}})
                if run.is_run() else DataConfig(train=data, system_prompt=system))
    test = eval_file(data, tokenizer, data_cfg, limit)
    if is_raw_text(test.conversations):  # its loss in rows of max_seq_len, as training reads raw text
        losses, tokens = text_losses(model, tokenizer, test.conversations, row_tokens=data_cfg.max_seq_len)
        say("eval: raw text is scored by its loss alone (nothing to generate)")
        return {"eval_loss": sum(x * n for x, n in zip(losses, tokens)) / sum(tokens), "test_examples": len(losses)}
    validation = test.select([i for i, e in enumerate(test.encoded) if len(e.input_ids) <= data_cfg.max_seq_len])
    results = {"eval_loss": eval_loss(model, validation, eval_cfg.batch_size, tokenizer.pad_token_id)} \
        if validation.encoded \
        else say(f"eval: no eval loss: none of the examples fits in {data_cfg.max_seq_len} tokens") or {}
    results.update(score_generation(model, tokenizer, test.conversations, eval_cfg, label="eval"))
    return results


def scored_as(model_or_run: str, own_data: bool, limit: int | None, command: str, guard: LoopGuard | None,
              **given) -> tuple:
    """The EvalConfig and limit eval scores with: the options given, the others as a run folder's training
    scored its test split (its max_new_tokens, batch size, decoding, and test_limit on its own test data),
    so `eval RUN` repeats the figures training recorded: at 96 tokens on the whole split it scored others.
    Not the run's scorer: code named by a folder is imported only when --scorer names it."""
    from .config import EvalConfig

    given.update(repetition_penalty=guard and guard.repetition_penalty,  # a LoopGuard's fields may be None too
                 no_repeat_ngram_size=guard and guard.no_repeat_ngram_size)
    run = RunFolder(model_or_run)
    recorded = run.read_config().eval if run.is_run() else EvalConfig()
    taken = {k: getattr(recorded, k) for k, v in given.items() if v is None and k != "scorer"}
    if own_data and limit is None and recorded.test_limit:
        limit = taken["test_limit"] = recorded.test_limit
    if run.is_run() and taken:
        say(f"{command}: scored as {model_or_run}'s training scored its test split: " + ", ".join(
            f"{k} {v}" for k, v in taken.items()) + " (options change it)")
    taken.pop("test_limit", None)
    return EvalConfig(**{**given, **taken}), limit


def evaluate_general(model_or_run: str, folder: str | None = None, sets: list[str] | None = None,
                     limit: int | None = None, margin: float = 2.0, seed: int | None = 0, device: str = "auto",
                     keep: bool = False) -> dict:
    """The general-ability probe on a model; for a fine-tuned run or adapter, on its base too (the
    adapter switched off), with each difference and its paired 95% interval. `keep`: a run folder's
    goes to its general.json (its report and model card show it where training ran no probe)."""
    from .config import EvalConfig
    from .eval.general import GeneralAbility, means
    from .runs import load_trained, write_json

    model, tokenizer, _ = load_trained(model_or_run, device=resolve(device))
    probe = GeneralAbility(EvalConfig(general=True, general_data=folder, general_sets=sets, general_limit=limit,
                                      general_margin=margin, seed=seed or 0))  # None: eval's unset --seed
    if not hasattr(model, "disable_adapter"):  # a plain model: its own scores only
        probe.score(model, tokenizer, "model")
        return {"items": {n: len(i) for n, i in probe.probe.items()}, "model": means(probe.scores["model"])}
    with model.disable_adapter():
        probe.score(model, tokenizer, "base")
    with merged_adapter(model):  # the same scores, faster (as eval's loss and generation)
        probe.score(model, tokenizer, "fine-tuned")
    say(probe.table())
    for line in probe.warnings():
        say(line)
    found, run = probe.results(), RunFolder(model_or_run)
    if keep and run.is_run():
        write_json(run.general, found)
        say(f"general ability: {run.general}" + (f"; {refreshed_report(run.path)}" if run.results.is_file() else ""))
    return found


def compare(a: str, b: str, data: str, kshot: int = 0, kshot_data: str | None = None, max_new_tokens: int | None = None,
            batch_size: int | None = None, limit: int | None = None, scorer: str | None = None,
            temperature: float | None = None, seed: int | None = None, out: str | None = None, retrieval_k: int = 0,
            guard: LoopGuard | None = None) -> dict:
    """A against B (e.g. base model vs fine-tuned run) with bootstrap intervals; optionally A k-shot,
    A and B with k retrieved training examples too. Decoding options left None are B's run's own
    (A's where only A is a run; `scored_as`), else eval's defaults.

    Written to `out` (default: B's run folder, whose report then shows the comparison)."""
    from .eval.baselines import compare_models
    from .eval.compare import format_table, write_comparison
    from .eval.metrics import load_scorer
    from .eval.scoring import scorer_name
    from .runs import check_loadable

    if not Path(data).exists():
        raise UserError(f"{data}: data file not found")
    if out and Path(out).exists() and not Path(out).is_dir():  # said before the answers are generated
        raise UserError(f"--out {out}: a file, not a folder for comparison.json")
    for spec in (a, b):  # a mistyped B is said before A's answers are generated, not after
        check_loadable(spec)
    settings, _ = scored_as(b if RunFolder(b).is_run() else a, False, limit, "compare", guard,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature, seed=seed,
                            scorer=scorer)
    max_new_tokens, batch_size, temperature, seed, guard = (settings.max_new_tokens, settings.batch_size,
                                                            settings.temperature, settings.seed, LoopGuard.of(settings))
    result = compare_models(a, b, data, kshot, kshot_data, max_new_tokens, batch_size, limit, temperature, seed,
                            load_scorer(scorer) if scorer else None, scorer_name(scorer),
                            names=_names(a, b), retrieval_k=retrieval_k, guard=guard)
    folder = Path(out) if out else (Path(b) if RunFolder(b).is_run() else None)
    if folder is not None:
        say(f"comparison: {write_comparison(result, folder)}")
        if RunFolder(folder).is_run():
            say(refreshed_report(folder))
    say(format_table(result))
    return result


def refreshed_report(folder) -> str:
    """The line saying where the run's report was rewritten, or why it was not (the new figures are
    kept whatever the report's fate: a damaged results.json must not lose them)."""
    from .eval.report import write_report

    try:
        return f"report: {write_report(folder)[0]}"
    except UserError as err:
        return f"report not refreshed: {err}"


def _names(a: str, b: str) -> tuple[str, str]:
    """Short column names for the table: folder names, or A and B where those are the same."""
    short = (Path(a).name or a, Path(b).name or b)
    return short if short[0] != short[1] else ("A", "B")
