"""Run by tests/test_distributed.py under torchrun: a resume where rank 1 sees the checkpoints
differently from rank 0. argv: config, then "older" (rank 1 would pick the oldest checkpoint) or
"unreadable" (rank 1 cannot load the one chosen)."""
import os
import sys

from tunesmith.cli import main
from tunesmith.training import checkpoint

if os.environ.get("RANK") == "1":
    if sys.argv[2] == "older":
        checkpoint.newest_usable = lambda folder, say: checkpoint.complete_checkpoints(folder)[0]
    else:
        def unreadable(*args, **kwargs):
            raise FileNotFoundError("trainable.safetensors is not on this node's disk")

        checkpoint.load_checkpoint = unreadable

sys.exit(main(["train", sys.argv[1]]))
