"""Typed run configuration: a YAML file plus `section.key=value` overrides.

Every field carries its documentation; `tunesmith config` prints them under the defaults.
Unknown keys are errors that name the closest valid key.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from .errors import UserError, closest
from .methods import METHODS, NAMES as METHOD_NAMES
from .objectives.settings import ObjectiveSettings  # train.objective and its settings (issue 23)
from .yamlfile import Refused, parse_yaml, read_yaml, shortened


class _Section(BaseModel):
    # allow_inf_nan: train.lr=.inf trained to a NaN loss, as valid as any number above 0
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name: str = Field("default", min_length=1, description="'default' (built-in SmolLM2-135M-Instruct), a hub id, a local HF folder or a .gguf file.")
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto", description="Compute dtype of the frozen weights; 'auto' is bfloat16 where the hardware runs it fast, else float32.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub; off unless you trust the source.")


class DataConfig(_Section):
    train: str = Field("demo", description="Training data: a .jsonl/.json/.csv/.parquet file, a folder of them, a saved HF dataset folder, a hub data set id, or 'demo' for the built-in support-ticket triage task.")
    validation: str | None = Field(None, description="Validation data; when absent, a seeded share of `train` is held out.")
    test: str | None = Field(None, description="Test data for generation-based evaluation (base vs fine-tuned).")
    validation_share: float = Field(0.1, gt=0, lt=1, description="Share of `train` held out for validation when no file is given.")
    max_seq_len: int = Field(512, ge=16, description="Longest tokenised example (and packed row); what happens to longer ones is set by `overlong`.")
    system_prompt: str | None = Field(None, description="System message put in front of every example that has none.")
    demo_size: int = Field(1200, ge=10, description="Number of training tickets generated for the demo task.")
    seed: int = Field(0, description="Seed for splits and the demo data generator.")
    mix: dict[Annotated[str, StringConstraints(min_length=1)], Annotated[float, Field(ge=0)]] = Field(default_factory=dict, description="More training sources mixed into `train`, {source: weight}: weight 2 repeats a source's examples twice, 0.5 keeps a seeded half (`train` has weight 1).")
    hub_split: str = Field("train", description="Split read from a hub data set id or a saved HF dataset folder.")
    format: Literal["auto", "messages", "sharegpt", "instruction", "prompt_completion", "question_answer", "text"] = Field(
        "auto", description="Record format; 'auto' detects it per record from its fields. 'text' = raw text for continued pre-training (chunked to max_seq_len, EOS between documents).")
    columns: dict[str, str] = Field(default_factory=dict, description="Your column names for the format's fields, {field: column}, e.g. {question: Q, answer: A}.")
    chat_template: str | None = Field(None, description="Chat template: null = the tokenizer's (a documented fallback when it has none), 'fallback', 'chatml', a Jinja string or a .jinja file. Saved with the trained model.")
    template_variables: dict[str, str | int | float | bool | None] = Field(default_factory=dict, description="Variables the chat template reads, e.g. {enable_thinking: false} for Qwen3 / SmolLM3 with thinking off; set at the top of the template saved with the model, so serving renders as training did.")
    reasoning: Literal["train", "mask", "drop"] = Field("train", description="Assistant reasoning (reasoning_content, or <think>...</think> at the start of an answer), rendered as the chat template does: 'train' puts the loss on it, 'mask' keeps it in the text without a loss, 'drop' removes it. A template that does not render reasoning refuses 'train'/'mask' examples that have it.")
    train_on_inputs: bool = Field(False, description="Put the loss on every token (prompts too), not only on the assistant answers.")
    overlong: Literal["drop", "truncate", "error"] = Field("drop", description="Examples longer than max_seq_len: 'drop' (counted), 'truncate' (cut at the end; dropped when no answer token is left) or 'error'.")
    packing: bool = Field(False, description="Pack several training examples into one row of up to max_seq_len tokens; a block-diagonal mask keeps them from attending to each other.")
    dedup: bool | Literal["near"] = Field(True, description="Remove exact and normalised-text (case, punctuation, white space) duplicates, counted; 'near' also removes near-duplicates (MinHash/LSH, `near_dup_threshold`) within train and train examples near-duplicating a validation or test example.")
    near_dup_threshold: float = Field(0.8, gt=0, le=1, description="Estimated Jaccard similarity of word 3-gram sets above which two examples count as near-duplicates (data check, dedup: near).")
    min_valid_share: float = Field(0.0, ge=0, le=1, description="Stop with an error when fewer than this share of the training records are usable.")
    cache: bool = Field(True, description="Cache the tokenised data under $TUNESMITH_CACHE/data, keyed by file contents, tokenizer and these settings.")


class AdapterConfig(_Section):
    method: Literal[METHOD_NAMES] = Field(  # type: ignore[valid-type]
        "lora", description="; ".join(f"'{m.name}': {m.description}" for m in METHODS.values()) + ".")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt; 'all-linear' = every linear layer of the transformer blocks.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    modules_to_save: list[str] | None = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. lm_head); vLLM rejects such adapters.")
    freeze_embeddings: bool = Field(False, description="Full fine-tuning: keep the token embeddings (and a tied LM head) frozen.")
    gradient_checkpointing: bool | int | Literal["auto"] = Field(
        "auto", description="Recompute activations in the backward pass: less memory, about a third more compute "
                            "for each block checkpointed. true: every block; an integer k: the first k blocks; "
                            "'auto': the fewest first blocks with which the run's planned peak (its real "
                            "micro-batches, as `tunesmith plan` counts) stays within 90% of the memory free on "
                            "its device, none where it fits (every block under FSDP).")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="What LoRA/DoRA adapter weights, their gradients and AdamW states are stored in: "
                               "'float32' (updates of any size land) or 'bfloat16' (half their memory, as TRL's "
                               "QLoRA and the QLoRA paper; an update below about 1/256 of its weight is lost). "
                               "Matmuls run in the model's dtype either way. DoRA's magnitudes stay float32.")
    offload_activations: bool = Field(
        False, description="With gradient_checkpointing on a GPU: keep the checkpointed blocks' inputs in pinned "
                           "host memory between forward and backward (layers x tokens x hidden values; 1 GiB for an "
                           "8B model at 2 x 2048 tokens), at the cost of copying them out and back each micro-batch. "
                           "No effect on the CPU.")

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _on_off_blocks_or_auto(cls, value):
        words = ("true", "false", "auto")
        if isinstance(value, str) and value.strip().lower() not in words and not value.strip().isdigit() \
                or isinstance(value, float) or not isinstance(value, (bool, str)) and isinstance(value, int) and value < 0:
            raise ValueError("true, false, a number of blocks (0 or more) or 'auto'")
        return value

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self):
        if self.offload_activations and self.gradient_checkpointing is not True:
            raise ValueError("adapter.offload_activations needs adapter.gradient_checkpointing: true (without it, "
                             "or for the blocks left out, their every activation would cross to the "
                             "host and back)")
        return self


class TrainConfig(_Section, ObjectiveSettings):  # objective settings: objectives/settings.py
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed); ignored when max_steps is set.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides `epochs`.")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch, global: under torchrun each of N processes takes every N-th of them, so a step trains on batch_size x grad_accum examples whatever N is. With the fast paths micro-batches carry no padding: up to batch_size x max_seq_len tokens each, so a step of short examples takes fewer, taller forwards.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warm-up before the cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a share of the peak.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null turns clipping off.")
    seed: int = Field(0, description="Seed for weights of new layers, dropout and the data order.")
    log_every: int = Field(5, ge=1, description="Optimizer steps between progress lines and metric records.")
    checkpoint_every: int = Field(0, ge=0, description="Optimizer steps between resumable checkpoints; 0 = only at the end and on SIGTERM/SIGINT.")
    keep_checkpoints: int = Field(2, ge=1, description="How many of the newest checkpoints to keep.")
    resume: bool = Field(True, description="Continue from the newest complete checkpoint in the run folder when there is one.")
    max_bad_steps: int = Field(5, ge=1, description="Stop after this many optimizer steps in a row with a non-finite loss or gradient.")
    auto_micro_batch: bool = Field(False, description="On out-of-memory, halve the micro-batch and double grad_accum (same samples per step).")
    fsdp: bool = Field(False, description="Under torchrun (or --nproc N): shard the weights with FSDP2 (a full fine-tune's weights, gradients and optimizer state, or an adapter run's frozen base: models too large for one device); off = DDP replicas.")
    fsdp_offload: bool = Field(False, description="With fsdp: keep the sharded weights (and optimizer state) in CPU memory between uses (FSDP2 CPUOffloadPolicy): less GPU memory, slower steps.")
    log_sample_ids: bool = Field(False, description="Record the example indices of every step in metrics.jsonl (to audit the data order).")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="Where the run computes: 'auto' (cuda:LOCAL_RANK where CUDA is available, else cpu), 'cpu', 'cuda' or 'cuda:N'.")
    fast_paths: Literal["auto", "off"] = Field("auto", description="'auto': the device's fast paths (tunesmith/accel: padding-free attention, compiled norms/MLP/rotary, fused LoRA layers) where they know the architecture; 'off': plain transformers + peft.")

    @field_validator("fast_paths", mode="before")
    @classmethod
    def _off_as_yaml_reads_it(cls, value):
        """YAML 1.1 reads a bare `off` as false (and `on` as true)."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


