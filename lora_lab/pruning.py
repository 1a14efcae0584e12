"""The Optuna trial inside a sweep job: report the objective at each evaluation, stop when pruned.

The lora_lab_optuna sweeper passes the job its trial (`optuna_trial.*`); the pruner is built here
from `hydra.sweeper.pruner`, the same config the sweeper checked.
"""

from __future__ import annotations

import logging
import math

import optuna
from hydra.utils import instantiate
from transformers import TrainerCallback

from lora_lab.config import TrialRef
from lora_lab.metrics import ExactMatchScorer, perplexity

log = logging.getLogger("lora_lab")
# An exact_match objective is decoded at each evaluation on the first this many eval prompts: the same
# prompts each time, and few enough to decode often. The final eval/exact_match decodes all of them.
EXACT_MATCH_PROMPTS_PER_EVALUATION = 64


def load_trial(ref: TrialRef, pruner_cfg) -> optuna.Trial:
    pruner = instantiate(pruner_cfg, _execution_whitelist_="optuna.pruners.*") if pruner_cfg else None
    study = optuna.load_study(study_name=ref.study_name, storage=ref.storage, pruner=pruner)
    return optuna.Trial(study, ref.trial_id)


def pruning_callback(
    trial: optuna.Trial, objectives: list[str], score_exact_match: ExactMatchScorer
) -> PruningCallback | None:
    """The callback that gives the pruner the sweep's objective at each evaluation; None, with the
    reason in the log, where the objective is not one a pruner can act on."""
    if len(objectives) > 1:
        log.warning(
            "hydra.sweeper.pruner is not used: Optuna cannot prune a multi-objective study (%s)",
            ", ".join(objectives),
        )
        return None
    if not objectives[0].startswith("eval/"):
        log.warning(
            "hydra.sweeper.pruner is not used: %s is measured at the end of a run, not at its evaluations",
            objectives[0],
        )
        return None
    if objectives[0] == "eval/exact_match":
        total = len(score_exact_match.prompts)
        log.info(
            "the pruner gets eval/exact_match of the first %d of %d eval prompts at each evaluation; "
            "the final eval/exact_match scores all of them",
            min(EXACT_MATCH_PROMPTS_PER_EVALUATION, total),
            total,
        )
    return PruningCallback(trial, objectives[0], score_exact_match)


class PruningCallback(TrainerCallback):
    """Reports `objective` (eval/<metric>) at each evaluation during training and stops training when
    the trial is pruned. The evaluation after training is the run's final result, not a report."""

    def __init__(self, trial: optuna.Trial, objective: str, score_exact_match: ExactMatchScorer):
        self.trial, self.objective, self.score_exact_match = trial, objective, score_exact_match
        self.pruned_at: tuple[int, float] | None = None
        self.training = False
        self.reported_steps: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def value(self, metrics: dict, model) -> float | None:
        """The objective from the Trainer's eval metrics (eval_<name>), which have no perplexity and
        no exact match (that needs generation)."""
        name = self.objective.removeprefix("eval/")
        if name == "perplexity":
            return perplexity(metrics["eval_loss"]) if "eval_loss" in metrics else None
        if name == "exact_match":
            return self.score_exact_match(model, limit=EXACT_MATCH_PROMPTS_PER_EVALUATION)
        return metrics.get(f"eval_{name}")

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not self.training:
            return
        value = self.value(metrics or {}, model)
        if value is None or not math.isfinite(value):
            return
        if state.global_step in self.reported_steps:
            return  # Optuna keeps only the first value of a step, and warns at a second
        self.trial.report(value, state.global_step)
        self.reported_steps.add(state.global_step)
        log.info("step %d: %s=%.4g reported to the pruner", state.global_step, self.objective, value)
        if self.trial.should_prune():
            self.pruned_at = (state.global_step, value)
            control.should_training_stop = True

    def raise_if_pruned(self) -> None:
        if self.pruned_at is not None:
            step, value = self.pruned_at
            raise optuna.TrialPruned(f"pruned at step {step} with {self.objective}={value:.4g}")
