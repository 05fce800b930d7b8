"""A corpus of bad configs and data files: each ends with one clear line and exit status 2, never a
traceback, and the finished run already in the output folder is left exactly as it was."""
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from tunesmith.cli import main

from helpers import write_jsonl

GOOD_ROW = {"prompt": "Say hi", "completion": "hi"}


def good_data(folder: Path) -> str:
    return str(write_jsonl(folder / "good.jsonl", [{"prompt": f"Say hi {i}", "completion": f"hi {i}"} for i in range(8)]))


def empty_folder(folder: Path) -> str:
    (folder / "nothing").mkdir()
    return str(folder / "nothing")


def write(folder: Path, name: str, content) -> str:
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


# Each case: (id, builder(tmp, model_dir, data) -> (config text or None, extra CLI args), expected message regex).
# `data` is a good data file; a builder swaps in the broken part.
def config_text(model_dir, train_file, extra="", **sections) -> str:
    base = {"model": {"name": str(model_dir), "dtype": "float32"}, "data": {"train": train_file},
            "train": {"max_steps": 1}, "eval": {"generate": False}}
    for key, value in sections.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return json.dumps(base) + extra


CASES = [
    ("unknown-key", lambda t, m, d: (config_text(m, d, train={"lr_rate": 1}), []), r"unknown key 'train.lr_rate'; did you mean 'train.lr'"),
    ("unknown-section", lambda t, m, d: (config_text(m, d, trian={"lr": 1}), []), r"unknown key 'trian'; did you mean 'train'"),
    ("wrong-type", lambda t, m, d: (config_text(m, d, train={"batch_size": "many"}), []), r"train.batch_size: .*'many'"),
    ("negative-lr", lambda t, m, d: (config_text(m, d, train={"lr": -1}), []), r"train.lr: .*greater than 0"),
    ("share-out-of-range", lambda t, m, d: (config_text(m, d, data={"train": d, "validation_share": 1.5}), []), r"data.validation_share"),
    ("unknown-method", lambda t, m, d: (config_text(m, d, adapter={"method": "lorra"}), []), r"adapter.method"),
    ("section-is-scalar", lambda t, m, d: (config_text(m, d, train=5), []), r"train: .*(dictionary|mapping|object)"),
    ("yaml-syntax", lambda t, m, d: ("train:\n  lr: [1\n", []), r"not valid YAML"),
    ("yaml-list", lambda t, m, d: ("- model\n- data\n", []), r"a config is a mapping"),
    ("yaml-tabs", lambda t, m, d: ("train:\n\tlr: 1\n", []), r"not valid YAML"),
    ("config-binary", lambda t, m, d: (bytes(range(256)) * 4, []), r"config.yaml:2: not UTF-8 text \(byte 0x80\)"),
    ("config-utf16", lambda t, m, d: ("train:\n  lr: 0.1\n".encode("utf-16"), []), r"config.yaml:1: not UTF-8 text"),
    ("config-latin1", lambda t, m, d: (f"model:\n  name: {m}\ndata:\n  system_prompt: Réponds\n".encode("latin-1"), []), r"config.yaml:4: not UTF-8 text \(byte 0xe9\)"),
    ("yaml-duplicate-key", lambda t, m, d: (f"model:\n  name: {m}\ntrain:\n  lr: 0.1\n  max_steps: 1\n  lr: 0.2\n", []), r"config.yaml:6: .*'lr' is given twice \(first on line 4\)"),
    ("config-missing", lambda t, m, d: (None, ["/no/such/config.yaml"]), r"config file not found"),
    ("config-is-a-folder", lambda t, m, d: (None, [empty_folder(t)]), r"nothing: a folder, not a config file$"),
    ("override-no-equals", lambda t, m, d: (config_text(m, d), ["train.lr"]), r"expected section.key=value"),
    ("override-unknown", lambda t, m, d: (config_text(m, d), ["train.learning_rate=1"]), r"unknown key 'train.learning_rate'"),
    ("model-missing", lambda t, m, d: (config_text("/no/such/model-folder", d), []), r"model folder not found"),
    ("model-no-config", lambda t, m, d: (config_text(t, d), []), r"no config.json"),
    ("gguf-missing", lambda t, m, d: (config_text(f"{t}/nothing.gguf", d), []), r"GGUF file not found"),
    ("data-missing", lambda t, m, d: (config_text(m, "/no/such/data.jsonl"), []), r"data file not found"),
    ("validation-missing", lambda t, m, d: (config_text(m, d, data={"train": d, "validation": "/no/val.jsonl"}), []), r"/no/val.jsonl: data file not found"),
    ("test-missing", lambda t, m, d: (config_text(m, d, data={"train": d, "test": "/no/test.jsonl"}), []), r"/no/test.jsonl: data file not found"),
    ("data-empty", lambda t, m, d: (config_text(m, write(t, "empty.jsonl", "")), []), r"empty.jsonl: no training records in it"),
    ("data-binary", lambda t, m, d: (config_text(m, write(t, "junk.jsonl", bytes(range(256)) * 64)), []), r"junk.jsonl.*(UTF-8|binary)"),
    ("data-utf16", lambda t, m, d: (config_text(m, write(t, "u16.jsonl", (json.dumps(GOOD_ROW) + "\n").encode("utf-16"))), []), r"u16.jsonl.*(UTF-8|binary)"),
    ("data-latin1", lambda t, m, d: (config_text(m, write(t, "l1.jsonl", json.dumps({"prompt": "café", "completion": "olé"}, ensure_ascii=False).encode("latin-1"))), []), r"l1.jsonl.*UTF-8"),
    ("data-all-broken", lambda t, m, d: (config_text(m, write(t, "broken.jsonl", '{"prompt": "a"\n[1, 2\n')), []), r"broken.jsonl: no usable training examples"),
    ("data-huge-line", lambda t, m, d: (config_text(m, write(t, "huge.jsonl", json.dumps({"prompt": "word " * 200_000, "completion": "x"}) + "\n")), []), r"huge.jsonl.*(dropped|longer than|max_seq_len)"),
    ("data-empty-folder", lambda t, m, d: (config_text(m, empty_folder(t)), []), r"nothing: .*(folder|no data)"),
    ("data-unknown-type", lambda t, m, d: (config_text(m, write(t, "notes.docx", "hello")), []), r"notes.docx.*(unsupported|unknown)"),
    ("json-not-list", lambda t, m, d: (config_text(m, write(t, "d.json", '{"prompt": 1}')), []), r"d.json.*(list|no usable)"),
    ("json-broken", lambda t, m, d: (config_text(m, write(t, "b.json", '[{"prompt": "a", ')), []), r"b.json:1.*broken JSON"),
    ("csv-wrong-columns", lambda t, m, d: (config_text(m, write(t, "d.csv", "colour,size\nred,3\n")), []), r"d.csv.*no usable training examples"),
    ("data-deep-json", lambda t, m, d: (config_text(m, write(t, "deep.jsonl", "[" * 100_000 + "\n")), []), r"deep.jsonl: no usable training examples.*deep.jsonl:1: broken JSON"),
    ("data-huge-integer", lambda t, m, d: (config_text(m, write(t, "int.jsonl", '{"prompt": ' + "9" * 5001 + "}\n")), []), r"int.jsonl: no usable training examples.*int.jsonl:1: broken JSON"),
    ("output-is-a-file", lambda t, m, d: (config_text(m, d, output={"dir": write(t, "taken", "x")}), []), r"taken: .*not a folder"),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run folder standing in for an earlier, finished run that no mistake may touch."""
    run = tmp_path_factory.mktemp("earlier") / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "checkpoints" / "step-00000003").mkdir(parents=True)
    (run / "results.json").write_text('{"fine_tuned": {"eval_loss": 1.0}}')
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 2.0}\n')
    (run / "config.yaml").write_text("model: default\n")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "checkpoints" / "step-00000003" / "state.json").write_text('{"step": 3}')
    return run


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, build, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(name, build, expected, tmp_path, tiny_model_dir, finished_run, capsys):
    import re

    before = fingerprint(finished_run)
    text, args = build(tmp_path, tiny_model_dir, good_data(tmp_path))
    command = ["train"]
    if text is not None:
        command.append(write(tmp_path, "config.yaml", text))
    command += args
    if name != "output-is-a-file":
        command += [f"output.dir={finished_run}", "output.overwrite=true"]  # the dangerous case: overwrite on
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert re.search(expected, lines[0]), lines[0]
    assert fingerprint(finished_run) == before, "an earlier run's output was changed"


def test_a_run_folder_given_as_the_config_is_told_where_its_config_and_model_are(finished_run, capsys):
    """`plan runs/sft` said 'cannot read config (IsADirectoryError)'."""
    assert main(["plan", str(finished_run)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {finished_run}: a folder, not a config file; the run's own config is {finished_run}/config.yaml, and "
        f"a new run starts from its model with `model: {finished_run}` (plan: --model {finished_run})")


def test_finished_run_is_not_overwritten_without_asking(tmp_path, tiny_model_dir, finished_run, capsys):
    before = fingerprint(finished_run)
    config = write(tmp_path, "c.yaml", config_text(tiny_model_dir, good_data(tmp_path), output={"dir": str(finished_run)}))
    assert main(["train", config]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert fingerprint(finished_run) == before


def test_debug_flag_shows_the_traceback(tmp_path):
    from tunesmith.errors import UserError

    with pytest.raises(UserError, match="config file not found"):
        main(["--debug", "train", str(tmp_path / "missing.yaml")])


def test_own_warnings_read_as_one_line_others_keep_their_source(monkeypatch, capsys):
    import warnings

    import tunesmith.export.peft_folder as ours

    default = warnings.formatwarning
    monkeypatch.setattr(warnings, "formatwarning", default)
    assert main(["--debug", "config"]) == 0 and warnings.formatwarning is default
    assert main(["config"]) == 0
    assert warnings.formatwarning("served on another base", UserWarning, ours.__file__, 46) == \
        "warning: served on another base\n"
    assert "elsewhere.py:3: FutureWarning" in warnings.formatwarning("old", FutureWarning, "/x/elsewhere.py", 3)
    plain = warnings.formatwarning
    main(["config"])
    assert warnings.formatwarning is plain  # not wrapped again by a second command in the same process


def test_a_hub_id_without_network_fails_at_once_naming_it(monkeypatch, capsys):
    """Offline (the hub's host has no address), a hub id is looked up in the local cache only: one
    address lookup (tunesmith's own), not huggingface_hub's retried requests (27 s, ten lines)."""
    import socket

    import huggingface_hub.constants as hub

    from tunesmith.models.load import hub_unreachable

    lookups = []

    def no_network(host, *rest, **options):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    hub_unreachable.cache_clear()
    try:
        assert main(["plan", "--model", "someorg/some-model", "--no-this-machine"]) == 2
    finally:
        hub_unreachable.cache_clear()
    err = capsys.readouterr().err
    assert "error: someorg/some-model: cannot read the model config" in err and "Retrying" not in err
    # tunesmith's probe, and huggingface_hub's one fetch of its user-agent registry; retried requests made 6 or more
    assert set(lookups) == {"huggingface.co"} and len(lookups) <= 2


def test_offline_a_tuned_release_of_a_shipped_shape_is_planned_with_its_base_shape(monkeypatch, capsys):
    """Offline, Qwen/Qwen2.5-7B-Instruct's config cannot be read; its base's shape ships, and says so."""
    import socket

    import huggingface_hub.constants as hub

    from tunesmith.models.load import hub_unreachable

    def no_network(host, *rest, **options):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    hub_unreachable.cache_clear()
    try:
        assert main(["plan", "--model", "Qwen/Qwen2.5-7B-Instruct", "--method", "qlora", "--no-this-machine"]) == 0
        assert main(["plan", "--model", "meta-llama/Meta-Llama-3.1-8B-Instruct", "--no-this-machine"]) == 0
        assert main(["plan", "--model", "Qwen/Qwen2.5-7B-Math", "--no-this-machine"]) == 2  # not a shipped base's name
    finally:
        hub_unreachable.cache_clear()
    captured = capsys.readouterr()
    assert "planned with the shipped shape qwen2.5-7b (Qwen/Qwen2.5-7B), the same architecture" in captured.err
    assert "planned with the shipped shape llama-3.1-8b (meta-llama/Llama-3.1-8B)" in captured.err
    assert "model: Qwen/Qwen2.5-7B-Instruct: 7.615B parameters, 28 layers" in captured.out
    assert "error: Qwen/Qwen2.5-7B-Math: cannot read the model config" in captured.err


def test_a_mistyped_run_folder_is_not_looked_up_on_the_hub(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`runs/nope` (a typo for runs/mine) has a hub id's shape: it was requested from the hub, retried for
    half a minute where the hub's host resolves, and `compare` generated A's answers first."""
    from helpers import write_jsonl

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    data = write_jsonl(tmp_path / "test.jsonl", [{"question": "Screen broken?", "answer": "technical"}])
    for args in (["compare", str(tiny_model_dir), "runs/nope", "--data", str(data)],
                 ["eval", "runs/nope", "--data", str(data)], ["chat", "runs/nope"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "error: runs/nope: model folder not found: runs/ has no nope" in err, (args, err)
        assert "generate" not in err and "huggingface.co" not in err


def test_a_folder_that_is_not_a_model_says_what_to_name_instead(tmp_path):
    from tunesmith.errors import UserError
    from tunesmith.models import resolve_model_path

    full = tmp_path / "full-run"
    (full / "model").mkdir(parents=True)
    (full / "model" / "config.json").write_text("{}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    cases = {full: f"a run folder; its fine-tuned model is {full / 'model'}",
             adapter: "a LoRA adapter, not a whole model; name its base model",
             tmp_path / "empty": "folder has no config.json; not a transformers model folder"}
    for folder, said in cases.items():
        with pytest.raises(UserError, match=re.escape(said)):
            resolve_model_path(str(folder))


def test_no_hub_kernel_warning_from_bitsandbytes_on_every_command():
    """On CPUs with AVX-512 bf16, importing bitsandbytes (peft does) warned "Failed to load CPU
    gemm_4bit_forward" on every command where the optional `kernels` package is missing (other CPUs never
    printed it: there this test passes either way)."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    code = "import tunesmith, peft, bitsandbytes"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert found.returncode == 0 and "gemm_4bit_forward" not in found.stderr


@pytest.mark.parametrize("args, expected", [
    (["ui", "--port", "99999"], "--port 99999: a port is 0 to 65535"),
    (["ui", "--runs", "{file}", "--port", "0"], "cannot be the runs folder"),
    (["curve", "{file}", "--fractions", "0.5,abc"], "--fractions 0.5,abc: expected numbers separated by commas"),
    # refused before the config and data are read (`taken` is neither)
    (["curve", "{file}", "--fractions", "0.5,0.5"], "curve: each fraction once, got [0.5, 0.5]"),
    (["curve", "{file}", "--fractions", "0,1"], "curve: fractions must lie in (0, 1]"),
    (["export", "{file}", "--format", ","], "export: unknown format ,"),
    # FILE was the data whatever `train=` said; other sections were dropped without a word
    (["data", "check", "{file}", "data.train=other.jsonl"], "the data file is the FILE argument, not train=other.jsonl"),
    (["data", "check", "{file}", "train.lr=1"], "'train.*' is not a data setting"),
])
def test_command_options_out_of_range_give_one_clear_line(args, expected, tmp_path, capsys):
    taken = write(tmp_path, "taken", "x")
    assert main([a.replace("{file}", taken) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines() == [f"error: {err.removeprefix('error: ')}"] and expected in err


@pytest.mark.parametrize("args, expected", [
    (["eval", "m", "--data", "d.jsonl", "--limit", "-1"], "argument --limit: -1: expected an integer of at least 1"),
    (["pairs", "m", "--data", "d.jsonl", "--batch-size", "0"], "argument --batch-size: 0: expected an integer of at least 1"),
    (["compare", "a", "b", "--data", "d.jsonl", "--kshot", "-1"], "argument --kshot: -1: expected an integer of at least 0"),
    (["eval", "m", "--temperature", "nan"], "argument --temperature: nan: expected a number of at least 0.0"),
    (["plan", "--seq", "-1"], "argument --seq: -1: expected an integer of at least 1"),
    (["plan", "--label-share", "2"], "argument --label-share: 2 is not a share above 0 and at most 1"),
    (["choose", "c.yaml", "--models", "a", "--retrieval-k", "-1"], "argument --retrieval-k: -1: expected an integer"),
])
def test_numbers_out_of_range_are_refused_before_anything_loads(args, expected, capsys):
    """A negative --limit or --retrieval-k was a slice (all examples but one), a --batch-size of 0 failed
    in sampling after the model loaded, a negative --seq planned negative memory."""
    with pytest.raises(SystemExit) as done:
        main(args)
    err = capsys.readouterr().err
    assert done.value.code == 2 and expected in err and "Traceback" not in err


def test_a_damaged_run_folder_is_one_clear_line(tmp_path, tiny_model_dir, capsys):
    """results.json holding a list, an adapter_config.json that is not JSON, a file where --out names a
    folder, an unreadable file: one line each, never a traceback."""
    import shutil

    from tunesmith.errors import one_line

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: {tiny_model_dir}\n")
    (run / "results.json").write_text("[1, 2]")
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 2.0}\n')
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, run / "adapter" / name)
    (run / "adapter" / "adapter_config.json").write_text("{not json")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(run / "adapter" / "adapter_model.safetensors"))
    # A foreign or damaged results.json: the report is not rewritten without the run's results.
    assert main(["report", str(run)]) == 2
    assert "results.json: damaged (not a readable JSON object)" in capsys.readouterr().err
    from tunesmith.measure import refreshed_report  # compare and eval --general keep their figures and say so

    assert refreshed_report(run).startswith("report not refreshed: ") and "results.json: damaged" in refreshed_report(run)
    assert main(["generate", str(run), "hi"]) == 2
    assert "adapter_config.json: not a JSON object" in capsys.readouterr().err
    data = write(tmp_path, "d.jsonl", json.dumps(GOOD_ROW) + "\n")
    assert main(["compare", str(tiny_model_dir), str(run), "--data", data, "--out", data]) == 2
    assert "a file, not a folder for comparison.json" in capsys.readouterr().err
    assert one_line(PermissionError(13, "Permission denied", "x.jsonl")) == "x.jsonl: Permission denied"


def test_a_run_folder_without_its_weights_is_one_clear_line(tmp_path, tiny_model_dir, capsys):
    """An adapter/ without adapter_model.safetensors (a copy that left it out) went to peft, which failed
    with a traceback (HFValidationError: 'Repo id must be a string') in eval, generate and export."""
    import shutil

    from safetensors.torch import save_file

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: {tiny_model_dir}\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, run / "adapter" / name)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir),
                                                                     "peft_type": "LORA", "r": 4}))
    for args in (["generate", str(run), "hi"], ["export", str(run), "--format", "hf"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{run / 'adapter'}: no weights (no .safetensors file); train the run again" in err
        assert "Traceback" not in err
    # A full fine-tune's sharded model with a shard gone: named.
    shutil.rmtree(run / "adapter")
    (run / "model").mkdir()
    save_file({"x": torch.zeros(1)}, str(run / "model" / "model-00001-of-00002.safetensors"))
    (run / "model" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert main(["generate", str(run), "hi"]) == 2
    assert "model: weights missing (model-00002-of-00002.safetensors); train the run again" in capsys.readouterr().err
    # An index whose weight_map is no mapping names no shard (was an AttributeError); an adapter folder
    # saved as adapter_model.bin (older peft, safe_serialization=False) has its weights.
    from tunesmith.weightfiles import readable_weights

    (run / "model" / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    readable_weights(run / "model")
    (tmp_path / "bin").mkdir()
    torch.save({"x": torch.zeros(1)}, tmp_path / "bin" / "adapter_model.bin")
    readable_weights(tmp_path / "bin")


def test_output_into_a_reader_that_stopped_ends_quietly_and_other_broken_pipes_are_errors(monkeypatch, capsys):
    """`tunesmith config | head -1` printed "error: [Errno 32] Broken pipe" and exited 2."""
    import os
    import subprocess
    import sys

    from tunesmith import cli

    read, write = os.pipe()
    os.close(read)  # the reader gone before the first line
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "config"], stdout=write, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(write)
    assert done.returncode == 141 and done.stderr == ""
    # a pipe to something else (a converter's input) breaking is an error, said as one
    monkeypatch.setattr(cli, "cmd_config", lambda args: (_ for _ in ()).throw(BrokenPipeError(32, "Broken pipe")))
    assert main(["config"]) == 2 and "error: [Errno 32] Broken pipe" in capsys.readouterr().err
