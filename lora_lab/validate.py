"""Validation of the composed config, before anything is loaded: the config is typed against the
schema (lora_lab/config.py), the schedule settled with the command line, then each group checked by
its own function. Every check raises `ConfigError` with one line naming the key, the bad value and
what is valid."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_lab.chat import check_chat_options
from lora_lab.config import (
    COMPUTE_DTYPES,
    DEVICES,
    DISTRIBUTED,
    INITS,
    LAYER_PRESETS,
    METRIC_DIRECTIONS,
    MODEL_KINDS,
    QUANTS,
    ROW_SHAPE_FORMATS,
    SCHEDULERS,
    TARGET_PRESETS,
    TASK_FORMATS,
    TASK_SOURCES,
    AdapterConfig,
    HarnessConfig,
    LoggerConfig,
    ModelConfig,
    QuantConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
)
from lora_lab.errors import ConfigError
from lora_lab.tasks.files import data_files

log = logging.getLogger("lora_lab")


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
    check_model(run.model, run.task)
    check_adapter(run.adapter, run.quant)
    check_quant(run.quant)
    check_task(run.task)
    check_train(run.train, run.adapter, run.quant)
    check_logger(run.logger)
    check_harness(run.harness, run.model.kind)
    return run


def check_model(m: ModelConfig, t: TaskConfig) -> None:
    """model.*: a known kind, the task's."""
    _choice("model.kind", m.kind, MODEL_KINDS)
    if m.kind != t.kind:
        raise ConfigError("model.kind", m.kind, f"task {t.name!r} needs model.kind={t.kind}")


def check_adapter(a: AdapterConfig, q: QuantConfig) -> None:
    """adapter.*, and the inits the base's quantization admits; fills in alpha from alpha_multiple."""
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


def check_quant(q: QuantConfig) -> None:
    """quant.*."""
    _choice("quant.name", q.name, QUANTS)
    _choice("quant.compute_dtype", q.compute_dtype, COMPUTE_DTYPES)


def check_task(t: TaskConfig) -> None:
    """task.*: choices that fit the task's kind, chat options, the files a task=files names."""
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


def check_train(tr: TrainConfig, a: AdapterConfig, q: QuantConfig) -> None:
    """train.*; max_steps=0 (evaluate only) needs adapter.init_from; FSDP needs several processes
    and a base it can shard."""
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
    _choice("train.distributed", tr.distributed, DISTRIBUTED)
    if tr.distributed == "fsdp":
        check_sharded(q.name)


def check_sharded(quant_name: str) -> None:
    """train.distributed=fsdp: shards need processes to go to (torchrun, accelerate or Slurm tasks
    set WORLD_SIZE); bitsandbytes' 8-bit weights are int8 tensors whose scales live beside them, which
    FSDP cannot split (4-bit ones are stored as the compute dtype for it, models.quantization_config)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2:
        raise ConfigError(
            "train.distributed",
            "fsdp",
            f"FSDP shards the model across processes and this run is one (WORLD_SIZE={world_size}): "
            "launch it with torchrun --nproc_per_node N (N >= 2), or use train.distributed=ddp",
        )
    if quant_name == "int8":
        raise ConfigError(
            "quant",
            quant_name,
            "train.distributed=fsdp shards 4-bit and full-precision bases: quant=nf4, fp4 or none "
            "(or train.distributed=ddp for int8)",
        )


def check_logger(logger: LoggerConfig) -> None:
    """logger.*."""
    _choice("logger.name", logger.name, ("none", "wandb"))
    _choice("logger.mode", logger.mode, ("auto", "online", "offline"))


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
