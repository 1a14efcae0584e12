"""The report's figures: the objective against rank and learning rate, the alpha x rank heatmap, the
objective and memory by quantization, Optuna's param importances and the Pareto front."""

from __future__ import annotations

import math
import statistics
import textwrap
import warnings
from pathlib import Path

import matplotlib
import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.ticker import FuncFormatter, NullFormatter, ScalarFormatter
from optuna.importance import get_param_importances

from lora_lab import stats
from lora_lab.report.tables import SEED, fmt, numeric

UNITS = {"eval/loss": "cross-entropy, nats", "eval/perplexity": "exp(loss)", "params/trainable": "count"}
UNITS |= {"memory/peak_gib": "GiB", "speed/tokens_per_second": "tokens/s", "time/wall_seconds": "s"}
PARAM_LABELS = {
    "adapter.r": "LoRA rank adapter.r (log2 scale)",
    "train.lr": "learning rate train.lr (log scale)",
    "adapter.alpha_multiple": "adapter.alpha_multiple (alpha / r)",
    "adapter.alpha": "LoRA alpha adapter.alpha",
}
STYLES = {"COMPLETE": {"marker": "o", "color": "tab:blue"}, "PRUNED": {"marker": "x", "color": "tab:orange"}}
PLOTS = (
    "objective_vs_rank",
    "objective_vs_lr",
    "alpha_rank_heatmap",
    "objective_memory_by_quant",
    "param_importances",
    "pareto_front",
)
QUANT_ORDER = ("none", "int8", "nf4", "fp4")  # most bits first
RC = {"font.size": 11, "axes.titlesize": 12, "figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3}


def metric_label(name: str, direction: str) -> str:
    unit = UNITS.get(name) or ("fraction" if any(w in name for w in ("accuracy", "f1", "match")) else None)
    better = {"maximize": "↑ better", "minimize": "↓ better"}[direction]
    return f"{name} ({unit}, {better})" if unit else f"{name} ({better})"


def _summaries(groups: dict[str, list[dict]], key: str) -> dict[str, stats.Summary]:
    """Each configuration's summary of one metric, over its runs that report it."""
    values = {c: [r[key] for r in runs if numeric(r.get(key))] for c, runs in groups.items()}
    return {c: stats.summarize(v) for c, v in values.items() if v}


def _error_bars(ax, points: list[tuple[float, stats.Summary]]) -> str:
    """Mean and 95% t-interval of each repeated configuration (a single run has none); returns the note
    for a plot without any."""
    points = [(x, s) for x, s in points if s.n >= 2]
    if not points:
        return "one run per configuration: no error bars, differences unconfirmed (see comparison.md)"
    means = [s.mean for _, s in points]
    low = [s.mean - s.ci_low for _, s in points]
    high = [s.ci_high - s.mean for _, s in points]
    ax.errorbar(
        [x for x, _ in points],
        means,
        yerr=[low, high],
        fmt="D",
        color="black",
        ms=5,
        capsize=5,
        elinewidth=1.2,
        zorder=3,
        label="mean, 95% t-interval over seeds",
    )
    return ""


def outside_canvas(fig: Figure, renderer) -> list[Text]:
    """The figure's texts that reach past its edges (a title cut on the left, say)."""
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return [
        t
        for t in texts
        if not all(fig.bbox.contains(x, y) for x, y in t.get_window_extent(renderer).corners())
    ]


def _fit(fig: Figure, note: Text | None) -> None:
    """Lay the figure out with every text inside it: a text that reaches past an edge is wrapped to
    fewer columns and the layout done again; the note at the bottom keeps its own strip."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    for _ in range(8):
        strip = note.get_window_extent(renderer).y1 / fig.bbox.height + 0.01 if note else 0
        fig.tight_layout(rect=(0, strip, 1, 1))
        outside = outside_canvas(fig, renderer)
        if not outside:
            return
        for text in outside:
            lines = text.get_text().splitlines()
            columns = max(10, int(0.8 * max(map(len, lines))))
            text.set_text("\n".join(textwrap.fill(line, columns) for line in lines))


def _save(fig: Figure, path: Path, rows: list[dict], note: str = "") -> None:
    failed = [str(r["trial"]) for r in rows if r["state"] == "FAIL"]
    if failed:  # listed, not plotted: a failed trial has no value
        note = f"{note}   failed trials, not plotted: {', '.join(failed)}".strip()
    _fit(fig, fig.text(0.01, 0.01, note, fontsize=9) if note else None)
    fig.savefig(path)  # a bare Figure renders with Agg: no pyplot state, no display needed


def plot_vs_param(rows, groups, param, names, dirs, title, path: Path) -> None:
    """Objective(s) against a numeric param: completed trials, pruned ones at their last report, and the
    mean with its interval where a configuration was repeated."""
    base = 2 if param == "adapter.r" else 10
    # Each mean sits right of its runs' points, the configurations sharing an x value side by side.
    at, taken = {}, {}
    for c, runs in groups.items():
        if numeric(x := runs[0][param]):
            taken[x] = taken.get(x, 0) + 1
            at[c] = x * base ** (0.05 * taken[x])
    fig = Figure(figsize=(6.4 * len(names), 4.6))
    note = ""
    for ax, name, direction in zip(fig.subplots(1, len(names), squeeze=False)[0], names, dirs, strict=True):
        for state, style in STYLES.items():
            points = [(r[param], r[name]) for r in rows if r["state"] == state and numeric(r[param], r[name])]
            if points:
                label = state if state == "COMPLETE" else "PRUNED (last reported value)"
                ax.scatter([x for x, _ in points], [y for _, y in points], s=60, label=label, **style)
        note = _error_bars(ax, [(at[c], s) for c, s in _summaries(groups, name).items() if c in at])
        values = sorted({r[param] for r in rows if numeric(r[param]) and r[param] > 0})
        ax.set_xscale("log", base=base)
        if param == "adapter.r":  # ranks are powers of two: label each as a plain number
            ax.set_xticks(values)
            ax.xaxis.set_major_formatter(ScalarFormatter())
        elif values:  # whole decades, labelled at 10^k only: minor labels (2x10^-3, ...) collide
            low, high = math.log10(values[0]), math.log10(values[-1])
            ax.set_xlim(10 ** math.floor(low - 0.05), 10 ** math.ceil(high + 0.05))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(float(v))))
        ax.set(xlabel=PARAM_LABELS.get(param, param), ylabel=metric_label(name, direction))
        ax.set_title(f"{title}\n{name} vs {param}")
        if ax.get_legend_handles_labels()[0]:  # a sweep whose trials all failed has no points
            ax.legend(fontsize=9)
    _save(fig, path, rows, note)


def cell_text(configurations: list[stats.Summary]) -> str:
    """What a heatmap cell says: one configuration's mean, with the half-width of its 95% t-interval
    where its seeds repeated it; for a cell of several settings (another lr, say) their values, as
    they are: an interval over different settings would pass their spread off as noise."""
    if len(configurations) == 1:
        [cell] = configurations
        spread = f" ± {(cell.ci_high - cell.ci_low) / 2:.2g}" if cell.n >= 2 else ""
        return f"{cell.mean:.4g}{spread}\nn={cell.n}"
    values = sorted(c.mean for c in configurations)
    shown = (
        ", ".join(f"{v:.3g}" for v in values) if len(values) <= 3 else f"{values[0]:.3g} .. {values[-1]:.3g}"
    )
    return f"{shown}\n{len(values)} settings"


def plot_heatmap(rows, groups, alpha: str, name: str, direction: str, title: str, path: Path) -> None:
    """Each (alpha, rank) cell coloured by the mean of its configurations' means (cell_text says what
    it holds); cells without a completed trial stay blank."""
    alphas = sorted({r[alpha] for r in rows if numeric(r[alpha])})
    ranks = sorted({r["adapter.r"] for r in rows if numeric(r["adapter.r"])})
    summaries = _summaries(groups, name)
    cells: dict[tuple, list[stats.Summary]] = {}
    for label, runs in groups.items():
        if label in summaries and numeric(runs[0][alpha], runs[0]["adapter.r"]):
            cells.setdefault((runs[0][alpha], runs[0]["adapter.r"]), []).append(summaries[label])
    colour = [
        [statistics.fmean(c.mean for c in cells[a, k]) if (a, k) in cells else math.nan for k in ranks]
        for a in alphas
    ]
    fig = Figure(figsize=(1.3 * len(ranks) + 3.5, 0.8 * len(alphas) + 2.6))
    ax = fig.subplots()
    image = ax.imshow(colour, cmap="viridis", aspect="auto")
    low, high = image.get_clim()
    for i, a in enumerate(alphas):
        for j, k in enumerate(ranks):
            if (a, k) in cells:  # dark text on the bright end of viridis, light text on the dark end
                text_colour = "black" if (colour[i][j] - low) / ((high - low) or 1) > 0.6 else "white"
                ax.text(j, i, cell_text(cells[a, k]), ha="center", va="center", color=text_colour, fontsize=9)
    ax.set_xticks(range(len(ranks)), [str(k) for k in ranks])
    ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set(xlabel="LoRA rank adapter.r", ylabel=PARAM_LABELS[alpha])
    ax.set_title(f"{title}\n{name} per (alpha, rank) cell")
    ax.grid(False)
    fig.colorbar(image, ax=ax, label=metric_label(name, direction))
    note = "one setting: mean ± half-width of its 95% t-interval over seeds; several: their values"
    _save(fig, path, rows, note)


def configuration_means(study: optuna.Study) -> optuna.Study:
    """An in-memory study of one trial per configuration (the COMPLETE trials' params less train.seed),
    valued at its runs' mean: where seeds repeat a configuration, importances then weigh the settings,
    and the seed, which is not one, is not among them."""
    runs: dict[str, tuple[dict, dict, list]] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        params = {k: v for k, v in t.params.items() if k != SEED}
        key = repr(sorted(params.items()))
        runs.setdefault(key, (params, {k: t.distributions[k] for k in params}, []))[2].append(t.values)
    means = optuna.create_study(directions=study.directions)
    for params, distributions, values in runs.values():
        mean = [statistics.fmean(v[i] for v in values) for i in range(len(values[0]))]
        means.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, values=mean))
    return means


def plot_importances(study: optuna.Study, names: list[str], title: str, path: Path) -> str | None:
    """Optuna's param importances per objective, over the configurations' means; returns why they
    were skipped, or None."""
    means = configuration_means(study)
    done = means.trials
    # A param constant over the configurations explains nothing: leave it out.
    searched = dict.fromkeys(p for t in done for p in t.params)
    varying = [p for p in searched if len({repr(t.params.get(p)) for t in done}) > 1]
    if len(done) < 2 or not varying:
        return "param importances need >= 2 completed configurations and a param that varies among them"
    if len(varying) == 1:  # normalised importances sum to 1: a lone param gets 1 whatever the data
        return (
            f"param importances: only {varying[0]} varies, so it would get all the importance by definition"
        )
    fig = Figure(figsize=(6.4 * len(names), 2.7 + 0.7 * len(varying)))
    for i, ax in enumerate(fig.subplots(1, len(names), squeeze=False)[0]):
        with warnings.catch_warnings(record=True) as too_few:  # Optuna warns when trials are too few
            warnings.simplefilter("always")
            imp = get_param_importances(means, params=varying, target=lambda t, i=i: t.values[i])
        ax.bar_label(ax.barh(list(imp)[::-1], list(imp.values())[::-1]), fmt="%.2f", padding=3)
        ax.set(xlim=(0, 1.1), xlabel="importance (normalised: sums to 1)")
        ax.set_title(f"{title}\nparam importances for {names[i]}")
    runs = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    note = f"{len(done)} configurations ({runs} completed trials; each configuration's mean)"
    _save(fig, path, [], note + (": too few, unreliable" if too_few else ""))
    return None


def plot_by_quant(groups, names, dirs, title, path: Path) -> None:
    """The objective and peak memory of each configuration, in order of quant bits: every run, and the mean
    with its interval where a configuration was repeated."""
    bits = {q: i for i, q in enumerate(QUANT_ORDER)}
    order = sorted(groups, key=lambda c: (bits.get(groups[c][0]["quant"], len(bits)), c))
    panels = [(names[0], dirs[0])]
    memory = any(numeric(r.get("memory/peak_gib")) for runs in groups.values() for r in runs)
    panels += [("memory/peak_gib", "minimize")] if memory else []
    fig = Figure(figsize=(max(4.8, 1.3 * len(order) + 2.5) * len(panels), 4.8))
    notes = [] if memory else ["no memory/peak_gib: the jobs' metrics.json are not at hand"]
    for ax, (key, direction) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        points = [(i, r[key]) for i, c in enumerate(order) for r in groups[c] if numeric(r.get(key))]
        ax.scatter(
            [x for x, _ in points], [y for _, y in points], s=40, alpha=0.6, label="run", **STYLES["COMPLETE"]
        )
        summaries = _summaries(groups, key)  # each mean just right of its runs' points
        notes.append(
            _error_bars(ax, [(i + 0.15, summaries[c]) for i, c in enumerate(order) if c in summaries])
        )
        ax.set_xticks(range(len(order)), [c.replace(", ", "\n") for c in order], fontsize=9)
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(float(v))))
        ax.set(xlabel="configuration (as in comparison.md)", ylabel=metric_label(key, direction))
        ax.set_title(f"{title}\n{key} by quantization")
        ax.legend(fontsize=9)
    _save(fig, path, [], "; ".join(dict.fromkeys(n for n in notes if n)))


def plot_pareto(study, rows, names, dirs, title, path: Path) -> None:
    """All completed trials in grey; the non-dominated ones (Optuna's best_trials) joined as a staircase."""
    points: dict[tuple, list[str]] = {}  # trials with equal values share one point and one label
    for t in study.best_trials:
        points.setdefault(tuple(t.values[:2]), []).append(f"#{t.number}")
    front = sorted(points)
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    done = [r for r in rows if r["state"] == "COMPLETE"]
    ax.scatter(
        [r[names[0]] for r in done], [r[names[1]] for r in done], s=50, color="0.65", label="all trials"
    )
    # Each corner of the staircase is the point that its two neighbours dominate.
    step = "steps-pre" if dirs[0] == "maximize" else "steps-post"
    ax.plot([x for x, _ in front], [y for _, y in front], "o-", color="tab:red", ms=8, drawstyle=step)
    ax.lines[-1].set_label("Pareto front")
    for xy in front:
        ax.annotate(", ".join(points[xy]), xy, textcoords="offset points", xytext=(6, 4))
    ax.set(xlabel=metric_label(names[0], dirs[0]), ylabel=metric_label(names[1], dirs[1]))
    ax.set_title(f"{title}: Pareto front of {names[0]} and {names[1]}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(float(v))))
    ax.legend(fontsize=9)
    _save(fig, path, rows)


def write_plots(study, rows, groups, params, names, dirs, title, out: Path) -> list[str]:
    """Draw the plots that the study's params allow; returns Markdown lines (images and skip notes)."""
    lines = []
    with matplotlib.rc_context(RC):
        for param, png in (("adapter.r", "objective_vs_rank"), ("train.lr", "objective_vs_lr")):
            if param in params:
                plot_vs_param(rows, groups, param, names, dirs, title, out / f"{png}.png")
                lines.append(f"![{png}]({png}.png)")
        alpha = next((p for p in ("adapter.alpha_multiple", "adapter.alpha") if p in params), None)
        if alpha and "adapter.r" in params:
            plot_heatmap(rows, groups, alpha, names[0], dirs[0], title, out / "alpha_rank_heatmap.png")
            lines.append("![alpha_rank_heatmap](alpha_rank_heatmap.png)")
        if "quant" in params and groups:
            plot_by_quant(groups, names, dirs, title, out / "objective_memory_by_quant.png")
            lines.append("![objective_memory_by_quant](objective_memory_by_quant.png)")
        skipped = plot_importances(study, names, title, out / "param_importances.png") if study else None
        lines.append(f"Skipped: {skipped}." if skipped else "![param_importances](param_importances.png)")
        if study is not None and len(names) >= 2:
            plot_pareto(study, rows, names, dirs, title, out / "pareto_front.png")
            lines.append("![pareto_front](pareto_front.png)")
    return lines
