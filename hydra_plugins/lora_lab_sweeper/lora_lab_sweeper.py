"""The hydra-optuna-sweeper, extended for training sweeps (select with `hydra/sweeper=lora_lab_optuna`).

What it adds to the stock plugin, without replacing its sweep loop:
- each job gets `optuna_trial.{study_name,storage,trial_id,number}`, so the training loop can report
  to its own trial and ask the pruner (`hydra.sweeper.pruner`, any `optuna.pruners.*`);
- a job that raised `optuna.TrialPruned` ends PRUNED, a job that raised anything else ends FAIL with
  the reason in the trial's user attrs, and the sweep goes on (max_failure_rate defaults to 1.0);
- a SQLite storage path is made absolute and its directory created; job dirs are numbered by trial;
- a new study records what makes its trials comparable: objectives and directions, the sweep's fixed
  overrides, the data files (absolute path, content hash); resuming it with other settings is
  refused in one line naming each difference (exit 2), so trials of two sweeps are never mixed;
- resuming a grid runs each point without a COMPLETE or PRUNED trial once (failed points again),
  and a complete grid runs nothing;
- the sweep dir is locked while the sweep runs: a second sweep started into it is refused (exit 2);
- a sweep whose trials all ended neither COMPLETE nor PRUNED exits 1, with their states in one line;
- each trial keeps a heartbeat in the storage from ask to tell, written by the worker that will
  tell it; at start-up and before each batch, RUNNING trials whose heartbeat is older than
  `grace_period` (their worker was killed or lost the database) are marked FAIL, so workers on one
  study never fail each other's live trials; a trial another worker ended meanwhile is logged, not told;
- a password in the storage URL reaches the jobs as PGPASSWORD (libpq reads it): no override,
  config, log or summary holds it (Hydra's record of the setting shows it masked, user:***@host);
- `hydra.sweeper.seeds=N` runs each sampled configuration N times (train.seed + 0 .. N-1): the trial's
  value is the mean, its per-seed values and their std are user attrs; a failed seed fails the trial;
- each trial keeps its job dirs and its jobs' metrics.json values (mean over seeds) as user attrs, so
  a report from the storage alone has its measurements;
- one progress line per finished trial, trials numbered as Optuna stores them (and as their job dirs
  are named), with the trial's place in this sweep as "k of N", on a resume too;
- at the end, besides the stock `optimization_results.yaml`, `study_summary.yaml` holds the trial
  counts per state, the best configuration (params less train.seed, of the best mean over its runs),
  the command (one line, without a seed) that reruns it as a single run, or one per Pareto-front
  configuration, and whether it beats the runner-up beyond noise (`winner`); with train.seed
  searched, optimization_results.yaml and the closing lines name configurations, never a seed;
- a sweep leaves its process as it found it (signal handlers, Optuna's log level, the dir lock), so an
  app may sweep twice in one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class LoraLabOptunaSweeper(OptunaSweeper):
    def __init__(
        self, heartbeat_interval: int, grace_period: int, seeds: int = 1, pruner: Any = None, **kwargs: Any
    ):
        super().__init__(**kwargs)  # instantiates the sampler
        if pruner:
            # Jobs prune themselves (lora_lab/pruning.py builds the pruner from this config);
            # building it here makes a bad pruner config fail the sweep before any trial runs.
            instantiate(pruner, _execution_whitelist_="optuna.pruners.*")
        from hydra_plugins.lora_lab_sweeper._impl import LoraLabSweeperImpl

        stock = self.sweeper
        self.sweeper = LoraLabSweeperImpl(
            stock.sampler,
            kwargs["direction"],
            stock.storage,
            stock.study_name,
            stock.n_trials,
            stock.n_jobs,
            stock.max_failure_rate,
            kwargs["custom_search_space"],
            stock.params,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            seeds=seeds,
        )


@dataclass
class LoraLabOptunaSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.lora_lab_sweeper.lora_lab_sweeper.LoraLabOptunaSweeper"
    # e.g. {_target_: optuna.pruners.MedianPruner, n_startup_trials: 2}; null: no pruning
    pruner: Any = None
    # Seconds between the heartbeats a worker writes for each trial it runs, and how old the last
    # one may be before any worker marks the trial FAIL (its worker was killed or lost the
    # database). Every worker on one study needs the same values.
    heartbeat_interval: int = 60
    grace_period: int = 600
    max_failure_rate: float = 1.0  # a failing trial fails alone, never the sweep
    n_jobs: int = 1  # trials per batch; they run in parallel only under a parallel launcher (joblib)
    # Runs per sampled configuration, with train.seed = the config's train.seed + 0 .. seeds - 1, in job
    # dirs <trial>_seed<seed>; the trial's value is their mean, the per-seed values and their std
    # are its user attrs seed_values and seed_std. 1: one run per trial, in job dir <trial>.
    seeds: int = 1


ConfigStore.instance().store(
    group="hydra/sweeper", name="lora_lab_optuna", node=LoraLabOptunaSweeperConf, provider="lora_lab"
)
