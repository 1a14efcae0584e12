"""Experiment tracking: Weights & Biases runs (online when possible, offline otherwise) or none.

Training curves (loss, learning rate, eval metrics) reach W&B through transformers' own
WandbCallback, on the run opened here; this module adds the run's identity (group, job type,
tags, name, resolved config), LoRA diagnostics, the quantization-error table and the final summary,
and guarantees that every run is finished, so the next trial of a sweep never logs into it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import netrc
import os
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import optuna
from transformers import TrainerCallback

from lora_lab.config import LoggerConfig
from lora_lab.metrics import lora_diagnostics, summarise_diagnostics

log = logging.getLogger(__name__)


class Tracker:
    """No tracking (logger=none): every call is a no-op, so the training code has one path."""

    report_to: list[str] = []
    active = False  # whether anything is recorded: lets callers skip work done only for the tracker

    def log(self, values: dict, step: int) -> None:
        pass

    def log_table(self, name: str, rows: list[dict]) -> None:
        pass

    def summarise(self, values: dict) -> None:
        pass

    def finish(self, state: str, reason: str | None) -> None:
        pass


class WandbTracker(Tracker):
    report_to = ["wandb"]
    active = True

    def __init__(self, run, offline: bool):
        self.run, self.offline = run, offline

    def log(self, values: dict, step: int) -> None:
        self.run.log({**values, "train/global_step": step})

    def log_table(self, name: str, rows: list[dict]) -> None:
        import wandb

        if rows:
            columns = list(rows[0])
            self.run.log(
                {name: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])}
            )

    def summarise(self, values: dict) -> None:
        self.run.summary.update(values)

    def finish(self, state: str, reason: str | None) -> None:
        self.run.summary.update({"state": state, **({"reason": reason} if reason else {})})
        directory = self.run.dir
        self.run.finish(exit_code=1 if state == "failed" else 0)
        if self.offline:
            log.info("W&B run saved offline; upload it with: wandb sync %s", Path(directory).parent)


def _wandb_mode(requested: str) -> str:
    """auto: online only with credentials; without them wandb would prompt or fail, so go offline
    at once. A set WANDB_MODE (e.g. offline in CI) wins."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_wandb_credentials() else "offline"


def has_wandb_credentials() -> bool:
    """A W&B key where wandb reads it without prompting: WANDB_API_KEY, or ~/.netrc (or $NETRC),
    where `wandb login` saves it. Not wandb.login(prompt=False), which also checks the key online
    and hangs on an offline machine, nor wandb.api.api_key, deprecated with a warning on every run."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


# Parts of a run's config that say which run it is, not which configuration it trains.
RUN_IDENTITY_KEYS = {"optuna_trial", "logger", "tags", "task_name"}
RUN_IDENTITY_TRAIN_KEYS = {"seed", "resume"}


def config_id(config: dict) -> str:
    """A short hash of what a run trains, its seed left out: repeats of one configuration share it,
    so grouping the W&B runs table by config_id shows each configuration's mean and spread."""
    settings = {k: v for k, v in config.items() if k not in RUN_IDENTITY_KEYS}
    settings["train"] = {k: v for k, v in settings["train"].items() if k not in RUN_IDENTITY_TRAIN_KEYS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def start_tracking(
    cfg: LoggerConfig, config: dict, run_dir: Path, group: str, job_type: str, name: str, tags: list[str]
) -> Tracker:
    if cfg.name == "none" or int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 logs
        return Tracker()
    import wandb

    mode = _wandb_mode(cfg.mode)
    kwargs = dict(
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group or group,
        job_type=job_type,
        name=name,
        tags=[*tags, *cfg.tags],
        config={**config, "config_id": config_id(config)},
        dir=str(run_dir),
        reinit="finish_previous",
    )
    if mode == "online":
        try:
            run = wandb.init(mode="online", settings=wandb.Settings(init_timeout=cfg.init_timeout), **kwargs)
            return WandbTracker(run, offline=False)
        except Exception as e:  # unreachable or rejected: never let tracking stop training
            log.warning("W&B online init failed (%s); logging offline", e)
    run = wandb.init(mode="offline", **kwargs)
    return WandbTracker(run, offline=True)


@contextmanager
def tracking(
    cfg: LoggerConfig, config: dict, run_dir: Path, group: str, job_type: str, name: str, tags: list[str]
):
    """A tracked run that is finished however the block ends: failed (with the reason), pruned, or done."""
    tracker = start_tracking(cfg, config, run_dir, group, job_type, name, tags)
    try:
        yield tracker
    except optuna.TrialPruned as e:
        tracker.finish("pruned", str(e))
        raise
    except BaseException as e:
        tracker.finish("failed", f"{type(e).__name__}: {e}")
        raise
    tracker.finish("finished", None)


class DiagnosticsCallback(TrainerCallback):
    """LoRA diagnostics at each evaluation, summarised per module type."""

    def __init__(self, tracker: Tracker, model):
        self.tracker, self.model = tracker, model

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.tracker.log(summarise_diagnostics(lora_diagnostics(self.model)), state.global_step)
