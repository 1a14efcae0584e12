"""One training run on a validated config: model -> adapter -> data -> train -> evaluate -> write.

The command line (lora_lab/train.py) composes and validates the config before this module, and with
it torch and transformers, is imported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from lora_lab.adapters import attach_adapter, load_adapter
from lora_lab.config import AdapterConfig, ModelConfig, QuantConfig, RunConfig, TaskConfig, TrainConfig
from lora_lab.data import TaskData, build_task_data, longest_batch, row_sources
from lora_lab.harness import Harness
from lora_lab.loftq import LoftQRecipe, loftq_recipe, prepare_quantized_adapter, summarise
from lora_lab.metric_names import check_reported, objective_names
from lora_lab.metrics import (
    ExactMatchScorer,
    add_perplexity,
    lora_diagnostics,
    step_metrics_fn,
    summarise_diagnostics,
)
from lora_lab.models import load_model, resolve_compute_dtype, resolve_device
from lora_lab.pruning import load_trial, pruning_callback
from lora_lab.sharding import base_param_bytes, full_adapter_state, is_sharded, shard
from lora_lab.speed import apply_speed_switches, checkpointing_needed
from lora_lab.tasks import DATA_RECORD, TaskRows, load_task, read_record
from lora_lab.tracking import DiagnosticsCallback, tracking
from lora_lab.trainer import (
    CheckpointCompletion,
    DivergenceGuard,
    MeasureCallback,
    Measurements,
    baseline_eval,
    build_trainer,
    latest_complete_checkpoint,
    peak_memory_gib,
    reset_peak_memory,
    training_arguments,
)

log = logging.getLogger("lora_lab")
# Trainer bookkeeping among the eval_* keys: not metrics of the model.
_EVAL_BOOKKEEPING = {
    "eval_runtime",
    "eval_samples_per_second",
    "eval_steps_per_second",
    "eval_model_preparation_time",
}


def named_eval_metrics(raw: dict, prefix: str) -> dict[str, float]:
    """The Trainer's `eval_<name>` metrics as `<prefix>/<name>`, without its bookkeeping."""
    return {
        f"{prefix}/{k.removeprefix('eval_')}": float(v)
        for k, v in raw.items()
        if k.startswith("eval_") and k not in _EVAL_BOOKKEEPING
    }


def train(run: RunConfig, run_dir: Path, pruner_cfg=None, run_name: str = "default") -> dict[str, float]:
    """One training run of a validated config (`validate.validate`); returns the final metrics, also
    written to run_dir/metrics.json.

    In a sweep job with a pruner, a pruned run raises optuna.TrialPruned before writing outputs.
    """
    started = time.perf_counter()
    objectives = objective_names(run.optimized_metric, run.task.metrics, run.harness)
    with setup_tracker(run, run_dir, run_name) as tracker:
        device = resolve_device(run.train.device)
        # loaded first: a hub task without its dataset (offline) fails the run before it trains
        harness = Harness(run.harness) if run.harness.tasks else None
        transformers.set_seed(run.train.seed)
        # fills in what the data decides (task.format=auto, a classifier's labels) before the model
        rows = load_task(run.task, read_record(run_dir) if run.train.resume else None)
        model, tokenizer, backbone = setup_model(
            run.model, run.adapter, run.quant, run.task.labels, run.train, device, tracker
        )
        data = setup_data(rows, run.task, run.train.packing, tokenizer, model.config._attn_implementation)
        fit = setup_fit(run, run_dir, model, tokenizer, data, tracker, device, objectives, pruner_cfg)
        if fit.trainer.is_world_process_zero():  # reloads and resumes read the data as this run does
            write_json(run_dir / DATA_RECORD, rows.record)
        # The untrained adapter itself (as baseline/* evaluates it), not the base with the adapter
        # disabled: LoftQ, PiSSA and OLoRA adapters change the model from the start, and an
        # init_from adapter starts trained. Scoring leaves the random streams as they were.
        baseline_scores = harness.score(model, tokenizer, "baseline_harness") if run.harness.baseline else {}
        evaluated, peak_gib = fit_model(fit, run.train.max_steps, device)
        metrics = evaluate(fit, evaluated, run.task.metrics, model, tokenizer, harness) | baseline_scores
        metrics |= measurements(fit, model, peak_gib, started)
        write_results(run_dir, tracker, fit.trainer, model, metrics, backbone)
        check_reported(objectives, metrics)
        return metrics


