"""A short README.md in each export folder: how to load what is in it."""
from __future__ import annotations

from pathlib import Path

TEXTS = {
    "hf": """# Merged model ({run})

The adapter folded into a full-precision copy of the base (safetensors), with the tokenizer, the
chat template training used and the generation config. Checked: its logits equal the adapter
model's (max abs difference {max_abs_diff:.2g}).

transformers:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("{folder}")
    tokenizer = AutoTokenizer.from_pretrained("{folder}")

vLLM: `vllm serve {folder}`
""",
    "peft": """# PEFT adapter ({run})

adapter_config.json + adapter_model.safetensors on top of `{base_model}`, with the tokenizer and the
chat template training used. Checked by loading this folder with plain peft onto the base: logits vs
the run's adapter max abs difference {max_abs_diff:.3g} over {positions} positions.

transformers + peft:

    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained("{folder}")

vLLM: `vllm serve {base_model} --enable-lora --lora-modules run={folder}`
TGI: `--model-id {base_model} --lora-adapters run={folder}`

Warnings for these servers: {warnings}
""",
    "gguf": """# GGUF ({run})

`{file}` ({quant}), with the tokenizer and the chat template training used inside. Checked by reading
it back with transformers: logits vs the merged model max abs difference {max_abs_diff:.3g}
({relative_diff:.2%} of the logit scale), mean KL divergence {kl_divergence:.4f} over {positions} answer
positions, top-1 token agreement {top1_agreement:.2%} of them ({top1_decided:.2%} of the {decided_positions} where the
merged model's top token leads by half a logit or more; {top1_all_positions:.2%} of all positions), generation prompts
token-equal to training's for {prompts_equal} of {prompts_checked}.
Checked on: {checked_on}.

llama.cpp: `llama-cli -m {file} -cnv`  (or `llama-server -m {file}`)
transformers: `AutoModelForCausalLM.from_pretrained("{folder}", gguf_file="{file}")`
ollama (if a Modelfile is here): `ollama create my-model -f Modelfile && ollama run my-model`
""",
}


def write_readme(where: Path, kind: str, **facts) -> Path:
    path = Path(where) / "README.md"
    facts.setdefault("folder", str(where))
    path.write_text(TEXTS[kind].format(**facts), encoding="utf-8")
    return path
