"""Report of a sweep, a run or an Optuna study: every trial in a table, the configurations compared across
seeds, plots, LoRA's parameter efficiency.

python -m lora_lab.report multirun/2025-06-01/12-00-00    # a sweep dir (an Optuna study, or a plain grid)
python -m lora_lab.report outputs/2025-06-01/12-00-00     # a single run
python -m lora_lab.report sqlite:///multirun/optuna.db --study lora_tiny_sort --out reports/

Writes report.md, report.csv, comparison.md, comparison.csv, param_efficiency.csv and the plots that apply
to the study's params. Objective values come from the Optuna storage; measurements (memory, speed, time)
from metrics.json; means, intervals and differences from lora_lab.stats.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

from lora_lab.report.comparison import comparison_section
from lora_lab.report.efficiency import EFFICIENCY_COLUMNS, efficiency_section
from lora_lab.report.plots import PLOTS, write_plots
from lora_lab.report.sources import ReportError, load_source, objectives, without_password
from lora_lab.report.tables import (
    MEASURES,
    config_groups,
    harness_scores,
    markdown_table,
    trial_rows,
    write_csv,
)


def report(target: str, study_name: str | None, out: str | None) -> Path:
    jobs, study, storage, default_out = load_source(target, study_name)
    out_dir = Path(out) if out else default_out
    out_dir.mkdir(parents=True, exist_ok=True)
    for png in PLOTS:  # an earlier report's plots that may no longer apply
        (out_dir / f"{png}.png").unlink(missing_ok=True)
    names, dirs = objectives(jobs, study)
    params, rows = trial_rows(jobs, study, names)
    groups = config_groups(rows, params)
    title = f"study {study.study_name}" if study else f"runs in {Path(target).resolve().name}"
    columns = {"trial": "trial", "state": "state", **{p: p for p in params}}
    columns |= {n: n if n.startswith("objective") else f"{n} (objective)" for n in names} | {
        k: v for k, v in MEASURES.items() if k not in names
    }
    columns |= {k: k for r in rows for k in harness_scores(r, names)}
    columns |= {"pruned at step": "pruned at step"} if any("pruned at step" in r for r in rows) else {}
    columns["fail reason"] = "fail reason"
    write_csv(out_dir / "report.csv", list(columns), rows)
    table = markdown_table(columns, rows)
    comparison = comparison_section(groups, names, dirs, target, out_dir)
    figures = write_plots(study, rows, groups, params, names, dirs, title, out_dir)
    eff_rows, eff_note = efficiency_section(jobs, rows, params)
    # the layers column only where the study varies adapter.layers
    eff_columns = {
        k: v for k, v in EFFICIENCY_COLUMNS.items() if k != "layers" or (eff_rows and "layers" in eff_rows[0])
    }
    if eff_rows:
        write_csv(out_dir / "param_efficiency.csv", list(eff_columns), eff_rows)

    states = {s: sum(r["state"] == s for r in rows) for s in dict.fromkeys(r["state"] for r in rows)}
    source = f"`{without_password(target)}`"
    source += f", Optuna storage `{without_password(storage)}`" if storage not in (None, target) else ""
    md = [f"# Report: {title}", "", f"Source: {source}."]
    md += [f"Objective: {', '.join(f'{n} ({d})' for n, d in zip(names, dirs, strict=True))}."]
    md += [f"Trials: {', '.join(f'{n} {s}' for s, n in states.items())}.", "", "## Trials", "", table, ""]
    md += ["## Comparison", "", *comparison]
    md += ["## Figures", "", *(f"{line}\n" for line in figures), "## Parameter efficiency", "", eff_note, ""]
    md += [markdown_table(eff_columns, eff_rows), ""] if eff_rows else []
    (out_dir / "report.md").write_text("\n".join(md))
    print(out_dir / "report.md")
    print(table)
    print("\n".join(["", *comparison]))
    return out_dir / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.report", description=__doc__.splitlines()[0])
    parser.add_argument("target", help="a run dir, a sweep dir, or an Optuna storage URL")
    parser.add_argument("--study", help="the study's name (needed for a storage that holds several)")
    parser.add_argument("--out", help="where to write the report (default: the dir; for a URL, the cwd)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        report(args.target, args.study, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