def setup_tracker(run: RunConfig, run_dir: Path, run_name: str):
    """The W&B run (or none) of this run: a sweep's trials grouped by study."""
    in_sweep = run.optuna_trial.study_name is not None
    return tracking(
        run.logger,
        asdict(run),  # the validated config: defaults filled in, alpha as trained
        run_dir,
        group=run.optuna_trial.study_name if in_sweep else run.task_name,
        job_type="trial" if in_sweep else "train",
        name=run_name,
        tags=[
            run.model.name,
            f"quant={run.quant.name}",
            f"init={run.adapter.init}",
            f"r={run.adapter.r}",
            *run.tags,
        ],
    )


@dataclass
class Backbone:
    """What a quantized base needs written beside the adapter: LoftQ's recipe and the per-layer
    quantization errors."""

    loftq: LoftQRecipe | None
    quant_errors: list[dict] | None


def setup_model(
    model_cfg: ModelConfig,
    adapter: AdapterConfig,
    quant: QuantConfig,
    labels: list[str],
    train_cfg: TrainConfig,
    device: str,
    tracker,
):
    """The base model with its adapter (new, or adapter.init_from), on LoftQ's backbone where it runs."""
    model, tokenizer = load_model(model_cfg, quant, labels, device, sharded=train_cfg.distributed == "fsdp")
    if adapter.init_from is not None:
        model = load_adapter(model, adapter.init_from, model_cfg.kind, trainable=train_cfg.max_steps != 0)
    else:
        model = attach_adapter(model, adapter, model_cfg.kind)
    # an init_from adapter keeps its weights and needs the backbone it trained on
    loftq = loftq_recipe(adapter, quant, adapter.init_from)
    quant_errors = None
    # under FSDP the ranks but rank 0 hold the model on `meta`: its backbone reaches them as it shards
    if model.device.type != "meta":
        quant_errors = prepare_quantized_adapter(
            model,
            model_cfg,
            quant,
            loftq,
            fit_adapter=adapter.init_from is None,
            report=quant.error_report,
            compute_device=device,
        )
    if quant_errors:
        log.info("quantization error: %s", summarise(quant_errors))
        tracker.log_table("quant_error", quant_errors)
    return model, tokenizer, Backbone(loftq, quant_errors)


def setup_data(
    rows: TaskRows, task: TaskConfig, packing: bool, tokenizer, attn_implementation: str
) -> TaskData:
    """The task's rows tokenised for this model (the attention it runs decides how packing batches)."""
    data = build_task_data(
        rows.train,
        rows.eval,
        task.format,
        tokenizer,
        task.max_length,
        packing,
        attn_implementation=attn_implementation,
        train_on=task.train_on,
        chat_template=task.chat_template,
        chat_template_kwargs=task.chat_template_kwargs,
        train_on_reasoning=task.train_on_reasoning,
        row_sources=row_sources(task),
    )
    log.info("task %s: %d train / %d eval examples", task.name, len(data.train), len(data.eval))
    return data


@dataclass
class Fit:
    """The training of a run as set up: the Trainer and what runs beside it."""

    trainer: Any
    measurements: Measurements
    score_exact_match: ExactMatchScorer
    pruning: Any  # the pruning callback of a sweep trial with a pruner, else None
    kernels: dict[str, bool]
    checkpointing: bool
    checkpoint: str | None  # the checkpoint it resumes from


