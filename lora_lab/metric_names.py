"""Which metrics a run can report and a sweep can optimise, by name: checked with the config, before
torch or any model is loaded. The metrics themselves are computed in lora_lab/metrics.py."""

from __future__ import annotations

from lora_lab.config import HarnessConfig
from lora_lab.errors import ConfigError

DERIVED_METRICS = ("perplexity",)
FINAL_METRICS = ("exact_match",)
# Measurements of the run that a (multi-objective) sweep may optimise besides eval metrics.
RUN_MEASURES = ("params/trainable", "memory/peak_gib", "speed/tokens_per_second", "time/wall_seconds")


def step_metrics(kind: str, labels: list[str]) -> dict[str, tuple[str, dict]]:
    """The metrics of the Trainer's eval loop, by name: (metric module, its compute arguments).
    Binary F1 depends on which label is positive, so its name says it: f1_<label>, for two labels;
    f1_macro is the mean of every label's F1, for any number of them."""
    if kind == "causal_lm":
        return {"token_accuracy": ("accuracy", {})}
    binary = (
        {f"f1_{label}": ("f1", {"average": "binary", "pos_label": i}) for i, label in enumerate(labels)}
        if len(labels) == 2
        else {}
    )
    return {"accuracy": ("accuracy", {}), **binary, "f1_macro": ("f1", {"average": "macro"})}


def check_metric_names(kind: str, names: list[str], primary: str, labels: list[str]) -> None:
    valid = (*step_metrics(kind, labels), *(DERIVED_METRICS + FINAL_METRICS if kind == "causal_lm" else ()))
    for name in names:
        if name not in valid:
            raise ConfigError(
                "task.metrics", names, f"{name!r} is not available for {kind}; valid: {', '.join(valid)}"
            )
    if primary != "loss" and primary not in names:
        raise ConfigError("task.metric", primary, f"must be loss or one of task.metrics ({', '.join(names)})")


def objective_names(
    optimized_metric: str | list[str], task_metrics: list[str], harness: HarnessConfig
) -> list[str]:
    """The metrics a sweep optimises; checked before anything is trained. lm-eval's metric names are
    known only once it has scored (`check_reported` checks them then), and a group's tasks report
    under their own names: with harness.tasks, any harness/<task>/<metric> passes here (and
    baseline_harness/<task>/<metric> with harness.baseline)."""
    names = [optimized_metric] if isinstance(optimized_metric, str) else list(optimized_metric)
    available = {"eval/loss", *(f"eval/{m}" for m in task_metrics), *RUN_MEASURES}
    scored = ["harness", *(["baseline_harness"] if harness.baseline else [])] if harness.tasks else []
    unknown = [
        n for n in names if n not in available and not (n.split("/")[0] in scored and n.count("/") == 2)
    ]
    if not names or unknown:
        reports = ", ".join([*sorted(available), *(f"{prefix}/<task>/<metric>" for prefix in scored)])
        hint = "" if scored else " (harness/<task>/<metric> needs harness.tasks)"
        raise ConfigError("optimized_metric", optimized_metric, f"this run reports {reports}{hint}")
    return names


def check_reported(objectives: list[str], metrics: dict[str, float]) -> None:
    """After the run: each objective is among its metrics (a harness metric named as lm-eval did not
    report it fails here, once the run's outputs are written)."""
    missing = [name for name in objectives if name not in metrics]
    if missing:
        scored = sorted(k for k in metrics if k.startswith(("harness/", "baseline_harness/")))
        raise ConfigError(
            "optimized_metric", missing[0], f"lm-eval reported {', '.join(scored) or 'no metrics'}"
        )
