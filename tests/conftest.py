"""Tiny random models and a tiny tokenizer, built in the tests: nothing comes from a hub."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus() -> list[str]:
    from tunesmith.data.demo import SYSTEM_PROMPT, make_ticket

    rng = random.Random(1)
    texts = [SYSTEM_PROMPT]
    for _ in range(400):
        ticket, label = make_ticket(rng)
        texts += [ticket, json.dumps(label)]
    return texts


def build_tokenizer(folder: Path):
    """A byte-level BPE tokenizer with ChatML and pad == eos, like many real chat models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_model(folder: Path, arch: str = "llama", vocab: int = 600, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, eos_token_id=2, pad_token_id=2, bos_token_id=None)
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}
    config = configs[arch](**common)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama-like model folder with its tokenizer, loadable by the real loading code."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(folder)
    build_model(folder, "llama", vocab=len(tokenizer))
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from tunesmith.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path):
    """A config dict for a fast run of the demo task on the tiny model."""
    return {
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "data": {"train": "demo", "demo_size": 48, "max_seq_len": 256},
        "train": {"max_steps": 12, "batch_size": 4, "lr": 2e-2, "log_every": 4, "warmup_ratio": 0.0},
        "eval": {"test_limit": 8, "max_new_tokens": 24, "batch_size": 8},
        "output": {"dir": str(tmp_path / "run")},
    }


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Family name -> folder with its tokenizer (built on first use, once per session)."""
    from families import build_family_tokenizer

    root = tmp_path_factory.mktemp("families")
    built: dict = {}

    def get(name: str):
        if name not in built:
            from tunesmith.models import load_tokenizer

            build_family_tokenizer(name, root / name)
            built[name] = (root / name, load_tokenizer(str(root / name)))  # as training loads it
        return built[name]

    return get
