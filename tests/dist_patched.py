"""Run by torchrun in tests/test_distributed.py: `train CONFIG` with one thing changed, by MODE:
- broken: rank 1 raises at its third training micro-batch while rank 0 waits for it in a collective;
- oom: rank 1 runs out of memory there, once (train.auto_micro_batch would retry on that rank alone);
- worse-eval-from-N: every evaluation from the N-th on (the base's is the first) reads 1 higher, so
  the best weights of an earlier step come back at the end;
- slow-save: every checkpoint takes 40 s longer to write (a large model's, on slow storage);
- no-room: rank 0's device has 1 KiB free at the end of an FSDP2 run (a base too large for one device);
- loads-no-room-at-start: each whole load of the base is recorded (its rank, in loads.txt beside the
  config), and rank 0's device has 1 KiB free for the whole model at the start of an FSDP2 run."""
import os
import sys

from tunesmith import api
from tunesmith.cli import main
from tunesmith.training import checkpoint, loop

mode = sys.argv[2]
if mode in ("broken", "oom") and os.environ.get("RANK") == "1":
    real = loop.label_loss_sum
    calls = {"n": 0}

    def breaks(model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("rank 1 broke on purpose" if mode == "broken" else
                                   "CUDA out of memory. Tried to allocate 2.00 GiB (on purpose)")
        return real(model, batch)

    loop.label_loss_sum = breaks
if mode.startswith("worse-eval-from-"):
    real_eval, evaluations, first = api.eval_loss, {"n": 0}, int(mode.rpartition("-")[2])

    def worse(*args, **kwargs):
        evaluations["n"] += 1
        return real_eval(*args, **kwargs) + (1.0 if evaluations["n"] >= first else 0.0)

    api.eval_loss = worse

if mode == "slow-save":
    import time

    real_save = checkpoint.save_checkpoint

    def slow(*args, **kwargs):
        time.sleep(40)
        return real_save(*args, **kwargs)

    checkpoint.save_checkpoint = slow

if mode == "no-room":
    from tunesmith.training import sharded_end

    sharded_end.free_bytes = lambda device: 1024

if mode == "loads-no-room-at-start":
    from pathlib import Path

    import tunesmith.models
    from tunesmith.training import sharded_start

    real_load, record = tunesmith.models.load_base, Path(sys.argv[1]).parent / "loads.txt"

    def recorded(*args, **kwargs):
        with open(record, "a") as handle:
            handle.write(os.environ["RANK"] + "\n")
        return real_load(*args, **kwargs)

    tunesmith.models.load_base = recorded
    sharded_start.free_bytes = lambda device: 1024

sys.exit(main(["train", sys.argv[1]]))
