"""Run by tests/test_accumulation.py, alone or under torchrun: one optimizer step's raw gradients
through the training loop's own code (distributed wrapper, train_step), written by rank 0.

argv: model folder, data file (JSONL of token lists), output file, micro-batches as JSON, and the
pieces each micro-batch is cut into (the loop's out-of-memory halving)."""
import json
import sys

import torch
from safetensors.torch import save_file

from tunesmith import methods
from tunesmith.config import AdapterConfig
from tunesmith.data.prepare import Split
from tunesmith.data.tokenize import IGNORE, Encoded
from tunesmith.models import load_model
from tunesmith.training import distributed
from tunesmith.training.step import train_step
from tunesmith.training.loss import label_loss_sum


def main(model_dir: str, data: str, out: str, indices: str, pieces: str = "1") -> None:
    ranks = distributed.setup("cpu")
    torch.manual_seed(0)
    model = methods.get("lora").make_trainable(load_model(model_dir), AdapterConfig(r=4, alpha=8))
    with torch.no_grad():  # B != 0, so every adapter weight gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    rows = [json.loads(line) for line in open(data)]
    split = Split("train", [], [Encoded(r["ids"], [IGNORE] * r["prompt"] + r["ids"][r["prompt"]:]) for r in rows])
    loss_module, grad_scale = distributed.wrap(model, label_loss_sum, ranks, fsdp=False)
    loss, _ = train_step(loss_module, split, json.loads(indices), 0, ranks, grad_scale, pieces=int(pieces))
    most = ranks.most(10.0 + ranks.rank)  # what every rank takes for 'auto' checkpointing (training/recompute.py)
    if ranks.main:
        save_file({n: p.grad.contiguous() for n, p in model.named_parameters() if p.grad is not None}, out,
                  metadata={"loss": repr(float(loss)), "most": repr(most)})
    distributed.teardown(ranks)


if __name__ == "__main__":
    main(*sys.argv[1:6])
