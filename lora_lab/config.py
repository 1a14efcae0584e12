"""Structured schema of the composed config, and validation that runs before anything is loaded.

Every check raises `ConfigError` with one line naming the key, the bad value and what is valid.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger("lora_lab")


class ConfigError(ValueError):
    """A bad value in the user's config: the message is one line meant for the user."""

    def __init__(self, key: str, value: Any, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"{key}={value!r} is invalid: {valid}")


@contextlib.contextmanager
def exit_on_config_error():
    """For the command-line tools: a ConfigError ends the command with its one line and exit
    status 2, without a traceback."""
    try:
        yield
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


MODEL_KINDS = ("causal_lm", "seq_cls")
TARGET_PRESETS = ("attn", "mlp", "all-linear", "qv")
LAYER_PRESETS = ("all", "middle", "top_half", "bottom_half")
INITS = ("gaussian", "kaiming", "loftq", "pissa", "olora")
QUANTS = ("none", "nf4", "fp4", "int8")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
TASK_SOURCES = ("builtin", "files", "hub")
# What a task's rows are tokenised as (lora_lab/data.py); auto: what the detected row shape needs.
TASK_FORMATS = ("auto", "sft", "lm", "cls", "chat")
# The row shapes lora_lab reads (lora_lab/tasks), in the order they are detected, and the format each
# becomes: OpenAI messages, ShareGPT conversations, Alpaca, TRL's prompt/completion, prompt/response,
# text with a label (classification), plain text.
ROW_SHAPE_FORMATS = {
    "messages": "chat",
    "conversations": "chat",
    "alpaca": "sft",
    "prompt_completion": "sft",
    "prompt_response": "sft",
    "text_label": "cls",
    "text": "lm",
}
METRIC_DIRECTIONS = ("maximize", "minimize")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass
class TinyModelConfig:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 320  # the byte-level tokenizer's 260 tokens, padded to a multiple of 64
    max_position_embeddings: int = 256


@dataclass
class ModelConfig:
    name: str = "tiny"
    name_or_path: str | None = None  # None: the tiny model, built locally
    kind: str = "causal_lm"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass
class AdapterConfig:
    r: int = 8
    alpha: float = 16.0
    alpha_multiple: float | None = None  # when set, alpha = alpha_multiple * r (for sweeps over r)
    dropout: float = 0.05
    target_modules: Any = "all-linear"  # a preset name or a list of module names
    init: str = "gaussian"
    loftq_iter: int = 1
    loftq_svd: str = "randomized"  # randomized (rank-r, fast) | exact
    use_rslora: bool = False
    use_dora: bool = False
    # Which transformer blocks get adapters: all, middle (the middle half), top_half, bottom_half, or
    # a list of block indices (PEFT's layers_to_transform).
    layers: Any = "all"
    # An existing PEFT LoRA adapter (dir or hub id) to continue training or, with
    # train.max_steps=0, only to evaluate; r, alpha and targets then come from it.
    init_from: str | None = None


@dataclass
class QuantConfig:
    name: str = "none"
    double_quant: bool = True
    compute_dtype: str = "auto"
    # Write quant_error.json (reads each adapted full-precision weight once from the checkpoint).
    error_report: bool = True


@dataclass
class TaskConfig:
    name: str = "sort"
    kind: str = "causal_lm"
    source: str = "builtin"
    # auto, or one of TASK_FORMATS: a fixed format limits detection to the row shapes that make it
    format: str = "sft"
    shape: str | None = None  # null: detected from the first row; or one of ROW_SHAPE_FORMATS
    template: str | None = None  # a prompt template for hub presets (gsm8k)
    answer_pattern: str | None = None  # regex whose group 1 is the answer compared by exact_match
    dataset: str | None = None  # hub dataset id
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    # source=files: a file (.jsonl .json .csv .tsv .parquet .arrow), a glob, or a save_to_disk dir
    train_path: str | None = None
    eval_path: str | None = None  # null: eval_fraction of the training rows, split with a fixed seed
    eval_fraction: float = 0.1
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    prompt_field: str = "prompt"
    response_field: str = "response"
    labels: list[str] = field(default_factory=list)  # source=files: empty infers them, sorted
    metrics: list[str] = field(default_factory=list)
    metric: str = "loss"
    metric_direction: str = "minimize"
    max_length: int = 512
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    generate_max_new_tokens: int = 32
    # Conversations: which assistant turns carry the loss (all_assistant | last_turn), and the chat
    # template for a tokenizer without one (chatml, llama3, or a Jinja string), and options that
    # reach apply_chat_template (e.g. Qwen3's enable_thinking: false); whether an assistant's
    # reasoning (reasoning_content, <think>...</think>), where the template renders it, carries loss.
    train_on: str = "all_assistant"
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    train_on_reasoning: bool = True


