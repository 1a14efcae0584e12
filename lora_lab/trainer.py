"""The HF Trainer, set up for adapter training: arguments, eval-time metrics and measurements."""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.optimizers import create_loraplus_optimizer
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import SCHEDULER_NAME

from lora_lab.config import TrainConfig
from lora_lab.data import IGNORE_INDEX, TaskData, real_tokens
from lora_lab.metrics import argmax_logits
from lora_lab.sharding import full_adapter_state, is_sharded, load_sharded_state, save_sharded_state


@dataclass
class Measurements:
    """Speed and memory of the training phase, filled in by MeasureCallback."""

    train_seconds: float = 0.0
    tokens_seen: int = 0  # over the whole run, earlier processes of a resumed run included
    tokens_this_process: int = 0  # what train_seconds timed

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_this_process / self.train_seconds if self.train_seconds else 0.0


class MeasureCallback(TrainerCallback):
    """Times training net of evaluation, and counts the tokens this process trained on: a resumed
    run's state starts with the tokens of the processes before it, which this one did not time."""

    def __init__(self, measurements: Measurements):
        self.measurements = measurements
        self._started = 0.0
        self._eval_seconds = 0.0
        self._tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()
        self._tokens_at_start = int(state.num_input_tokens_seen)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._eval_seconds += metrics.get("eval_runtime", 0.0) if metrics else 0.0

    def on_train_end(self, args, state, control, **kwargs):
        self.measurements.train_seconds = time.perf_counter() - self._started - self._eval_seconds
        self.measurements.tokens_seen = int(state.num_input_tokens_seen)
        self.measurements.tokens_this_process = self.measurements.tokens_seen - self._tokens_at_start


log = logging.getLogger("lora_lab")
# The Trainer's log entries that are bookkeeping, not the model's progress.
_QUIET_LOG_KEYS = {"epoch", "total_flos", "train_samples_per_second", "train_steps_per_second"}


def format_log(logs: dict) -> str:
    """One log entry as `loss 3.015 · grad_norm 1.2 · lr 0.003`: eval metrics by their short name,
    the eval loop's timings dropped."""
    items = []
    for key, value in logs.items():
        if key in _QUIET_LOG_KEYS or key.endswith(("_runtime", "_per_second")):
            continue
        name = key.removeprefix("eval_")
        items.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return " · ".join(items)


def write_to_log_files(line: str) -> None:
    """A line for the run's train.log (Hydra's file handler on the root logger), not the console."""
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, line, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class ConsoleCallback(TrainerCallback):
    """What training shows, on the main process only: on a terminal a progress bar with the latest
    loss, otherwise (a log file, Slurm, CI) one line per logging step and per evaluation. Every line
    also goes to the run's train.log, through the `lora_lab` logger. Replaces the Trainer's printed
    dicts (PrinterCallback) and its bar (ProgressCallback)."""

    def __init__(self, terminal: bool | None = None):
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = None
        self.trained = False

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.terminal:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="training", dynamic_ncols=True
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or self.trained:
            return  # after training: the run's final line says its metrics
        kind = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        line = f"{kind} step {state.global_step}/{state.max_steps}: {format_log(logs)}"
        if self.bar is None:
            log.info("%s", line)
            return
        if "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4g}")
        if kind == "eval":
            self.bar.write(line)  # above the bar
        write_to_log_files(line)

    def on_train_end(self, args, state, control, **kwargs):
        self.trained = True
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def baseline_eval(log_history: list[dict]) -> dict | None:
    """The evaluation of the untrained adapter (train.eval_on_start), from the Trainer's log
    history, which a resumed run restores from its checkpoint: evaluating again on resume would
    score the partly trained adapter."""
    return next((e for e in log_history if e.get("step") == 0 and "eval_loss" in e), None)


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
    resuming: bool,
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
        eval_on_start=train.eval_on_start and not resuming,  # a resumed run keeps its first baseline
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
        include_num_input_tokens_seen="no",  # AdapterTrainer counts them
        label_names=["labels"],
        ddp_find_unused_parameters=False,  # every LoRA parameter gets a gradient; the search costs a pass
        remove_unused_columns=False,
        report_to=report_to or "none",
        disable_tqdm=True,
        optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
        torch_compile=train.compile,
    )


