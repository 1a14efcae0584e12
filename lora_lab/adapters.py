"""LoRA adapter: target-module presets per architecture, the PEFT config, and attaching it."""

from __future__ import annotations

import logging
import re

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from lora_lab.config import TARGET_PRESETS, AdapterConfig, ConfigError

log = logging.getLogger(__name__)

# Module names per architecture family. A string is a PEFT regex (full match on the module
# path), used where a bare name is ambiguous (GPT-2's `c_proj` is in attention and MLP).
_LLAMA_STYLE = {
    "qv": ["q_proj", "v_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
_BERT_MLP = r".*\.layer\.\d+\.(intermediate\.dense|output\.dense)"
TARGET_MODULE_PRESETS: dict[str, dict[str, list[str] | str]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
    "gemma": _LLAMA_STYLE,
    "gemma2": _LLAMA_STYLE,
    "phi3": {"qv": ["qkv_proj"], "attn": ["qkv_proj", "o_proj"], "mlp": ["gate_up_proj", "down_proj"]},
    # GPT-2 fuses q, k and v into one Conv1D (`c_attn`), so `qv` can only mean that layer.
    "gpt2": {"qv": ["c_attn"], "attn": r".*\.attn\.(c_attn|c_proj)", "mlp": r".*\.mlp\.(c_fc|c_proj)"},
    "bert": {
        "qv": ["query", "value"],
        "attn": r".*\.attention\.(self\.(query|key|value)|output\.dense)",
        "mlp": _BERT_MLP,
    },
    "deberta-v2": {
        "qv": ["query_proj", "value_proj"],
        "attn": r".*\.attention\.(self\.(query_proj|key_proj|value_proj)|output\.dense)",
        "mlp": _BERT_MLP,
    },
}
# Heads that a classification fine-tune trains in full (PEFT adds `classifier` and `score`
# itself); DeBERTa's pooler is new at fine-tuning time too.
EXTRA_TRAINED_MODULES = {"deberta-v2": ["pooler"]}
# loftq: PEFT leaves the weights alone and lora_lab.loftq sets both A and B.
PEFT_INIT = {"gaussian": "gaussian", "kaiming": True, "pissa": "pissa", "olora": "olora", "loftq": False}


def resolve_target_modules(model: PreTrainedModel, target_modules: list[str] | str) -> list[str] | str:
    """A preset name becomes this architecture's module names; an explicit list is checked."""
    model_type = model.config.model_type
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return "all-linear"
        presets = TARGET_MODULE_PRESETS.get(model_type)
        if presets is None:
            raise ConfigError(
                "adapter.target_modules",
                target_modules,
                f"no presets for model type {model_type!r} (known: {', '.join(TARGET_MODULE_PRESETS)}); "
                "use all-linear or an explicit list of module names",
            )
        return presets[target_modules]
    adaptable = _adaptable_module_names(model)
    suffixes = {name.rsplit(".", 1)[-1] for name in adaptable}
    missing = [
        t
        for t in target_modules
        if t not in suffixes and not any(n == t or n.endswith("." + t) for n in adaptable)
    ]
    if missing:
        raise ConfigError(
            "adapter.target_modules",
            target_modules,
            f"{', '.join(missing)} matches no linear layer of this {model_type} model; "
            f"presets are {', '.join(TARGET_PRESETS)}, layer names are {', '.join(sorted(suffixes))}",
        )
    return list(target_modules)


def _adaptable_module_names(model: torch.nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D))
        or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
    ]


def task_type(kind: str) -> TaskType:
    return TaskType.SEQ_CLS if kind == "seq_cls" else TaskType.CAUSAL_LM