class EvalConfig(_Section):
    every_steps: int = Field(0, ge=0, description="Optimizer steps between validation-loss evaluations; 0 = at the end only.")
    batch_size: int = Field(16, ge=1, description="Examples per batch for eval loss and generation.")
    generate: bool = Field(True, description="After training, generate answers for the test split and score them.")
    compare_base: bool = Field(True, description="Also score the base model on the test split, shown side by side.")
    max_new_tokens: int = Field(96, ge=1, description="Longest generated answer.")
    test_limit: int | None = Field(None, ge=1, description="Score only the first N test examples.")
    patience: int = Field(0, ge=0, description="Early stopping: stop after this many evaluations in a row without improvement (of eval.best_metric); 0 = off (needs every_steps).")
    min_delta: float = Field(0.0, ge=0, description="Early stopping: eval.best_metric (the eval loss by default) must improve by more than this to count as an improvement.")
    restore_best: bool = Field(True, description="At the end, return the weights of the best evaluation (by eval.best_metric) when the last step's are worse.")
    best_metric: str = Field("eval_loss", description="What early stopping and the kept weights follow: 'eval_loss', or a metric of the answers generated at each evaluation for the first eval.best_metric_examples validation examples (all_fields, json_valid, rouge_l, token_f1, exact_match, a scorer's column; higher is better, repetition lower). One process only.")
    best_metric_examples: int = Field(32, ge=1, description="Validation examples answered and scored at each evaluation when eval.best_metric is not eval_loss.")
    temperature: float = Field(0.0, ge=0, description="Generation temperature; 0 = greedy decoding, above 0 samples with `seed`.")
    repetition_penalty: float = Field(1.0, gt=0, description="Divide the scores of tokens already in the answer by this when generating (1 = off; 1.1-1.3 stops the loops small models fall into when decoded greedily, which the `repetition` score counts; no_repeat_ngram_size stops them with less harm to the answers).")
    no_repeat_ngram_size: int = Field(0, ge=0, description="When generating, never repeat a token n-gram of this size within an answer (0 = off; 4 stops loops while keeping the words a text repeats).")
    seed: int = Field(0, description="Seed for sampled generation and for the bootstrap intervals.")
    scorer: str | None = Field(None, description="Your own metric as 'module:function', called as function(prediction, reference) -> float or dict of floats.")
    kshot: int = Field(0, ge=0, description="Also score the base model prompted with this many seeded random training examples (k-shot baseline) on the test split; 0 = off.")
    retrieval_k: int = Field(0, ge=0, description="Also score the base and the fine-tuned model with the k training examples most similar to each test question (BM25 over the training questions) in the prompt (retrieval baseline); 0 = off.")
    retrieval_tuned: bool = Field(True, description="With retrieval_k: also score the fine-tuned model with the retrieved examples in its prompt (does retrieval help on top of fine-tuning?).")
    general: bool = Field(False, description="Score the base and the fine-tuned model on general-ability probes (MMLU, ARC, HellaSwag, TruthfulQA, GSM8K) and report each difference with its 95% interval.")
    general_data: str | None = Field(None, description="Folder of general-ability probe files (<set>.jsonl, the schema of the shipped probe); null = the probe shipped with tunesmith.")
    general_sets: list[str] | None = Field(None, description="Probe sets to score (arc_easy, arc_challenge, hellaswag, mmlu, truthfulqa_mc1, gsm8k); null = all found.")
    general_limit: int | None = Field(None, ge=1, description="Score only the first N items of each probe set (the shipped probe holds 200 per multiple-choice set, 100 of GSM8K).")
    general_margin: float = Field(2.0, ge=0, description="Warn at the end of training when the fine-tuned model scores more than this many points (of 100) below the base on a probe set.")
    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Extra metric loggers besides metrics.jsonl (each must be installed): tensorboard, wandb, mlflow.")
    report: bool = Field(True, description="Write report.html (self-contained, opens offline) and report.json into the run folder.")


