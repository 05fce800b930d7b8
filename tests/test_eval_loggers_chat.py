"""Metric loggers behind one protocol, and the terminal chat."""
import io
import json
import sys
import types

import pytest
import torch

from tunesmith.errors import UserError
from tunesmith.training.loggers import Loggers, open_loggers


def fake_module(name, monkeypatch, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_jsonl_always_and_extra_loggers_get_numeric_records(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("wandb", step, values))

        def finish(self):
            calls.append(("wandb-finish",))

    fake_module("wandb", monkeypatch, init=lambda **kw: calls.append(("wandb-init", kw["config"]["train"])) or Run())
    fake_module("mlflow", monkeypatch, start_run=lambda run_name: calls.append(("mlflow-start", run_name)),
                log_params=lambda params: calls.append(("mlflow-params", params)),
                log_metrics=lambda values, step: calls.append(("mlflow", step, values)),
                end_run=lambda: calls.append(("mlflow-end",)))
    log = open_loggers(tmp_path / "run", ["wandb", "mlflow", "wandb"], {"train": {"lr": 0.1}})
    assert isinstance(log, Loggers) and len(log.extra) == 2  # a repeated name opens one logger
    log.write(event="train", step=5, loss=1.5, lr=0.1, note="text is left to the file")
    log.close()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["loss"] == 1.5 and record["note"] == "text is left to the file"
    assert ("wandb", 5, {"train/loss": 1.5, "train/lr": 0.1}) in calls
    assert ("mlflow", 5, {"train_loss": 1.5, "train_lr": 0.1}) in calls
    assert ("mlflow-params", {"train.lr": 0.1}) in calls and ("wandb-finish",) in calls and ("mlflow-end",) in calls


def test_a_logger_asked_for_but_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(UserError, match="'tensorboard' asked for but not installed"):
        open_loggers(tmp_path, ["tensorboard"])
    with pytest.raises(UserError, match="unknown logger"):
        open_loggers(tmp_path, ["neptune"])


def test_config_accepts_only_known_loggers():
    from tunesmith.config import load_config

    assert load_config(None, ["eval.loggers=[wandb]"]).eval.loggers == ["wandb"]
    with pytest.raises(UserError, match="eval.loggers"):
        load_config(None, ["eval.loggers=[neptune]"])


def test_chat_streams_answers_and_keeps_the_history(tiny_model_dir):
    from tunesmith.eval.chat import chat

    said = iter(["My PixelPad froze", "", "/reset", "And the invoice?", "/exit", "never read"])
    out = io.StringIO()
    torch.manual_seed(0)  # sampled: a random tiny model's greedy answer is often blank
    messages = chat(str(tiny_model_dir), system="Answer briefly.", max_new_tokens=8, temperature=1.0,
                    read=lambda prompt: next(said), out=out)
    # /reset dropped the first exchange; the empty line was ignored; /exit ended before the last line.
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[1]["content"] == "And the invoice?"
    text = out.getvalue()
    assert text.count("model> ") == 2
    answer = " ".join(messages[2]["content"].split())
    assert answer and answer in " ".join(text.split())  # what was streamed is what joined the history


def test_chat_leaves_out_the_oldest_turns_beyond_the_models_context(tiny_model_dir, tmp_path):
    """The whole history went to the model every turn: past its context a model with absolute positions
    failed (the session lost) and one with rotary positions degraded without a word."""
    import json
    import shutil

    from tunesmith.data.tokenize import prompt_ids
    from tunesmith.eval.chat import chat
    from tunesmith.models import load_tokenizer

    small = tmp_path / "small"
    shutil.copytree(tiny_model_dir, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 96}))
    said = iter([f"Ticket {i}: my PixelPad froze again after the update" for i in range(6)]
                + ["word " * 200, "/exit"])
    out = io.StringIO()
    messages = chat(str(small), system="Answer briefly.", max_new_tokens=8, read=lambda prompt: next(said), out=out)
    tokenizer = load_tokenizer(str(small))
    assert messages[0]["role"] == "system" and messages[-2]["content"].startswith("Ticket 5")
    assert len(prompt_ids(tokenizer, messages[:-1])) + 8 <= 96  # the last prompt the model saw fitted
    text = out.getvalue()
    assert "messages left out: with them the conversation is longer than the model's 96 tokens" in text
    assert "leaves no room in the model's 96 tokens" in text and text.count("model> ") == 6
    # the first message, too long, with no system prompt: refused, and the session goes on
    said = iter(["word " * 200, "Ticket 9: froze", "/exit"])
    messages = chat(str(small), system="", max_new_tokens=8, read=lambda prompt: next(said), out=io.StringIO())
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "Ticket 9: froze"


