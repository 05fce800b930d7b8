"""Shared helpers of the tests: tiny models and tokenizer built here (nothing from a hub), data
writers, models made trainable as training makes them, and gradient comparisons."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

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


def build_model(folder: Path, arch: str = "llama", vocab: int = 600, seed: int = 0, layers: int = 2):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, eos_token_id=2, pad_token_id=2, bos_token_id=None)
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}
    config = configs[arch](**common)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def trainable(model, adapter=None, fast_paths: bool = True):
    """The model as api.train makes it: the method's trainable parts, then the device's fast paths."""
    from tunesmith import accel, methods
    from tunesmith.config import AdapterConfig

    adapter = adapter or AdapterConfig()
    model = methods.get(adapter.method).make_trainable(model, adapter)
    if fast_paths:
        accel.apply(model, next(model.parameters()).device)
    return model


def lora_model(model, seed: int = 0, fast_paths: bool = True, r: int = 4):
    """LoRA on every linear layer (seeded) with B made non-zero, so the adapters change the output."""
    from tunesmith.config import AdapterConfig

    torch.manual_seed(seed)
    model = trainable(model, AdapterConfig(r=r, alpha=2 * r), fast_paths)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def demo_examples(tokenizer, n: int = 6, seed: int = 3):
    """Encoded examples of the demo task."""
    from tunesmith.data.demo import make_splits
    from tunesmith.data.tokenize import encode

    rows = make_splits(n, seed=seed, validation_size=0, test_size=0)["train"]
    return [encode(tokenizer, r["messages"]) for r in rows]


def full_logits_loss(model, batch) -> torch.Tensor:
    """The plain definition: full-vocabulary logits at every position, summed over label tokens."""
    from tunesmith.data.tokenize import IGNORE
    from tunesmith.training.loss import model_inputs

    logits = model(**model_inputs(model.config, batch, torch.float32)).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def seeded_lora(folder, dtype, device, fast: bool = True):
    """LoRA r=4 on every linear layer of the model in `folder`, seeded, with B made non-zero (so
    the adapters change the output); the fast paths applied or not."""
    from tunesmith.config import AdapterConfig
    from tunesmith.models import load_model

    torch.manual_seed(0)
    model = trainable(load_model(str(folder), dtype, device=device), AdapterConfig(r=4, alpha=8), fast_paths=fast)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The mean label loss of a collated batch and the gradients it gives."""
    from tunesmith.training.loss import label_loss_sum

    total, count = label_loss_sum(model, batch)
    (total / count).backward()
    return float(total.detach()) / count, gradients(model)


def relative_difference(a: dict, b: dict) -> float:
    """|a - b| / |b| over all the tensors together."""
    return (sum(float(((a[k] - b[k]) ** 2).sum()) for k in b) / sum(float((b[k] ** 2).sum()) for k in b)) ** 0.5


def assert_same_gradients(expected: dict, actual: dict, tolerance: float) -> None:
    """Every gradient of `expected` within `tolerance` (relative to its largest value) in `actual`."""
    assert expected.keys() == actual.keys()
    for name, grad in expected.items():
        scale = grad.abs().max().clamp_min(1e-6)
        assert (actual[name] - grad).abs().max() / scale < tolerance, name


# A small run driven through the command line, as a user would (tests/test_reliability.py, test_resume.py)
STEPS = 10


def qa_rows(n=48):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa"]
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))
        rows.append({"prompt": f"Repeat: {q} {i}", "completion": f"{q} {i}"})
    return rows


def write_config(tmp_path: Path, model_dir: Path, run: str, **train) -> Path:
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows())
    config = {
        "model": {"name": str(model_dir), "dtype": "float32"},
        "data": {"train": str(data), "max_seq_len": 128},
        "adapter": {"r": 4, "dropout": 0.1},  # dropout on: the RNG state must be restored too
        "train": {"max_steps": STEPS, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "log_every": 1,
                  "checkpoint_every": 1, "keep_checkpoints": 2, "log_sample_ids": True, **train},
        "eval": {"generate": False},
        "output": {"dir": str(tmp_path / run)},
    }
    path = tmp_path / f"{run}.json"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def run_cli(config: Path, *extra, timeout=300):
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(config), *extra],
                          capture_output=True, text=True, timeout=timeout)


def finished(config: Path) -> Path:
    """`tunesmith train` on the config to its end (it must succeed); the run folder."""
    done = run_cli(config)
    assert done.returncode == 0, done.stderr
    return Path(json.loads(config.read_text())["output"]["dir"])


def records(run: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, open(run / "metrics.jsonl")) if r.get("event") == event]


def start_and_kill_at(config: Path, run: Path, step: int, sig=signal.SIGKILL):
    """Start a training process and send `sig` once the metrics show `step`."""
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "train", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and any(r["step"] >= step for r in records(run, "train")):
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    return proc.returncode