def setup_fit(
    run: RunConfig, run_dir: Path, model, tokenizer, data: TaskData, tracker, device, objectives, pruner_cfg
) -> Fit:
    """Callbacks (measurements, guards, diagnostics, the pruner), the speed switches, the
    checkpointing decision and the Trainer."""
    task, train_cfg = run.task, run.train
    compute_dtype = resolve_compute_dtype(run.quant.compute_dtype, device)
    measured = Measurements()
    callbacks = [MeasureCallback(measured), DivergenceGuard(), CheckpointCompletion()]
    fsdp = train_cfg.distributed == "fsdp"
    if tracker.active and fsdp:  # rank 0, which tracks, holds only its part of each layer
        log.info("LoRA diagnostics: not computed under train.distributed=fsdp")
    elif tracker.active:  # the diagnostics dequantize every adapted layer: only for a tracker
        callbacks.append(DiagnosticsCallback(tracker, model))
    score_exact_match = ExactMatchScorer(
        tokenizer,
        data.eval_prompts,
        data.eval_references,
        task.answer_pattern,
        task.generate_max_new_tokens,
        train_cfg.eval_batch_size,
        data.stop_token_ids,
    )
    pruning = None
    if run.optuna_trial.study_name is not None and pruner_cfg:
        pruning = pruning_callback(load_trial(run.optuna_trial, pruner_cfg), objectives, score_exact_match)
        callbacks += [pruning] if pruning is not None else []
    kernels = apply_speed_switches(model, train_cfg.liger, train_cfg.fused_loss, run.model.kind, device)
    checkpointing = train_cfg.gradient_checkpointing
    if checkpointing == "auto" and fsdp:  # the probe would step the whole model on one GPU
        checkpointing = device == "cuda"
    elif checkpointing == "auto":
        batch = longest_batch(data, train_cfg.batch_size)
        checkpointing = checkpointing_needed(model, batch, device, compute_dtype)
    log.info(
        "liger: %s, fused loss: %s, gradient checkpointing: %s",
        *("on" if on else "off" for on in (kernels["liger"], kernels["fused_loss"], checkpointing)),
    )
    checkpoint = resume_checkpoint(train_cfg.resume, run_dir / "checkpoints")
    args = training_arguments(
        train_cfg,
        run_dir / "checkpoints",
        device,
        compute_dtype,
        tracker.report_to,
        checkpointing and not fsdp,  # under FSDP by its own wrapper, in shard
        resuming=checkpoint is not None,
    )
    if fsdp:  # after the arguments, which start the process group
        shard(model, device, compute_dtype, checkpointing)
    trainer = build_trainer(
        model,
        tokenizer,
        data,
        args,
        step_metrics_fn(task.kind, task.metrics, task.labels),
        callbacks,
        task.kind,
        train_cfg.loraplus_lr_ratio,
    )
    return Fit(trainer, measured, score_exact_match, pruning, kernels, checkpointing, checkpoint)


def fit_model(fit: Fit, max_steps: int, device: str) -> tuple[dict[str, float], float]:
    """Train (max_steps=0 evaluates an existing adapter only), then the Trainer's final evaluation;
    returns its eval/* metrics and the peak memory of training and evaluation, not of loading or the
    checkpointing probe."""
    reset_peak_memory(device)
    if max_steps != 0:
        fit.trainer.train(resume_from_checkpoint=fit.checkpoint)
    if fit.pruning is not None:
        fit.pruning.raise_if_pruned()
    evaluated = named_eval_metrics(fit.trainer.evaluate(), "eval")
    return evaluated, peak_memory_gib(device)


def evaluate(
    fit: Fit, evaluated: dict[str, float], metric_names: list[str], model, tokenizer, harness: Harness | None
) -> dict[str, float]:
    """eval/* (the Trainer's `evaluated`, perplexity and exact match where asked), harness scores,
    baseline/*."""
    metrics = dict(evaluated)
    if "perplexity" in metric_names:
        add_perplexity(metrics)
    if "exact_match" in metric_names:
        metrics["eval/exact_match"] = fit.score_exact_match(model)
    if harness is not None:  # after the peak memory reading: lm-eval's batches are not training's
        metrics |= harness.score(model, tokenizer)
    baseline = baseline_eval(fit.trainer.state.log_history)
    if baseline is not None:
        metrics |= named_eval_metrics(baseline, "baseline")
    return metrics


