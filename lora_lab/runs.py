"""A finished run reloaded from its run dir (composed config, data record, adapter), for export and
generation."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from peft import PeftModel

from lora_lab.config import RunConfig
from lora_lab.errors import ConfigError
from lora_lab.loftq import loftq_recipe, prepare_quantized_adapter
from lora_lab.models import load_model, resolve_device
from lora_lab.tasks import read_record
from lora_lab.validate import validate


def _as_launched(cfg, hydra_yaml: Path):
    """The saved config with data paths made absolute against the directory the run was launched
    from (Hydra records it), so a run can be reloaded from anywhere; resuming is not reloading."""
    if hydra_yaml.exists():
        launch_dir = Path(OmegaConf.load(hydra_yaml).hydra.runtime.cwd)
        for key in ("train_path", "eval_path"):
            value = cfg.task.get(key)
            if value and not Path(value).is_absolute():
                cfg.task[key] = str(launch_dir / value)
    cfg.train.resume = False
    return cfg


def load_run(run_dir: Path, device: str = "auto") -> tuple[PeftModel, object, RunConfig]:
    """The run's base model (quantized as it trained, with LoftQ's backbone where it ran) and its adapter."""
    config_path, adapter_dir = run_dir / ".hydra" / "config.yaml", run_dir / "adapter"
    if not config_path.exists() or not adapter_dir.is_dir():
        raise ConfigError(
            "run_dir", str(run_dir), "a finished run's directory, holding .hydra/config.yaml and adapter/"
        )
    run = validate(_as_launched(OmegaConf.load(config_path), run_dir / ".hydra" / "hydra.yaml"))
    recorded = read_record(run_dir)
    if recorded is not None:  # what the data decided when the run trained: the head's labels
        run.task.labels, run.task.format = recorded["labels"], recorded["format"]
    base, tokenizer = load_model(run.model, run.quant, run.task.labels, resolve_device(device))
    model = PeftModel.from_pretrained(base, adapter_dir)
    # LoftQ trained against its own Q, not plain quantize(W): put that backbone back.
    loftq = loftq_recipe(run.adapter, run.quant, adapter_dir)
    prepare_quantized_adapter(model, run.model, run.quant, loftq, fit_adapter=False, report=False)
    model.eval()
    return model, tokenizer, run
