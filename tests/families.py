"""Today's model families as tests use them: each one's real tokenizer and chat template (vendored in
tests/data/families, see SOURCES.md there) and a tiny random model built from the family's real
config (the structure kept: attention layout, head size, GQA ratio, biases, norms, RoPE, ties, vocabulary;
the sizes shrunk), plus seeded probe conversations (system, multi-turn, tools, reasoning).
"""
from __future__ import annotations

import json
import lzma
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data" / "families"


@dataclass(frozen=True)
class Family:
    name: str
    files: str  # folder under tests/data/families with tokenizer.json.xz
    template: str  # folder whose chat_template.jinja the family uses
    config: dict  # the tiny model's config: model_type + the real config's structure, shrunk
    tools: bool = True  # the template renders tools and tool calls
    reasoning_field: bool = False  # the template renders reasoning_content
    variables: dict = field(default_factory=dict)  # data.template_variables (e.g. thinking off)
    added_tokens: tuple = ()  # tokens the real tokenizer has on top of the vendored one (see SmolLM3)


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

FAMILIES = {f.name: f for f in [
    # Llama 3.2 1B Instruct: GQA 4:1, head 64 (here 16), RoPE theta 5e5 with llama3 scaling, tied head.
    Family("llama3", "llama3", "llama3", dict(
        model_type="llama", **SMALL, num_key_value_heads=1, head_dim=16, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=True, vocab_size=128256, bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009])),
    # Qwen2.5 0.5B Instruct: q/k/v biases, GQA 7:1 (here 2:1), theta 1e6, tied head.
    Family("qwen2.5", "qwen3", "qwen2.5", dict(
        model_type="qwen2", **SMALL, num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=True, vocab_size=151936, bos_token_id=151643,
        eos_token_id=151645, use_sliding_window=False)),
    # Qwen3 0.6B: q/k RMS norms, head 128 = 2 x hidden/heads (here 32), GQA 2:1, theta 1e6, tied head.
    Family("qwen3", "qwen3", "qwen3", dict(
        model_type="qwen3", **SMALL, num_key_value_heads=2, head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=40960, tie_word_embeddings=True, vocab_size=151936, bos_token_id=151643,
        eos_token_id=151645), reasoning_field=True),
    Family("qwen3-nothink", "qwen3", "qwen3", dict(
        model_type="qwen3", **SMALL, num_key_value_heads=2, head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=40960, tie_word_embeddings=True, vocab_size=151936, bos_token_id=151643,
        eos_token_id=151645), variables={"enable_thinking": False}),
    # Gemma 3 1B it: head 256 (here 32), 1 KV head, q/k norms, pre/post norms, sliding + global layers,
    # gelu-tanh, scaled embeddings, 262k vocabulary, tied head. Its template has no tools.
    Family("gemma3", "gemma3", "gemma3", dict(
        model_type="gemma3_text", **SMALL, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=512,
        layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768, tie_word_embeddings=True,
        vocab_size=262144, bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0), tools=False),
    # Phi-3 mini 4k instruct: fused qkv and gate/up projections, no GQA, untied head, 32064 vocabulary.
    Family("phi3", "phi3", "phi3", dict(
        model_type="phi3", **SMALL, num_key_value_heads=4, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
        tie_word_embeddings=False, vocab_size=32064, bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
        tools=False),
    # Phi-4 (14B): the Phi-3 architecture with GQA 4:1 (40 heads, 10 KV), theta 2.5e5, untied head, and a
    # cl100k_base vocabulary with ChatML-like <|im_start|>role<|im_sep|> turns; its template has no tools.
    Family("phi4", "phi4", "phi4", dict(
        model_type="phi3", **SMALL, num_key_value_heads=1, rope_theta=250000.0, rms_norm_eps=1e-5,
        max_position_embeddings=16384, original_max_position_embeddings=16384, sliding_window=None,
        tie_word_embeddings=False, vocab_size=100352, bos_token_id=100257, eos_token_id=100265, pad_token_id=100349),
        tools=False),
    # Mistral Nemo Instruct 2407: head 128 != hidden/heads (here 32 vs 16), GQA 4:1, theta 1e6, untied head,
    # Tekken vocabulary.
    Family("mistral", "mistral", "mistral", dict(
        model_type="mistral", **SMALL, num_key_value_heads=1, head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-5,
        max_position_embeddings=1024000, sliding_window=None, tie_word_embeddings=False, vocab_size=131072,
        bos_token_id=1, eos_token_id=2)),
    # SmolLM2 135M Instruct: GQA 3:1, theta 1e5, tied head, 49152 vocabulary. ChatML without tools.
    Family("smollm2", "smollm2", "smollm2", dict(
        model_type="llama", hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
        tie_word_embeddings=True, vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2), tools=False),
    # SmolLM3 3B: Llama 3 vocabulary, GQA 4:1, no RoPE in every 4th layer, theta 5e6, tied head. The real
    # tokenizer names some reserved Llama 3 tokens <|im_start|>, <|im_end|>, <think>, </think>; here they
    # are added after the vocabulary (same text, other ids).
    Family("smollm3", "llama3", "smollm3", dict(
        model_type="smollm3", hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, rope_theta=5000000.0, rms_norm_eps=1e-6, max_position_embeddings=65536,
        no_rope_layer_interval=4, use_sliding_window=False, tie_word_embeddings=True, vocab_size=128256,
        bos_token_id=128000, eos_token_id=128012, pad_token_id=128004), tools=False,
        added_tokens=("<|im_start|>", "<|im_end|>", "<think>", "</think>")),
]}


