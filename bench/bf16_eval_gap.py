"""How much of a LoRA run's effect bf16 inference keeps: the answer loss of a run's test examples with
its adapter in float32 and in bf16 compute, beside and merged, and of its float32 export loaded in bf16.

    .venv/bin/python bench/bf16_eval_gap.py runs/sft runs/sft/test.jsonl   # after `tunesmith export runs/sft --format hf`

Plain transformers + peft, the chat template of the run's tokenizer; the loss is the mean over examples of
each answer's mean token loss (the examples are {"question", "answer"} or {"messages"} records).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer


def conversations(path: Path) -> list[list[dict]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        out.append(record.get("messages") or [{"role": "user", "content": record["question"]},
                                              {"role": "assistant", "content": record["answer"]}])
    return out


@torch.no_grad()
def answer_loss(model, tokenizer, chats: list[list[dict]]) -> float:
    losses = []
    for chat in chats:
        prompt = tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(chat, tokenize=False)
        ids = torch.tensor([tokenizer(whole, add_special_tokens=False).input_ids])
        labels = ids.clone()
        labels[0, :len(tokenizer(prompt, add_special_tokens=False).input_ids)] = -100
        losses.append(model(ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


def main(run: str, test: str) -> None:
    adapter = Path(run) / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    chats = conversations(Path(test))
    rows = []
    for name, dtype, upcast in (("float32", torch.float32, False), ("bf16 weights, float32 compute", torch.bfloat16, True),
                                ("bf16", torch.bfloat16, False)):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        model = model.float() if upcast else model
        rows.append((name, "base", answer_loss(model, tokenizer, chats)))
        tuned = PeftModel.from_pretrained(model, adapter)
        rows.append((name, "adapter beside the base", answer_loss(tuned, tokenizer, chats)))
        if not upcast:
            rows.append((name, "adapter merged", answer_loss(tuned.merge_and_unload(), tokenizer, chats)))
    merged = Path(run) / "export" / "merged"
    if merged.is_dir():
        rows.append(("bf16", "float32 export loaded in bf16", answer_loss(
            AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16), tokenizer, chats)))
    print(f"| compute | model | answer loss ({len(chats)} examples) |\n|---|---|---:|")
    for name, what, loss in rows:
        print(f"| {name} | {what} | {loss:.3f} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
