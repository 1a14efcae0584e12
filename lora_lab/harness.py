"""EleutherAI's lm-evaluation-harness on the model in memory: the benchmark scores papers report.

The PEFT model is handed to lm-eval as it is (a 4-bit base included): no reload, no merge.
`pip install 'lora_lab[harness]'` installs lm-eval.

Names: lm-eval reports each task's metrics as `<metric>,<filter>` (`exact_match,strict-match`,
`acc,none`); lora_lab names them `harness/<task>/<metric>_<filter>`, leaving out the filter `none`
(no filter): harness/gsm8k/exact_match_strict-match, harness/arc_easy/acc, harness/arc_easy/acc_norm.
Standard errors keep lm-eval's name for them the same way: harness/arc_easy/acc_stderr,
harness/gsm8k/exact_match_stderr_strict-match.
"""

from __future__ import annotations

import contextlib
import logging
import random

import numpy as np
import torch

from lora_lab.config import HarnessConfig
from lora_lab.errors import ConfigError

log = logging.getLogger("lora_lab")
# Draws for the standard error of metrics without a closed form (BLEU, F1, ...): lm-eval's CLI
# default of 100,000 takes minutes per such metric on CPU; a thousand give error bars within a few
# percent. Means (accuracy, exact match) have a closed form and take no draws.
BOOTSTRAP_ITERS = 1000


def metric_key(prefix: str, task: str, name: str) -> str:
    """harness/<task>/<metric>_<filter>, without a comma: `acc,none` -> acc,
    `exact_match,strict-match` -> exact_match_strict-match."""
    metric, _, filter_name = name.partition(",")
    return f"{prefix}/{task}/{metric}" + (f"_{filter_name}" if filter_name not in ("", "none") else "")


def named_results(results: dict[str, dict], prefix: str = "harness") -> dict[str, float]:
    """lm-eval's results["results"] (per task or group: metric -> value, with an alias and "N/A"
    where no standard error was computed) as flat metrics."""
    return {
        metric_key(prefix, task, name): float(value)
        for task, row in results.items()
        for name, value in row.items()
        if "," in name and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def task_manager(harness: HarnessConfig):
    """lm-eval's task index. Indexing its own ~14,000 task configs takes about 15 s: tasks that are
    all in harness.include_path are found in an index of that folder alone (a group of the user's
    that names lm-eval's tasks is not: name those tasks in harness.tasks too)."""
    from lm_eval.tasks import TaskManager

    if harness.include_path is not None:
        own = TaskManager(include_path=harness.include_path, include_defaults=False)
        if set(harness.tasks) <= set(own.all_tasks):
            return own
    return TaskManager(include_path=harness.include_path)


def load_tasks(harness: HarnessConfig, manager) -> list:
    """The requested tasks, groups and tags as lm-eval objects, each loaded on its own so that a
    failure names its task: an unknown name, or a dataset that cannot be had (offline)."""
    loaded = []
    for name in harness.tasks:
        try:
            found = manager.load([name])
        except KeyError:
            raise ConfigError(
                "harness.tasks",
                list(harness.tasks),
                f"{name!r} is neither an lm-eval task nor one in harness.include_path="
                f"{harness.include_path} (python -m lm_eval ls tasks lists lm-eval's)",
            ) from None
        except (
            ConnectionError,
            FileNotFoundError,
        ) as e:  # what datasets raises offline or for a missing file
            raise ConfigError(
                "harness.tasks",
                list(harness.tasks),
                f"task {name!r} needs a dataset that is not available here ({str(e).splitlines()[0]}); "
                "download it while online, or write the task over local files in a folder of task "
                "YAMLs given as harness.include_path",
            ) from None
        group = found.get("groups", {}).get(name)
        loaded += [group] if group is not None else list(found["tasks"].values())
    return loaded


@contextlib.contextmanager
def random_state_kept():
    """lm-eval seeds Python's, NumPy's and torch's generators as its CLI does (so its scores are
    reproducible); the caller's streams continue afterwards as if it had not run, so that a baseline
    scored before training leaves the training as it would be without it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class Harness:
    """harness.tasks, loaded when a run starts (so that a missing dataset or an unknown name fails it
    before training), and scored on a model as often as asked (the untrained adapter, the trained)."""

    def __init__(self, settings: HarnessConfig):
        self.settings = settings
        self.manager = task_manager(settings)
        self.tasks = load_tasks(settings, self.manager)

    def score(self, model, tokenizer, prefix: str = "harness") -> dict[str, float]:
        """The model in memory on every task: `prefix`/<task>/<metric> -> value."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        was_training = model.training
        try:
            with random_state_kept():
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.settings.batch_size)
                results = simple_evaluate(
                    model=lm,
                    tasks=self.tasks,
                    task_manager=self.manager,
                    num_fewshot=self.settings.num_fewshot,
                    limit=self.settings.limit,
                    bootstrap_iters=BOOTSTRAP_ITERS,
                    log_samples=False,
                )
        finally:
            model.train(was_training)  # HFLM puts the model in eval mode
        metrics = named_results(results["results"], prefix)
        log.info(
            "%s: %s", prefix, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "_stderr" not in k)
        )
        return metrics