@dataclass
class HarnessConfig:
    """EleutherAI lm-evaluation-harness on the trained model (empty `tasks`: off)."""

    tasks: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: int | None = None  # examples per task (for sweeps); null: all
    batch_size: int = 8
    include_path: str | None = None  # a folder of the user's own task YAMLs (lm-eval's --include_path)
    baseline: bool = False  # also score the untrained adapter, as baseline_harness/...


@dataclass
class TrainConfig:
    lr: float = 2e-4
    max_steps: int = -1
    epochs: float = 1.0
    batch_size: int = 4
    eval_batch_size: int = 16
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    # LoRA+ (Hayou et al. 2024): B's learning rate as this multiple of A's (train.lr); null = off
    loraplus_lr_ratio: float | None = None
    lr_scheduler: str = "cosine"
    eval_steps: int = 100
    logging_steps: int = 10
    seed: int = 42
    save_steps: int | None = (
        None  # checkpoint (adapter, optimizer, scheduler, RNG, data position) every N steps
    )
    resume: Any = (
        False  # true: continue from the latest complete checkpoint in the run dir; or a checkpoint path
    )
    eval_on_start: bool = True  # the untrained model's metrics, as the baseline in metrics.json
    device: str = "auto"
    # auto: on CUDA, measured: on when one step of the longest batch without it would run out of
    # memory or come near the limit; off on CPU. Or true / false.
    gradient_checkpointing: Any = "auto"
    # padding-free batches for SFT tasks (LM blocks have no padding; classification pads)
    packing: bool = True
    # Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy): auto = on
    # CUDA when liger-kernel is installed (`pip install lora_lab[gpu]`).
    liger: Any = "auto"
    # PyTorch's chunked linear cross-entropy (the logits are never held whole) for causal LMs with a
    # plain output head: auto = on unless liger is on (liger fuses the loss itself).
    fused_loss: Any = "auto"
    compile: bool = False  # torch.compile the model


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str = "lora_lab"
    entity: str | None = None
    group: str | None = None  # default: the study name in a sweep, task_name otherwise
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto (online when logged in, else offline) | online | offline
    init_timeout: float = 30.0


@dataclass
class TrialRef:
    """Set by the lora_lab_optuna sweeper in each job: the Optuna trial this run is."""

    study_name: str | None = None
    storage: str | None = None
    trial_id: int | None = None
    number: int | None = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
    # One metric name, or a list of them for a multi-objective study.
    optimized_metric: Any = "eval/loss"
    optuna_trial: TrialRef = field(default_factory=TrialRef)
    task_name: str = "train"
    tags: list[str] = field(default_factory=list)


# The root config lists this schema first in its defaults: every group's yaml merges onto it, so
# keys a preset leaves out take these defaults and a wrongly typed override fails at composition.
ConfigStore.instance().store(name="lora_lab_schema", node=RunConfig)

# The metrics of a task that leaves them to its kind (task=files):
# `metrics: ${lora_lab.kind_default:metrics,${task.kind}}`. An unknown kind is refused by validate.
KIND_METRIC_DEFAULTS = {
    "causal_lm": {
        "metrics": ["token_accuracy", "perplexity"],
        "metric": "loss",
        "metric_direction": "minimize",
    },
    "seq_cls": {"metrics": ["accuracy", "f1_macro"], "metric": "accuracy", "metric_direction": "maximize"},
}


