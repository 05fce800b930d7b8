"""Run by torchrun in tests/test_distributed.py: rank 1 raises at its third micro-batch while rank 0 waits
for it in a collective; torchrun must end the whole job with the error shown."""
import os
import sys

from tunesmith.cli import main
from tunesmith.training import loop

if os.environ.get("RANK") == "1":
    real = loop.label_loss_sum
    calls = {"n": 0}

    def breaks(model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("rank 1 broke on purpose")
        return real(model, batch)

    loop.label_loss_sum = breaks

sys.exit(main(["train", sys.argv[1]]))