def test_a_bf16_adapter_is_folded_in_once_and_its_weights_stay_as_they_were(tiny_model_dir, tmp_path, monkeypatch):
    """Merged before and unmerged after every chat turn, a bf16 base took a rounding each time: 30 turns
    moved a weight by 0.014. Folded in once for the session, nothing moves."""
    import json

    from peft import LoraConfig, get_peft_model

    import tunesmith.eval.chat as chat_module
    from tunesmith.models import load_model, load_tokenizer

    adapter = get_peft_model(load_model(str(tiny_model_dir), torch.bfloat16),
                             LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    folder = tmp_path / "adapter"
    adapter.save_pretrained(folder)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tiny_model_dir)}))
    seen, reply = [], chat_module.stream_reply

    def watched(model, *args, **kwargs):
        seen.append(next(p for n, p in model.named_parameters() if "q_proj" in n).detach().float().clone())
        return reply(model, *args, **kwargs)

    monkeypatch.setattr(chat_module, "stream_reply", watched)
    said = iter(["hello there"] * 30 + ["/exit"])
    chat_module.chat(str(folder), system="", max_new_tokens=2, read=lambda prompt: next(said), out=io.StringIO())
    assert len(seen) == 30 and float((seen[-1] - seen[0]).abs().max()) == 0.0


class Tracked:
    """An extra metric logger that records whether it was closed."""

    def __init__(self, closed: list, fail_on_close: bool = False):
        self.closed, self.fail_on_close = closed, fail_on_close

    def write(self, **record) -> None:
        pass

    def close(self) -> None:
        self.closed.append(self)
        if self.fail_on_close:
            raise OSError("the logger's server went away")


def test_loggers_are_closed_when_training_fails(tiny_config, monkeypatch):
    """A run that fails after its loggers opened closes them all (W&B/MLflow runs would stay open)."""
    import tunesmith
    from tunesmith import api
    from tunesmith.training import loggers

    closed, opened = [], []
    monkeypatch.setitem(loggers.EXTRA_LOGGERS, "wandb",  # W&B's place, taken by a logger that counts closes
                        ("json", lambda folder, config: opened.append(Tracked(closed)) or opened[-1]))
    tiny_config["eval"]["loggers"] = ["wandb"]
    real_open = api.open_loggers
    files = []
    monkeypatch.setattr(api, "open_loggers", lambda *a, **k: files.append(real_open(*a, **k)) or files[-1])
    monkeypatch.setattr(api, "fit", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("failed in the middle")))
    with pytest.raises(RuntimeError, match="failed in the middle"):
        tunesmith.train(tiny_config)
    assert len(opened) == 1 and closed == opened
    assert files[0].jsonl.handle.closed


def test_every_logger_is_closed_when_one_fails_to_close_or_open(tmp_path, monkeypatch):
    from tunesmith.training import loggers

    closed = []
    monkeypatch.setitem(loggers.EXTRA_LOGGERS, "first", ("json", lambda folder, config: Tracked(closed, True)))
    monkeypatch.setitem(loggers.EXTRA_LOGGERS, "second", ("json", lambda folder, config: Tracked(closed)))
    log = open_loggers(tmp_path / "run", ["first", "second"])
    with pytest.raises(OSError, match="went away"):
        log.close()
    assert len(closed) == 2 and log.jsonl.handle.closed

    def broken(folder, config):
        raise RuntimeError("cannot reach the tracking server")

    closed.clear()
    monkeypatch.setitem(loggers.EXTRA_LOGGERS, "broken", ("json", broken))
    with pytest.raises(RuntimeError, match="tracking server"):
        open_loggers(tmp_path / "run", ["second", "broken"])
    assert len(closed) == 1  # the one opened before the failure


