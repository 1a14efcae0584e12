"""The Optuna trial inside a sweep job: report the objective at each evaluation, stop when pruned.

The lora_lab_optuna sweeper passes the job its trial (`optuna_trial.*`); the pruner is built here
from `hydra.sweeper.pruner`, the same config the sweeper checked.
"""

from __future__ import annotations

import math

import optuna
from hydra.utils import instantiate
from transformers import TrainerCallback

from lora_lab.config import TrialRef


def load_trial(ref: TrialRef, pruner_cfg) -> optuna.Trial:
    pruner = instantiate(pruner_cfg, _execution_whitelist_="optuna.pruners.*") if pruner_cfg else None
    study = optuna.load_study(study_name=ref.study_name, storage=ref.storage, pruner=pruner)
    return optuna.Trial(study, ref.trial_id)


class PruningCallback(TrainerCallback):
    """Reports `metric` (a Trainer eval key such as eval_accuracy) and stops training when pruned."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric = trial, metric
        self.pruned_at: tuple[int, float] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None or not math.isfinite(value):
            return
        self.trial.report(value, state.global_step)
        if self.trial.should_prune():
            self.pruned_at = (state.global_step, value)
            control.should_training_stop = True

    def raise_if_pruned(self) -> None:
        if self.pruned_at is not None:
            step, value = self.pruned_at
            raise optuna.TrialPruned(f"pruned at step {step} with {self.metric}={value:.4g}")