def _kind_default(key: str, kind: str) -> Any:
    return KIND_METRIC_DEFAULTS.get(kind, KIND_METRIC_DEFAULTS["causal_lm"])[key]


OmegaConf.register_resolver("lora_lab.kind_default", _kind_default, replace=True)


def _choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(key, value, f"valid values are {', '.join(valid)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(key, value, "must be " + ("zero or positive" if allow_zero else "positive"))


def _typed(cfg: DictConfig) -> RunConfig:
    """Merge the composed config onto the schema: wrong types and unknown keys fail here."""
    schema = OmegaConf.structured(RunConfig)
    user = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "hparams_search", "experiment")])
    try:
        merged = OmegaConf.merge(schema, user)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = e.full_key or "config"
        reason = str(e).splitlines()[0]
        if "not in struct" in reason or "not found" in reason:
            reason = "unknown key (`python -m lora_lab.train --cfg job` prints every valid key)"
        value = OmegaConf.select(user, key, default=None, throw_on_missing=False) if e.full_key else None
        raise ConfigError(key, value, reason) from None


# model=tiny's demo schedule (lr 3e-3, 1,200 steps, ...), sized for a model of 0.1M parameters.
TINY_PRESET = Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny.yaml"


def _command_line_keys(command_line: list[str]) -> set[str]:
    return {o.lstrip("+~").split("=", 1)[0] for o in command_line}


def settle_schedule(run: RunConfig, command_line: list[str]) -> list[str]:
    """Make what the user wrote on the command line win over presets' schedules; return one line
    per value changed, saying why.

    - `train.epochs` on the command line (and not `train.max_steps`) trains for those epochs:
      a preset's max_steps (model=tiny sets 1,200) would otherwise silently override it.
    - `model.name_or_path` without a model preset keeps the default preset, tiny, whose demo schedule
      suits no real model: its values that nothing else set go back to the train/ defaults.
    """
    given = _command_line_keys(command_line)
    notes = []
    if run.model.name == "tiny" and run.model.name_or_path is not None:
        tiny_schedule = OmegaConf.load(TINY_PRESET).train
        defaults = TrainConfig()
        reset = [
            key
            for key, value in tiny_schedule.items()
            if f"train.{key}" not in given and getattr(run.train, key) == value
        ]
        for key in reset:
            setattr(run.train, key, getattr(defaults, key))
        if reset:
            notes.append(
                f"model.name_or_path={run.model.name_or_path} with no model preset: the tiny model's demo "
                "schedule does not apply, using "
                + ", ".join(f"train.{k}={getattr(run.train, k)}" for k in reset)
                + " (set them on the command line to change them)"
            )
    if "train.epochs" in given and "train.max_steps" not in given and run.train.max_steps != -1:
        notes.append(
            f"train.epochs={run.train.epochs} from the command line: training for epochs, not the "
            f"preset's train.max_steps={run.train.max_steps}"
        )
        run.train.max_steps = -1
    return notes


