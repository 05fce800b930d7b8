"""Long work says what it does: progress lines with counts and an ETA, evaluation time left out
of training's rate and ETA, and eval loss in the training layout with its own progress."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from helpers import records
from tunesmith import progress as progress_module
from tunesmith.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_paused_time_is_left_out_of_elapsed_and_eta(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    out = io.StringIO()
    bar = Progress(10, "train", stream=out)
    clock.now += 10  # 2 steps in 10 s
    bar.update(2)
    with bar.paused():
        clock.now += 600  # a long evaluation
    clock.now += 10  # 2 more steps
    bar.update(4, loss=1.5)
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("train 4/10 | loss 1.5") and "0:20 elapsed" in last and "ETA 0:30" in last


def test_eta_follows_the_work_where_items_differ_in_size(monkeypatch):
    """Eval batches go from the shortest examples to the longest: half the batches done in 2 s is a
    quarter of the tokens, so 6 s are left, not 2."""
    clock = Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    out = io.StringIO()
    bar = Progress(4, "eval loss", stream=out, work=[100, 100, 300, 300])
    clock.now += 2
    bar.update(2)
    assert out.getvalue().splitlines()[-1] == "eval loss 2/4 | 0:02 elapsed | ETA 0:06"
    clock.now += 3
    bar.update(3)
    assert out.getvalue().splitlines()[-1].endswith("ETA 0:03")


def test_eval_loss_shows_progress_in_the_training_layout(tiny_model_dir, tiny_tokenizer, capsys):
    """Eval loss over many batches reports how far it is; padding-free it gives the padded result."""
    from helpers import demo_examples, trainable
    from tunesmith.data.collate import PADDED, PADDING_FREE
    from tunesmith.data.prepare import Split
    from tunesmith.eval.loss import eval_loss
    from tunesmith.models import load_model

    examples = demo_examples(tiny_tokenizer, 24)
    split = Split("validation", [[]] * len(examples), examples)
    model = trainable(load_model(str(tiny_model_dir)))
    model.train()
    flat = eval_loss(model, split, 4, tiny_tokenizer.pad_token_id, layout=PADDING_FREE, label="eval loss (base)")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval loss (base)")]
    assert lines[-1].startswith("eval loss (base) 6/6") and "ETA" in lines[-1]
    padded = eval_loss(model, split, 4, tiny_tokenizer.pad_token_id, layout=PADDED)
    assert flat == pytest.approx(padded, rel=1e-5)
    assert model.training and torch.is_grad_enabled()  # left as it was found


def test_train_seconds_leave_evaluations_out(tiny_config, monkeypatch):
    """A run whose evaluations take long: its training time and tokens/s do not count them.

    The clock is the test's: each evaluation moves it 1000 s on, so the check does not depend on
    how fast this machine trains."""
    import time

    import tunesmith
    from tunesmith import api

    real_clock, real_eval = time.perf_counter, api.eval_loss
    skipped = [0.0]

    def clock():
        return real_clock() + skipped[0]

    def slow(*args):
        if not args[-1].endswith("(base)"):
            skipped[0] += 1000.0
        return real_eval(*args)

    monkeypatch.setattr(time, "perf_counter", clock)
    monkeypatch.setattr(api, "eval_loss", slow)
    tiny_config["train"].update(max_steps=4, log_every=1)
    tiny_config["eval"].update(every_steps=1, generate=False, report=False)
    results = tunesmith.train(tiny_config)
    # 3 evaluations during training (1000 s each) and 1 at the end, outside the training loop
    assert skipped[0] == 4000.0
    assert results["train_seconds"] < 1000.0
    steps = records(Path(tiny_config["output"]["dir"]), "train")
    assert len(steps) == 4 and all(r["step_seconds"] < 1000.0 for r in steps)  # the tokens/s windows too


def test_evaluations_still_to_come_count_in_the_eta():
    from tunesmith.training.loop import evaluations_ahead

    # every 25 of 100 steps: at 25, 50 and 75 (not at the last step), then the final one
    assert evaluations_ahead(10, 100, 25, 60.0) == 4 * 60.0
    assert evaluations_ahead(75, 100, 25, 60.0) == 60.0
    assert evaluations_ahead(10, 100, 0, 60.0) == 60.0  # the final one only
    assert evaluations_ahead(10, 100, 25, None) == 0.0  # nothing measured yet


def test_training_eta_counts_the_evaluations_ahead_as_the_base_and_each_one_took(tiny_config, monkeypatch, capsys):
    """Each evaluation (the base's too) moves the test's clock 1000 s on: after step 1 three are ahead
    (steps 2 and 4, and the final one), after step 3 two, after steps 5 and 6 the final one."""
    import time

    import tunesmith
    from tunesmith import api

    real_clock, real_eval = time.perf_counter, api.eval_loss
    skipped = [0.0]

    def slow(*args):
        skipped[0] += 1000.0
        return real_eval(*args)

    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + skipped[0])
    monkeypatch.setattr(api, "eval_loss", slow)
    tiny_config["train"].update(max_steps=6, log_every=1)
    tiny_config["eval"].update(every_steps=2, generate=False, report=False)
    tunesmith.train(tiny_config)
    lines = {line.split(" | ")[0]: line for line in capsys.readouterr().err.splitlines() if line.startswith("train ")}

    def seconds(text: str) -> int:  # "M:SS" or "H:MM:SS"
        total = 0
        for part in text.split(":"):
            total = 60 * total + int(part)
        return total

    def evaluating(line: str) -> int:  # "ETA 5:03 (5:01 of it evaluating)" -> 301
        return seconds(line.split("(")[1].split(" of it evaluating")[0])

    # 1000 s each, and the real seconds the tiny model's evaluations take on top (up to a minute on a busy machine)
    ahead = [evaluating(lines[f"train {step}/6"]) / 1000 for step in (1, 3, 5, 6)]
    assert [round(n) for n in ahead] == [3, 2, 1, 1] and all(n >= round(n) for n in ahead)  # the last: the final one
    assert seconds(lines["train 1/6"].split("ETA ")[1].split(" ")[0]) >= evaluating(lines["train 1/6"])