def test_a_record_after_a_line_cut_by_a_crash_starts_its_own_line(tmp_path):
    """A crash may leave metrics.jsonl's last record without its newline: the resumed session's first
    record (its `run` record, written before truncate_after) was glued to it and both were lost."""
    from tunesmith.training.loggers import MetricLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "step": 1}\n{"event": "train", "st')
    log = MetricLog(path)
    log.write(event="run", step=0)
    log.truncate_after(1)
    log.close()
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["train", "run"]


def test_a_failing_dashboard_is_left_out_and_a_refused_mlflow_run_is_ended(tmp_path, monkeypatch, capsys):
    """A dashboard's network error drops that logger with a warning, training's records go on to
    metrics.jsonl and the other loggers; MLflow parameters it refuses end the run it started (the next
    training in the process, a curve fraction, found it still active)."""
    calls = []

    class Run:
        def log(self, values, step):
            raise ConnectionError("wandb.ai unreachable")

        def finish(self):
            calls.append("wandb-finish")

    def refuse(params):
        raise ValueError("param value too long")

    fake_module("wandb", monkeypatch, init=lambda **kw: Run())
    fake_module("mlflow", monkeypatch, start_run=lambda run_name: calls.append("mlflow-start"), log_params=refuse,
                log_metrics=lambda values, step: calls.append(("mlflow", step)), end_run=lambda: calls.append("mlflow-end"))
    with pytest.raises(ValueError, match="too long"):
        open_loggers(tmp_path / "a", ["mlflow"], {"train": {"lr": 0.1}})
    assert calls == ["mlflow-start", "mlflow-end"]
    monkeypatch.setattr(sys.modules["mlflow"], "log_params", lambda params: None)
    log = open_loggers(tmp_path / "run", ["wandb", "mlflow"], {"train": {"lr": 0.1}})
    for step in (1, 2):
        log.write(event="train", step=step, loss=1.0)
    log.close()
    assert "ConnectionError: wandb.ai unreachable" in capsys.readouterr().err
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert ("mlflow", 1) in calls and ("mlflow", 2) in calls and calls.count("wandb-finish") == 1


def test_chat_and_generate_take_tools_say_the_calls_and_take_their_results(tiny_model_dir, tmp_path, monkeypatch,
                                                                          capsys):
    """A model trained on tool calls could not be tried with its tools: chat and generate had no way to
    declare them, nor to see the calls an answer made or give a call its result."""
    import shutil

    from helpers import CHATML
    from tunesmith.data.tokenize import render
    from tunesmith.eval import chat as module
    from tunesmith.models import load_tokenizer

    tools = [{"name": "get_weather", "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    renders = tmp_path / "renders"
    shutil.copytree(tiny_model_dir, renders)
    (renders / "chat_template.jinja").write_text(
        "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}" + CHATML)
    answers = iter(['<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "kelvin"}}</tool_call>',
                    "It is 4 degrees in Oslo.", "A toolbox holds tools.",
                    '{"name": "get_weather", "arguments": {"city": "Bergen"}}'])
    prompts = []

    def reply(model, tokenizer, messages, *args):
        prompts.append(render(tokenizer, messages, add_generation_prompt=True))
        return next(answers)

    monkeypatch.setattr(module, "stream_reply", reply)
    said = iter(["/tool 4 degrees", "Weather in Oslo?", "/tool 4 degrees", "/toolbox is a word", "/tool again", "/exit"])
    out = io.StringIO()
    messages = module.chat(str(renders), system="", max_new_tokens=16, read=lambda prompt: next(said), out=out,
                           tools=str(tmp_path / "tools.json"))
    text = out.getvalue()
    # /tool before any call, and after an answer that made none, is refused; "/toolbox" is a user message
    assert text.count("(no tool call to answer: the last answer made none)") == 2 and "/tool TEXT gives the result" in text
    assert ("(tool call: get_weather {\"city\": \"Oslo\", \"unit\": \"kelvin\"} - arguments unlike the schema: calls "
            "'get_weather' with arguments['unit']: 'kelvin' is not one of ['celsius', 'fahrenheit'])") in text
    assert [m["role"] for m in messages] == ["tools", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "4 degrees" and "<tools>" in prompts[0] and "4 degrees" in prompts[1]
    assert "does not render tools" not in text
    # generate: the call said (valid) on stderr; a template without tools is said to leave them out
    monkeypatch.setattr(module, "stream_reply", reply)
    module.generate_once(str(tiny_model_dir), "Weather in Bergen?", system="", tools=str(tmp_path / "tools.json"))
    assert "<tools>" not in prompts[-1]
    err = capsys.readouterr().err
    assert "the chat template does not render tools" in err and '(tool call: get_weather {"city": "Bergen"} - valid)' in err
    # A template that refuses the tool message (Mistral's wants call ids): said, the message left out, the chat goes on
    (renders / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('tool results need a tool_call_id') }}"
        "{% endif %}{% endfor %}" + CHATML)
    answers = iter(['{"name": "get_weather", "arguments": {"city": "Oslo"}}', "Hello."])
    said, out = iter(["Weather in Oslo?", "/tool 4 degrees", "Hi", "/exit"]), io.StringIO()
    messages = module.chat(str(renders), system="", max_new_tokens=16, read=lambda prompt: next(said), out=out,
                           tools=str(tmp_path / "tools.json"))
    assert "(chat template refused the conversation (tool results need a tool_call_id): that message is left out)" \
        in out.getvalue()
    assert [m["role"] for m in messages] == ["tools", "user", "assistant", "user", "assistant"]
    (tmp_path / "broken.json").write_text('[{"name": "get_weather",\n "parameters": }]')
    with pytest.raises(UserError, match=r"broken.json: line 2: not valid JSON"):
        module.read_tools(str(tmp_path / "broken.json"))
    assert load_tokenizer(str(renders))  # the copied folder is a model folder still


def test_a_tool_result_without_declared_tools_is_said_not_sent():
    """`/tool 21` in a chat without --tools was sent to the model as the user's words."""
    import io

    from tunesmith.eval.chat import said_message

    out = io.StringIO()
    assert said_message("/tool 21", [], None, out) is None and "start chat with --tools FILE" in out.getvalue()
    assert said_message("/tools are great", [], None, out) == {"role": "user", "content": "/tools are great"}
