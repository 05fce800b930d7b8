"""`tunesmith push` against a local stand-in of the Hub's HTTP API (tests/hub_standin.py), never the
real Hub: the files that arrive equal the run's adapter or merged model byte for byte, the model card
carries the run's comparison, data summary and config, the token travels in every request, and
failures are one-line messages."""
from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import yaml

import tunesmith
from helpers import write_jsonl
from hub_standin import StandInHub
from test_methods import run_config
from tunesmith.cli import main
from tunesmith.export import export

TOKEN = "hf_standin_token"


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A 2-step LoRA run scored on 4 test examples (base vs fine-tuned with intervals) and a 2-step
    full fine-tune without generation (eval losses only)."""
    from tunesmith.data.demo import make_splits

    root = tmp_path_factory.mktemp("push")
    splits = make_splits(16, seed=5, validation_size=4, test_size=4)
    data = {name: write_jsonl(root / f"{name}.jsonl", splits[name]) for name in ("train", "validation", "test")}
    found = {}
    for method in ("lora", "full"):
        config = run_config(tiny_model_dir, root / f"run-{method}", {"method": method}, data)
        config["train"]["max_steps"] = 2
        if method == "lora":
            config["data"]["test"] = str(data["test"])
            config["eval"].update(generate=True, max_new_tokens=4)
        found[method] = Path(tunesmith.train(config)["run_dir"])
    return found


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the stand-in is on this machine
    with StandInHub(TOKEN) as server:
        yield server


def push(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["push", *args])
    out, err = capsys.readouterr()
    return code, out, err


def folder_bytes(folder: Path, leave_out: tuple[str, ...] = ("README.md",)) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in leave_out}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_adapter_arrives_byte_for_byte_with_a_card_of_the_runs_evidence(runs, hub, capsys):
    run = runs["lora"]
    code, out, err = push(capsys, str(run), "me/tiny-adapter", "--token", TOKEN, "--endpoint", hub.url, "--private")
    assert code == 0, err
    assert out.strip() == f"{hub.url}/me/tiny-adapter"
    arrived = hub.files("me/tiny-adapter")
    assert {k: v for k, v in arrived.items() if k != "README.md"} == folder_bytes(run / "adapter")
    assert hub.private["me/tiny-adapter"] is True
    assert hub.requests and all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)
    assert [path for method, path, _ in hub.requests if method == "POST"][-1] == "/api/models/me/tiny-adapter/commit/main"
    assert not list(run.glob(".push-*")), "the staging folder is removed"
    assert "adapter_model.safetensors" in err and f"push: done, {hub.url}/me/tiny-adapter" in err
    assert "is a local folder, not on the Hub: others can load the adapter only onto a copy of it; --what merged" in err

    card = arrived["README.md"].decode()
    assert front_matter(card) == {"library_name": "peft", "tags": ["tunesmith"]}  # a local base: no hub id
    results = json.loads((run / "results.json").read_text())
    differences = results["baselines"]["differences"]
    assert differences
    for d in differences:
        assert (f"| {d['candidate']} - {d['baseline']} | {d['metric']} | {d['difference']:+.4f} | "
                f"[{d['low']:+.4f}, {d['high']:+.4f}] | {d['win']} / {d['tie']} / {d['loss']} |") in card
    assert f"base {results['base']['eval_loss']:.4f} -> fine-tuned {results['fine_tuned']['eval_loss']:.4f}" in card
    assert "Scored on 4 held-out test examples" in card
    data = results["data"]
    for split, count in data["examples"].items():
        assert f"| {split} | {count} | {data['tokens'][split]} | {data['label_tokens'][split]} |" in card
    # The config as trained, but no folder of the machine it trained on (config.yaml holds them absolute).
    shown = yaml.safe_load(card.split("```yaml\n", 1)[1].split("\n```", 1)[0])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert shown["data"]["train"] == Path(saved["data"]["train"]).name and shown["output"]["dir"] == run.name
    assert shown["adapter"] == saved["adapter"] and str(run.parent) not in card
    assert 'PeftModel.from_pretrained(base, "me/tiny-adapter")' in card  # its base is a local folder


def test_merged_model_of_an_adapter_run_to_a_new_branch(runs, hub, capsys, tmp_path):
    run = runs["lora"]
    code, out, err = push(capsys, str(run), "me/tiny-merged", "--what", "merged", "--revision", "dev",
                          "--token", TOKEN, "--endpoint", hub.url)
    assert code == 0, err
    assert out.strip() == f"{hub.url}/me/tiny-merged/tree/dev"
    assert hub.files("me/tiny-merged", "main") == {}
    arrived = hub.files("me/tiny-merged", "dev")
    expected = Path(export(run, tmp_path, formats="hf")["merged"]["folder"])  # what `tunesmith export` writes
    assert {k: v for k, v in arrived.items() if k not in ("README.md", "merge_check.json")} == folder_bytes(
        expected, ("README.md", "merge_check.json"))
    check = json.loads(arrived["merge_check.json"])  # the merge was checked as export checks it
    assert check["max_abs_diff"] <= check["tolerance"]
    assert front_matter(arrived["README.md"].decode())["library_name"] == "transformers"


def test_full_fine_tune_pushes_its_model_with_token_and_endpoint_from_the_environment(runs, hub, capsys, monkeypatch):
    run = runs["full"]
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    code, out, err = push(capsys, str(run), "me/tiny-full")
    assert code == 0, err
    arrived = hub.files("me/tiny-full")
    assert {k: v for k, v in arrived.items() if k != "README.md"} == folder_bytes(run / "model")
    card = arrived["README.md"].decode()
    assert front_matter(card)["library_name"] == "transformers"
    assert "No per-example comparison with intervals in this run" in card
    results = json.loads((run / "results.json").read_text())
    assert f"| eval_loss | {results['base']['eval_loss']:.4g} | {results['fine_tuned']['eval_loss']:.4g} |" in card

    code, _, err = push(capsys, str(run), "me/tiny-full", "--what", "adapter")
    assert code == 2 and "a full fine-tune has no adapter; push it with --what merged" in err


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("case, message", [
    ("refused token", "refused the token (401 Unauthorized)"),
    ("forbidden", "the token may not write to me/tiny (403 Forbidden)"),
    ("no token", "no Hugging Face token; set HF_TOKEN"),
    ("unknown run", "no-such-run: no such run folder"),
    ("unfinished run", "not a finished run (pending)"),
    ("run without weights", "no trained model in this run folder"),
    ("unreachable", "could not reach http://127.0.0.1:"),
    ("linked file", "a symbolic link in a run folder; push uploads only the run's own files"),
    ("damaged weights", "adapter_model.safetensors: damaged weights (Error while deserializing header"),
    ("damaged results", "results.json: damaged (not a readable JSON object)"),
])
def test_failures_are_one_line_messages(case, message, runs, capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants

    run, token = str(runs["lora"]), TOKEN
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-login"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    if case == "unknown run":
        run = str(tmp_path / "no-such-run")
    if case in ("unfinished run", "run without weights"):
        run = str(tmp_path / "copy")
        keep = ["config.yaml"] + (["results.json"] if case == "run without weights" else [])
        Path(run).mkdir()
        for name in keep:
            (Path(run) / name).write_bytes((runs["lora"] / name).read_bytes())
    if case == "damaged weights":  # cut short by a full disk: no hub repo is made for it, and no traceback
        run = str(tmp_path / "copy")
        shutil.copytree(runs["lora"], run)
        weights = Path(run) / "adapter" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        from tunesmith.errors import UserError
        from tunesmith.runs import load_trained

        with pytest.raises(UserError, match="damaged weights"):
            load_trained(run)
    if case == "damaged results":  # the card (and report) would leave the run's figures out without a word
        run = str(tmp_path / "copy")
        shutil.copytree(runs["lora"], run)
        (Path(run) / "results.json").write_text('{"steps": 6, ')
        (Path(run) / "report.html").write_text("the report written at the end of training")
        from tunesmith.errors import UserError
        from tunesmith.eval.report import write_report

        with pytest.raises(UserError, match="results.json: damaged"):
            write_report(run)
        assert (Path(run) / "report.html").read_text() == "the report written at the end of training"
    if case == "linked file":  # a run folder from someone else: model/notes.txt -> the user's stored token
        run = str(tmp_path / "copy")
        shutil.copytree(runs["full"], run)
        secret = tmp_path / "hub-token"
        secret.write_text("hf_secret")
        (Path(run) / "model" / "notes.txt").symlink_to(secret)
    with StandInHub("another-token" if case == "refused token" else TOKEN,
                    refuse=403 if case == "forbidden" else None) as hub:
        endpoint = f"http://127.0.0.1:{closed_port()}" if case == "unreachable" else hub.url
        args = [run, "me/tiny", "--endpoint", endpoint] + ([] if case == "no token" else ["--token", token])
        code, out, err = push(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert hub.repos == {}
    if case not in ("refused token", "forbidden", "unreachable"):
        assert hub.requests == []  # refused before anything was sent


def test_private_to_an_existing_public_repo_uploads_nothing(runs, hub, capsys):
    """The hub keeps an existing repo's visibility: weights trained on private data asked --private
    went to a public repo."""
    hub.create_repo({"name": "public", "organization": "me"})
    code, out, err = push(capsys, str(runs["lora"]), "me/public", "--private", "--token", TOKEN, "--endpoint", hub.url)
    assert code == 2 and "me/public exists and is public" in err and err.count("\n") == 1
    assert hub.files("me/public") == {}
    code, out, err = push(capsys, str(runs["lora"]), "me/secret", "--private", "--token", TOKEN, "--endpoint", hub.url)
    assert code == 0, err
    assert hub.private["me/secret"] and "adapter_model.safetensors" in hub.files("me/secret")


def test_base_model_hub_id_and_license_for_the_front_matter(tmp_path):
    from tunesmith.export.card import base_model_facts

    assert base_model_facts("default") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert base_model_facts("someone/some-model") == ("someone/some-model", None)  # nothing cached, no network
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# a local model\n")
    assert base_model_facts(str(tmp_path)) == (None, "mit")


def test_a_model_cards_license_is_read_from_front_matter_as_the_hub_writes_it(tmp_path):
    """Others' README front matter: a key given twice keeps the last (as YAML does), never losing the license."""
    from tunesmith.export.card import card_license

    readme = tmp_path / "README.md"
    readme.write_text("---\nlicense: other\ntags: [a]\nlicense: apache-2.0\n---\n# a model\n")
    assert card_license(readme) == "apache-2.0"
    readme.write_text("---\nlicense: " + "[" * 50_000 + "]" * 50_000 + "\n---\n")
    assert card_license(readme) is None  # nested past the stack: no license, no traceback


def test_the_card_of_a_run_started_from_another_run_names_that_run_and_what_it_trained_from(runs, tmp_path):
    """Its base is the earlier run's merged model, which the card called 'a local model folder (`merged`)'."""
    from tunesmith.export.card import model_card
    from tunesmith.runs import RunFolder

    earlier = RunFolder(runs["lora"]).read_config()
    data = {"train": Path(earlier.data.train), "validation": Path(earlier.data.validation)}
    config = run_config(runs["lora"], tmp_path / "second", {"method": "lora"}, data)
    config["train"]["max_steps"] = 1
    card = model_card(RunFolder(tunesmith.train(config)["run_dir"]), "adapter", "me/second")
    assert (f"Adapter fine-tuned with tunesmith from the model of an earlier tunesmith run (`run-lora`, trained "
            f"from a local model folder (`{Path(earlier.model.name).name}`)), not on the Hub: method `lora`") in card
