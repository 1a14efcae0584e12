"""Entrypoint: compose -> validate -> (only then import torch) train -> objective.

python -m lora_lab.train model=llama3_8b task=gsm8k adapter.r=16 quant=nf4

Composition and validation import neither torch nor transformers, so a mistyped value or
`--cfg job` answers in about a second; the pipeline (lora_lab/pipeline.py) loads them after.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lora_lab.errors import ConfigError
from lora_lab.interrupts import Interrupted, raise_on_interrupt
from lora_lab.metric_names import check_metric_names, objective_names
from lora_lab.validate import validate

log = logging.getLogger("lora_lab")
OOM_ADVICE = (
    "To use less memory: lower train.batch_size and raise train.grad_accum (same global batch), "
    "train.gradient_checkpointing=true, quant=nf4, a smaller task.max_length or adapter.r, "
    "or adapter.target_modules=attn"
)


def run_name(overrides: list[str]) -> str:
    """The run's name in trackers: its command-line overrides, without the sweeper's bookkeeping."""
    own = [o for o in overrides if not o.startswith("++optuna_trial.")]
    return ",".join(own) if own else "default"


def interrupted_message(e: Interrupted, save_steps: int | None, run_dir: Path, overrides: list[str]) -> str:
    """One line: what was interrupted, and the command that resumes it from its last checkpoint."""
    from lora_lab.trainer import latest_complete_checkpoint

    checkpoint = latest_complete_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        how = (
            "no checkpoint was saved (train.save_steps is unset): rerun to start again"
            if save_steps is None
            else "no checkpoint was complete yet: rerun to start again"
        )
        return f"run interrupted by {e.signal_name}; {how}"
    resume = " ".join(
        ["python -m lora_lab.train", *overrides, "train.resume=true", f"hydra.run.dir={run_dir}"]
    )
    return f"run interrupted by {e.signal_name}; {checkpoint.name} is intact, resume with: {resume}"


def join_submitit_tasks() -> None:
    """A job of several tasks under the submitit launcher (hydra/launcher=submitit_slurm with
    tasks_per_node = GPUs per node, on one node or more; or submitit_local): its tasks become the
    processes of one torch.distributed run, as torchrun's would be (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT from the job's environment). Each task keeps seeing every GPU of its
    node and uses the one of its LOCAL_RANK."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "WORLD_SIZE" in os.environ:
        return
    # imported here: only submitit jobs need it, and the entrypoint answers in a second without it
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def quiet_other_ranks() -> None:
    """Under torchrun / accelerate every process runs this entrypoint: only rank 0 writes to the
    console and to train.log; the others still show their errors."""
    if int(os.environ.get("RANK", "0")) == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
        else:
            handler.setLevel(logging.ERROR)


def log_hub_once() -> None:
    """huggingface_hub logs through a stderr handler of its own and also, propagating, through Hydra's:
    every Hub warning (an offline retry, say) was printed twice. Hydra's handlers alone print it once
    and write it to train.log."""
    hub = logging.getLogger("huggingface_hub")
    for handler in list(hub.handlers):
        hub.removeHandler(handler)


def fail(message: str, status: int, single_run: bool) -> None:
    """A single run ends with one line and `status`, no traceback; in a sweep the caller re-raises,
    and the error fails only its trial."""
    log.error("%s", message)
    if single_run:
        sys.exit(status)


def remove_refused_run_dir(run_dir: Path) -> None:
    """A single run refused before it trained leaves no run dir: Hydra's .hydra/ and a train.log that
    holds only the line the console showed. A dir holding anything else (a run being resumed) stays."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(run_dir)


@hydra.main(config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | list[float]:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    join_submitit_tasks()
    quiet_other_ranks()
    if hydra_cfg.mode != RunMode.RUN:  # a sweep job: the sweeper handles interrupts and errors
        return run_job(cfg, run_dir, single_run=False)
    raise_on_interrupt()
    try:
        return run_job(cfg, run_dir, single_run=True)
    except Interrupted as e:
        overrides = list(hydra_cfg.overrides.task)
        fail(interrupted_message(e, cfg.train.save_steps, run_dir, overrides), e.exit_status, True)


def run_job(cfg: DictConfig, run_dir: Path, single_run: bool) -> float | list[float]:
    hydra_cfg = HydraConfig.get()
    try:
        run = validate(cfg, list(hydra_cfg.overrides.task))
        check_metric_names(run.task.kind, run.task.metrics, run.task.metric, run.task.labels)
        objectives = objective_names(run.optimized_metric, run.task.metrics, run.harness)
    except ConfigError as e:
        if single_run:
            remove_refused_run_dir(run_dir)
        fail(str(e), 2, single_run)
        raise
    log.info("config valid; loading torch and the model (checks that need the model follow)")
    import torch

    from lora_lab.pipeline import train
    from lora_lab.trainer import TrainingDiverged

    log_hub_once()

    try:
        metrics = train(
            run,
            run_dir,
            pruner_cfg=hydra_cfg.sweeper.get("pruner"),
            run_name=run_name(hydra_cfg.overrides.task),
        )
    except torch.cuda.OutOfMemoryError as e:
        fail(f"CUDA out of memory ({str(e).splitlines()[0]}). {OOM_ADVICE}", 3, single_run)
        raise
    except (ConfigError, TrainingDiverged) as e:
        if single_run and isinstance(e, ConfigError):
            remove_refused_run_dir(run_dir)
        fail(str(e), 2, single_run)
        raise
    log.info("outputs in %s", run_dir)
    values = [metrics[name] for name in objectives]
    return values[0] if isinstance(cfg.optimized_metric, str) else values


if __name__ == "__main__":
    main()