class OutputConfig(_Section):
    dir: str = Field("runs/run", min_length=1, description="Run folder: metrics, adapter, tokenizer, results.")
    overwrite: bool = Field(False, description="Allow writing into a run folder that already holds a finished run.")


class Config(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    adapter: AdapterConfig = AdapterConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value):
        # `model: default` or `model: HuggingFaceTB/SmolLM2-360M` is short for `model: {name: ...}`.
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fsdp_method(self):
        refused = fsdp_refusal(self.adapter.method, self.train.fsdp)
        if refused:
            raise ValueError(refused)
        # Said before anything loads (`--nproc` checks the config first), not by every rank at its start
        if self.train.objective != "sft" and (self.train.fsdp or self.data.packing):
            setting = "train.fsdp" if self.train.fsdp else "data.packing"
            raise ValueError(f"{setting} applies to train.objective: sft only, not {self.train.objective} "
                             + ("yet; use DDP (train.fsdp: false)" if self.train.fsdp else ""))
        if self.eval.best_metric != "eval_loss" and self.train.objective != "sft":
            raise ValueError(f"eval.best_metric={self.eval.best_metric} scores answers to single-answer validation "
                             f"examples; with train.objective: {self.train.objective} use eval.best_metric: eval_loss")
        weighted = {spec: w for spec, w in self.data.mix.items() if w != 1.0}
        if weighted and self.train.objective != "sft":
            raise ValueError(f"data.mix weights repeat or subsample SFT examples; with train.objective: "
                             f"{self.train.objective} a mixed source is read once: give {weighted} weight 1")
        return self