def validate(cfg: DictConfig, command_line: list[str] | None = None) -> RunConfig:
    """Return the typed run config, or raise ConfigError on the first bad value. For a run about to
    train, `command_line` (its overrides) settles the schedule first (`settle_schedule`, whose notes
    are logged); None for a finished run's saved config, reloaded as it ran."""
    run = _typed(cfg)
    if command_line is not None:
        for note in settle_schedule(run, command_line):
            log.warning("%s", note)
    m, a, q, t, tr = run.model, run.adapter, run.quant, run.task, run.train

    _choice("model.kind", m.kind, MODEL_KINDS)
    if m.kind != t.kind:
        raise ConfigError("model.kind", m.kind, f"task {t.name!r} needs model.kind={t.kind}")

    if a.r < 1:
        raise ConfigError("adapter.r", a.r, "the LoRA rank must be an integer >= 1")
    if a.alpha_multiple is not None:
        _positive("adapter.alpha_multiple", a.alpha_multiple)
        a.alpha = a.alpha_multiple * a.r
    _positive("adapter.alpha", a.alpha)
    if not 0.0 <= a.dropout < 1.0:
        raise ConfigError("adapter.dropout", a.dropout, "must be in [0, 1)")
    tm = a.target_modules
    if isinstance(tm, str):
        _choice("adapter.target_modules", tm, TARGET_PRESETS)
    elif not (isinstance(tm, list) and tm and all(isinstance(x, str) and x for x in tm)):
        raise ConfigError(
            "adapter.target_modules",
            tm,
            f"a preset ({', '.join(TARGET_PRESETS)}) or a non-empty list of names",
        )
    if isinstance(a.layers, str):
        _choice("adapter.layers", a.layers, LAYER_PRESETS)
    elif not (
        isinstance(a.layers, list) and a.layers and all(isinstance(i, int) and i >= 0 for i in a.layers)
    ):
        raise ConfigError(
            "adapter.layers",
            a.layers,
            f"a preset ({', '.join(LAYER_PRESETS)}) or a list of block indices >= 0",
        )
    _choice("adapter.init", a.init, INITS)
    _choice("adapter.loftq_svd", a.loftq_svd, ("randomized", "exact"))
    if a.loftq_iter < 1:
        raise ConfigError("adapter.loftq_iter", a.loftq_iter, "must be an integer >= 1")
    if a.init == "loftq" and q.name not in ("nf4", "fp4"):
        raise ConfigError("adapter.init", a.init, "loftq needs a 4-bit base: quant=nf4 or quant=fp4")
    if a.init in ("pissa", "olora") and q.name != "none":
        raise ConfigError("adapter.init", a.init, f"{a.init} needs a full-precision base (quant=none)")
    if a.use_dora and a.init == "loftq":
        raise ConfigError("adapter.use_dora", True, "DoRA cannot be combined with adapter.init=loftq")

    _choice("quant.name", q.name, QUANTS)
    _choice("quant.compute_dtype", q.compute_dtype, COMPUTE_DTYPES)

    _choice("task.kind", t.kind, MODEL_KINDS)
    _choice("task.source", t.source, TASK_SOURCES)
    _choice("task.format", t.format, TASK_FORMATS)
    if t.shape is not None:
        _choice("task.shape", t.shape, tuple(ROW_SHAPE_FORMATS))
        if t.format not in ("auto", ROW_SHAPE_FORMATS[t.shape]):
            raise ConfigError(
                "task.format",
                t.format,
                f"task.shape={t.shape} is read as {ROW_SHAPE_FORMATS[t.shape]} (or auto)",
            )
    _choice("task.metric_direction", t.metric_direction, METRIC_DIRECTIONS)
    from lora_lab.chat import check_chat_options  # chat imports this module's ConfigError

    check_chat_options(t.train_on, t.chat_template)
    classifier = t.kind == "seq_cls"
    if t.shape is not None and (ROW_SHAPE_FORMATS[t.shape] == "cls") != classifier:
        raise ConfigError(
            "task.shape",
            t.shape,
            "task.kind=seq_cls reads text_label rows"
            if classifier
            else "text_label rows need task.kind=seq_cls",
        )
    if t.format != "auto" and (t.format == "cls") != classifier:
        raise ConfigError(
            "task.format",
            t.format,
            f"task.kind={t.kind} needs task.format="
            + ("cls or auto" if classifier else "auto, sft, lm or chat"),
        )
    # Files infer their labels from the training rows (lora_lab/tasks); one label is no classifier.
    if t.kind == "seq_cls" and len(t.labels) < 2 and (t.labels or t.source != "files"):
        raise ConfigError("task.labels", t.labels, "a classification task needs at least two label names")
    if t.source == "files":
        from lora_lab.tasks.files import data_files  # the task package imports this module

        if not t.train_path:
            raise ConfigError("task.train_path", t.train_path, "task=files needs the training data's path")
        data_files("task.train_path", t.train_path)
        if t.eval_path:
            data_files("task.eval_path", t.eval_path)
        elif not 0.0 < t.eval_fraction < 1.0:
            raise ConfigError(
                "task.eval_fraction",
                t.eval_fraction,
                "without task.eval_path, a fraction in (0, 1) to evaluate on",
            )
    if t.source == "hub" and not t.dataset:
        raise ConfigError("task.dataset", t.dataset, "a hub task needs a dataset id")
    if t.max_length < 8:
        raise ConfigError("task.max_length", t.max_length, "must be >= 8 tokens")

    _positive("train.lr", tr.lr)
    if tr.max_steps < -1 or (tr.max_steps == 0 and a.init_from is None):
        raise ConfigError(
            "train.max_steps",
            tr.max_steps,
            "a positive step count, -1 to train for train.epochs, "
            "or 0 (evaluate only) with adapter.init_from",
        )
    if tr.save_steps is not None and tr.save_steps < 1:
        raise ConfigError(
            "train.save_steps", tr.save_steps, "a positive step count, or null for no checkpoints"
        )
    if not isinstance(tr.resume, bool) and not (isinstance(tr.resume, str) and os.path.isdir(tr.resume)):
        raise ConfigError("train.resume", tr.resume, "true, false, or the path of a checkpoint directory")
    if tr.max_steps == -1:
        _positive("train.epochs", tr.epochs)
    for key in ("batch_size", "eval_batch_size", "grad_accum", "eval_steps", "logging_steps"):
        value = getattr(tr, key)
        if value < 1:
            raise ConfigError(f"train.{key}", value, "must be an integer >= 1")
    if not 0.0 <= tr.warmup_ratio < 1.0:
        raise ConfigError("train.warmup_ratio", tr.warmup_ratio, "must be in [0, 1)")
    _positive("train.weight_decay", tr.weight_decay, allow_zero=True)
    if tr.loraplus_lr_ratio is not None and not tr.loraplus_lr_ratio >= 1:
        raise ConfigError(
            "train.loraplus_lr_ratio",
            tr.loraplus_lr_ratio,
            "B's learning rate as a multiple of A's: a number >= 1 (the LoRA+ paper uses 16), or null for off",
        )
    _choice("train.lr_scheduler", tr.lr_scheduler, SCHEDULERS)
    _choice("train.device", tr.device, DEVICES)
    for key in ("gradient_checkpointing", "liger", "fused_loss"):
        if getattr(tr, key) not in (True, False, "auto"):
            raise ConfigError(f"train.{key}", getattr(tr, key), "auto, true or false")
    _choice("logger.name", run.logger.name, ("none", "wandb"))
    _choice("logger.mode", run.logger.mode, ("auto", "online", "offline"))

    check_harness(run.harness, m.kind)

    return run