class AdapterTrainer(Trainer):
    """HF's Trainer with three numbers made right:
    - the training tokens are counted with `data.real_tokens`: the Trainer's own count of packed
      batches, which have no attention mask, takes the pad id for padding, and that is often the EOS
      token that ends every example;
    - the eval loss is the mean over all label tokens of the eval set, not the mean of per-batch
      means (which weighs a token of a short batch more than one of a long batch);
    - under gradient accumulation the loss is divided by the number of micro-batches unless the
      model itself normalises by the global token count (causal LMs do, given num_items_in_batch;
      classifiers ignore it, and the Trainer then multiplied their loss by grad_accum and, under DDP,
      by the world size).
    A model sharded by lora_lab.sharding saves and loads its checkpoints in parts, one per rank.
    """

    def __init__(self, *args, causal_lm: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.causal_lm = causal_lm
        # The Trainer assumes any model whose forward takes **kwargs normalises by num_items_in_batch.
        self.model_accepts_loss_kwargs = causal_lm
        self._eval_loss_sum = self._eval_loss_count = None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A sharded model's adapter gathered whole (every rank takes part), written by rank 0 as a
        plain PEFT adapter."""
        if not is_sharded(self.model):
            return super().save_model(output_dir, _internal_call)
        state = full_adapter_state(self.model)
        if self.args.should_save:
            self._save(output_dir or self.args.output_dir, state_dict=state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not is_sharded(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        save_sharded_state(self.model, self.optimizer.optimizer, Path(output_dir))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not is_sharded(self.model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        # a sharded adapter loads with the optimizer state, in _load_optimizer_and_scheduler

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not is_sharded(self.model):
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_sharded_state(self.model, self.optimizer.optimizer, Path(checkpoint))
        self.lr_scheduler.load_state_dict(
            torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        tokens = real_tokens(inputs, self.processing_class.pad_token_id).to(self.args.device)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens).sum())
        return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if loss is not None:
            count = loss_targets(inputs["labels"], shifted=self.causal_lm)
            self._eval_loss_sum += loss.to(self._eval_loss_sum) * count
            self._eval_loss_count += count
        return loss, logits, labels

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._eval_loss_sum = torch.zeros((), dtype=torch.float64, device=self.args.device)
        self._eval_loss_count = torch.zeros((), dtype=torch.float64, device=self.args.device)
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        key = f"{metric_key_prefix}_loss"
        if key in output.metrics:
            # Summed over processes. Under DDP the sampler repeats a few examples to even out the
            # last batch; their tokens count twice (the Trainer's own mean does the same).
            total = self.accelerator.reduce(torch.stack([self._eval_loss_sum, self._eval_loss_count]), "sum")
            output.metrics[key] = float(total[0] / total[1])
        return output


def loss_targets(labels: torch.Tensor, shifted: bool) -> torch.Tensor:
    """How many targets a batch's mean loss averages over: label tokens that a causal LM predicts
    (position t predicts t+1, so the first label of a row is never a target), or the examples of a
    classification batch."""
    if not shifted:
        return torch.tensor(labels.shape[0], device=labels.device)
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def loraplus_optimizer(model, args: TrainingArguments, lr_ratio: float) -> torch.optim.Optimizer:
    """LoRA+: PEFT's optimizer with B's learning rate lr_ratio times A's, otherwise the AdamW the
    Trainer would build from `args`."""
    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=args.learning_rate,
        loraplus_lr_ratio=lr_ratio,
        loraplus_weight_decay=args.weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=args.optim == "adamw_torch_fused",
    )


def build_trainer(
    model,
    tokenizer,
    data: TaskData,
    args: TrainingArguments,
    compute_metrics,
    callbacks: list[TrainerCallback],
    kind: str,
    loraplus_lr_ratio: float | None = None,
) -> Trainer:
    optimizer = loraplus_optimizer(model, args, loraplus_lr_ratio) if loraplus_lr_ratio else None
    trainer = AdapterTrainer(
        model=model,
        processing_class=tokenizer,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=argmax_logits if compute_metrics else None,
        callbacks=callbacks,
        optimizers=(optimizer, None),  # None: the Trainer's own AdamW; its scheduler in both cases
        causal_lm=kind == "causal_lm",
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ConsoleCallback())
    return trainer


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size


def peak_memory_gib(device: str) -> float:
    """Peak CUDA memory allocated by tensors on GPU; on CPU the process's peak resident set since
    reset_peak_memory (VmHWM, which Linux resets through clear_refs: the lifetime peak that
    getrusage reports would only grow over the in-process trials of a sweep)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    status = Path("/proc/self/status")
    if not status.exists():  # not Linux: unknown rather than a lifetime peak passed off as this run's
        return math.nan
    return int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)) / 2**20
