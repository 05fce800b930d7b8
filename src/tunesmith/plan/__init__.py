"""Will it fit, and how long will it take: `tunesmith plan`, from the model's config alone.

plan() -> a Plan: the memory breakdown of one setup, whether it fits each device, what to change
where it does not, and the time per epoch where the data set's token count is known.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .devices import GPUS, HEADROOM, Device, GiB, find_device, gib, this_machine
from .memory import Estimate, estimate
from .objectives import describe as describe_objective
from .objectives import trained_lengths
from .sharding import per_device
from .setup import Setup, checkpointed_layers
from .setups import estimate_for_machine, estimate_on, fewest_checkpointed, setup_from_config
from .shapes import LINEARS, ModelShape, model_shape
from .speed import CPU_UTILISATION, GPU_UTILISATION, epoch_seconds, flops_per_token

__all__ = ["plan", "setup_from_config", "gib", "Plan", "Setup", "Estimate", "estimate", "estimate_on",
           "estimate_for_machine", "model_shape", "format_plan", "run_estimate", "TrainingMemory",
           "estimated", "fewest_within", "run_setup", "fewest_checkpointed", "first_steps", "largest_micro_batch", "utilisation_of"]


@dataclass
class Fit:
    device: Device
    estimate: Estimate
    epoch_seconds: float | None = None

    @property
    def fits(self) -> bool:
        """Within HEADROOM of the device's memory, as `train`'s auto checkpointing keeps to."""
        return self.estimate.total <= HEADROOM * self.device.memory

    @property
    def tight(self) -> bool:
        """Over the headroom but within the memory: it may run, with nothing to spare."""
        return not self.fits and self.estimate.total <= self.device.memory


@dataclass
class Plan:
    shape: ModelShape
    setup: Setup
    estimate: Estimate  # tensors only (no device overhead)
    fits: list[Fit]
    target: Fit | None = None  # the named device or memory size
    changes: list[tuple[str, Estimate]] = field(default_factory=list)  # what would make it fit the target
    tokens: int | None = None
    flops_per_token: float = 0.0
    drawn: bool = False  # the micro-batches are the data's own, not batch x max_seq_len
    utilisation: float | None = None  # --utilisation, where given (else the defaults of plan/speed.py)
    padding: float = 1.0  # tokens computed per token trained: padded rows compute their padding
    run_epochs: float | None = None  # the config's own length (train.max_steps or train.epochs), in epochs


def plan(model: str | ModelShape, setup: Setup, device: str | None = None, memory_gib: float | None = None,
         tokens: int | None = None, mean_seq: float | None = None, utilisation: float | None = None,
         include_this_machine: bool = True) -> Plan:
    shape = model if isinstance(model, ModelShape) else model_shape(model)
    several = setup.devices > 1  # GPUs only: this machine's CPU processes would share its memory
    devices = list(GPUS.values()) + ([this_machine()] if include_this_machine and not several else [])
    target_device = None
    if memory_gib is not None:
        target_device = Device(f"{memory_gib:g} GiB", memory_gib * GiB, None, 0.0)  # memory only: no time
    elif device is not None:
        target_device = find_device(device)
        devices = [d for d in devices if d.name != target_device.name] + [target_device]
    if several:  # each row: that many of the device, the memory per device
        devices = [replace(d, name=f"{setup.devices} x {d.name}") for d in devices if not d.is_cpu]
        if target_device and target_device.is_cpu:  # processes of this machine share its memory
            target_device = replace(target_device, name=f"{setup.devices} processes on {target_device.name}",
                                    memory=target_device.memory / setup.devices)
        elif target_device:
            target_device = replace(target_device, name=f"{setup.devices} x {target_device.name}")

    def fit_on(dev: Device, candidate: Setup = setup) -> Fit:
        if candidate.dtype_auto:  # the dtype a run there would train in
            candidate = replace(candidate, dtype=dev.auto_dtype(candidate.dtype), dtype_auto=False)
        if candidate.checkpointing_auto:  # as the run would: the fewest first blocks that fit, else every one
            fewest = fewest_checkpointed(shape, candidate,
                                         lambda s: estimate_on(shape, s, dev).total <= HEADROOM * dev.memory)
            candidate = replace(candidate, gradient_checkpointing=True,
                                checkpoint_layers=shape.layers if fewest is None else fewest)
        seconds = None
        if tokens and dev.fp32_tflops > 0:
            util = utilisation or (CPU_UTILISATION if dev.is_cpu else GPU_UTILISATION)
            # the devices share the tokens; the time their collectives take is not counted
            seconds = epoch_seconds(tokens, shape, candidate, dev.peak_flops(candidate.dtype), util,
                                    mean_seq) / candidate.devices
        return Fit(dev, estimate_on(shape, candidate, dev), seconds)

    fits = [fit_on(d) for d in devices]
    target = fit_on(target_device) if target_device else None
    changes = []
    if setup.dtype_auto:  # the breakdown in the named device's dtype, else in a GPU's (bf16)
        setup = replace(setup, dtype=target_device.auto_dtype(setup.dtype) if target_device else "bfloat16")
    if target and not target.fits:
        # the fewest checkpointed blocks first: what adapter.gradient_checkpointing=auto would choose
        # (with auto, the target's row has tried them already)
        fewest = None if setup.checkpointing_auto else fewest_checkpointed(
            shape, setup, lambda s: fit_on(target_device, s).fits)
        if fewest is not None and fewest < shape.layers:
            changes.append((f"gradient checkpointing on the first {fewest} of {shape.layers} blocks "
                            "(adapter.gradient_checkpointing=auto chooses so)",
                            fit_on(target_device, replace(setup, gradient_checkpointing=True,
                                                          checkpoint_layers=fewest)).estimate))
        bf16 = target_device.auto_dtype("bfloat16") == "bfloat16"  # a T4 or V100 has no fast bf16: not advised there
        for label, candidate in candidate_changes(replace(setup, checkpointing_auto=False), bf16):
            fitted = fit_on(target_device, candidate)
            if fitted.fits:
                changes.append((label, fitted.estimate))
    return Plan(shape, setup, per_device(estimate(shape, setup), gpu=True), fits, target, changes[:4], tokens,
                flops_per_token(shape, setup, mean_seq), utilisation=utilisation)


def candidate_changes(setup: Setup, bf16: bool = True) -> list[tuple[str, Setup]]:
    """Changes to try, least disruptive first; `bf16`: whether the device computes in bfloat16 fast."""
    found = []

    def add(label, **changes):
        candidate = replace(setup, **changes, **({"dtype_auto": False} if "dtype" in changes else {}))
        if candidate != setup and label not in [f for f, _ in found]:
            found.append((label, candidate))

    ckpt = {"gradient_checkpointing": True}
    add("gradient checkpointing on (adapter.gradient_checkpointing=true)", **ckpt)
    # same results, slower steps; a GPU's saving only (the CPU estimate leaves it out)
    add("gradient checkpointing, its activations in host memory (adapter.offload_activations=true)",
        offload_activations=True, **ckpt)
    for batch in (setup.batch // 2, setup.batch // 4, 1):
        if batch >= 1:
            add(f"micro-batch {batch} (train.batch_size={batch}, raise train.grad_accum to keep the step size) "
                "with gradient checkpointing", batch=batch, **ckpt)
    if setup.method != "full" and setup.adapter_dtype == "float32":
        add("bf16 adapters and optimizer states (adapter.dtype=bfloat16) with gradient checkpointing",
            adapter_dtype="bfloat16", **ckpt)
    if setup.dtype == "float32" and bf16:
        add("bfloat16 (model.dtype=bfloat16) with gradient checkpointing", dtype="bfloat16", **ckpt)
    if setup.method == "full":
        add("LoRA instead of full fine-tuning (adapter.method=lora) with gradient checkpointing", method="lora", **ckpt)
    if setup.method != "qlora":
        add("QLoRA: 4-bit base (adapter.method=qlora) with gradient checkpointing", method="qlora", **ckpt)
        add("QLoRA with gradient checkpointing and micro-batch 1", method="qlora", batch=1, **ckpt)
    for seq in (setup.seq // 2, setup.seq // 4):
        if seq >= 64:
            add(f"sequences of at most {seq} tokens (data.max_seq_len={seq}), micro-batch 1, checkpointing",
                seq=seq, batch=1, **ckpt)
    return found


def checkpointing(shape: ModelShape, setup: Setup) -> str:
    layers = checkpointed_layers(shape, setup)
    if setup.checkpointing_auto and not setup.gradient_checkpointing:
        return "auto (the fewest first blocks that fit, per device)"
    return "on" if layers == shape.layers else "off" if not layers else f"on {layers} of {shape.layers} blocks"


def duration(seconds: float) -> str:
    if seconds < 1:
        return "< 1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


AUTO = " (model.dtype auto: each device below in its own, float32 where it has no fast bfloat16)"


def micro_batch(p: Plan) -> str:
    """The planned micro-batch in words: the data's largest, or the config's worst case."""
    s = p.setup
    if not p.drawn:
        return f"micro-batch {s.batch} x {s.seq} tokens"
    if s.tokens:
        return f"the data's largest micro-batch {s.batch} sequences in one row of {s.tokens} tokens (padding-free)"
    return f"the data's largest micro-batch {s.batch} {'packed rows' if s.packed_rows else 'rows'} x {s.seq} tokens"


def format_plan(p: Plan) -> str:
    s, shape, est = p.setup, p.shape, p.estimate
    targets = "all linear" if set(s.targets) == set(LINEARS) else ",".join(s.targets)
    method = s.method if s.method == "full" else f"{s.method} r={s.r} on {targets}"
    lines = [
        f"model: {shape.name}: {shape.total_params / 1e9:.3f}B parameters, {shape.layers} layers, hidden "
        f"{shape.hidden}, vocab {shape.vocab}",
        f"setup: {method}, {s.dtype}{AUTO if s.dtype_auto else ''}, {micro_batch(p)}, gradient checkpointing "
        f"{checkpointing(shape, s)}, {s.label_share:.0%} of positions with a label",
        f"trainable: {est.trainable / 1e6:.2f}M parameters; peak during the {est.peak_phase}",
    ]
    if s.devices > 1:
        lines.append(f"spread over {s.devices} devices: " + (
            "FSDP2 shards weights, gradients and optimizer states (train.fsdp); memory per device below"
            if s.fsdp else "DDP replicas, each with the whole model (train.fsdp=true shards it)"))
    lines += [
        "memory at the peak (tensors):",
    ]
    lines += [f"  {name:<26}{gib(value):>12}" for name, value in est.parts.items() if name != "framework overhead"]
    lines.append(f"  {'total':<26}{gib(est.total):>12}")
    lines.append(f"activations without / with gradient checkpointing: {gib(est.activations_no_ckpt)} / "
                 f"{gib(est.activations_ckpt)}")
    if p.tokens:
        padded = f", {1 - 1 / p.padding:.0%} of them padding the rows compute" if p.padding > 1.005 else ""
        lines.append(f"time: {p.flops_per_token / 1e9:.2f} GFLOP per token x {p.tokens:,} tokens per epoch{padded} "
                     + (f"(utilisation {p.utilisation:.0%} of each device's peak, as asked)" if p.utilisation else
                        f"(utilisation {GPU_UTILISATION:.0%} of the dense peak on GPUs, {CPU_UTILISATION:.0%} of the "
                        "measured matmul peak here)"))
    objective_line = describe_objective(shape, s)
    if objective_line:
        lines.append(objective_line)
    run = p.run_epochs is not None and p.tokens
    if run:
        lines.append(f"the run: {p.run_epochs:.3g} epochs of its data (train.max_steps or train.epochs); its "
                     "evaluations and the generation that scores the base and the result come on top")
    lines.append(f"{'device':<20}{'memory':>10}{'needs':>12}  fits {'  dtype' if s.dtype_auto else ''}"
                 f"{'  epoch' if p.tokens else ''}{'  run' if run else ''}")
    for fit in p.fits + ([p.target] if p.target and p.target.device.name not in [f.device.name for f in p.fits] else []):
        epoch = f"  {duration(fit.epoch_seconds)}" if fit.epoch_seconds else ""
        epoch += f"  {duration(fit.epoch_seconds * p.run_epochs)}" if fit.epoch_seconds and run else ""
        blocks = checkpointed_layers(shape, fit.estimate.setup)
        chosen = f"  checkpointing {blocks} of {shape.layers} blocks" if s.checkpointing_auto and blocks else ""
        dtype = f"  {fit.estimate.setup.dtype}" if s.dtype_auto else ""
        lines.append(f"{fit.device.name:<20}{fit.device.memory / GiB:>7.0f} GiB{gib(fit.estimate.total):>12}  "
                     f"{'yes  ' if fit.fits else 'tight' if fit.tight else 'no   '}{dtype}{epoch}{chosen}")
    if any(fit.tight for fit in p.fits + [p.target] if fit):
        lines.append(f"tight: within the device's memory but over the {HEADROOM:.0%} of it that train keeps to "
                     "(the rest: allocator fragmentation, the CUDA context); with gradient checkpointing auto, "
                     "train checkpoints blocks until the plan is within it")
    if p.target and not p.target.fits:
        lines.append(("tight on " if p.target.tight else "does not fit ") + f"{p.target.device.name}; "
                     + ("changes that fit:" if p.changes else "no single change makes it fit"))
        lines += [f"  - {label}: {gib(changed.total)}" for label, changed in p.changes]
    return "\n".join(lines)


def plan_for(config: str | None = None, overrides: list[str] | None = None, model: str | None = None,
             device: str | None = None, memory_gib: float | None = None, tokens: int | None = None,
             utilisation: float | None = None, include_this_machine: bool = True, **changes) -> Plan:
    """`tunesmith plan`: a run config (or the defaults) with flags on top. Where the config names
    training data, its token count, label share and mean length come from it, and so do the
    micro-batches: the largest the run draws, as the estimate `train` prints at its start (a
    --seq, --batch or --grad-accum flag plans its own worst case instead)."""
    from ..config import load_config

    return plan_of(load_config(config, overrides), config is not None, model, device, memory_gib, tokens, utilisation,
                   include_this_machine, **changes)


def plan_of(cfg, read_data: bool, model: str | None = None, device: str | None = None, memory_gib: float | None = None,
            tokens: int | None = None, utilisation: float | None = None, include_this_machine: bool = True,
            **changes) -> Plan:
    """plan_for's plan of a loaded config; `read_data`: from its training data, as the run reads it
    (the dashboard's preview plans a run this way too)."""
    from ..config import fsdp_refusal
    from ..data.packing import as_trained
    from ..errors import UserError
    from ..objectives import prepare_data
    from ..start import unmerged
    from ..training.step import total_steps

    name = model or cfg.model.name
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes.get("devices", 1) < 1:
        raise UserError(f"--nproc {changes['devices']}: a run needs at least one device")
    devices = changes.pop("devices", 1)
    split, mean_seq = None, None
    if tokens is None and read_data:
        split = prepare_data(cfg, unmerged(cfg.model.name)[1]).splits["train"]  # as the run reads it
        # What training puts through per epoch: a GRPO prompt as group_size sequences of prompt and answer
        lengths = [n for e in split.encoded for n in trained_lengths(e, cfg.train, cfg.data.max_seq_len)]
        tokens, mean_seq = sum(lengths), sum(lengths) / max(1, len(lengths))
    share = label_share(split.encoded, cfg.train, cfg.data.max_seq_len) if split else 1.0
    drawn = split is not None and not {"seq", "batch", "grad_accum"} & changes.keys()
    cfg = with_flags(cfg, changes)
    setup = setup_from_config(cfg, share, devices=devices)
    padding, run_epochs = 1.0, None
    if drawn:
        shape = shape_of(name, cfg.model.trust_remote_code)
        trained, layout = as_trained(split, cfg.data), planned_layout(cfg, shape)
        setup, _ = with_drawn_micro_batches(cfg, trained, layout, setup)
        steps = total_steps(cfg, len(trained))
        padding = padding_factor(trained, cfg, layout, steps)
        tokens = round(tokens * padding)
        run_epochs = steps * cfg.train.batch_size * cfg.train.grad_accum / max(1, len(trained))
    if "fsdp" in changes:  # said on the command line
        changes["fsdp"] = changes["fsdp"] and setup.devices > 1
    if "gradient_checkpointing" in changes:  # said on the command line: on or off for every block
        changes.update(checkpointing_auto=False, checkpoint_layers=None)
    setup = replace(setup, **changes, **({"dtype_auto": False} if "dtype" in changes else {}))
    refused = fsdp_refusal(setup.method, setup.fsdp)
    if refused:
        raise UserError(refused)
    shape = shape if drawn else shape_of(name, cfg.model.trust_remote_code)
    return replace(plan(shape, setup, device, memory_gib, tokens, mean_seq, utilisation, include_this_machine),
                   drawn=drawn, padding=padding, run_epochs=run_epochs)


def shape_of(spec: str, trust_remote_code: bool = False) -> ModelShape:
    """model_shape, where a run folder (`model: RUN`) has its base's shape (the merge a run makes of it
    changes none) under its own name: planned without merging."""
    from ..start import is_run_start, unmerged

    if not is_run_start(spec):
        return model_shape(spec, trust_remote_code)
    return replace(model_shape(unmerged(spec)[0], trust_remote_code), name=spec)


# Flags that an objective scales go into the config before the objective reads it: --batch counts
# pairs for DPO (two sequences each), and --method full keeps a reference copy.
CONFIG_FLAGS = {"method": ("adapter", "method"), "batch": ("train", "batch_size"), "seq": ("data", "max_seq_len")}


def with_flags(cfg, changes: dict):
    """`cfg` with the flags of CONFIG_FLAGS said in `changes` (taken out of it)."""
    for flag, (section, name) in CONFIG_FLAGS.items():
        if flag in changes:
            part = getattr(cfg, section).model_copy(update={name: changes.pop(flag)})
            cfg = cfg.model_copy(update={section: part})
    return cfg


def planned_layout(cfg, shape: ModelShape) -> str:
    """The batch layout a run would take, from its config and the model's family: padding-free where
    the fast paths' attention knows the family (accel/families.py), as on the CPU and on CUDA."""
    from ..accel.families import PADDING_FREE_TYPES
    from ..data.collate import layout

    fast = cfg.train.fast_paths != "off" and shape.model_type in PADDING_FREE_TYPES
    return layout(cfg.data.packing, fast)


from .objectives import label_share  # noqa: E402
from .run import (TrainingMemory, estimated, fewest_within, first_steps, largest_micro_batch,  # noqa: E402
                  padding_factor, run_estimate, run_setup, utilisation_of, with_drawn_micro_batches)