def check_harness(h: HarnessConfig, model_kind: str) -> None:
    """The harness.* settings (validate's check, and `python -m lora_lab.evaluate`'s for a finished run)."""
    if h.tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            "harness.tasks",
            h.tasks,
            "lm-evaluation-harness is not installed: pip install 'lora_lab[harness]'",
        )
    if h.tasks and model_kind != "causal_lm":
        raise ConfigError(
            "harness.tasks", h.tasks, "lm-eval scores language models: it needs model.kind=causal_lm"
        )
    if not all(isinstance(name, str) and name for name in h.tasks) or len(set(h.tasks)) < len(h.tasks):
        raise ConfigError("harness.tasks", h.tasks, "a list of distinct lm-eval task, group or tag names")
    if h.baseline and not h.tasks:
        raise ConfigError("harness.baseline", True, "it scores harness.tasks: name at least one")
    if h.num_fewshot is not None and h.num_fewshot < 0:
        raise ConfigError(
            "harness.num_fewshot", h.num_fewshot, "an integer >= 0, or null for each task's own"
        )
    if h.limit is not None and h.limit < 1:
        raise ConfigError("harness.limit", h.limit, "examples per task: an integer >= 1, or null for all")
    if h.batch_size < 1:
        raise ConfigError("harness.batch_size", h.batch_size, "must be an integer >= 1")
    if h.include_path is not None and not os.path.isdir(h.include_path):
        raise ConfigError(
            "harness.include_path", h.include_path, "no such directory (a folder of task YAMLs)"
        )
