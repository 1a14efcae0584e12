"""LoRA's parameter efficiency: trainable parameters per target modules, layers and rank, counted by PEFT
on the real architecture built on the meta device."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import replace

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from lora_lab.adapters import lora_config
from lora_lab.config import RunConfig
from lora_lab.errors import ConfigError
from lora_lab.models import build_tiny_model
from lora_lab.report.sources import Job
from lora_lab.validate import validate

RANKS = (1, 2, 4, 8, 16, 32, 64)
EFFICIENCY_COLUMNS = {"target_modules": "target modules", "layers": "layers", "r": "r"}
EFFICIENCY_COLUMNS |= {
    "trainable": "trainable params",
    "base params": "base params",
    "trainable %": "trainable % of all params",  # as params/trainable_pct and the training log
    "reduction": "base params per trainable",
}


def param_efficiency(
    run: RunConfig, target_modules: list, ranks: list[int], layers: list | None = None
) -> tuple[list[dict], str]:
    """Trainable LoRA params per target modules, adapted layers (when the study varies them) and
    rank, counted by PEFT on the real architecture: rows and a heading."""
    path = build_tiny_model(run.model.tiny) if run.model.name_or_path is None else run.model.name_or_path
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=run.model.trust_remote_code)
    except (OSError, ValueError) as e:
        return [], f"Skipped: the config of {path} is not available offline ({str(e).splitlines()[0]})."
    auto = AutoModelForCausalLM
    if run.model.kind == "seq_cls":
        auto, config.num_labels = AutoModelForSequenceClassification, len(run.task.labels)
    rows = []
    for modules, which, r in itertools.product(target_modules, layers or [run.adapter.layers], ranks):
        with torch.device("meta"):  # shapes only: no weight is allocated or loaded
            model = auto.from_config(config, trust_remote_code=run.model.trust_remote_code)
        base = sum(p.numel() for p in model.parameters())
        # The init changes values, not counts (and loftq or pissa cannot run on meta tensors).
        adapter = replace(run.adapter, r=r, target_modules=modules, layers=which, init="gaussian")
        with warnings.catch_warnings():  # transformers' deprecation notices, raised inside PEFT
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, lora_config(model, adapter, run.model.kind))
        trainable, total = peft_model.get_nb_trainable_parameters()
        rows.append({"target_modules": modules, **({"layers": which} if layers else {}), "r": r})
        rows[-1] |= {"trainable": trainable, "base params": base}
        rows[-1] |= {"trainable %": 100 * trainable / total, "reduction": base / trainable}
    arch = type(peft_model.get_base_model()).__name__
    return rows, f"Model `{run.model.name}` ({arch}), {rows[0]['base params']:,} base params."


def efficiency_section(jobs: list[Job], rows: list[dict], params: list[str]) -> tuple[list[dict], str]:
    if not jobs:
        return [], "Skipped: a storage URL names no model; report the sweep dir for this table."
    run, error = None, None
    for job in sorted(jobs, key=lambda j: j.metrics is None):  # a completed job's config was valid
        try:
            run = validate(job.cfg)
            break
        except ConfigError as e:  # e.g. a relative task.train_path, resolved from another cwd
            error = e
    if run is None:
        return [], f"Skipped: no job config validates from here ({error})."
    used = [r["adapter.target_modules"] for r in rows if "adapter.target_modules" in params]
    modules = list(dict.fromkeys(used)) or [run.adapter.target_modules]
    ranks = sorted({*RANKS, *(r["adapter.r"] for r in rows if isinstance(r.get("adapter.r"), int))})
    layers: list = []
    for row in rows if "adapter.layers" in params else []:
        layers += [row["adapter.layers"]] if row["adapter.layers"] not in layers else []
    try:
        return param_efficiency(run, modules, ranks, layers or None)
    except (ConfigError, ValueError, RuntimeError) as e:
        return [], f"Skipped: {str(e).splitlines()[0]}."