def resolve_layers(
    model: PreTrainedModel, layers: list[int] | str, target_modules: list[str] | str
) -> list[int] | None:
    """adapter.layers as the block indices PEFT adapts (None: every block). middle is the middle half
    of the blocks, top_half the upper (output-side) half."""
    if layers == "all":
        return None
    if isinstance(target_modules, str) and target_modules != "all-linear":  # a regex preset
        raise ConfigError(
            "adapter.layers",
            layers,
            f"PEFT selects layers only for module names, not for the regex of target_modules preset "
            f"{target_modules!r}: use adapter.target_modules=all-linear or a list of names",
        )
    n = model.config.num_hidden_layers
    halves = {
        "bottom_half": list(range(n // 2)),
        "top_half": list(range(n // 2, n)),
        "middle": list(range(n // 4, n - n // 4)),
    }
    indices = halves[layers] if isinstance(layers, str) else layers
    if not indices or max(indices) >= n:
        raise ConfigError("adapter.layers", layers, f"block indices of this model are 0 to {n - 1}")
    return sorted(indices)


def lora_config(model: PreTrainedModel, adapter: AdapterConfig, kind: str) -> LoraConfig:
    target_modules = resolve_target_modules(model, adapter.target_modules)
    layers = resolve_layers(model, adapter.layers, target_modules)
    if layers is not None and target_modules == "all-linear":
        # PEFT takes layers_to_transform with module names only: all-linear's names in the blocks
        target_modules = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name in _adaptable_module_names(model)
                if re.search(r"\.\d+\.", name)
            }
        )
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=target_modules,
        layers_to_transform=layers,
        init_lora_weights=PEFT_INIT[adapter.init],
        use_rslora=adapter.use_rslora,
        use_dora=adapter.use_dora,
        task_type=task_type(kind),
        modules_to_save=EXTRA_TRAINED_MODULES.get(model.config.model_type),
    )


def attach_adapter(model: PreTrainedModel, adapter: AdapterConfig, kind: str) -> PeftModel:
    """Wrap the frozen base model with a trainable LoRA adapter."""
    config = lora_config(model, adapter, kind)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # PEFT's "Target modules ... not found in the base model"
        if "not found in the base model" not in str(e):
            raise
        raise ConfigError(
            "adapter.target_modules",
            adapter.target_modules,
            f"matches no layer of this {model.config.model_type} model",
        ) from None
    keep_trainable_in_fp32(peft_model)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("trainable parameters: %d of %d (%.4f%%)", trainable, total, 100 * trainable / total)
    return peft_model


def keep_trainable_in_fp32(model: PeftModel) -> None:
    """Every trainable parameter in fp32. PEFT upcasts the LoRA weights, but a classifier's new head
    (modules_to_save) is a copy in the base's bf16 or fp16: in bf16 small updates round away, and in
    fp16 the grad scaler refuses its gradients. Autocast runs the head in the compute dtype."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def load_adapter(model: PreTrainedModel, source: str, kind: str, trainable: bool) -> PeftModel:
    """An existing PEFT LoRA adapter (made by lora_lab or anyone) on this base model, checked first."""
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(source)
    except Exception as e:  # a missing dir, a hub id offline, not a PEFT adapter
        raise ConfigError(
            "adapter.init_from", source, f"not a loadable PEFT adapter ({str(e).splitlines()[0]})"
        ) from None
    if config.peft_type != "LORA":
        raise ConfigError(
            "adapter.init_from", source, f"a {config.peft_type} adapter; lora_lab trains LoRA adapters"
        )
    # PEFT would load it and drop (or leave untrained) the classification head it was made with
    if config.task_type is not None and config.task_type != task_type(kind):
        raise ConfigError(
            "adapter.init_from",
            source,
            f"an adapter for task_type {config.task_type}; this run's model.kind={kind} needs {task_type(kind).value}",
        )
    targets = config.target_modules
    if not isinstance(targets, str):  # a regex or all-linear needs no check by name
        try:
            resolve_target_modules(model, sorted(targets))
        except ConfigError as e:
            raise ConfigError(
                "adapter.init_from", source, f"its target modules do not fit this base model: {e.valid}"
            ) from None
    try:
        peft_model = PeftModel.from_pretrained(model, source, is_trainable=trainable)
    except RuntimeError as e:  # size mismatch: made for another base model
        raise ConfigError(
            "adapter.init_from",
            source,
            f"made for another base model ({config.base_model_name_or_path}): {str(e).splitlines()[-1].strip()}",
        ) from None
    keep_trainable_in_fp32(peft_model)
    log.info(
        "adapter from %s (r=%s, alpha=%s, base %s)",
        source,
        config.r,
        config.lora_alpha,
        config.base_model_name_or_path,
    )
    return peft_model
