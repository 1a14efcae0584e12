"""The HF Trainer, set up for adapter training: arguments, eval-time metrics and measurements."""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from lora_lab.config import TrainConfig
from lora_lab.data import TaskData, real_tokens
from lora_lab.metrics import argmax_logits


@dataclass
class Measurements:
    """Speed and memory of the training phase, filled in by MeasureCallback."""

    train_seconds: float = 0.0
    tokens_seen: int = 0
    eval_history: list[dict] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.train_seconds if self.train_seconds else 0.0


class MeasureCallback(TrainerCallback):
    """Times training net of evaluation, and keeps every evaluation's metrics."""

    def __init__(self, measurements: Measurements):
        self.measurements = measurements
        self._started = 0.0
        self._eval_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.measurements.eval_history.append({"step": state.global_step, **(metrics or {})})
        self._eval_seconds += metrics.get("eval_runtime", 0.0) if metrics else 0.0

    def on_train_end(self, args, state, control, **kwargs):
        self.measurements.train_seconds = time.perf_counter() - self._started - self._eval_seconds
        self.measurements.tokens_seen = int(state.num_input_tokens_seen)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class DivergenceGuard(TrainerCallback):
    """Stops a run whose loss is NaN/Inf at once, instead of training on garbage to the end."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                raise TrainingDiverged(
                    f"train {key} is {value} at step {state.global_step}: lower train.lr, raise "
                    "train.warmup_ratio, or use quant.compute_dtype=float32"
                )


COMPLETE_MARKER = "checkpoint_complete"


class CheckpointCompletion(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it. The Trainer writes
    checkpoint-N in place, so a kill during a save leaves a partial directory: resuming only ever
    picks a marked one."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tmp = folder / f".{COMPLETE_MARKER}.tmp"
            with open(tmp, "w") as f:
                f.write(str(state.global_step))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / COMPLETE_MARKER)


def latest_complete_checkpoint(directory: Path) -> Path | None:
    complete = [p for p in directory.glob("checkpoint-*") if (p / COMPLETE_MARKER).exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


# transformers 5.18 renamed gradient_checkpointing* to activation_checkpointing* (the old names warn);
# 5.17, the oldest supported, knows only the old ones.
CHECKPOINTING_ARG = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def training_arguments(
    train: TrainConfig,
    output_dir: Path,
    device: str,
    compute_dtype: torch.dtype,
    report_to: list[str],
    checkpointing: bool,
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=train.lr,
        max_steps=train.max_steps,
        num_train_epochs=train.epochs,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size,
        gradient_accumulation_steps=train.grad_accum,
        warmup_steps=train.warmup_ratio,
        weight_decay=train.weight_decay,
        lr_scheduler_type=train.lr_scheduler,
        eval_strategy="steps",
        eval_steps=train.eval_steps,
        eval_on_start=train.eval_on_start,
        logging_steps=train.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must reach DivergenceGuard, not be averaged away
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        save_total_limit=2,  # the newest checkpoint and the one before, in case the newest is incomplete
        seed=train.seed,
        data_seed=train.seed,
        use_cpu=device == "cpu",
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        **{CHECKPOINTING_ARG: checkpointing, f"{CHECKPOINTING_ARG}_kwargs": {"use_reentrant": False}},
        include_num_input_tokens_seen="no",  # TokenCountingTrainer counts them
        label_names=["labels"],
        ddp_find_unused_parameters=False,  # every LoRA parameter gets a gradient; the search costs a pass
        remove_unused_columns=False,
        report_to=report_to or "none",
        disable_tqdm=True,
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
        torch_compile=train.compile,
    )


class TokenCountingTrainer(Trainer):
    """HF's Trainer, counting the real tokens of each training batch with `data.real_tokens`: its
    own count of packed batches, which have no attention mask, takes the pad id for padding, and
    that is often the EOS token that ends every example."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        tokens = real_tokens(inputs, self.processing_class.pad_token_id).to(self.args.device)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens).sum())
        return super().training_step(model, inputs, num_items_in_batch)


def build_trainer(
    model,
    tokenizer,
    data: TaskData,
    args: TrainingArguments,
    compute_metrics,
    callbacks: list[TrainerCallback],
) -> Trainer:
    return TokenCountingTrainer(
        model=model,
        processing_class=tokenizer,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=argmax_logits if compute_metrics else None,
        callbacks=callbacks,
    )


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float:
    """Peak CUDA memory allocated by tensors on GPU; the process's peak resident set on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
