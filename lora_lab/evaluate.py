"""Score a finished run with lm-evaluation-harness and add the scores to its metrics.json.

python -m lora_lab.evaluate outputs/2026-12-01/10-00-00-000000 harness.tasks=[arc_easy] harness.limit=200
python -m lora_lab.evaluate <run dir> harness.include_path=my_tasks harness.tasks=[my_task]

The harness.* settings default to those the run trained with. An adapter.init_from run with
train.max_steps=0 is a finished run too: this scores an existing adapter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_lab.config import HarnessConfig
from lora_lab.errors import ConfigError, exit_on_config_error
from lora_lab.validate import check_harness


def harness_settings(run_dir: Path, overrides: list[str]) -> HarnessConfig:
    """The run's harness settings with the command line's harness.* overrides, checked before the
    model loads."""
    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.exists():
        raise ConfigError("run_dir", str(run_dir), "a finished run's directory, holding .hydra/config.yaml")
    for override in overrides:
        key, equals, value = override.partition("=")
        if not (key.startswith("harness.") and equals):
            raise ConfigError(key, value, "only harness.<key>=<value> settings apply to a finished run")
    saved = OmegaConf.load(config_path)
    given = None
    try:
        given = OmegaConf.from_dotlist([o.removeprefix("harness.") for o in overrides])
        # a run trained with harness.baseline has its baseline scores already: not asked again
        trained_with = OmegaConf.merge(saved.get("harness") or {}, {"baseline": False})
        merged = OmegaConf.merge(OmegaConf.structured(HarnessConfig), trained_with, given)
        harness: HarnessConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = f"harness.{e.full_key}" if e.full_key else "harness"
        value = OmegaConf.select(given, e.full_key) if given is not None and e.full_key else None
        raise ConfigError(key, value, str(e).splitlines()[0]) from None
    if not harness.tasks:
        raise ConfigError("harness.tasks", [], "name the tasks to score, e.g. harness.tasks=[arc_easy]")
    if harness.baseline:
        raise ConfigError(
            "harness.baseline",
            True,
            "the untrained adapter exists only while training: set it for the training run",
        )
    check_harness(harness, saved.model.kind)
    return harness


def add_to_metrics(run_dir: Path, scores: dict[str, float]) -> dict[str, float]:
    """metrics.json with `scores` added (replacing earlier scores of the same names), rewritten
    whole or not at all."""
    from lora_lab.pipeline import write_json

    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics |= scores
    write_json(path, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lora_lab.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "overrides", nargs="*", help="harness.<key>=<value> (conf/harness/none.yaml lists them)"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    with exit_on_config_error():
        settings = harness_settings(args.run_dir, args.overrides)
        from lora_lab.harness import Harness  # torch and lm-eval load after the checks
        from lora_lab.runs import load_run

        harness = Harness(settings)
        model, tokenizer, _ = load_run(args.run_dir, args.device)
        scores = harness.score(model, tokenizer)
    add_to_metrics(args.run_dir, scores)
    for name, value in scores.items():
        print(f"{name}\t{value:.4f}")
    print(f"added to {args.run_dir / 'metrics.json'}")


if __name__ == "__main__":
    main()
