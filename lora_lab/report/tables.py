"""The trials as rows (one per trial, or per job of a plain multirun), grouped into configurations, and
written as Markdown and CSV."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import optuna

from lora_lab.report.sources import Job, failure_from_log

# metrics.json keys reported for every trial, and their Markdown headers (which name the unit).
MEASURES = {
    "params/trainable": "trainable params",
    "params/trainable_pct": "trainable % of all params",
    "memory/peak_gib": "peak memory (GiB)",
    "speed/tokens_per_second": "tokens/s",
    "time/wall_seconds": "wall time (s)",
    "train/gradient_checkpointing": "checkpointing (1 = on)",  # auto may differ between trials
}
SEED = "train.seed"  # runs that differ only in it are repeats of one configuration


def harness_scores(metrics: dict, names: list[str]) -> dict:
    """lm-evaluation-harness scores (harness/<task>/<metric>, baseline_harness/...) that are not the
    objective, without their standard errors."""
    return {
        k: v
        for k, v in metrics.items()
        if k.split("/")[0] in ("harness", "baseline_harness") and "_stderr" not in k and k not in names
    }


def trial_rows(jobs: list[Job], study: optuna.Study | None, names: list[str]) -> tuple[list[str], list[dict]]:
    """One row per trial (per job without a study), and the searched params' names in order."""
    rows = []
    if study is not None:
        by_number = {j.number: j for j in jobs}
        params = list(dict.fromkeys(p for t in study.trials for p in t.params))
        for t in study.trials:
            # The sweeper stores the measurements on the trial (a mean over its seeds): they are there
            # without the job dir (a storage URL, a trial run in another sweep dir).
            metrics = (
                t.user_attrs.get("metrics")
                or (by_number[t.number].metrics if t.number in by_number else None)
                or {}
            )
            row = {"trial": t.number, "state": t.state.name, **t.params}
            if (seed_values := t.user_attrs.get("seed_values")) and t.state.name == "COMPLETE":
                # Keyed by the objectives in order: from a storage URL alone their names are unknown.
                row["seed runs"] = [
                    dict(zip(names, v, strict=True)) for v in zip(*seed_values.values(), strict=True)
                ]
            row |= dict(zip(names, t.values or [None] * len(names), strict=True))
            row |= {k: metrics.get(k) for k in MEASURES if k not in names} | harness_scores(metrics, names)
            if t.state.name == "PRUNED":
                row["pruned at step"] = max(t.intermediate_values, default=None)
            reason = t.user_attrs.get("fail_reason") if t.state.name == "FAIL" else None
            rows.append(row | {"fail reason": reason})
        return params, rows
    # A plain multirun: the searched params are the overrides that differ between jobs.
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    params = [k for k in keys if len({repr(j.overrides.get(k)) for j in jobs}) > 1] or keys
    for job in jobs:
        reason = None if job.metrics else failure_from_log(job)
        state = "COMPLETE" if job.metrics else ("FAIL" if reason else "RUNNING")
        row = {"trial": job.number, "state": state, **{k: job.overrides.get(k) for k in params}}
        row |= {k: (job.metrics or {}).get(k) for k in [*names, *MEASURES] if k not in row}
        row |= harness_scores(job.metrics or {}, names)
        rows.append(row | {"fail reason": reason})
    return params, rows


def config_groups(rows: list[dict], params: list[str]) -> dict[str, list[dict]]:
    """The completed runs of each configuration (the runs that share every param but the seed), by label;
    a trial run with several seeds (hydra.sweeper.seeds) counts each seed's run."""
    keys = [p for p in params if p != SEED]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["state"] == "COMPLETE":
            runs = [row | run for run in row.get("seed runs", [{}])]
            groups.setdefault(", ".join(f"{k}={row.get(k)}" for k in keys) or "all runs", []).extend(runs)
    return groups


def fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and (value.is_integer() or abs(value) >= 1e3):
        return f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")[:160]


def markdown_table(columns: dict[str, str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(fmt(row.get(k)) for k in columns) + " |" for row in rows])


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:  # floats as repr: they read back exactly
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: "" if row.get(k) is None else row[k] for k in columns} for row in rows)


def numeric(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
