"""The configurations compared on the first objective: mean, interval, difference from the best and its
verdict (lora_lab.stats), written as comparison.md and comparison.csv."""

from __future__ import annotations

import math
from pathlib import Path

from lora_lab import stats
from lora_lab.commands import CONFIRM
from lora_lab.report.tables import SEED, fmt, markdown_table, numeric, write_csv


def comparison_section(groups, names, dirs, target: str, out_dir: Path) -> list[str]:
    """Compare the configurations on the first objective: writes comparison.csv and comparison.md and
    returns the section's Markdown (the table and what it can and cannot tell)."""
    name, direction = names[0], dirs[0]
    values = {c: [r[name] for r in runs if numeric(r.get(name))] for c, runs in groups.items()}
    values = {c: v for c, v in values.items() if v}
    rows = stats.compare(values, direction) if values else []
    floor, df = stats.noise_floor(list(values.values()))
    for i, row in enumerate(rows):  # rows[0] is the best: the others differ from it
        row["below noise floor"] = "yes" if i and abs(row["diff_vs_best"]) < floor else None
    # No interval (a single run) is left blank, not written as nan.
    rows = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows
    ]
    write_csv(out_dir / "comparison.csv", list(stats.COMPARISON_COLUMNS), rows)
    lines = [
        f"Objective {name} ({direction}) per configuration, the runs that share every param but `{SEED}`: "
        f"mean and its {stats.CONFIDENCE:.0%} Student-t interval (ci_low, ci_high); the difference from the "
        f"best configuration and its {stats.CONFIDENCE:.0%} Welch interval (diff_ci_low, diff_ci_high). "
        "Verdict: `worse` where that interval excludes 0, else `within noise`. "
        f"{sum(map(len, values.values()))} completed runs; pruned, failed and unfinished trials have no "
        "final value."
    ]
    if len(names) > 1:
        lines.append(f"Compared on {name} only; the Pareto front weighs the {len(names)} objectives.")
    if not rows:
        lines.append("No completed run to compare.")
    elif len(rows) == 1:
        lines.append("One configuration only: nothing to compare it with, so its verdict is `unconfirmed`.")
    if df:
        lines.append(
            f"Noise floor (the seed-to-seed std of {name}, pooled within the repeated configurations, "
            f"{df} degrees of freedom): {fmt(floor)}. Differences from the best smaller than it are marked "
            "in the column *below noise floor*."
        )
    elif rows:
        lines.append(
            "No configuration was repeated with another seed: the seed-to-seed spread (the noise floor) is "
            "unknown and every difference here is unconfirmed."
        )
    if len(rows) > 1 and any(row["n"] < 2 for row in rows):
        sweep_dir = "<sweep dir>" if "://" in target else target  # confirm reruns a sweep dir's trials
        lines.append(
            "A configuration run once (n = 1) has no interval (blank) and the verdict `unconfirmed`. "
            f"Confirm the top 3 with 5 seeds each: `{CONFIRM.format(target=sweep_dir)}`"
        )
    headers = {c: c for c in stats.COMPARISON_COLUMNS} | (
        {"below noise floor": "below noise floor"} if df else {}
    )
    section = [*(f"{line}\n" for line in lines), markdown_table(headers, rows), ""]
    (out_dir / "comparison.md").write_text("\n".join(["# Comparison", "", *section]))
    return section