def _unpacked(path: Path) -> str:
    return lzma.decompress(path.read_bytes()).decode("utf-8")


def build_family_tokenizer(name: str, folder: Path):
    """The family's real tokenizer and chat template, saved into `folder` and loaded from there."""
    from transformers import AutoTokenizer

    family = FAMILIES[name]
    source = DATA / family.files
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_json = json.loads(_unpacked(source / "tokenizer.json.xz"))
    config = json.loads(_unpacked(source / "tokenizer_config.json.xz"))
    if name == "qwen2.5":  # Qwen2.5's vocabulary is Qwen3's without the four tokens Qwen3 added last
        tokenizer_json["added_tokens"] = [a for a in tokenizer_json["added_tokens"] if a["id"] < 151665]
        config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < 151665}
    if name == "smollm3":
        config.update(eos_token="<|im_end|>", pad_token="<|finetune_right_pad_id|>")
    config["chat_template"] = (DATA / family.template / "chat_template.jinja").read_text(encoding="utf-8")
    next_id = max(a["id"] for a in tokenizer_json["added_tokens"]) + 1
    for number, token in enumerate(family.added_tokens):  # as tokenizer.add_special_tokens would add them
        entry = {"id": next_id + number, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
        tokenizer_json["added_tokens"].append(entry)
        config.setdefault("added_tokens_decoder", {})[str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token is not None or tokenizer.eos_token is not None
    return tokenizer


def build_family_model(name: str, folder: Path, tokenizer, seed: int = 0):
    """A tiny random model of the family's architecture, saved next to its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(FAMILIES[name].config)
    settings["vocab_size"] = max(settings["vocab_size"], len(tokenizer))
    if "pad_token_id" not in settings:
        settings["pad_token_id"] = tokenizer.pad_token_id
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return model


# Every family whose GGUF tunesmith writes (tests/test_family_exports.py, bench/llamacpp_families.py).
EXPORTED = ["llama3", "qwen2.5", "qwen3", "mistral", "smollm2", "smollm3", "phi4", "phi3", "gemma3"]


GEMMA_EMBEDDING_SCALE = 20.0  # see build_aligned_family_model


def build_aligned_family_model(name: str, folder: Path, tokenizer, seed: int = 1):
    """A family model for export checks, whose top-1 tokens are not near-ties (as a trained model's are
    not): an untied head copies the embeddings, and Gemma's embeddings are scaled 20x. Gemma's random
    model barely prefers any token (median top-1 margin at answer positions 2.7% of the logit scale,
    against 12-28% for the other families), so any rounding flips its ties; at 20x its tied head prefers
    the input token, as the others' aligned heads do."""
    model = build_family_model(name, folder, tokenizer, seed=seed)
    with torch.no_grad():
        if not model.config.tie_word_embeddings:
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        if name == "gemma3":
            model.model.embed_tokens.weight.mul_(GEMMA_EMBEDDING_SCALE)
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()


# --- probe conversations -------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "description": "City name"},
                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city"]}}},
    {"type": "function", "function": {"name": "find_order", "description": "Look up an order by its number.",
                                      "parameters": {"type": "object", "properties": {
                                          "order_id": {"type": "integer"}}, "required": ["order_id"]}}},
]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Tromsø", "São Paulo", "Kraków"]
QUESTIONS = ["What is the capital of Peru?", "Name three primes.", "Translate 'thank you' into Polish.",
             "Why is the sky blue?", "Summarise: the meeting moved to Tuesday.", "Is 91 prime?",
             "Write a haiku about rain.", "What does HTTP 404 mean?"]
ANSWERS = ["Lima.", "2, 3 and 5.", "Dziękuję.", "Rayleigh scattering favours short wavelengths.",
           "The meeting is now on Tuesday.", "No: 91 = 7 x 13.", "Soft rain on the roof\nthe gutters hum",
           "The server did not find the page."]
SYSTEMS = ["You are a concise assistant.", "Answer in one sentence.", "Be friendly and brief."]
KINDS = ("plain", "system", "multi_turn", "think_inline", "tool_call", "tool_chain", "reasoning_field",
         "reasoning_multi_turn")


def _call(rng: random.Random, number: int) -> tuple[dict, dict]:
    """An assistant tool call and the tool's result message (ids of 9 alphanumerics, as Mistral wants)."""
    call_id = f"call{number:05d}"
    if rng.random() < 0.5:
        city = rng.choice(CITIES)
        call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
        result = json.dumps({"city": city, "temperature": rng.randint(-5, 35)})
    else:
        order = rng.randint(1000, 99999)
        call = {"id": call_id, "type": "function", "function": {"name": "find_order", "arguments": {"order_id": order}}}
        result = json.dumps({"order_id": order, "status": rng.choice(["shipped", "delayed"])})
    return call, {"role": "tool", "tool_call_id": call_id, "name": call["function"]["name"], "content": result}


def probe(kind: str, rng: random.Random, number: int) -> dict:
    """One probe record (the data-file form: messages, and tools where it calls them)."""
    q = rng.randrange(len(QUESTIONS))
    user, answer = {"role": "user", "content": QUESTIONS[q]}, {"role": "assistant", "content": ANSWERS[q]}
    system = {"role": "system", "content": rng.choice(SYSTEMS)}
    if kind == "plain":
        return {"messages": [user, answer]}
    if kind == "system":
        return {"messages": [system, user, answer]}
    if kind == "multi_turn":
        r = rng.randrange(len(QUESTIONS))
        return {"messages": [system, user, answer, {"role": "user", "content": QUESTIONS[r]},
                             {"role": "assistant", "content": ANSWERS[r]}]}
    if kind == "think_inline":
        return {"messages": [user, {"role": "assistant", "content": f"<think>\nThe user asks: {QUESTIONS[q]}\n</think>\n\n{ANSWERS[q]}"}]}
    if kind in ("reasoning_field", "reasoning_multi_turn"):
        thought = {"role": "assistant", "content": ANSWERS[q], "reasoning_content": f"Recall the fact for probe {number}."}
        if kind == "reasoning_field":
            return {"messages": [system, user, thought]}
        r = rng.randrange(len(QUESTIONS))
        return {"messages": [user, thought, {"role": "user", "content": QUESTIONS[r]},
                             {"role": "assistant", "content": ANSWERS[r], "reasoning_content": "Think again."}]}
    call, result = _call(rng, number)
    calling = {"role": "assistant", "content": "", "tool_calls": [call]}
    ask = {"role": "user", "content": f"Please check with the tools (probe {number})."}
    final = {"role": "assistant", "content": f"Done: {result['content']}"}
    if kind == "tool_call":
        return {"tools": TOOLS, "messages": [ask, calling]}
    return {"tools": TOOLS, "messages": [system, ask, calling, result, final]}


def supported_kinds(name: str) -> list[str]:
    family = FAMILIES[name]
    kinds = ["plain", "system", "multi_turn", "think_inline"]
    kinds += ["tool_call", "tool_chain"] if family.tools else []
    kinds += ["reasoning_field", "reasoning_multi_turn"] if family.reasoning_field else []
    if family.variables.get("enable_thinking") is False:
        kinds.remove("think_inline")  # thinking off: answers carry no reasoning
    return kinds


def probes(name: str, count: int = 56, seed: int = 0) -> list[dict]:
    """`count` probe records of the kinds the family's template renders, in turn."""
    rng = random.Random(seed)
    kinds = supported_kinds(name)
    return [probe(kinds[i % len(kinds)], rng, i) for i in range(count)]
