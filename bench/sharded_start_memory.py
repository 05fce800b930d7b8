"""Peak resident memory of each rank of a 2-rank FSDP2 LoRA run (gloo, CPU), and the whole model's size.

Before the sharded start every rank loaded the whole base before sharding it; now rank 0 alone reads
it and sends each rank its shard. On the CPU the "device" is host memory, so rank 1's peak shows the
difference (rank 0 holds the whole base in host memory in both). Run it against another checkout with
--src to compare:

    .venv/bin/python bench/sharded_start_memory.py                      # this checkout
    .venv/bin/python bench/sharded_start_memory.py --src /tmp/old/src   # another one's src/
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENTRY = """import atexit, os, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            with open(os.path.join(sys.argv[2], "peak-" + os.environ["RANK"]), "w") as out:
                out.write(line.split()[1])
atexit.register(peak)
from tunesmith.cli import main
code = main(["train", sys.argv[1]])
peak()
sys.exit(code)
"""


def build(folder: Path, hidden: int, layers: int) -> int:
    """A random Llama-shaped model (test tokenizer) of `hidden` width; returns its bytes in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(HERE.parent / "tests"))
    from helpers import build_tokenizer

    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() * 4 for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=str(HERE.parent / "src"), help="the src/ folder of the tunesmith to run")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sharded-start-"))
    size = build(work / "model", args.hidden, args.layers)
    rows = [{"prompt": f"Repeat: item {i} of the list", "completion": f"item {i}"} for i in range(32)]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": {"name": str(work / "model"), "dtype": "float32"},
              "data": {"train": str(work / "data.jsonl"), "max_seq_len": 64},
              "adapter": {"method": "lora", "r": 8},
              "train": {"max_steps": 2, "batch_size": 4, "device": "cpu", "fsdp": True},
              "eval": {"generate": False, "report": False}, "output": {"dir": str(work / "run")}}
    (work / "config.json").write_text(json.dumps(config))
    (work / "entry.py").write_text(ENTRY)
    env = {**os.environ, "PYTHONPATH": args.src, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(work / "entry.py"), str(work / "config.json"), str(work)],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    peaks = [int((work / f"peak-{rank}").read_text()) * 1024 for rank in (0, 1)]
    print(f"model {size / 2**20:.0f} MiB in fp32; peak resident: rank 0 {peaks[0] / 2**20:.0f} MiB, "
          f"rank 1 {peaks[1] / 2**20:.0f} MiB ({args.src})")


if __name__ == "__main__":
    main()
