"""Repeats of a configuration (hydra.sweeper.seeds): each trial's jobs, one per train.seed, and the
trial's value as the mean over them."""

from __future__ import annotations

import statistics
from typing import Any

from omegaconf import OmegaConf

from lora_lab.commands import key_of
from lora_lab.errors import ConfigError

SEED = "train.seed"


def check_seeds(seeds: int, config: Any, searched: dict[str, Any]) -> None:
    if seeds < 1:  # the config's type makes it an int
        raise ConfigError("hydra.sweeper.seeds", seeds, "an integer >= 1 (runs per sampled configuration)")
    if seeds > 1 and OmegaConf.select(config, SEED, default=None) is None:
        raise ConfigError(
            "hydra.sweeper.seeds",
            seeds,
            f"1 for an app without a {SEED} key (repeats set it): this config has none",
        )
    if seeds > 1 and SEED in searched:
        raise ConfigError(
            "hydra.sweeper.seeds",
            seeds,
            f"1 when {SEED} is searched (hydra.sweeper.seeds sets it): drop one of the two",
        )


def trial_seeds(config: Any, seeds: int) -> list[int | None]:
    """The train.seed values of each trial's jobs: the config's train.seed + 0 .. seeds - 1; one
    job, as the config has it (None for an app without train.seed), without repeats."""
    seed = OmegaConf.select(config, SEED, default=None)
    return [seed] if seeds == 1 else [int(seed) + k for k in range(seeds)]


def seed_job(overrides: tuple, trial_number: int, seed: int, seeds: int) -> tuple:
    """A trial's job for one seed: with repeats, train.seed set and the job dir `<trial>_seed<seed>`
    (the stock `<trial>` otherwise)."""
    if seeds == 1:
        return overrides
    kept = tuple(o for o in overrides if key_of(o) != SEED)
    return (*kept, f"{SEED}={seed}", f"hydra.sweep.subdir={trial_number}_seed{seed}")


def mean_over_seeds(values: list[float]) -> float:
    """The mean, and a value the seeds agree on as it is (a count stays an int)."""
    return values[0] if all(v == values[0] for v in values) else statistics.fmean(values)


def fold_seed_values(values: list[list[float]], names: list[str], seeds: list[int]) -> tuple[list, dict]:
    """Each objective's mean over the seeds' jobs (values: one list of objectives per job), and the
    trial's user attrs that keep the seeds, each objective's per-seed values and their std."""
    means = [statistics.fmean(float(v[i]) for v in values) for i in range(len(names))]
    per_seed = {n: [float(v[i]) for v in values] for i, n in enumerate(names)}
    attrs = {"seeds": seeds, "seed_values": per_seed}
    return means, attrs | {"seed_std": {n: statistics.stdev(per_seed[n]) for n in names}}