def measurements(fit: Fit, model, peak_gib: float, started: float) -> dict[str, float]:
    """Parameters, steps, tokens, speed, memory and time, and what the automatic switches decided."""
    trainable, total = model.get_nb_trainable_parameters()
    # the rank holding the most: under FSDP about 1/world size of the base, else all of it
    held = fit.trainer.accelerator.gather(
        torch.tensor([base_param_bytes(model)], device=fit.trainer.args.device)
    )
    return {
        "params/trainable": trainable,
        "params/total": total,
        "params/trainable_pct": 100.0 * trainable / total,
        "train/steps": fit.trainer.state.global_step,
        "train/tokens": fit.measurements.tokens_seen,
        # what the auto switches decided: memory and speed compare only between equal settings
        "train/gradient_checkpointing": float(fit.checkpointing),
        "train/liger": float(fit.kernels["liger"]),
        "train/fused_loss": float(fit.kernels["fused_loss"]),
        "speed/tokens_per_second": fit.measurements.tokens_per_second,
        "memory/peak_gib": peak_gib,
        "memory/base_param_bytes_per_rank": int(held.max()),
        "time/train_seconds": fit.measurements.train_seconds,
        "time/wall_seconds": time.perf_counter() - started,
    }


def write_results(run_dir: Path, tracker, trainer, model, metrics: dict, backbone: Backbone) -> None:
    """The tracker's summary and LoRA diagnostics, the outputs (rank 0 only), the eval line."""
    if tracker.active:
        diagnostics = [] if is_sharded(model) else lora_diagnostics(model)
        tracker.log_table("lora_diagnostics", diagnostics)
        tracker.summarise({**metrics, **summarise_diagnostics(diagnostics)})
    # under FSDP every rank gathers its shards of the adapter; only rank 0 writes
    adapter_state = full_adapter_state(model) if is_sharded(model) else None
    if trainer.is_world_process_zero():
        write_outputs(run_dir, model, metrics, backbone.quant_errors, backbone.loftq, adapter_state)
    log.info("eval: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("eval/")))


def resume_checkpoint(resume: bool | str, checkpoints: Path) -> str | None:
    """The checkpoint to continue from: an explicit path, or the latest complete one in this run dir."""
    if isinstance(resume, str):
        return resume
    if not resume:
        return None
    latest = latest_complete_checkpoint(checkpoints)
    if latest is None:
        log.info(
            "train.resume=true: no complete checkpoint in %s yet, starting from the beginning", checkpoints
        )
        return None
    log.info("resuming from %s", latest)
    return str(latest)


def write_outputs(
    run_dir: Path,
    model,
    metrics: dict,
    quant_errors: list[dict] | None,
    loftq: LoftQRecipe | None,
    adapter_state: dict | None = None,
) -> None:
    """Write each output under a temporary name, then rename: a crash leaves nothing half-written.
    A LoftQ adapter carries the recipe of its backbone. `adapter_state`: a sharded model's adapter,
    gathered whole (None: the model's own parameters)."""
    staging = run_dir / ".adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, state_dict=adapter_state)
    if loftq is not None:
        loftq.save(staging)
    shutil.rmtree(run_dir / "adapter", ignore_errors=True)
    staging.rename(run_dir / "adapter")
    if quant_errors is not None:
        write_json(run_dir / "quant_error.json", quant_errors)
    write_json(run_dir / "metrics.json", metrics)
    with contextlib.suppress(OSError):  # the Trainer makes checkpoints/ even when it saves none
        (run_dir / "checkpoints").rmdir()


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