def field_docs() -> dict[str, str]:
    """'section.key' -> documentation, for help output and error hints."""
    docs = {}
    for section, info in Config.model_fields.items():
        for key, field in info.annotation.model_fields.items():
            docs[f"{section}.{key}"] = field.description or ""
    return docs


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['train.lr=1e-3', 'model=default'] -> nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"override '{pair}': expected section.key=value")
        try:
            value = parse_yaml(raw) if raw else ""
        except Refused as err:  # a key twice, aliases expanding without end
            raise UserError(f"override '{key}': {err.problem}") from None
        except yaml.YAMLError:
            value = raw
        if "#" in raw and not isinstance(value, (dict, list)):
            value = raw  # YAML took ` #...` for a comment: `data.system_prompt=Answer as agent #7` keeps it
        if isinstance(value, dict):
            value = Whole(value)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{pair}': '{part}' is not a section")
        node[parts[-1]] = value
    return nested


class Whole(dict):
    """A mapping given whole as an override's value (`data.mix={}`): it replaces the config's, where the
    sections that dotted keys make (`data.mix.extra.jsonl=1`) merge into it."""


def merge(base: dict, extra: dict) -> dict:
    """The config `base` with the overrides `extra` (parse_overrides) applied."""
    out = dict(base)
    if isinstance(out.get("model"), str) and isinstance(extra.get("model"), dict):
        out["model"] = {"name": out["model"]}  # the shorthand `model: NAME`: `model.dtype=...` keeps NAME
    for key, value in extra.items():
        if isinstance(value, dict) and not isinstance(value, Whole) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = dict(value) if isinstance(value, Whole) else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML config (or none), apply overrides and validate; user mistakes raise UserError."""
    raw: dict = {}
    text = ""
    source = "config"
    if path is not None:
        source = str(path)
        raw, text = read_yaml(path)
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise UserError(f"{path}: a config is a mapping of sections (model, data, ...), got {type(raw).__name__}")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    raw = merge(raw, overrides or {})
    return validate(raw, source, text, overrides)


def validate(raw: dict, source: str = "config", text: str = "", overrides: dict | None = None) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first["loc"] if not TYPE_TAG.match(str(p))]
        rule = not loc or first["type"] == "value_error" and len(loc) == 1  # across settings: model validators
        if rule:  # where the first setting its message names was given, not the section's whole dict
            named = [name.split(".") for name in SETTING.findall(first["msg"])]
            loc = next((n for n in named if _given_in(overrides, n)), named[0] if named else loc)
        key = ".".join(loc)
        line = _line_of(text, loc)
        where = "command line" if _given_in(overrides, loc) else f"{source}:{line}" if line else source
        if first["type"] == "extra_forbidden":
            valid = _valid_keys(loc[:-1])
            familiar = FAMILIAR_NAMES.get(loc[-1])
            hint = familiar if familiar in valid else closest(loc[-1], valid)
            parent = ".".join(loc[:-1])
            prefix = f"{parent}." if parent else ""
            suggestion = f"; did you mean '{prefix}{hint}'?" if hint else f"; valid keys: {', '.join(sorted(valid))}"
            raise UserError(f"{where}: unknown key '{key}'{suggestion}") from None
        if rule:  # its message says everything
            raise UserError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
        raise UserError(f"{where}: {key}: {first['msg']} (got {shortened(first.get('input'))})") from None


# Other tools' names (transformers' TrainingArguments, peft's LoraConfig, TRL, Axolotl) for settings
# that tunesmith names otherwise: `train.learning_rate` got the list of every train key.
FAMILIAR_NAMES = {"learning_rate": "lr", "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size",
                  "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs", "num_epochs": "epochs",
                  "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                  "max_length": "max_seq_len", "max_seq_length": "max_seq_len", "sequence_len": "max_seq_len",
                  "cutoff_len": "max_seq_len", "output_dir": "dir", "model_name_or_path": "name",
                  "base_model": "name", "lr_scheduler_warmup_ratio": "warmup_ratio"}


# A setting named in a message ("train.rewards")
SETTING = re.compile(r"\b(?:model|data|adapter|train|eval|output)\.\w+")

# Parts of a pydantic error's location that name a type, not a setting (the branch of a union that
# failed): `adapter.target_modules.list[str]` named no line and blamed the config file.
TYPE_TAG = re.compile(r"^(str|int|float|bool|none|\[key\]|(list|dict|tuple|literal|function-\w+|constrained-\w+)\[.*)$")


def _given_in(overrides: dict | None, loc: list[str]) -> bool:
    """Whether the setting at `loc` came from a key=value override (the config file's line would mislead)."""
    node = overrides
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return bool(loc)


def _valid_keys(section_path: list[str]) -> list[str]:
    if not section_path:
        return list(Config.model_fields)
    field = Config.model_fields.get(section_path[0])
    return list(field.annotation.model_fields) if field else []


def _line_of(text: str, loc: list[str]) -> int | None:
    """1-based line of a key path in the YAML text, so errors point at the right place."""
    if not text:
        return None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == part:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line


def fsdp_refusal(method: str, fsdp: bool) -> str | None:
    """Why FSDP2 cannot train `method`, or None (the config and `plan --fsdp` alike)."""
    # FSDP2 gathers a sharded 4-bit weight as a plain tensor without its quantisation state
    if fsdp and method == "qlora":
        return ("train.fsdp does not work with adapter.method: qlora yet (FSDP2 loses the 4-bit weights' "
                "quantisation state); use DDP (train.fsdp: false) or adapter.method: lora")
    return None


def dump(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
